"""synth-cxr: determinism, sizes, and that labels are visible in the pixels.

Reports here are made up (no IU text); the real archive is used only by the CLI test.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from medseek.data.iu import IUReport
from medseek.data.manifest import read_manifest, validate_manifest
from medseek.data.mesh import parse_mesh_terms
from medseek.data.synth.cxr import build_synth_cxr, render_case
from medseek.data.synth.cxr_findings import unrendered

FAKE = [
    IUReport("CXR9001", "", "", "Made-up normal text.", "", ("normal",), (), ("a", "b")),
    IUReport("CXR9002", "", "", "Made-up big heart.", "", ("Cardiomegaly/severe", "Pleural Effusion/left/small"), (), ()),
    IUReport("CXR9003", "", "", "Made-up devices.", "", ("Catheters, Indwelling/right", "Implanted Medical Device/left",
                                                          "Thoracic Vertebrae/degenerative/mild"), (), ()),
]


def _hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_byte_identical_per_seed(tmp_path):
    a = _hashes(_build(tmp_path / "a", seed=1))
    b = _hashes(_build(tmp_path / "b", seed=1))
    c = _hashes(_build(tmp_path / "c", seed=2))
    assert a == b
    assert set(a) == set(c)
    assert a["images/CXR9002_PA.png"] != c["images/CXR9002_PA.png"]
    assert "contact_sheet.png" in a and "manifest.parquet" in a


def _build(out, seed=0, size=96):
    build_synth_cxr(out, seed=seed, size=size, reports=FAKE, progress=False)
    return out


def test_manifest_rows_sizes_and_labels(tmp_path):
    root = _build(tmp_path / "o", size=96)
    recs = read_manifest(root)
    assert validate_manifest(recs, root) == []
    assert [r.kind for r in recs] == ["image", "image", "report"] * 3
    assert [r.view for r in recs[:2]] == ["PA", "LATERAL"]
    for r in recs:
        if r.kind == "image":
            with Image.open(root / r.path) as im:
                assert im.size == (96, 96) and im.mode == "L"
    assert recs[3].labels == ("cardiomegaly", "pleural effusion")
    assert recs[0].labels == ("normal",)
    assert recs[5].report == "Made-up big heart."
    # patient ids are hashes of the uid, the uid itself is the provenance id
    assert recs[0].patient_id != "CXR9001" and recs[0].source_id == "iu:CXR9001"
    assert len({r.split for r in recs if r.patient_id == recs[0].patient_id}) == 1


def _heart_width(img: np.ndarray) -> int:
    """Bright pixels between the lungs in the band where the heart sits (PA)."""
    h, w = img.shape
    band = img[int(0.56 * h): int(0.64 * h), int(0.15 * w): int(0.85 * w)].astype(float).mean(axis=0)
    lung, heart = np.percentile(band, 10), np.median(band[int(0.4 * band.size): int(0.6 * band.size)])
    return int((band > 0.5 * (lung + heart)).sum())


@pytest.mark.parametrize("key", ["P1", "P2", "P3", "P4"])
def test_cardiomegaly_widens_the_heart(key):
    normal = render_case([], 0, key, 192, views=("PA",))["PA"]
    mild = render_case(parse_mesh_terms(["Cardiomegaly/mild"]), 0, key, 192, views=("PA",))["PA"]
    severe = render_case(parse_mesh_terms(["Cardiomegaly/severe"]), 0, key, 192, views=("PA",))["PA"]
    wn, wm, ws = _heart_width(normal), _heart_width(mild), _heart_width(severe)
    assert wn < wm < ws, (wn, wm, ws)


def test_effusion_side_is_where_the_fluid_is():
    normal = render_case([], 0, "E1", 128, views=("PA",))["PA"].astype(float)
    left = render_case(parse_mesh_terms(["Pleural Effusion/left/moderate"]), 0, "E1", 128, views=("PA",))["PA"]
    diff = left.astype(float) - normal
    lower = diff[int(0.55 * 128):, :]
    # the patient's left is the image right in a PA view
    assert lower[:, 64:].sum() > 20 * max(lower[:, :64].sum(), 1.0)


FREQUENT_TERMS = [
    "Cardiomegaly/mild", "Lung/hypoinflation", "Lung/hyperdistention", "Aorta/tortuous", "Spine/degenerative",
    "Calcified Granuloma/lung/upper lobe/left", "Calcinosis/lung/hilum/lymph nodes/right", "Atherosclerosis/aorta",
    "Opacity/lung/base/left", "Pulmonary Atelectasis/base/left", "Cicatrix/lung/apex/bilateral",
    "Pleural Effusion/bilateral/small", "Airspace Disease/lung/base/bilateral", "Catheters, Indwelling/right",
    "Implanted Medical Device/left", "Surgical Instruments/mediastinum", "Scoliosis/thoracic vertebrae/right",
    "Nodule/lung/lower lobe/right", "Mass/lung/upper lobe/right/large", "Fractures, Bone/ribs/left/healed",
    "Fractures, Bone/thoracic vertebrae", "Emphysema", "Pulmonary Congestion", "Pulmonary Edema/interstitial",
    "Pneumothorax/right/small", "Hernia, Hiatal/large", "Diaphragm/right/elevated", "Markings/bronchovascular",
    "Costophrenic Angle/right/blunted", "Tube, Inserted/trachea, carina", "Deformity/thoracic vertebrae",
    "Technical Quality of Image Unsatisfactory", "Infiltrate/lung/upper lobe/right", "Pulmonary Fibrosis/base",
    "Pulmonary Artery/enlarged", "Shift/mediastinum/right", "Blister/lung/upper lobe/bilateral",
    "Heart/left/obscured", "Lymph Nodes/right/paratracheal/enlarged", "Nipple Shadow/bilateral",
]


def test_frequent_findings_are_all_drawn():
    findings = parse_mesh_terms(FREQUENT_TERMS)
    assert unrendered(findings) == []
    base = render_case([], 0, "F", 96)
    for f in findings:
        img = render_case([f], 0, "F", 96)
        change = max(np.abs(img[v].astype(int) - base[v].astype(int)).max() for v in img)
        assert change >= 8, (f.term, change)


def test_render_case_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        render_case([], 0, "x", 32)
    with pytest.raises(ValueError, match="OBLIQUE"):
        render_case([], 0, "x", 64, views=("OBLIQUE",))


def test_worker_processes_give_identical_files(tmp_path):
    build_synth_cxr(tmp_path / "one", seed=0, size=64, reports=FAKE, progress=False, workers=1)
    build_synth_cxr(tmp_path / "two", seed=0, size=64, reports=FAKE, progress=False, workers=2)
    assert _hashes(tmp_path / "one") == _hashes(tmp_path / "two")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_bytes_round_trip_and_determinism(dtype):
    import io

    from medseek.data.synth.common import png_bytes

    img = (np.arange(48 * 40).reshape(48, 40) * (37 if dtype == np.uint16 else 1) % np.iinfo(dtype).max).astype(dtype)
    data = png_bytes(img)
    assert data == png_bytes(img.copy())
    with Image.open(io.BytesIO(data)) as im:
        assert np.array_equal(np.asarray(im), img)
    with pytest.raises(TypeError, match="float32"):
        png_bytes(img.astype(np.float32))
