"""synth-ct: determinism, NIfTI geometry against the manifest, organ z-ranges, HU values."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest

from medseek.data.manifest import read_manifest, validate_manifest
from medseek.data.synth.ct import build_synth_ct, render_ct
from medseek.data.synth.ct_draw import LOBES, ORGANS

SMALL = dict(matrix=(32, 48), slices=(40, 64))


def _hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_byte_identical_per_seed(tmp_path):
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        build_synth_ct(tmp_path / name, n=2, seed=seed, progress=False, **SMALL)
    a, b, c = (_hashes(tmp_path / k) for k in "abc")
    assert a == b
    assert a["volumes/CT00000.nii.gz"] != c["volumes/CT00000.nii.gz"]


def test_nifti_geometry_matches_manifest(tmp_path):
    recs = build_synth_ct(tmp_path, n=3, seed=0, progress=False, **SMALL)
    assert read_manifest(tmp_path) == recs
    assert validate_manifest(recs, tmp_path) == []
    for r in (r for r in recs if r.kind == "volume"):
        img = nib.load(tmp_path / r.path)
        d, h, w = r.meta["shape"]
        sz, sy, sx = r.meta["spacing"]
        assert img.shape == (w, h, d) and img.get_data_dtype() == np.int16
        assert 40 <= d <= 64 and 32 <= h <= 48
        np.testing.assert_allclose(img.header.get_zooms(), (sx, sy, sz), rtol=1e-6)
        np.testing.assert_allclose(np.diag(img.affine)[:3], (-sx, -sy, sz), rtol=1e-6)
        assert 0.5 <= sx <= 1.0 and 0.6 <= sz <= 5.0
        names = {g.name for g in r.regions}
        assert {"lungs", "heart", "aorta", "liver", "bones"} <= names
        for g in r.regions:
            assert 0 <= g.z0 < g.z1 <= d
            mm = r.meta["regions_mm"][g.name]
            assert mm == [round(g.z0 * sz, 2), round(g.z1 * sz, 2)]
        assert next(g for g in r.regions if g.name == "lungs").text.startswith("Lungs:")


def test_hounsfield_ranges_and_organs():
    vol, lab, g, _ = render_ct(0, "HU", [], matrix=(64, 64), slices=(48, 48))
    assert vol.dtype == np.int16 and vol.shape == g.shape
    assert abs(vol[lab == 0].mean() + 1000) < 20                 # air outside the body
    lungs = (lab >= ORGANS["right upper lobe"]) & (lab <= ORGANS["left lower lobe"])
    assert -900 < vol[lungs].mean() < -700
    assert abs(np.median(vol[lab == ORGANS["heart"]]) - 45) < 15  # soft tissue
    assert np.percentile(vol[lab == ORGANS["spine"]], 90) > 300   # bone
    zs = {name: np.flatnonzero((lab == ORGANS[name]).any(axis=(1, 2))) for name in LOBES}
    assert zs["right upper lobe"].max() > zs["right lower lobe"].max()   # upper lobe sits higher


def test_cardiomegaly_enlarges_the_heart():
    _, normal, _, _ = render_ct(1, "C", [], matrix=(48, 48), slices=(48, 48))
    _, big, _, found = render_ct(1, "C", ["cardiomegaly"], matrix=(48, 48), slices=(48, 48))
    assert (big == ORGANS["heart"]).sum() > 1.4 * (normal == ORGANS["heart"]).sum()
    assert [f["name"] for f in found] == ["cardiomegaly"]


@pytest.mark.parametrize("name, organ_values", [
    ("nodule", [ORGANS[l] for l in LOBES]), ("liver lesion", [ORGANS["liver"]]), ("kidney cyst", [ORGANS["kidneys"]]),
])
def test_findings_sit_in_their_organ(name, organ_values):
    vol0, lab, _, _ = render_ct(2, "F", [], matrix=(64, 64), slices=(80, 80))
    vol1, _, _, found = render_ct(2, "F", [name], matrix=(64, 64), slices=(80, 80))
    assert [f["name"] for f in found] == [name]
    # noise is the same for both, so any changed voxel belongs to the finding
    changed = vol0 != vol1
    assert changed.any() and np.isin(lab[changed], organ_values).all()
    zs = np.flatnonzero(changed.any(axis=(1, 2)))
    assert (found[0]["z0"], found[0]["z1"]) == (zs[0], zs[-1] + 1)
