"""Manifest round-trip, validation problems with their rows, and patient-wise splits."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medseek.data.manifest import (
    ManifestRecord,
    Region,
    assign_splits,
    read_manifest,
    validate_manifest,
    write_manifest,
)


def _image(path, w=40, h=30):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w), dtype=np.uint8)).save(path)


def _records():
    return [
        ManifestRecord(
            id="a1", path="img/a1.png", kind="image", modality="CR", body_part="CHEST", view="PA",
            patient_id="p1", study_id="s1", source_id="doc1", labels=("cardiomegaly", "effusion"),
            report="Made-up text.", regions=(Region("heart", box=(5.0, 5.0, 20.0, 25.0), text="big heart"),),
            split="train", meta={"age": 40, "spacing": [0.5, 0.5]},
        ),
        ManifestRecord(id="a1:report", path="", kind="report", patient_id="p1", study_id="s1",
                       report="Made-up report.", split="train"),
        ManifestRecord(id="v1", path="vol/v1.nii.gz", kind="volume", modality="CT", patient_id="p2",
                       regions=(Region("lungs", z0=2, z1=8, text="clear"),)),
    ]


def test_round_trip_preserves_every_field(tmp_path):
    recs = _records()
    path = write_manifest(recs, tmp_path / "m.parquet")
    back = read_manifest(path)
    assert back == recs
    assert back[0].regions[0].box == (5.0, 5.0, 20.0, 25.0)
    assert back[2].regions[0].z0 == 2 and back[2].regions[0].box is None


def test_write_is_byte_identical_and_directory_form(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    p1 = write_manifest(_records(), tmp_path / "x")
    p2 = write_manifest(_records(), tmp_path / "y")
    assert p1.name == "manifest.parquet"
    assert p1.read_bytes() == p2.read_bytes()
    assert read_manifest(tmp_path / "x") == _records()


def test_write_rejects_non_records(tmp_path):
    with pytest.raises(TypeError, match=r"records\[1\]"):
        write_manifest([_records()[0], {"id": "x"}], tmp_path / "m.parquet")


def test_read_missing_manifest_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_manifest(tmp_path / "nope.parquet")


def test_valid_manifest_has_no_problems(tmp_path):
    _image(tmp_path / "img" / "a1.png")
    recs = [r for r in _records() if r.kind != "volume"]
    assert validate_manifest(recs, tmp_path) == []


def test_validation_reports_offending_rows(tmp_path):
    _image(tmp_path / "img" / "a1.png", w=40, h=30)
    _image(tmp_path / "img" / "b.png", w=40, h=30)
    recs = [
        _records()[0],                                                     # 0 fine
        ManifestRecord(id="a1", path="img/b.png", kind="image"),           # 1 duplicate id
        ManifestRecord(id="m", path="img/missing.png", kind="image"),      # 2 missing file
        ManifestRecord(id="k", path="img/b.png", kind="photo"),            # 3 bad kind
        ManifestRecord(id="s", path="img/b.png", kind="image", split="dev"),  # 4 bad split
        ManifestRecord(id="leak", path="img/b.png", kind="image", patient_id="p1", split="test"),  # 5 leak
        ManifestRecord(id="box", path="img/b.png", kind="image",
                       regions=(Region("r", box=(10.0, 10.0, 45.0, 20.0)),)),  # 6 box outside 40x30
    ]
    problems = validate_manifest(recs, tmp_path)
    by_row = {(p.row, p.field) for p in problems}
    assert by_row == {(1, "id"), (2, "path"), (3, "kind"), (4, "split"), (5, "split"), (6, "regions[r]")}
    leak = next(p for p in problems if p.row == 5)
    assert "p1" in leak.message and "row 0" in leak.message
    assert "45" in next(p for p in problems if p.row == 6).message
    assert "missing.png" in next(p for p in problems if p.row == 2).message
    assert str(problems[0]).startswith("row 1 (id 'a1') id:")


def test_volume_region_outside_depth(tmp_path):
    import nibabel as nib

    (tmp_path / "vol").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 6), dtype=np.int16), np.eye(4)), tmp_path / "vol" / "v.nii.gz")
    ok = ManifestRecord(id="v", path="vol/v.nii.gz", kind="volume", regions=(Region("lungs", z0=0, z1=6),))
    bad = ManifestRecord(id="w", path="vol/v.nii.gz", kind="volume", regions=(Region("lungs", z0=2, z1=7),))
    problems = validate_manifest([ok, bad], tmp_path)
    assert [(p.row, p.id) for p in problems] == [(1, "w")]
    assert "depth 6" in problems[0].message


def _many(n_patients=50, per_patient=3):
    return [ManifestRecord(id=f"r{p}_{k}", path="", kind="report", patient_id=f"p{p}")
            for p in range(n_patients) for k in range(per_patient)]


def test_assign_splits_keeps_patients_together_and_is_deterministic():
    recs = _many()
    a = assign_splits(recs, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=3)
    b = assign_splits(list(reversed(recs)), {"train": 0.7, "val": 0.15, "test": 0.15}, seed=3)
    assert {r.id: r.split for r in a} == {r.id: r.split for r in b}
    per_patient = {}
    for r in a:
        per_patient.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in per_patient.values())
    counts = {s: sum(1 for v in per_patient.values() if s in v) for s in ("train", "val", "test")}
    # cumulative cuts: round(0.7 * 50) = 35, round(0.85 * 50) = 42 (half to even)
    assert counts == {"train": 35, "val": 7, "test": 8}
    assert validate_manifest(a, ".") == []


def test_assign_splits_seed_changes_assignment():
    recs = _many()
    a = assign_splits(recs, {"train": 0.5, "test": 0.5}, seed=0)
    b = assign_splits(recs, {"train": 0.5, "test": 0.5}, seed=1)
    assert [r.split for r in a] != [r.split for r in b]


@pytest.mark.parametrize("fractions, match", [
    ({"train": 0.5, "val": 0.4}, "sum to 1"),
    ({"train": 1.2, "val": -0.2}, "val"),
    ({"dev": 1.0}, "dev"),
    ({}, "at least one"),
])
def test_assign_splits_rejects_bad_fractions(fractions, match):
    with pytest.raises(ValueError, match=match):
        assign_splits(_many(2, 1), fractions)
