#!/usr/bin/env python3
"""Regression gate: ratios of a pytest-benchmark run against ``benchmarks/baseline.json``.

Every benchmark in this folder stores in ``extra_info`` its ratio to a baseline timed in
the same run (``bench_gate.py``: ``ratio``, ``ratio_vs``, ``ratio_direction``). Those
ratios travel between machines and loads far better than times do, so they are what is
gated. The baseline file maps each benchmark's full name to its ratio, with the machine,
date and commit it came from and a tolerance (global, or per benchmark).

A benchmark regresses when its *change* falls below ``1 - tolerance``, where change is
now / baseline for "higher is better" ratios and baseline / now for "lower" ones (so a
2x slowdown of the measured path is a change of about 0.5 either way). ``--fail-below X``
replaces every tolerance by one floor on the change (CI's short tier: only very large
regressions fail). A benchmark of the baseline that is missing from the run, or that
carries no ratio, fails too, unless ``--allow-missing``; one that is new is listed only.

    pytest benchmarks -m quick --benchmark-json out.json
    python benchmarks/compare.py out.json --tier quick --fail-below 0.5
    python benchmarks/compare.py .benchmarks            # the newest autosaved run
    python benchmarks/compare.py run1.json run2.json --write-baseline benchmarks/baseline.json

Exit status: 0 when nothing regressed or went missing, 1 when something did, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_BASELINE = Path(__file__).resolve().parent / "baseline.json"
DIRECTIONS = ("higher", "lower")
DEFAULT_TOLERANCE = 0.35
# --write-baseline: a benchmark's tolerance is NOISE_FACTOR x its spread over the runs,
# kept in [MIN, MAX]; MAX < 0.5 so that a 2x slowdown (change 0.5) always fails
NOISE_FACTOR, MIN_TOLERANCE, MAX_TOLERANCE = 3.0, 0.3, 0.45


@dataclass(frozen=True)
class Measured:
    """One benchmark's gate ratio as a run recorded it."""

    ratio: float
    direction: str
    vs: str
    tier: str | None


@dataclass(frozen=True)
class Row:
    """One line of the report: status is ok, REGRESSED, MISSING (missing if allowed) or new."""

    name: str
    status: str
    baseline: float | None
    now: float | None
    change: float | None
    limit: float | None
    vs: str

    @property
    def failed(self) -> bool:
        return self.status in ("REGRESSED", "MISSING")


def find_run(path: Path) -> Path:
    """A pytest-benchmark JSON file; for a folder (``.benchmarks``), its newest one."""
    if path.is_dir():
        runs = sorted(path.rglob("*.json"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise ValueError(f"no pytest-benchmark JSON files under {path}")
        return runs[-1]
    if not path.is_file():
        raise ValueError(f"run file {path} does not exist")
    return path


def load_run(path: str | Path) -> tuple[dict[str, Measured | None], dict]:
    """``{full name: Measured, or None when the benchmark recorded no ratio}`` and the
    run's header (machine_info, commit_info, datetime) from a pytest-benchmark JSON."""
    path = find_run(Path(path))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path} is not a pytest-benchmark report (no 'benchmarks' list)")
    out: dict[str, Measured | None] = {}
    for bench in data["benchmarks"]:
        name = bench.get("fullname") or bench.get("name")
        info = bench.get("extra_info") or {}
        ratio = info.get("ratio")
        if not isinstance(ratio, (int, float)) or not ratio > 0:
            out[name] = None
            continue
        direction = info.get("ratio_direction", "higher")
        if direction not in DIRECTIONS:
            raise ValueError(f"{path}: {name} has ratio_direction {direction!r}, "
                             f"expected one of {DIRECTIONS}")
        out[name] = Measured(float(ratio), direction, str(info.get("ratio_vs", "?")),
                             info.get("tier"))
    header = {k: data.get(k) for k in ("machine_info", "commit_info", "datetime")}
    return out, header


def load_baseline(path: str | Path) -> dict:
    """The baseline file, checked: a global ``tolerance`` and per benchmark a ``ratio`` > 0
    and a ``direction`` (an optional ``tolerance`` of its own, in (0, 1))."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"baseline file {path} does not exist")
    try:
        base = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"baseline {path} is not JSON: {exc}") from None
    if not isinstance(base, dict) or not isinstance(base.get("benchmarks"), dict):
        raise ValueError(f"baseline {path} has no 'benchmarks' mapping")
    _check_tolerance(base.get("tolerance", DEFAULT_TOLERANCE), f"{path}: tolerance")
    for name, entry in base["benchmarks"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("ratio"), (int, float)) \
                or not entry["ratio"] > 0:
            raise ValueError(f"baseline {path}: {name} needs a 'ratio' > 0, got {entry!r}")
        if entry.get("direction", "higher") not in DIRECTIONS:
            raise ValueError(f"baseline {path}: {name} has direction "
                             f"{entry.get('direction')!r}, expected one of {DIRECTIONS}")
        if "tolerance" in entry:
            _check_tolerance(entry["tolerance"], f"{path}: {name} tolerance")
    return base


def _check_tolerance(value: object, what: str) -> float:
    if not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{what} must be a number in (0, 1), got {value!r}")
    return float(value)


def change_of(baseline: float, now: float, direction: str) -> float:
    """now relative to baseline, oriented so that < 1 is worse (2x slower ~ 0.5)."""
    return now / baseline if direction == "higher" else baseline / now


def compare(run: dict[str, Measured | None], baseline: dict, *, fail_below: float | None = None,
            tier: str | None = None, allow_missing: bool = False) -> list[Row]:
    """One row per benchmark of the baseline (restricted to ``tier`` when given), then one
    per benchmark of the run the baseline lacks. ``fail_below`` overrides tolerances."""
    if fail_below is not None and not 0 < fail_below <= 1:
        raise ValueError(f"fail_below must be in (0, 1], got {fail_below}")
    default_tol = float(baseline.get("tolerance", DEFAULT_TOLERANCE))
    rows = []
    for name, entry in sorted(baseline["benchmarks"].items()):
        if tier is not None and entry.get("tier") != tier:
            continue
        limit = fail_below if fail_below is not None else 1 - entry.get("tolerance", default_tol)
        got = run.get(name)
        if got is None:
            why = "missing" if name not in run else "no ratio"
            rows.append(Row(name, "missing" if allow_missing else "MISSING", entry["ratio"],
                            None, None, limit, f"{entry.get('vs', '')} ({why})"))
            continue
        direction = entry.get("direction", "higher")
        if got.direction != direction:
            raise ValueError(f"{name}: the run's ratio is '{got.direction} is better', "
                             f"the baseline's '{direction}'; rewrite the baseline")
        change = change_of(entry["ratio"], got.ratio, direction)
        rows.append(Row(name, "REGRESSED" if change < limit else "ok", entry["ratio"],
                        got.ratio, change, limit, got.vs))
    for name, got in sorted(run.items()):
        if name not in baseline["benchmarks"] and (tier is None or (got and got.tier == tier)):
            rows.append(Row(name, "new", None, got.ratio if got else None, None, None,
                            got.vs if got else "no ratio recorded"))
    return rows


def format_table(rows: list[Row]) -> str:
    """The report: name, baseline ratio, ratio now, change, the floor it was held to."""
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    width = max([len(r.name) for r in rows] + [9])
    lines = [f"{'benchmark':<{width}}  {'baseline':>9}  {'now':>9}  {'change':>7}  "
             f"{'floor':>5}  status     vs"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {num(r.baseline, '9.4g')}  {num(r.now, '9.4g')}  "
                     f"{num(r.change, '7.2f')}  {num(r.limit, '5.2f')}  {r.status:<9}  {r.vs}")
    failed = [r for r in rows if r.failed]
    lines.append(f"{len(failed)} of {len(rows)} failed" if failed else
                 f"all {sum(r.change is not None for r in rows)} gated ratios within bounds")
    return "\n".join(lines)


def make_baseline(runs: list[tuple[dict[str, Measured | None], dict]],
                  tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """A baseline from one or more runs of the same machine: the median ratio of each
    benchmark, and from two runs on, a tolerance of its own from their spread."""
    _check_tolerance(tolerance, "tolerance")
    header = runs[-1][1]
    names = sorted({n for r, _ in runs for n, m in r.items() if m is not None})
    benchmarks = {}
    for name in names:
        seen = [r[name] for r, _ in runs if r.get(name) is not None]
        ratio = statistics.median(m.ratio for m in seen)
        entry = {"ratio": round(ratio, 6), "direction": seen[-1].direction, "vs": seen[-1].vs}
        if seen[-1].tier:
            entry["tier"] = seen[-1].tier
        if len(seen) >= 2:
            spread = max(abs(m.ratio / ratio - 1) for m in seen)
            entry["spread"] = round(spread, 3)
            entry["tolerance"] = round(min(MAX_TOLERANCE, max(MIN_TOLERANCE, NOISE_FACTOR * spread)), 2)
        benchmarks[name] = entry
    info = header.get("machine_info") or {}
    cpu = info.get("cpu") or {}
    return {
        "about": "benchmark name -> ratio to the baseline timed in the same run (see "
                 "benchmarks/compare.py); tolerance: the fraction a ratio may fall",
        "machine": {"cpu": cpu.get("brand_raw"), "cpus": cpu.get("count"),
                    "system": f"{info.get('system')} {info.get('release')}",
                    "python": info.get("python_version")},
        "date": header.get("datetime") or datetime.now(timezone.utc).isoformat(),
        "commit": (header.get("commit_info") or {}).get("id"),
        "runs": len(runs),
        "tolerance": tolerance,
        "benchmarks": benchmarks,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path,
                   help="pytest-benchmark JSON (--benchmark-json) or a folder such as .benchmarks")
    p.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE)
    p.add_argument("--fail-below", type=float, default=None,
                   help="fail when a change falls below this (overrides the tolerances)")
    p.add_argument("--tier", default=None, help="gate only the baseline's benchmarks of this tier")
    p.add_argument("--allow-missing", action="store_true",
                   help="list benchmarks missing from the run without failing")
    p.add_argument("--write-baseline", type=Path, default=None,
                   help="write a baseline from the runs instead of comparing")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="with --write-baseline: the global tolerance")
    args = p.parse_args(argv)
    try:
        runs = [load_run(r) for r in args.runs]
        if args.write_baseline is not None:
            base = make_baseline(runs, args.tolerance)
            args.write_baseline.write_text(json.dumps(base, indent=1) + "\n")
            print(f"wrote {len(base['benchmarks'])} ratios to {args.write_baseline}")
            return 0
        if len(runs) != 1:
            raise ValueError(f"compare takes one run, got {len(runs)}")
        rows = compare(runs[0][0], load_baseline(args.baseline), fail_below=args.fail_below,
                       tier=args.tier, allow_missing=args.allow_missing)
    except ValueError as exc:
        print(f"compare.py: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
