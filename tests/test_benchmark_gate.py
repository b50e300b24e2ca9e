"""The benchmark regression gate (benchmarks/compare.py) catches a real 2x slowdown.

A real benchmark (the fused volume pipeline on the ``small`` case, against scipy's zoom
timed before each of its rounds) runs through pytest in a subprocess three times: twice
as it is, once with ``MEDSEEK_BENCH_REPEAT=2`` (the measured path does its work twice,
the baseline does not). The first run becomes the baseline, so nothing depends on this
machine's speed or on the committed baseline: only ratios within one run are compared.
The workload's ratio is about 10x with the pair timed back to back over 15 rounds, so
load moves it by far less than the 30 % tolerance while the slowdown halves it; a run
whose baseline workload itself ran at another speed is measured again
(``comparable_run``).
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
        if abs(baseline_cpu(out) / reference - 1.0) <= 0.15:
            break
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(baseline file, a normal run, a 2x-slowed run) as pytest-benchmark JSON files."""
    tmp = tmp_path_factory.mktemp("gate")
    first = run_benchmark(tmp / "first.json", 1)
    base = tmp / "baseline.json"
    made = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), str(first),
                           "--write-baseline", str(base), "--tolerance", "0.3"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    reference = baseline_cpu(first)
    return (base, comparable_run(tmp / "normal.json", 1, reference),
            comparable_run(tmp / "slow.json", 2, reference))


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
