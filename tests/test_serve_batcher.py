"""The async micro-batcher: batch sizes, grouping by key, dropped cancelled requests,
the bounded queue, failures handed to every caller; the two-step form (``finish`` on
another pool) and ``linger``."""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from medseek.serve.batcher import MicroBatcher, QueueFull
from medseek.serve.config import BatchConfig


def _run(coro_fn, config: BatchConfig, run_batch):
    async def main():
        with ThreadPoolExecutor(1) as pool:
            b = MicroBatcher("t", run_batch, config, pool)
            b.start()
            try:
                return await coro_fn(b)
            finally:
                await b.close()
    return asyncio.run(main())


def test_batches_up_to_max_batch_and_keeps_each_callers_result():
    calls = []

    def square(key, xs):
        calls.append((key, list(xs)))
        return [x * x for x in xs]

    async def go(b):
        return await asyncio.gather(*(b.submit("k", i) for i in range(10)))

    out = _run(go, BatchConfig(max_batch=4, max_wait_ms=50.0, max_queue=100), square)
    assert out == [i * i for i in range(10)]
    assert [len(xs) for _, xs in calls] == [4, 4, 2]
    assert [x for _, xs in calls for x in xs] == list(range(10))  # first come, first served


def test_keys_are_never_merged():
    calls = []

    def ident(key, xs):
        calls.append((key, list(xs)))
        return list(xs)

    async def go(b):
        return await asyncio.gather(*(b.submit("ab"[i % 2], i) for i in range(6)))

    assert _run(go, BatchConfig(max_batch=8, max_wait_ms=50.0), ident) == list(range(6))
    assert sorted(calls) == [("a", [0, 2, 4]), ("b", [1, 3, 5])]


# The batching windows below are a minute long, so they never close on their own while a
# test runs, however slow the machine: a batch closes because it is full, or at close().
LONG_WAIT_MS = 60_000.0


def test_cancelled_requests_are_dropped_before_the_batch_runs():
    seen = []

    def ident(key, xs):
        seen.extend(xs)
        return list(xs)

    async def go(b):
        doomed = asyncio.ensure_future(b.submit("k", "gone"))
        kept = asyncio.ensure_future(b.submit("k", "kept"))
        await asyncio.sleep(0)
        doomed.cancel()  # e.g. the client's deadline passed while it waited
        await asyncio.sleep(0)
        last = asyncio.ensure_future(b.submit("k", "last"))  # the third fills the batch
        return await asyncio.gather(kept, last)

    assert _run(go, BatchConfig(max_batch=3, max_wait_ms=LONG_WAIT_MS), ident) == [
        "kept", "last"]
    assert seen == ["kept", "last"]


def test_full_queue_refuses_at_once():
    async def go(b):
        first = asyncio.ensure_future(b.submit("k", 1))
        second = asyncio.ensure_future(b.submit("k", 2))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="2 waiting"):
            await b.submit("k", 3)
        await b.close()  # ends the open window: the two queued run as one batch
        return await asyncio.gather(first, second)

    assert _run(go, BatchConfig(max_wait_ms=LONG_WAIT_MS, max_queue=2),
                lambda k, xs: xs) == [1, 2]


def test_a_failing_batch_fails_each_caller_and_the_batcher_goes_on():
    def picky(key, xs):
        if key == "bad":
            raise ValueError("bad batch")
        return [-x for x in xs]

    async def go(b):
        bad = await asyncio.gather(b.submit("bad", 1), b.submit("bad", 2),
                                   return_exceptions=True)
        return bad, await b.submit("good", 3)

    bad, good = _run(go, BatchConfig(max_wait_ms=10.0), picky)
    assert [str(e) for e in bad] == ["bad batch", "bad batch"] and good == -3


# -- the two-step batcher (run_batch on one pool, finish on another), linger ----------------

class Gate:
    """A ``run_batch`` (or ``finish``) that holds its first ``hold`` calls until the test
    lets each go, so that requests queue up behind it deterministically."""

    def __init__(self, fn, hold: int = 0) -> None:
        self.fn, self.hold = fn, hold
        self.started: queue.Queue = queue.Queue()
        self.go: queue.Queue = queue.Queue()
        self.calls: list = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()  # finish runs on two threads

    def __call__(self, *args):
        with self._lock:
            self.calls.append(args)
            self.threads.add(threading.current_thread().name)
            n = len(self.calls)
        self.started.put(n)
        if n <= self.hold:
            assert self.go.get(timeout=10), "the test never released this call"
        return self.fn(*args)

    async def wait_started(self) -> int:
        return await asyncio.to_thread(self.started.get, True, 10)

    def release(self) -> None:
        self.go.put(True)


def _run_two_step(coro_fn, config: BatchConfig, run_batch, finish, max_finishing=2,
                  sizes=None):
    async def main():
        with ThreadPoolExecutor(1, thread_name_prefix="t-index") as pool, \
                ThreadPoolExecutor(2, thread_name_prefix="t-finish") as fpool:
            on_batch = None if sizes is None else (lambda name, n, s: sizes.append(n))
            b = MicroBatcher("t", run_batch, config, pool, on_batch, finish=finish,
                             finish_executor=fpool, max_finishing=max_finishing)
            b.start()
            try:
                return await asyncio.wait_for(coro_fn(b), 10)  # a hang fails, not blocks
            finally:
                _unblock(run_batch, finish)
                await asyncio.wait_for(b.close(), 10)
    return asyncio.run(main())


def _unblock(*gates) -> None:
    """Let every held call of these gates go (after a failed assertion: no 10 s wait)."""
    for g in gates:
        if isinstance(g, Gate):
            for _ in range(g.hold):
                g.release()


def test_finish_step_gets_the_batch_output_and_answers_each_caller_in_order():
    run = Gate(lambda key, xs: [x * 10 for x in xs])
    fin = Gate(lambda key, xs, out: [(key, x, o) for x, o in zip(xs, out)])
    sizes = []

    async def go(b):
        return await asyncio.gather(*(b.submit("ab"[i % 2], i) for i in range(9)))

    out = _run_two_step(go, BatchConfig(max_batch=3, max_wait_ms=50.0), run, fin,
                        sizes=sizes)
    assert out == [("ab"[i % 2], i, i * 10) for i in range(9)]
    assert sorted(sizes) == [1, 2, 3, 3] and len(fin.calls) == len(run.calls) == 4
    finished = {(key, tuple(xs)): out for key, xs, out in fin.calls}
    assert finished == {(key, tuple(xs)): [x * 10 for x in xs] for key, xs in run.calls}
    assert all(t.startswith("t-index") for t in run.threads)
    assert all(t.startswith("t-finish") for t in fin.threads)


def test_next_batch_runs_while_the_last_one_finishes_and_max_finishing_bounds_it():
    run = Gate(lambda key, xs: list(xs))
    fin = Gate(lambda key, xs, out: [-o for o in out], hold=2)

    async def go(b):
        first = asyncio.ensure_future(b.submit("k", 1))
        assert await fin.wait_started() == 1  # batch 1 is held in finish
        second = asyncio.ensure_future(b.submit("k", 2))
        assert await fin.wait_started() == 2  # batch 2's run_batch ran meanwhile
        third = asyncio.ensure_future(b.submit("k", 3))
        for _ in range(20):  # both finishing slots are taken: batch 3 must not be taken
            await asyncio.sleep(0.005)
        assert len(run.calls) == 2 and b.depth == 1
        fin.release()
        fin.release()
        return await asyncio.gather(first, second, third)

    assert _run_two_step(go, BatchConfig(max_wait_ms=0.0), run, fin, max_finishing=2) == [
        -1, -2, -3]
    assert [xs for _, xs in run.calls] == [[1], [2], [3]]


def test_failures_reach_only_their_callers_and_the_batcher_goes_on():
    def run_batch(key, xs):
        if key == "run-raises":
            raise KeyError("index gone")
        return [ValueError(f"bad {x}") if x == "bad-run" else x for x in xs]

    def finish(key, xs, out):
        if key == "finish-raises":
            raise OSError("store gone")
        if key == "short":
            return out[:1]
        def one(o):  # run_batch's output is finish's to read: it passes errors on here
            if isinstance(o, Exception):
                return o
            return LookupError(f"stale {o}") if o == "bad-fin" else f"ok {o}"
        return [one(o) for o in out]

    async def go(b):
        async def batch(key, *xs):
            return await asyncio.gather(*(b.submit(key, x) for x in xs),
                                        return_exceptions=True)
        # one slot: a slot lost on any of these paths would hang the next batch
        mixed = await batch("k", "a", "bad-run", "bad-fin", "b")
        run_raised = await batch("run-raises", "c", "d")
        fin_raised = await batch("finish-raises", "e", "f")
        short = await batch("short", "g", "h")
        return mixed, run_raised, fin_raised, short, await b.submit("k", "z")

    mixed, run_raised, fin_raised, short, last = _run_two_step(
        go, BatchConfig(max_batch=8, max_wait_ms=20.0), run_batch, finish, max_finishing=1)
    assert mixed[0] == "ok a" and mixed[3] == "ok b"
    assert type(mixed[1]) is ValueError and str(mixed[1]) == "bad bad-run"
    assert type(mixed[2]) is LookupError and str(mixed[2]) == "stale bad-fin"
    assert [type(e) for e in run_raised] == [KeyError, KeyError]
    assert [str(e) for e in fin_raised] == ["store gone", "store gone"]
    assert all(isinstance(e, RuntimeError) and "returned 1 results for 2 requests" in str(e)
               for e in short)
    assert last == "ok z"


def test_a_caller_gone_during_finish_does_not_disturb_the_others():
    fin = Gate(lambda key, xs, out: list(out), hold=1)

    async def go(b):
        gone = asyncio.ensure_future(b.submit("k", 1))
        kept = asyncio.ensure_future(b.submit("k", 2))
        await fin.wait_started()
        gone.cancel()  # its deadline passed while the batch was being finished
        fin.release()
        return await kept, await b.submit("k", 3), gone.cancelled()

    assert _run_two_step(go, BatchConfig(max_wait_ms=20.0), lambda k, xs: xs, fin) == (
        2, 3, True)
    assert [xs for _, xs, _ in fin.calls] == [[1, 2], [3]]


def test_queue_is_bounded_while_finishing_is_backed_up():
    pytest.importorskip("grpc")
    import grpc

    from medseek.serve.errors import status_of

    fin = Gate(lambda key, xs, out: list(out), hold=1)

    async def go(b):
        held = asyncio.ensure_future(b.submit("k", 0))
        await fin.wait_started()  # the only finishing slot is taken: nothing is taken now
        queued = [asyncio.ensure_future(b.submit("k", i)) for i in range(1, 4)]
        await asyncio.sleep(0)
        assert b.depth == 3
        refused = []
        for i in range(5):  # refused at once, the queue does not grow
            with pytest.raises(QueueFull, match=r"t queue is full \(3 waiting\)") as e:
                await b.submit("k", 100 + i)
            refused.append(e.value)
        assert b.depth == 3
        fin.release()
        return await asyncio.gather(held, *queued), refused

    out, refused = _run_two_step(go, BatchConfig(max_batch=8, max_wait_ms=0.0, max_queue=3),
                                 lambda k, xs: xs, fin, max_finishing=1)
    assert out == [0, 1, 2, 3]
    assert [xs for _, xs, _ in fin.calls] == [[0], [1, 2, 3]]
    assert status_of(refused[0], ())[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


class FakeClock:
    """``time`` for the batcher: the test's run_batch advances it (a long ANN pass)
    without sleeping, so the linger window (linger * the last run time) is long."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    perf_counter = monotonic


@pytest.mark.parametrize("linger, expected_sizes", [(1.0, [1, 4, 4]), (0.0, [1, 4, 2, 2])])
def test_linger_lets_the_callers_of_the_last_batch_join_the_next(monkeypatch, linger,
                                                                  expected_sizes):
    from medseek.serve import batcher as batcher_module

    clock = FakeClock()
    monkeypatch.setattr(batcher_module, "time", clock)

    def ident(key, xs):
        clock.t += 60.0  # every batch "takes" a minute: linger waits up to linger * 60 s
        return list(xs)

    run = Gate(ident, hold=2)
    sizes = []

    async def go(b):
        async def twice(x):  # a closed-loop client: its next request when answered
            await b.submit("k", x)
            return await b.submit("k", x + 10)

        first = asyncio.ensure_future(b.submit("k", 0))
        await run.wait_started()  # batch [0] holds the worker...
        once = [asyncio.ensure_future(b.submit("k", x)) for x in (1, 2)]
        loop = [asyncio.ensure_future(twice(x)) for x in (3, 4)]
        await asyncio.sleep(0)
        assert b.depth == 4
        run.release()  # ...while 4 requests queued: batch [1, 2, 3, 4]
        await run.wait_started()
        early = [asyncio.ensure_future(b.submit("k", x)) for x in (5, 6)]  # queued behind
        await asyncio.sleep(0)
        assert b.depth == 2
        run.release()  # the worker finds 2 queued, and 13, 14 come right after
        return await asyncio.gather(first, *once, *loop, *early)

    cfg = BatchConfig(max_batch=8, max_wait_ms=0.0, linger=linger)
    with ThreadPoolExecutor(1) as pool:
        async def main():
            b = MicroBatcher("t", run, cfg, pool, lambda name, n, s: sizes.append(n))
            b.start()
            try:
                return await asyncio.wait_for(go(b), 10)
            finally:
                _unblock(run)
                await asyncio.wait_for(b.close(), 10)
        assert asyncio.run(main()) == [0, 1, 2, 13, 14, 5, 6]
    assert sizes == expected_sizes
    batches = [xs for _, xs in run.calls]
    assert batches[:2] == [[0], [1, 2, 3, 4]]
    if linger:
        assert batches[2] == [5, 6, 13, 14]
    else:
        assert batches[2:] == [[5, 6], [13, 14]]


def test_a_failing_on_batch_hook_does_not_stop_the_batcher():
    def hook(name, size, seconds):
        raise ValueError("metrics backend down")

    async def main():
        with ThreadPoolExecutor(1) as pool:
            b = MicroBatcher("t", lambda key, xs: [x + 1 for x in xs],
                             BatchConfig(max_batch=4, max_wait_ms=1.0), pool, hook)
            b.start()
            try:
                return [await asyncio.wait_for(b.submit("k", i), 10) for i in range(3)]
            finally:
                await b.close()

    assert asyncio.run(main()) == [1, 2, 3]


def test_stop_iteration_reaches_its_callers_and_the_batcher_goes_on():
    def run_batch(key, xs):
        if key == "raise":
            raise StopIteration("from run_batch")
        return [StopIteration("as a result") if x == 0 else x for x in xs]

    async def go(b):
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(b.submit("raise", 1), 10)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(b.submit("k", 0), 10)
        return await asyncio.wait_for(b.submit("k", 5), 10)

    assert _run(go, BatchConfig(max_batch=4, max_wait_ms=1.0), run_batch) == 5


def test_max_running_runs_batches_side_by_side():
    """With ``max_running=2`` a second batch runs while the first is held in its thread."""
    release, started = threading.Event(), queue.Queue()

    def held(key, xs):
        started.put(key)
        if key == "a":
            release.wait(timeout=120)  # held until "b" has run beside it
        return list(xs)

    async def main():
        with ThreadPoolExecutor(2) as pool:
            b = MicroBatcher("t", held, BatchConfig(max_batch=4, max_wait_ms=0.0), pool,
                             max_running=2)
            b.start()
            try:
                first = asyncio.ensure_future(b.submit("a", 1))
                loop = asyncio.get_running_loop()
                assert await loop.run_in_executor(None, started.get, True, 120) == "a"
                second = await b.submit("b", 2)  # answered while "a" is still held
                assert not first.done()
                release.set()
                return await first, second
            finally:
                release.set()
                await b.close()

    assert asyncio.run(main()) == (1, 2)


def test_max_running_is_checked():
    with pytest.raises(ValueError, match="max_running must be >= 1"):
        MicroBatcher("t", lambda k, xs: xs, BatchConfig(), ThreadPoolExecutor(1), max_running=0)
