"""The benchmark regression gate (benchmarks/compare.py) catches a real 2x slowdown.

A real benchmark (the fused volume pipeline on the ``small`` case, against scipy's zoom
timed before each of its rounds) runs through pytest in a subprocess three times: twice
as it is, once with ``MEDSEEK_BENCH_REPEAT=2`` (the measured path does its work twice,
the baseline does not). A normal run becomes the baseline, so nothing depends on this
machine's speed or on the committed baseline: only ratios within one run are compared.
The workload's ratio is about 10x with the pair timed back to back over 15 rounds, so
load moves it by far less than the 30 % tolerance while the slowdown halves it; a run
whose baseline workload itself ran at another speed is measured again
(``agreeing_pair``, ``comparable_run``).

The gate's own check of that (``--baseline-drift``: a row whose baseline workload's CPU
time moved past a factor is ``BASELINE MOVED``, not a regression) is tested on the real
runs with the committed workload time edited, and on small synthetic reports in
pytest-benchmark's format for the cases a real run cannot be made to produce.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = "benchmarks/test_volume.py::test_pipeline[small-medseek_fused]"


def load_compare():
    """benchmarks/compare.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "benchmarks" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


compare = load_compare()


def run_benchmark(out: Path, repeat: int) -> Path:
    """Run BENCH through plain ``pytest`` (see tests/test_import_paths.py) into ``out``."""
    env = {**os.environ, "MEDSEEK_BENCH_REPEAT": str(repeat)}
    pytest_bin = Path(sys.executable).with_name("pytest")
    proc = subprocess.run(
        [str(pytest_bin), BENCH, "-q", "-p", "no:cacheprovider", f"--benchmark-json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def gate(run: Path, baseline: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), str(run), "--baseline",
         str(baseline), *extra], capture_output=True, text=True, timeout=60)


def baseline_cpu(run: Path) -> float:
    """The baseline workload's (scipy's zoom) best CPU time in ``run``."""
    (bench,) = [b for b in json.loads(run.read_text())["benchmarks"] if b["fullname"] == BENCH]
    return float(bench["extra_info"]["baseline_cpu_min_s"])


def agree(a: float, b: float) -> bool:
    """Two baseline workload times within 15 % of each other."""
    return abs(a / b - 1.0) <= 0.15


def agreeing_pair(tmp: Path, tries: int = 6) -> tuple[Path, Path]:
    """Two normal runs whose baseline workloads took the same CPU time (``agree``): up to
    ``tries`` runs, until one agrees with an earlier one. Anchoring on the first run alone
    fails when that run is the process that landed at the unusual speed (seen in CI: the
    first at 9.5 ms, the next five at 4.9 ms); the last two are kept if none agree."""
    done: list[Path] = []
    for i in range(tries):
        run = run_benchmark(tmp / f"normal{i}.json", 1)
        match = next((d for d in done if agree(baseline_cpu(d), baseline_cpu(run))), None)
        if match is not None:
            return match, run
        done.append(run)
    return done[-2], done[-1]


def comparable_run(out: Path, repeat: int, reference: float, tries: int = 5) -> Path:
    """BENCH run with ``repeat``, measured again (at most ``tries`` times in all) while its
    baseline workload's best CPU time differs from ``reference`` by more than 15 %.

    The same scipy call has been seen to take 5.3 ms of CPU in one process and 8.6 ms in
    the next on this VM (a per-process effect, not load: the minimum over 15 rounds
    stays put within a process), which moves the ratio by as much as the slowdown the
    gate must catch. Such a run compares nothing, so it is measured again; the last try
    is kept whatever it gives.
    """
    for _ in range(tries):
        run_benchmark(out, repeat)
        if agree(baseline_cpu(out), reference):
            break
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(baseline file, a normal run, a 2x-slowed run) as pytest-benchmark JSON files."""
    tmp = tmp_path_factory.mktemp("gate")
    first, normal = agreeing_pair(tmp)
    base = tmp / "baseline.json"
    made = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), str(first),
                           "--write-baseline", str(base), "--tolerance", "0.3"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return base, normal, comparable_run(tmp / "slow.json", 2, baseline_cpu(first), tries=6)


def test_gate_passes_a_normal_run(runs):
    base, normal, _ = runs
    res = gate(normal, base)
    assert res.returncode == 0, res.stdout + res.stderr
    assert BENCH in res.stdout and " ok " in res.stdout


def test_gate_fails_a_2x_slowdown(runs):
    base, _, slow = runs
    res = gate(slow, base)
    assert res.returncode == 1, res.stdout + res.stderr
    row = next(line for line in res.stdout.splitlines() if line.startswith(BENCH))
    assert "REGRESSED" in row
    # the measured change is near 0.5, not merely below the floor
    change = float(row.split()[3])
    assert 0.3 < change < 0.7, row


def test_slowdown_shows_in_the_recorded_ratio(runs):
    base, normal, slow = runs
    before = compare.load_run(normal)[0][BENCH]
    after = compare.load_run(slow)[0][BENCH]
    assert before.vs == after.vs == "scipy_zoom (small)"
    assert after.ratio < 0.7 * before.ratio
    assert json.loads(base.read_text())["benchmarks"][BENCH]["direction"] == "higher"


def test_missing_benchmark_fails_unless_allowed(runs, tmp_path):
    base, normal, _ = runs
    data = json.loads(base.read_text())
    data["benchmarks"]["benchmarks/test_gone.py::test_gone"] = {"ratio": 2.0,
                                                                "direction": "higher"}
    widened = tmp_path / "baseline.json"
    widened.write_text(json.dumps(data))
    res = gate(normal, widened)
    assert res.returncode == 1 and "MISSING" in res.stdout, res.stdout
    assert gate(normal, widened, "--allow-missing").returncode == 0


def test_fail_below_overrides_tolerance(runs):
    base, _, slow = runs
    # a 2x slowdown is a change near 0.5: a 0.2 floor lets it through, 0.9 does not
    assert gate(slow, base, "--fail-below", "0.2").returncode == 0
    assert gate(slow, base, "--fail-below", "0.9").returncode == 1


def test_tier_gates_only_that_tier(runs, tmp_path):
    base, normal, _ = runs
    rows = compare.compare(compare.load_run(normal)[0], compare.load_baseline(base), tier="quick")
    assert [r.name for r in rows] == [BENCH]  # test_volume's small case is quick
    data = json.loads(base.read_text())
    data["benchmarks"][BENCH].pop("tier")
    assert compare.compare(compare.load_run(normal)[0], data, tier="quick") == []


def test_lower_is_better_direction():
    # a "lower" ratio that doubles is a 2x regression: change 0.5
    assert compare.change_of(2.0, 4.0, "lower") == pytest.approx(0.5)
    assert compare.change_of(2.0, 1.0, "higher") == pytest.approx(0.5)


def test_bad_inputs_name_what_was_wrong(runs, tmp_path):
    base, normal, _ = runs
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmarks": {"x": {"ratio": -1}}}))
    res = gate(normal, bad)
    assert res.returncode == 2 and "x needs a 'ratio' > 0" in res.stderr
    bad.write_text(json.dumps({"tolerance": 1.5, "benchmarks": {}}))
    assert "tolerance must be a number in (0, 1), got 1.5" in gate(normal, bad).stderr
    res = gate(tmp_path / "nowhere.json", base)
    assert res.returncode == 2 and "nowhere.json does not exist" in res.stderr


def test_repeat_factor_rejects_bad_values(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_gate", ROOT / "benchmarks" / "bench_gate.py")
    bench_gate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gate)
    monkeypatch.setenv("MEDSEEK_BENCH_REPEAT", "3")
    assert bench_gate.repeat_factor() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv("MEDSEEK_BENCH_REPEAT", bad)
        with pytest.raises(ValueError, match=f"MEDSEEK_BENCH_REPEAT must be an int >= 1, got '{bad}'"):
            bench_gate.repeat_factor()


def load_bench_gate():
    """benchmarks/bench_gate.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_gate",
                                                  ROOT / "benchmarks" / "bench_gate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row_of(stdout: str, name: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(name))


def with_baseline_cpu(base: Path, out: Path, scale: float | None) -> Path:
    """``base`` with its baseline workload time scaled by ``scale`` (None: field removed,
    as in a baseline file written before the field existed), written to ``out``."""
    data = json.loads(base.read_text())
    entry = data["benchmarks"][BENCH]
    if scale is None:
        entry.pop(compare.BASELINE_CPU_KEY)
    else:
        entry[compare.BASELINE_CPU_KEY] *= scale
    out.write_text(json.dumps(data))
    return out


def test_runs_and_baseline_carry_the_workload_time(runs):
    base, normal, _ = runs
    written = json.loads(base.read_text())["benchmarks"][BENCH][compare.BASELINE_CPU_KEY]
    assert written == pytest.approx(compare.load_run(normal)[0][BENCH].baseline_cpu, rel=0.15)
    assert 0 < written < 1  # seconds: scipy's zoom of the small volume takes milliseconds


def test_moved_baseline_on_a_real_run_is_flagged(runs, tmp_path):
    base, normal, _ = runs
    # the committed workload took twice as long: now it runs at 0.5x, past the 1.3 factor
    moved = with_baseline_cpu(base, tmp_path / "moved.json", 2.0)
    res = gate(normal, moved)
    assert res.returncode == 0, res.stdout + res.stderr
    row = row_of(res.stdout, BENCH)
    assert compare.MOVED in row and " ok " not in row, row
    assert "WARNING: the baseline workload of 1 benchmark(s)" in res.stdout
    assert gate(normal, moved, "--fail-on-moved").returncode == compare.EXIT_MOVED
    # a wide enough factor takes the check out: the same row is an ordinary ok again
    wide = gate(normal, moved, "--baseline-drift", "2.5")
    assert wide.returncode == 0 and " ok " in row_of(wide.stdout, BENCH), wide.stdout


def test_unmoved_baseline_still_fails_a_2x_slowdown(runs):
    base, _, slow = runs
    res = gate(slow, base, "--fail-on-moved")
    assert res.returncode == 1, res.stdout + res.stderr  # 1 (regressed), not 3 (moved)
    row = row_of(res.stdout, BENCH)
    assert "REGRESSED" in row and compare.MOVED not in row, row
    drift = float(row.split()[5])  # the 'base x' column: within the 1.3 factor
    assert 1 / compare.DEFAULT_DRIFT <= drift <= compare.DEFAULT_DRIFT, row


def test_old_baseline_without_workload_time_still_compares(runs, tmp_path):
    base, normal, slow = runs
    old = with_baseline_cpu(base, tmp_path / "old.json", None)
    res = gate(slow, old)
    assert res.returncode == 1 and "REGRESSED" in row_of(res.stdout, BENCH), res.stdout
    res = gate(normal, old, "--fail-on-moved")
    assert res.returncode == 0, res.stdout + res.stderr
    assert row_of(res.stdout, BENCH).split()[5] == "-"  # no drift known, no check
    assert "WARNING" not in res.stdout


NAME = "benchmarks/test_synthetic.py::test_path"


def synthetic_run(path: Path, ratio: float, baseline_cpu: float | None,
                  direction: str = "higher") -> Path:
    """A pytest-benchmark JSON report with one benchmark that recorded ``ratio``."""
    info = {"ratio": ratio, "ratio_vs": "plain workload", "ratio_direction": direction}
    if baseline_cpu is not None:
        info[compare.BASELINE_CPU_KEY] = baseline_cpu
    path.write_text(json.dumps({
        "machine_info": {"cpu": {"brand_raw": "test", "count": 2}}, "commit_info": {},
        "datetime": "2026-12-07T00:00:00+00:00",
        "benchmarks": [{"fullname": NAME, "name": "test_path", "extra_info": info}]}))
    return path


def synthetic_baseline(tmp_path: Path, ratio: float = 10.0, cpu: float | None = 0.005,
                       direction: str = "higher") -> Path:
    """A baseline written by ``--write-baseline`` from one synthetic run."""
    base = tmp_path / "base.json"
    made = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"),
         str(synthetic_run(tmp_path / "first.json", ratio, cpu, direction)),
         "--write-baseline", str(base)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return base


def test_drop_explained_by_the_workload_is_not_a_regression(tmp_path):
    base = synthetic_baseline(tmp_path)
    # the workload got faster (5 -> 3.1 ms: 0.62x), the path did not: the ratio falls to 0.62
    run = synthetic_run(tmp_path / "run.json", 6.2, 0.0031)
    res = gate(run, base)
    assert res.returncode == 0, res.stdout + res.stderr
    row = row_of(res.stdout, NAME)
    assert compare.MOVED in row and "REGRESSED" not in row and "path alone: 1.00" in row, row
    # the same run without the check is a regression (change 0.62 < floor 0.65)
    assert gate(run, base, "--baseline-drift", "inf").returncode == 1


def test_gain_from_a_slower_workload_is_not_reported_as_ok(tmp_path):
    base = synthetic_baseline(tmp_path)
    res = gate(synthetic_run(tmp_path / "run.json", 16.0, 0.008), base)
    assert res.returncode == 0 and compare.MOVED in row_of(res.stdout, NAME), res.stdout


def test_drop_the_workload_cannot_explain_still_fails(tmp_path):
    base = synthetic_baseline(tmp_path)
    # workload 0.62x and the path 2x slower: change 0.31, path alone 0.5, both under 0.65
    res = gate(synthetic_run(tmp_path / "run.json", 3.1, 0.0031), base, "--fail-on-moved")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "REGRESSED" in row_of(res.stdout, NAME) and "WARNING" in res.stdout


def test_lower_is_better_ratio_with_a_moved_workload(tmp_path):
    # "lower" ratio = path / workload: the workload got 2x faster, the path did not
    base = synthetic_baseline(tmp_path, ratio=0.1, direction="lower")
    res = gate(synthetic_run(tmp_path / "run.json", 0.2, 0.0025, "lower"), base)
    assert res.returncode == 0 and "path alone: 1.00" in row_of(res.stdout, NAME), res.stdout
    # the path 2x slower with the workload unmoved fails
    res = gate(synthetic_run(tmp_path / "slow.json", 0.2, 0.005, "lower"), base)
    assert res.returncode == 1 and "REGRESSED" in row_of(res.stdout, NAME), res.stdout


def test_write_baseline_takes_the_median_workload_time(tmp_path):
    runs = [compare.load_run(synthetic_run(tmp_path / f"r{i}.json", 10.0, cpu))
            for i, cpu in enumerate([0.005, 0.009, None, 0.006])]
    entry = compare.make_baseline(runs)["benchmarks"][NAME]
    assert entry[compare.BASELINE_CPU_KEY] == pytest.approx(0.006)
    none = [compare.load_run(synthetic_run(tmp_path / "n.json", 10.0, None))]
    assert compare.BASELINE_CPU_KEY not in compare.make_baseline(none)["benchmarks"][NAME]


def test_bad_workload_times_name_what_was_wrong(tmp_path):
    base = synthetic_baseline(tmp_path)
    run = synthetic_run(tmp_path / "run.json", 10.0, 0.005)
    res = gate(run, base, "--baseline-drift", "0.9")
    assert res.returncode == 2 and "baseline drift must be a factor > 1, got 0.9" in res.stderr
    res = gate(synthetic_run(tmp_path / "bad.json", 10.0, 0.0), base)
    assert res.returncode == 2 and "baseline_cpu_min_s 0.0" in res.stderr, res.stderr
    data = json.loads(base.read_text())
    data["benchmarks"][NAME][compare.BASELINE_CPU_KEY] = -1
    base.write_text(json.dumps(data))
    res = gate(run, base)
    assert res.returncode == 2 and f"{NAME} has baseline_cpu_min_s -1" in res.stderr
    with pytest.raises(ValueError, match="baseline_cpu_s of x must be a positive finite"):
        load_bench_gate().record_ratio(None, 2.0, "x", baseline_cpu_s=0.0)
