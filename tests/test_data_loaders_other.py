"""CT-RATE and ROCO loaders on tiny trees in their published layouts (made-up text)."""

from __future__ import annotations

import numpy as np
import pytest

from medseek.data.loaders import load_ct_rate, load_roco
from medseek.data.loaders.roco import guess_modality
from medseek.data.manifest import validate_manifest


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _ct_rate(root, drop=False):
    import nibabel as nib

    names = ["train_1_a_1.nii.gz", "train_1_a_2.nii.gz", "train_2_a_1.nii.gz", "valid_1_a_1.nii.gz"]
    for name in names:
        if drop and name == "train_2_a_1.nii.gz":
            continue
        split, pid, scan = name.split("_")[:3]
        path = root / split / f"{split}_{pid}" / f"{split}_{pid}_{scan}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), dtype=np.int16), np.eye(4)), path)
    hdr = "VolumeName,ClinicalInformation_EN,Technique_EN,Findings_EN,Impressions_EN\n"
    _write(root / "radiology_text_reports" / "train_reports.csv",
           hdr + "".join(f'{n},Made-up cough.,Made-up technique.,"Made-up findings, {n}.",Made-up impression.\n'
                         for n in names[:3]))
    _write(root / "radiology_text_reports" / "validation_reports.csv",
           hdr + f"{names[3]},x,y,Made-up findings.,Made-up impression.\n")
    _write(root / "multi_abnormality_labels" / "train_predicted_labels.csv",
           "VolumeName,Cardiomegaly,Emphysema,Lung nodule\n"
           f"{names[0]},1,0,1\n{names[1]},1,0,1\n{names[2]},0,0,0\n")
    _write(root / "metadata" / "train_metadata.csv", f"VolumeName,XYSpacing,ZSpacing\n{names[0]},\"[0.75, 0.75]\",1.5\n")


def test_ct_rate_records(tmp_path):
    _ct_rate(tmp_path)
    recs = load_ct_rate(tmp_path)
    vols = [r for r in recs if r.kind == "volume"]
    assert [r.id for r in vols] == ["ct-rate:train_1_a_1.nii.gz", "ct-rate:train_1_a_2.nii.gz",
                                    "ct-rate:train_2_a_1.nii.gz", "ct-rate:valid_1_a_1.nii.gz"]
    assert vols[0].path == "train/train_1/train_1_a/train_1_a_1.nii.gz"
    assert vols[0].labels == ("Cardiomegaly", "Lung nodule") and vols[2].labels == ()
    assert vols[0].patient_id == vols[1].patient_id != vols[2].patient_id
    assert vols[0].meta == {"XYSpacing": "[0.75, 0.75]", "ZSpacing": "1.5"}
    assert vols[3].split == "val" and vols[0].split == "train"
    reports = [r for r in recs if r.kind == "report"]
    assert len(reports) == 4 and reports[0].report == "Made-up findings, train_1_a_1.nii.gz.\nMade-up impression."
    assert validate_manifest(recs, tmp_path) == []


def test_ct_rate_missing_volume_and_bad_label(tmp_path):
    _ct_rate(tmp_path, drop=True)
    with pytest.raises(FileNotFoundError, match="train_2_a_1"):
        load_ct_rate(tmp_path)
    assert sum(r.kind == "volume" for r in load_ct_rate(tmp_path, on_missing="skip")) == 3
    path = tmp_path / "multi_abnormality_labels" / "train_predicted_labels.csv"
    path.write_text(path.read_text().replace("train_1_a_1.nii.gz,1,0,1", "train_1_a_1.nii.gz,1,7,1"))
    with pytest.raises(ValueError, match="Emphysema.*'7'"):
        load_ct_rate(tmp_path, on_missing="skip")


def _roco(root, drop=False):
    for split, ids in (("train", ["ROCO_00001", "ROCO_00002", "ROCO_00003"]), ("validation", ["ROCO_00010"])):
        folder = root / "data" / split / "radiology"
        captions = {"ROCO_00001": "Made-up axial CT of the abdomen.", "ROCO_00002": "Made-up MRI of the knee.",
                    "ROCO_00003": "Made-up chest x-ray.", "ROCO_00010": "Made-up ultrasound picture."}
        _write(folder / "captions.txt", "".join(f"{i}\t {captions[i]}\n" for i in ids))
        docs = {"ROCO_00001": "PMC111", "ROCO_00002": "PMC111", "ROCO_00003": "PMC222", "ROCO_00010": "PMC333"}
        _write(folder / "dlinks.txt", "".join(
            f"{i}\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/aa/bb/{docs[i]}.tar.gz -P /path/to/Dir\tfig{k}.jpg\n"
            for k, i in enumerate(ids)))
        for i in ids:
            if not (drop and i == "ROCO_00003"):
                (folder / "images").mkdir(parents=True, exist_ok=True)
                (folder / "images" / f"{i}.jpg").write_bytes(b"\xff\xd8fake")


def test_roco_records_group_by_source_document(tmp_path):
    _roco(tmp_path)
    recs = load_roco(tmp_path)
    assert [r.id for r in recs] == ["roco:ROCO_00001", "roco:ROCO_00002", "roco:ROCO_00003", "roco:ROCO_00010"]
    assert [r.source_id for r in recs] == ["roco:PMC111", "roco:PMC111", "roco:PMC222", "roco:PMC333"]
    assert [r.modality for r in recs] == ["CT", "MR", "CR", "US"]
    assert recs[0].path == "data/train/radiology/images/ROCO_00001.jpg"
    assert recs[3].split == "val" and recs[1].meta["figure"] == "fig1.jpg"
    assert recs[0].report == "Made-up axial CT of the abdomen."
    assert validate_manifest(recs, tmp_path) == []


def test_roco_missing_image(tmp_path):
    _roco(tmp_path, drop=True)
    with pytest.raises(FileNotFoundError, match="ROCO_00003"):
        load_roco(tmp_path)
    assert len(load_roco(tmp_path, on_missing="skip")) == 3
    with pytest.raises(FileNotFoundError, match="captions.txt"):
        load_roco(tmp_path / "elsewhere")


def test_guess_modality():
    assert guess_modality("Contrast-enhanced computed tomography") == "CT"
    assert guess_modality("A photograph of the skin") == "OT"
