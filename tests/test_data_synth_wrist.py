"""synth-wrist: determinism, boxes inside the image, fractures inside their boxes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from medseek.data.manifest import read_manifest, validate_manifest
from medseek.data.synth.wrist import _patients, build_synth_wrist, render_wrist
from medseek.data.synth.wrist_draw import REGIONS, Fracture


def _hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_byte_identical_per_seed(tmp_path):
    build_synth_wrist(tmp_path / "a", n=4, seed=5, size=96, progress=False)
    build_synth_wrist(tmp_path / "b", n=4, seed=5, size=96, progress=False)
    build_synth_wrist(tmp_path / "c", n=4, seed=6, size=96, progress=False)
    a, b, c = (_hashes(tmp_path / k) for k in "abc")
    assert a == b
    assert a != c


def test_manifest_boxes_and_captions(tmp_path):
    root = tmp_path / "w"
    recs = build_synth_wrist(root, n=6, seed=0, size=128, progress=False)
    assert read_manifest(root) == recs
    assert validate_manifest(recs, root) == []
    images = [r for r in recs if r.kind == "image"]
    assert len(images) == 12 and sum(r.kind == "report" for r in recs) == 6
    for r in images:
        with Image.open(root / r.path) as im:
            assert im.size == (128, 128)
        assert [g.name for g in r.regions] == list(REGIONS)
        for g in r.regions:
            x0, y0, x1, y1 = g.box
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
            assert g.text
        for region, info in r.meta["fractures"].items():
            box = next(g.box for g in r.regions if g.name == region)
            x, y = info["site_px"][r.view]
            assert box[0] <= x <= box[2] and box[1] <= y <= box[3]
            assert f"{region} fracture" in r.labels


def test_some_patients_have_several_studies():
    cases = _patients(40, seed=0)
    patients = {p for p, _ in cases}
    assert len(patients) < 40 and max(s for _, s in cases) >= 1
    assert cases == _patients(40, seed=0)


@pytest.mark.parametrize("region", REGIONS)
@pytest.mark.parametrize("patient", [7, 8])
def test_fracture_is_drawn_inside_its_box(region, patient):
    size = 160
    clean, _, _, _ = render_wrist(3, patient, 0, {}, size)
    broken, boxes, _, _ = render_wrist(3, patient, 0, {region: Fracture(region, displacement=0.6, angulation=20)}, size)
    for view in ("PA", "LATERAL"):
        diff = np.abs(broken[view].astype(int) - clean[view].astype(int)) > 40
        assert diff.any()
        ys, xs = np.nonzero(diff)
        x0, y0, x1, y1 = boxes[view][region]
        inside = (xs >= x0 - 1) & (xs <= x1 + 1) & (ys >= y0 - 1) & (ys <= y1 + 1)
        assert inside.mean() > 0.95, (region, view, inside.mean())


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        build_synth_wrist(tmp_path, n=0)
    with pytest.raises(ValueError, match="size"):
        build_synth_wrist(tmp_path, n=1, size=10)
