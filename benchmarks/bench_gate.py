"""What every benchmark in this folder shares: a ratio to a baseline timed in the same run.

Absolute times move between machines and with the load of a shared one; the ratio of the
measured path to a plain baseline timed in the same process, round by round, moves far
less (most benchmarks here take it in CPU time: see ``paired``). Each benchmark stores that ratio in ``benchmark.extra_info`` under fixed keys, and
``benchmarks/compare.py`` gates on it against ``benchmarks/baseline.json``:

* ``ratio``: a float; "faster is higher" unless ``ratio_direction`` says ``"lower"``;
* ``ratio_vs``: what the baseline is, in words (so a table reader knows what moved);
* ``ratio_direction``: ``"higher"`` or ``"lower"`` (which way is better);
* ``baseline_cpu_min_s`` (when the benchmark times its baseline workload itself, as
  ``paired`` does): that workload's best CPU seconds in this run. The ratio moves with
  the baseline's own speed as much as with the path's, so ``compare.py`` holds this
  against the committed value and marks a benchmark whose baseline workload ran at
  another speed (a scipy upgrade, another CPU, a per-process effect) ``BASELINE MOVED``
  instead of calling its ratio change a regression or a gain.

``MEDSEEK_BENCH_REPEAT=N`` (an int >= 1, default 1) makes every measured path run its
work N times per round, and never the baseline: ``tests/test_benchmark_gate.py`` uses it
to prove that the gate catches a 2x slowdown.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

REPEAT_ENV = "MEDSEEK_BENCH_REPEAT"
DIRECTIONS = ("higher", "lower")
BASELINE_CPU_KEY = "baseline_cpu_min_s"  # compare.py reads it under this name


def repeat_factor() -> int:
    """``MEDSEEK_BENCH_REPEAT`` as an int >= 1 (1 when unset)."""
    raw = os.environ.get(REPEAT_ENV, "1")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{REPEAT_ENV} must be an int >= 1, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"{REPEAT_ENV} must be an int >= 1, got {raw!r}")
    return n


def measured(run: Callable[[], Any]) -> Callable[[], Any]:
    """``run``, or ``run`` done ``MEDSEEK_BENCH_REPEAT`` times (the last result returned):
    the deliberate slowdown the gate's own test injects into a measured path."""
    n = repeat_factor()
    if n == 1:
        return run

    def repeated():
        for _ in range(n - 1):
            run()
        return run()

    return repeated


def record_ratio(benchmark, ratio: float, vs: str, direction: str = "higher", *,
                 baseline_cpu_s: float | None = None, **extra: Any) -> None:
    """Store ``ratio`` (against ``vs``) in ``benchmark.extra_info`` under the gate's keys,
    with ``baseline_cpu_s`` (the baseline workload's best CPU seconds) when given."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not ratio > 0 or ratio == float("inf"):
        raise ValueError(f"ratio against {vs} must be a positive finite number, got {ratio}")
    info = {"ratio": float(ratio), "ratio_vs": vs, "ratio_direction": direction, **extra}
    if baseline_cpu_s is not None:
        if not baseline_cpu_s > 0 or baseline_cpu_s == float("inf"):
            raise ValueError(f"baseline_cpu_s of {vs} must be a positive finite number of "
                             f"seconds, got {baseline_cpu_s}")
        info[BASELINE_CPU_KEY] = float(baseline_cpu_s)
    benchmark.extra_info.update(info)


def cpu_and_wall(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, and the CPU seconds (this process, all threads) and wall seconds it took."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - t0


def paired(benchmark, run: Callable[[], Any], baseline: Callable[[], Any], vs: str, *,
           rounds: int, warmup_rounds: int = 1) -> Any:
    """Time ``run`` with ``benchmark.pedantic`` and ``baseline`` once just before each of
    its rounds (pedantic's untimed ``setup``), then record the speed-up
    ``min(baseline) / min(run)`` of CPU time ("higher is faster").

    Why CPU time: on a machine shared with busy processes a call that outlasts a
    scheduler time slice is preempted and its wall time grows with the load, while a
    shorter one often is not, so a wall-time ratio of a 0.5 ms path to a 5 ms baseline
    moved 2-4x with the load here; the CPU time of this process hardly moves. The
    wall-time speed-up is kept as ``ratio_wall``. Interleaving puts both under the same
    background load; minima over the rounds drop interrupted rounds. Warm-up rounds are
    not used. Returns what ``run`` returned. Under ``--benchmark-disable`` both run once
    and nothing is recorded.
    """
    base_cpu: list[float] = []
    base_wall: list[float] = []
    run_cpu: list[float] = []
    target = measured(run)

    def setup() -> None:
        _, cpu, wall = cpu_and_wall(baseline)
        base_cpu.append(cpu)
        base_wall.append(wall)

    def timed() -> Any:
        out, cpu, _ = cpu_and_wall(target)
        run_cpu.append(cpu)
        return out

    result = benchmark.pedantic(timed, setup=setup, rounds=rounds,
                                warmup_rounds=warmup_rounds, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: ran once, nothing timed
        return result
    b_cpu, r_cpu = base_cpu[warmup_rounds:], run_cpu[warmup_rounds:]
    record_ratio(benchmark, min(b_cpu) / max(min(r_cpu), 1e-9), vs,
                 ratio_wall=min(base_wall[warmup_rounds:]) / stats.stats.min,
                 ratio_median_pairs=_median([b / max(r, 1e-9) for b, r in zip(b_cpu, r_cpu)]),
                 baseline_min_s=min(base_wall[warmup_rounds:]),
                 baseline_cpu_s=min(b_cpu), cpu_min_s=min(r_cpu))
    return result


def _median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])
