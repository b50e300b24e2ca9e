"""De-identification (PS3.15 Basic Profile subset) on a real CT filled with fake PHI."""

from __future__ import annotations

import copy
import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medseek.io.deid import BASIC_PROFILE, DeidConfig, applied_action, deidentify
from medseek.io.errors import MedicalImageError
from medseek.io.images import read_image
from medseek.io.series import read_dicom_series

KEY_A = b"test-key-A-0123456789abcdef"
KEY_B = b"test-key-B-0123456789abcdef"
FAKE_TEXT = "FAKEPHI"
FAKE_DATE = "19230405"
FAKE_TIME = "112233.445566"


def fake_value(keyword: str, n: int):
    vr = dictionary_VR(tag_for_keyword(keyword)).split(" or ")[0]
    if vr == "SQ":
        item = Dataset()
        item.PatientName = f"{FAKE_TEXT}^NESTED{n}"
        item.CodeMeaning = "keep me"
        return vr, Sequence([item])
    return vr, {
        "PN": f"{FAKE_TEXT}^PERSON{n}",
        "DA": FAKE_DATE,
        "TM": FAKE_TIME,
        "DT": FAKE_DATE + "112233",
        "UI": f"1.2.826.0.1.3680043.10.999.{n}",
        "AS": "042Y",
        "DS": "77.7",
        "IS": "77",
        "US": 77,
        "SS": 77,
        "CS": f"FAKEPHI{n}",
        "SH": f"FAKEPHI{n}",
        "AE": f"FAKEPHI{n}",
        "FD": 77.7,
    }.get(vr, f"{FAKE_TEXT} {keyword}")


def phi_dataset(patient_id: str = "PID-12345", study_uid: str = "1.2.826.0.1.3680043.10.999.500") -> Dataset:
    """The real CT_small.dcm with every tag of BASIC_PROFILE set to a fake value."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for n, keyword in enumerate(BASIC_PROFILE):
        vr, value = fake_value(keyword, n)
        ds.add_new(tag_for_keyword(keyword), vr, value)
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.add_new(0x00091099, "LO", f"{FAKE_TEXT} private")
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    ref.PatientName = f"{FAKE_TEXT}^IN^SEQUENCE"
    ds.SourceImageSequence = Sequence([ref])
    return ds


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def header_bytes(ds: Dataset) -> bytes:
    ds = copy.deepcopy(ds)
    del ds.PixelData
    return encode(ds)


def test_no_basic_profile_value_survives():
    ds = phi_dataset()
    before = header_bytes(ds)
    originals = [str(ds[tag_for_keyword(kw)].value) for kw in BASIC_PROFILE
                 if dictionary_VR(tag_for_keyword(kw)) == "UI"] + [ds.PatientID, ds.SOPInstanceUID]
    assert FAKE_TEXT.encode() in before and FAKE_DATE.encode() in before  # the check can fail
    record = deidentify(ds, DeidConfig(KEY_A))
    after = header_bytes(ds)
    for needle in [FAKE_TEXT, FAKE_DATE, FAKE_TIME.split(".")[0], "042Y", "PID-12345", *originals]:
        assert needle.encode() not in after, f"{needle!r} survived de-identification"
    for keyword, code in BASIC_PROFILE.items():
        tag = tag_for_keyword(keyword)
        action = applied_action(code)
        if keyword in ("PatientID", "StudyID"):
            assert record.action_for(keyword) == "D"
        elif action == "X":
            assert tag not in ds, keyword
        elif action == "Z":
            assert not ds[tag].value, keyword
        elif action == "U":
            assert str(ds[tag].value).startswith("2.25."), keyword
        assert record.action_for(keyword) in {"X", "Z", "D", "U"}, keyword
    assert ds.PatientIdentityRemoved == "YES"
    assert "Basic Profile" in ds.DeidentificationMethod
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert not [e for e in ds.iterall() if e.tag.is_private]
    # UIDs are replaced consistently: the reference follows the SOP Instance UID
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # pixels are untouched
    np.testing.assert_array_equal(ds.pixel_array, phi_dataset().pixel_array)


def test_record_lists_tag_keyword_action():
    record = deidentify(phi_dataset(), DeidConfig(KEY_A))
    assert ("(0010,0010)", "PatientName", "Z") in record.actions
    assert ("(0008,0081)", "InstitutionAddress", "X") in record.actions
    assert ("(0009,1099)", "private", "X") in record.actions
    assert record.patient_pseudonym and len(record.patient_pseudonym) == 32
    assert not record.development_key


def test_pseudonyms_stable_per_key_and_differ_across_keys():
    a1 = deidentify(phi_dataset(), DeidConfig(KEY_A))
    a2 = deidentify(phi_dataset(), DeidConfig(KEY_A))
    b = deidentify(phi_dataset(), DeidConfig(KEY_B))
    for field in ("patient_pseudonym", "study_pseudonym", "series_pseudonym", "sop_pseudonym"):
        assert getattr(a1, field) == getattr(a2, field)
        assert getattr(a1, field) != getattr(b, field)


def test_two_studies_of_one_patient_share_the_patient_pseudonym():
    cfg = DeidConfig(KEY_A)
    s1 = deidentify(phi_dataset(study_uid="1.2.3.4.1"), cfg)
    s2 = deidentify(phi_dataset(study_uid="1.2.3.4.2"), cfg)
    other = deidentify(phi_dataset(patient_id="PID-99999", study_uid="1.2.3.4.1"), cfg)
    assert s1.patient_pseudonym == s2.patient_pseudonym != other.patient_pseudonym
    assert s1.study_pseudonym != s2.study_pseudonym
    assert s1.study_pseudonym == other.study_pseudonym  # same original study UID


def test_read_image_meta_carries_pseudonyms_and_no_phi():
    data = encode(phi_dataset())
    image = read_image(data, deid=DeidConfig(KEY_A))
    assert image.deid is not None
    assert image.meta["patient_pseudonym"] == image.deid.patient_pseudonym
    text = repr(image.meta) + repr(image.deid)
    for needle in (FAKE_TEXT, FAKE_DATE, "PID-12345"):
        assert needle not in text
    plain = read_image(data)  # without a config: no identifiers at all
    assert plain.deid is None
    assert not any("pseudonym" in k or "UID" in k and k != "SOPClassUID" and k != "TransferSyntaxUID" for k in plain.meta)
    assert FAKE_TEXT not in repr(plain.meta)


def test_series_slices_share_pseudonyms(tmp_path):
    cfg = DeidConfig.development()
    for k in range(3):
        ds = phi_dataset()
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.999.9{k}"
        ds.ImagePositionPatient = [0, 0, 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        (tmp_path / f"s{k}.dcm").write_bytes(encode(ds))
    vol = read_dicom_series(tmp_path, deid=cfg)
    assert vol.meta["patient_pseudonym"] == deidentify(phi_dataset(), cfg).patient_pseudonym
    assert vol.deid.development_key and vol.spacing[0] == pytest.approx(2.5)


def test_errors_do_not_quote_phi(tmp_path):
    data = encode(phi_dataset())
    with pytest.raises(MedicalImageError) as info:
        read_image(data[: len(data) - 3000], deid=DeidConfig(KEY_A))
    assert FAKE_TEXT not in str(info.value) and "PID-12345" not in str(info.value)


def test_config_requires_an_explicit_adequate_key():
    with pytest.raises(TypeError):
        DeidConfig()  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="at least 16 bytes"):
        DeidConfig(b"short")
    with pytest.raises(TypeError, match="bytes"):
        DeidConfig("a string key that is long")  # type: ignore[arg-type]
    assert KEY_A not in repr(DeidConfig(KEY_A)).encode()
    assert DeidConfig.development().development_key


def test_every_profile_keyword_is_a_dicom_keyword():
    for keyword, code in BASIC_PROFILE.items():
        assert tag_for_keyword(keyword) is not None, keyword
        assert applied_action(code) in {"X", "Z", "D", "U"}
