"""MIMIC-CXR-JPG, CheXpert and OpenI loaders on tiny trees in their published layouts.

All text here is made up; no dataset content is used.
"""

from __future__ import annotations

import gzip

import pytest

from medseek.data.loaders import load_chexpert, load_mimic_cxr, load_openi
from medseek.data.manifest import validate_manifest

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
          "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices"]


def _touch(path, data=b"\xff\xd8fakejpeg"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _csv(path, header, rows, gz=False):
    text = ",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        path.write_text(text)


def _mimic(root, drop_image=False):
    images = [("d1", "10000032", "50000001", "PA"), ("d2", "10000032", "50000001", "LATERAL"),
              ("d3", "11000099", "52000002", "AP")]
    for dicom, subj, study, _ in images:
        if not (drop_image and dicom == "d3"):
            _touch(root / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}" / f"{dicom}.jpg")
    _csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"],
         [(d, s, st, v, 3000, 2500) for d, s, st, v in images], gz=True)
    lab = {n: "" for n in LABELS}
    row1 = dict(lab, Cardiomegaly="1.0", Edema="-1.0", **{"Pleural Effusion": "0.0"})
    row2 = dict(lab, **{"No Finding": "1.0"})
    _csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id"] + LABELS,
         [["10000032", "50000001"] + [row1[n] for n in LABELS], ["11000099", "52000002"] + [row2[n] for n in LABELS]],
         gz=True)
    _csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
         [("d1", "50000001", "10000032", "train"), ("d2", "50000001", "10000032", "train"),
          ("d3", "52000002", "11000099", "validate")], gz=True)
    rep = root / "mimic-cxr-reports" / "files" / "p10" / "p10000032" / "s50000001.txt"
    rep.parent.mkdir(parents=True)
    rep.write_text("FINDINGS: made-up enlarged heart.\n")


def test_mimic_cxr_records(tmp_path):
    _mimic(tmp_path)
    recs = load_mimic_cxr(tmp_path)
    images = [r for r in recs if r.kind == "image"]
    reports = [r for r in recs if r.kind == "report"]
    assert [r.id for r in images] == ["mimic-cxr:d1", "mimic-cxr:d2", "mimic-cxr:d3"]
    assert images[0].path == "files/p10/p10000032/s50000001/d1.jpg"
    assert images[1].view == "LATERAL" and images[2].split == "val"
    assert images[0].labels == ("Cardiomegaly",)          # -1 -> zeros by default
    assert images[2].labels == ("No Finding",)
    assert images[0].patient_id == images[1].patient_id != images[2].patient_id
    assert len(reports) == 1 and "made-up" in reports[0].report and reports[0].study_id == images[0].study_id
    assert validate_manifest(recs, tmp_path) == []


def test_mimic_uncertain_policies(tmp_path):
    _mimic(tmp_path)
    ones = load_mimic_cxr(tmp_path, uncertain="ones")[0]
    tag = load_mimic_cxr(tmp_path, uncertain="tag")[0]
    assert ones.labels == ("Cardiomegaly", "Edema")
    assert tag.labels == ("Cardiomegaly", "Edema (uncertain)")
    with pytest.raises(ValueError, match="uncertain"):
        load_mimic_cxr(tmp_path, uncertain="maybe")


def test_mimic_missing_image(tmp_path):
    _mimic(tmp_path, drop_image=True)
    with pytest.raises(FileNotFoundError, match="d3.jpg"):
        load_mimic_cxr(tmp_path)
    assert [r.id for r in load_mimic_cxr(tmp_path, on_missing="skip") if r.kind == "image"] == [
        "mimic-cxr:d1", "mimic-cxr:d2"]
    kept = load_mimic_cxr(tmp_path, on_missing="keep")
    problems = validate_manifest(kept, tmp_path)
    assert [(p.id, p.field) for p in problems] == [("mimic-cxr:d3", "path")]


def _chexpert(root, drop=False):
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA",
              "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
              "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
              "Fracture", "Support Devices"]
    base = root.name
    rows = [
        [f"{base}/train/patient00001/study1/view1_frontal.jpg", "Female", 68, "Frontal", "AP",
         "", "", "1.0", "", "", "-1.0", "", "", "", "0.0", "", "", "", "1.0"],
        [f"{base}/train/patient00001/study1/view2_lateral.jpg", "Female", 68, "Lateral", "",
         "", "", "1.0", "", "", "-1.0", "", "", "", "0.0", "", "", "", "1.0"],
    ]
    valid = [[f"{base}/valid/patient64541/study1/view1_frontal.jpg", "Male", 73, "Frontal", "PA",
              "1.0"] + ["0.0"] * 13]
    _csv(root / "train.csv", header, rows)
    _csv(root / "valid.csv", header, valid)
    for r in rows + valid:
        if not (drop and "view2" in r[0]):
            _touch(root / r[0].split("/", 1)[1])


def test_chexpert_records(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    _chexpert(root)
    recs = load_chexpert(root)
    assert [r.view for r in recs] == ["AP", "LATERAL", "PA"]
    assert [r.split for r in recs] == ["train", "train", "val"]
    assert recs[0].path == "train/patient00001/study1/view1_frontal.jpg"
    assert recs[0].labels == ("Cardiomegaly", "Support Devices")
    assert load_chexpert(root, uncertain="ones")[0].labels == ("Cardiomegaly", "Edema", "Support Devices")
    assert recs[2].labels == ("No Finding",)
    assert recs[0].patient_id == recs[1].patient_id and recs[0].meta["sex"] == "Female"
    assert validate_manifest(recs, root) == []


def test_chexpert_missing_and_bad_label(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    _chexpert(root, drop=True)
    with pytest.raises(FileNotFoundError, match="train.csv row 3"):
        load_chexpert(root)
    assert len(load_chexpert(root, on_missing="skip")) == 2
    text = (root / "valid.csv").read_text().replace("Male,73,Frontal,PA,1.0", "Male,73,Frontal,PA,2.0")
    (root / "valid.csv").write_text(text)
    with pytest.raises(ValueError, match="valid.csv row 2.*No Finding.*2.0"):
        load_chexpert(root, on_missing="skip")


XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
  <uId id="CXR{n}"/>
  <MedlineCitation><Article><Abstract>
    <AbstractText Label="INDICATION">Made-up cough.</AbstractText>
    <AbstractText Label="FINDINGS">Made-up finding sentence {n}.</AbstractText>
    <AbstractText Label="IMPRESSION">Made-up impression.</AbstractText>
  </Abstract></Article></MedlineCitation>
  <MeSH>{mesh}</MeSH>
  <parentImage id="CXR{n}_1_IM-000{n}-1001"><caption>Xray Chest {cap}</caption></parentImage>
  <parentImage id="CXR{n}_1_IM-000{n}-2001"><caption>lateral view</caption></parentImage>
</eCitation>
"""


def _openi(root, drop=False):
    (root / "ecgen-radiology").mkdir(parents=True)
    meshes = {1: "<major>normal</major>", 2: "<major>Cardiomegaly/mild</major><major>Opacity/lung/base/left</major>"}
    for n, mesh in meshes.items():
        (root / "ecgen-radiology" / f"{n}.xml").write_text(XML.format(n=n, mesh=mesh, cap="PA and Lateral" if n == 1 else "PA"))
        for suffix in ("1001", "2001"):
            if not (drop and n == 2 and suffix == "2001"):
                _touch(root / "NLMCXR_png" / f"CXR{n}_1_IM-000{n}-{suffix}.png", b"\x89PNG fake")


def test_openi_records(tmp_path):
    _openi(tmp_path)
    recs = load_openi(tmp_path)
    assert [r.kind for r in recs] == ["image", "image", "report"] * 2
    img = recs[3]
    assert img.path == "NLMCXR_png/CXR2_1_IM-0002-1001.png" and img.view == "PA"
    assert recs[4].view == "LATERAL"
    assert recs[0].view == ""  # a caption naming both views decides nothing
    assert img.labels == ("cardiomegaly", "opacity")
    assert recs[5].report.startswith("Made-up finding sentence 2.")
    assert recs[2].labels == ("normal",)
    assert validate_manifest(recs, tmp_path) == []


def test_openi_missing_image(tmp_path):
    _openi(tmp_path, drop=True)
    with pytest.raises(FileNotFoundError, match="CXR2_1_IM-0002-2001"):
        load_openi(tmp_path)
    assert sum(r.kind == "image" for r in load_openi(tmp_path, on_missing="skip")) == 3
