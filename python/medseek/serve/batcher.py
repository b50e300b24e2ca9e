"""An async micro-batcher with a bounded queue.

Concurrent requests ``submit(key, payload)``; one worker task takes the oldest request,
waits up to ``max_wait_ms`` for up to ``max_batch - 1`` more with the same ``key`` (the
same kind of work, e.g. "text" encodes, or searches sharing collection/k/filters), and runs
``run_batch(key, payloads) -> results`` once in a single worker thread. With a ``finish``
step the batch runs in two: ``run_batch`` (e.g. the ANN search, on the index thread) hands
its output to ``finish(key, payloads, output) -> results`` on another pool (e.g. store
reads and ranking, on reader threads), and the worker forms the next batch as soon as
``run_batch`` returns; at most ``max_finishing`` batches are between the two. Without it,
up to ``max_running`` batches run at once (one per thread of the executor, e.g. an encode
lane's workers); the next batch is formed when one ends. A batch smaller than the
company it expects (the largest of the recent batches, or the requests of its key queued
plus those in flight, i.e. taken into a batch and not yet answered: under a steady load
those callers send again once answered) waits for it up to ``BatchConfig.linger`` times
the last ``run_batch`` time; on callers in flight, only until ``RETURN_GRACE_S`` after
they are all answered. The worker is woken only when a request can end its wait (a
full batch, the expected company), not once per request. A request whose
caller went away (its deadline passed, the client cancelled) is dropped before the batch
runs, so expired work costs nothing. More than ``max_queue`` waiting requests make
``submit`` raise ``QueueFull`` at once: the servicer answers RESOURCE_EXHAUSTED instead of
letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .config import BatchConfig

log = logging.getLogger(__name__)

#: how long a batch waiting for answered callers to send again still waits for them (a
#: closed-loop client sends within a few ms; an open-loop one never does)
RETURN_GRACE_S = 0.005


def _guarded(fn, *args):
    """``fn(*args)`` with ``StopIteration`` turned into ``RuntimeError``: an executor future
    holding ``StopIteration`` never resolves its asyncio twin (asyncio refuses it)."""
    try:
        return fn(*args)
    except StopIteration as exc:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)!s} raised StopIteration") from exc


class QueueFull(Exception):
    """The batcher's bounded queue holds ``max_queue`` requests already."""


class MicroBatcher:
    """See the module docstring.

    Parameters
    ----------
    name : str
        For metrics and messages ("encode", "search").
    run_batch : callable
        ``run_batch(key, payloads) -> sequence of results`` (same length), or an exception
        instance per position; runs in ``executor``. An exception it raises fails every
        request of the batch with that exception.
    config : BatchConfig
    executor : ThreadPoolExecutor
    on_batch : callable, optional
        ``on_batch(name, size, seconds)`` after each batch (metrics).
    finish : callable, optional
        ``finish(key, payloads, output) -> results``: the second step (module docstring);
        runs in ``finish_executor``. Without it ``run_batch`` returns the results.
    finish_executor : ThreadPoolExecutor, optional
        Required with ``finish``.
    max_finishing : int
        Most batches handed to ``finish`` and not yet done; the worker waits for one to
        end before starting another ``run_batch`` past that (back-pressure).
    max_running : int
        Without ``finish``: most batches in ``run_batch`` at once (give ``executor`` as
        many threads); 1 runs them one after another.
    """

    def __init__(self, name: str, run_batch: Callable[[Hashable, list], Any],
                 config: BatchConfig, executor: ThreadPoolExecutor,
                 on_batch: Callable[[str, int, float], None] | None = None, *,
                 finish: Callable[[Hashable, list, Any], Sequence[Any]] | None = None,
                 finish_executor: ThreadPoolExecutor | None = None,
                 max_finishing: int = 2, max_running: int = 1) -> None:
        if (finish is None) != (finish_executor is None):
            raise ValueError("finish and finish_executor must be given together")
        if max_finishing < 1:
            raise ValueError(f"max_finishing must be >= 1, got {max_finishing}")
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        if finish is not None and max_running != 1:
            raise ValueError("max_running is for a batcher without finish (max_finishing)")
        self.name, self.run_batch, self.config = name, run_batch, config
        self.executor, self.on_batch = executor, on_batch
        self.finish, self.finish_executor = finish, finish_executor
        self._finishing = asyncio.Semaphore(max_finishing)
        # several batches at once: each runs as a task holding a slot
        self._running = asyncio.Semaphore(max_running) if max_running > 1 else None
        self._finish_tasks: set[asyncio.Task] = set()
        self._pending: collections.deque = collections.deque()
        self._counts: collections.Counter = collections.Counter()  # pending per key
        self._recent: collections.deque = collections.deque(maxlen=8)  # last batch sizes
        self._last_run_s = 0.0  # how long the last run_batch took
        self._in_flight = 0  # requests taken into a batch and not yet answered
        self._answered_at = 0.0  # loop time of the last answer
        # the worker's wait: resolved by the submit that brings ``_need`` = (key, count)
        # requests of that key (any submit when ``_need`` is None), by its timer, or close
        self._waiter: asyncio.Future | None = None
        self._need: tuple[Hashable, int] | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def depth(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._worker(),
                                                                 name=f"batcher-{self.name}")

    async def submit(self, key: Hashable, payload: Any) -> Any:
        """Queue one request and wait for its result (raises what its batch raised)."""
        if self._closed:
            raise RuntimeError(f"{self.name} batcher is closed")
        if len(self._pending) >= self.config.max_queue:
            raise QueueFull(f"{self.name} queue is full ({self.config.max_queue} waiting)")
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((key, payload, fut))
        self._counts[key] += 1
        # wake the worker only when this request can end its wait (one wake per batch,
        # not one per request while a batch gathers)
        need = self._need
        if need is None or (key == need[0] and self._counts[key] >= need[1]):
            self._wake()
        return await fut

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, need: tuple[Hashable, int] | None, until: float | None) -> None:
        """Until ``need`` (see ``_waiter``) is met, loop time ``until`` passes, or close."""
        loop = asyncio.get_running_loop()
        self._waiter, self._need = loop.create_future(), need
        timer = None if until is None else loop.call_at(until, self._wake)
        try:
            await self._waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = self._need = None

    async def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        self._closed = True
        self._wake()
        if self._task is not None:
            await self._task
            self._task = None
        while self._finish_tasks:
            await asyncio.gather(*self._finish_tasks)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                if self._closed:
                    return
                await self._wait(None, None)
            if self.finish is not None:  # a finishing slot first: the batch grows meanwhile
                await self._finishing.acquire()
            elif self._running is not None:  # likewise a running slot
                await self._running.acquire()
            key = self._pending[0][0]
            now = loop.time()
            deadline = now + self.config.max_wait_ms / 1000.0
            # a batch smaller than the recent ones may wait longer: its company is likely
            # on the way (e.g. the callers of the batch that has just been answered)
            linger = max(deadline, now + self.config.linger * self._last_run_s)
            most = self.config.max_batch
            # company expected: as many as the recent batches held, or as are queued for
            # this key and in flight now (callers that may well send again once answered)
            recent = max(self._recent, default=1)
            expected = min(max(recent, self._counts[key] + self._in_flight), most)
            # waiting on callers in flight: once all are answered, only RETURN_GRACE_S more
            # (an open-loop caller does not send again; a slow index must not hold it)
            on_in_flight = expected > recent
            while not self._closed:
                n = self._counts[key]
                until = deadline if n >= expected else linger
                if on_in_flight and not self._in_flight and n < expected:
                    until = min(until, max(deadline, self._answered_at + RETURN_GRACE_S))
                if n >= most or loop.time() >= until:
                    break
                await self._wait((key, most if n >= expected else expected), until)
            batch, rest = [], collections.deque()
            while self._pending:
                item = self._pending.popleft()
                if item[0] == key and len(batch) < most:
                    batch.append(item)
                else:
                    rest.append(item)
            self._pending.extendleft(reversed(rest))
            self._counts[key] -= len(batch)
            if not self._counts[key]:
                del self._counts[key]
            live = [(p, f) for _, p, f in batch if not f.done()]  # cancelled: caller gone
            if live and self._running is not None:
                task = asyncio.get_running_loop().create_task(self._run_in_slot(key, live))
                self._finish_tasks.add(task)
                task.add_done_callback(self._finish_tasks.discard)
            elif live:
                await self._run(key, live)
            elif self.finish is not None:
                self._finishing.release()
            elif self._running is not None:
                self._running.release()

    async def _run_in_slot(self, key: Hashable, live: list) -> None:
        try:
            await self._run(key, live)
        finally:
            self._running.release()

    async def _run(self, key: Hashable, live: list) -> None:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        payloads = [p for p, _ in live]  # with finish: holds a slot, released once finished
        self._recent.append(len(live))
        self._in_flight += len(live)
        try:
            output = await loop.run_in_executor(self.executor, _guarded, self.run_batch, key,
                                                payloads)
            self._last_run_s = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
            if self.finish is not None:
                self._finishing.release()
            self._deliver(live, [exc] * len(live), t0)
            return
        if self.finish is None:
            self._deliver(live, output, t0)
            return
        task = loop.create_task(self._finish(key, live, payloads, output, t0))
        self._finish_tasks.add(task)
        task.add_done_callback(self._finish_tasks.discard)

    async def _finish(self, key: Hashable, live: list, payloads: list, output: Any,
                      t0: float) -> None:
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.finish_executor, _guarded, self.finish, key, payloads, output)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
            results = [exc] * len(live)
        finally:
            self._finishing.release()
        self._deliver(live, results, t0)

    def _deliver(self, live: list, results: Sequence[Any], t0: float) -> None:
        self._in_flight -= len(live)
        self._answered_at = asyncio.get_running_loop().time()
        if not self._in_flight and self._need is not None:
            self._wake()  # a wait on callers in flight now ends RETURN_GRACE_S from here
        n = len(results) if hasattr(results, "__len__") else None
        if n != len(live):
            results = [RuntimeError(f"{self.name} batch returned {n} results for "
                                    f"{len(live)} requests")] * len(live)
        for (_, fut), res in zip(live, results):
            if fut.done():
                continue
            if isinstance(res, StopIteration):  # asyncio refuses it as a future's exception
                res = RuntimeError(f"{self.name} batch raised StopIteration: {res!r}")
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)
        if self.on_batch is not None:
            try:
                self.on_batch(self.name, len(live), time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - a metrics hook must not stop the batcher
                log.exception("%s batcher: on_batch hook failed", self.name)
