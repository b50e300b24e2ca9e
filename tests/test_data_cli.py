"""``medseek data build ...`` end to end through :func:`medseek.cli.main`."""

from __future__ import annotations

import importlib.util

import pytest

from medseek.cli import main
from medseek.data.manifest import read_manifest, validate_manifest


def test_cli_builds_synth_wrist(tmp_path):
    out = tmp_path / "wrist"
    assert main(["data", "build", "synth-wrist", "--out", str(out), "--n", "4", "--quiet"]) == 0
    recs = read_manifest(out)
    assert sum(r.kind == "image" for r in recs) == 8
    assert validate_manifest(recs, out) == []
    assert (out / "contact_sheet.png").stat().st_size > 1000


def test_cli_builds_synth_ct(tmp_path):
    out = tmp_path / "ct"
    assert main(["data", "build", "synth-ct", "--out", str(out), "--n", "1", "--seed", "3", "--quiet"]) == 0
    recs = read_manifest(out)
    assert [r.kind for r in recs] == ["volume", "report"]
    assert validate_manifest(recs, out) == []


@pytest.mark.skipif(importlib.util.find_spec("torchxrayvision") is None, reason="IU reports need torchxrayvision")
def test_cli_builds_synth_cxr_from_real_reports(tmp_path):
    out = tmp_path / "cxr"
    assert main(["data", "build", "synth-cxr", "--out", str(out), "--n", "2", "--size", "64", "--quiet"]) == 0
    recs = read_manifest(out)
    assert [r.kind for r in recs] == ["image", "image", "report"] * 2
    assert validate_manifest(recs, out) == []


def test_cli_rejects_bad_n(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["data", "build", "synth-wrist", "--out", str(tmp_path), "--n", "0"])
    assert "must be >= 1" in capsys.readouterr().err
