"""An async micro-batcher with a bounded queue.

Concurrent requests ``submit(key, payload)``; one worker task takes the oldest request,
waits up to ``max_wait_ms`` for up to ``max_batch - 1`` more with the same ``key`` (the
same kind of work, e.g. "text" encodes, or searches sharing collection/k/filters), and runs
``run_batch(key, payloads) -> results`` once in a single worker thread. A request whose
caller went away (its deadline passed, the client cancelled) is dropped before the batch
runs, so expired work costs nothing. More than ``max_queue`` waiting requests make
``submit`` raise ``QueueFull`` at once: the servicer answers RESOURCE_EXHAUSTED instead of
letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .config import BatchConfig


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
    """

    def __init__(self, name: str, run_batch: Callable[[Hashable, list], Sequence[Any]],
                 config: BatchConfig, executor: ThreadPoolExecutor,
                 on_batch: Callable[[str, int, float], None] | None = None) -> None:
        self.name, self.run_batch, self.config = name, run_batch, config
        self.executor, self.on_batch = executor, on_batch
        self._pending: collections.deque = collections.deque()
        self._wake = asyncio.Event()
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
        self._wake.set()
        return await fut

    async def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _worker(self) -> None:
        while True:
            while not self._pending:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
            key = self._pending[0][0]
            deadline = time.monotonic() + self.config.max_wait_ms / 1000.0
            while (sum(1 for k, _, _ in self._pending if k == key) < self.config.max_batch
                   and time.monotonic() < deadline and not self._closed):
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), deadline - time.monotonic())
                except asyncio.TimeoutError:
                    break
            batch, rest = [], collections.deque()
            while self._pending:
                item = self._pending.popleft()
                if item[0] == key and len(batch) < self.config.max_batch:
                    batch.append(item)
                else:
                    rest.append(item)
            self._pending.extendleft(reversed(rest))
            live = [(p, f) for _, p, f in batch if not f.done()]  # cancelled: caller gone
            if live:
                await self._run(key, live)

    async def _run(self, key: Hashable, live: list) -> None:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(
                self.executor, self.run_batch, key, [p for p, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"{self.name} batch returned {len(results)} results "
                                   f"for {len(live)} requests")
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
            results = [exc] * len(live)
        for (_, fut), res in zip(live, results):
            if fut.done():
                continue
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)
        if self.on_batch is not None:
            self.on_batch(self.name, len(live), time.perf_counter() - t0)
