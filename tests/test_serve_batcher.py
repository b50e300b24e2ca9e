"""The async micro-batcher: batch sizes, grouping by key, dropped cancelled requests,
the bounded queue, failures handed to every caller."""

from __future__ import annotations

import asyncio
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


def test_cancelled_requests_are_dropped_before_the_batch_runs():
    seen = []

    def ident(key, xs):
        seen.extend(xs)
        return list(xs)

    async def go(b):
        doomed = asyncio.ensure_future(b.submit("k", "gone"))
        kept = asyncio.ensure_future(b.submit("k", "kept"))
        await asyncio.sleep(0.01)
        doomed.cancel()  # e.g. the client's deadline passed while it waited
        return await kept

    assert _run(go, BatchConfig(max_wait_ms=100.0), ident) == "kept"
    assert seen == ["kept"]


def test_full_queue_refuses_at_once():
    async def go(b):
        first = asyncio.ensure_future(b.submit("k", 1))
        second = asyncio.ensure_future(b.submit("k", 2))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="2 waiting"):
            await b.submit("k", 3)
        return await asyncio.gather(first, second)

    assert _run(go, BatchConfig(max_wait_ms=100.0, max_queue=2), lambda k, xs: xs) == [1, 2]


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
