"""DICOM series -> volume: a real MR volume written out as shuffled single-slice files.

The slices of the real multi-frame MR ``emri_small.dcm`` (10 x 64 x 64) are written as
single-frame MR files (template: the real ``MR_small.dcm``) along a tilted slice normal,
with shuffled file names and Instance Numbers and a Slice Thickness that differs from
the true spacing, then read back.
"""

from __future__ import annotations

import copy
import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medseek.io.errors import MedicalImageError
from medseek.io.series import read_dicom_series

SZ, SY, SX = 1.7, 0.9, 0.8
ORIGIN = np.array([-31.5, 12.25, 80.0])


def real(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"{name} missing from pydicom / pydicom-data"
    return path


def rotation(a: float, b: float, c: float) -> np.ndarray:
    """A right-handed rotation; its columns are (row cosine, column cosine, normal)."""
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


TILT = rotation(0.3, -0.2, 0.5)


@pytest.fixture(scope="module")
def source_volume() -> np.ndarray:
    frames = pydicom.dcmread(real("emri_small.dcm")).pixel_array
    assert frames.shape == (10, 64, 64) and frames.max() < 32768
    return frames.astype(np.int16)


def make_slices(volume: np.ndarray, rot: np.ndarray = TILT, seed: int = 0, **overrides) -> list[tuple[str, pydicom.Dataset]]:
    """One dataset per slice, in shuffled order, with shuffled names and numbers."""
    template = pydicom.dcmread(real("MR_small.dcm"))
    row, col, normal = rot[:, 0], rot[:, 1], rot[:, 2]
    rng = np.random.default_rng(seed)
    names = rng.permutation(len(volume))
    numbers = rng.permutation(len(volume)) + 1
    series_uid = generate_uid(entropy_srcs=["medseek-test-series"])
    out = []
    for k in rng.permutation(len(volume)):
        ds = copy.deepcopy(template)
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
        ds.PixelData = volume[k].astype("<i2").tobytes()
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ORIGIN + k * SZ * normal]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.r_[row, col]]
        ds.PixelSpacing = [SY, SX]
        ds.SliceThickness = 5.0  # deliberately not the spacing
        ds.SpacingBetweenSlices = 5.0
        ds.InstanceNumber = int(numbers[k])
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[f"slice{k}"])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for key, fn in overrides.items():
            if int(key) == k:
                fn(ds)
        out.append((f"IM{names[k]:04d}", ds))
    return out


def encode(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def write(tmp_path: Path, slices) -> list[Path]:
    paths = []
    for name, ds in slices:
        path = tmp_path / name
        path.write_bytes(encode(ds))
        paths.append(path)
    return paths


def check_volume(vol, source_volume):
    np.testing.assert_array_equal(vol.array, source_volume)
    assert vol.array.dtype == np.int16 and vol.array.flags.c_contiguous
    assert vol.spacing == pytest.approx((SZ, SY, SX), abs=1e-5)
    np.testing.assert_allclose(vol.origin, ORIGIN, atol=1e-5)
    np.testing.assert_allclose(vol.direction, np.stack([TILT[:, 2], TILT[:, 1], TILT[:, 0]]), atol=1e-6)


def test_directory_is_sorted_by_position_not_names_or_numbers(tmp_path, source_volume):
    write(tmp_path, make_slices(source_volume))
    (tmp_path / "README.txt").write_text("not dicom")
    vol = read_dicom_series(tmp_path)
    check_volume(vol, source_volume)
    assert vol.meta["skipped_files"] == 1 and vol.meta["geometry"] == "positions"
    assert vol.modality == "MR"
    # voxel [k, i, j] lies at IPP_k + i * SY * col + j * SX * row
    expected = ORIGIN + 7 * SZ * TILT[:, 2] + 5 * SY * TILT[:, 1] + 9 * SX * TILT[:, 0]
    np.testing.assert_allclose(vol.voxel_to_patient((7, 5, 9)), expected, atol=1e-5)


def test_list_of_paths_list_of_bytes_and_zip(tmp_path, source_volume):
    slices = make_slices(source_volume, seed=3)
    paths = write(tmp_path, slices)
    check_volume(read_dicom_series(paths), source_volume)
    check_volume(read_dicom_series([p.read_bytes() for p in paths]), source_volume)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for p in paths:
            archive.write(p, f"study/series/{p.name}")
    check_volume(read_dicom_series(buf.getvalue()), source_volume)
    zip_path = tmp_path / "series.zip"
    zip_path.write_bytes(buf.getvalue())
    check_volume(read_dicom_series(zip_path), source_volume)


def test_plain_axial_orientation(tmp_path, source_volume):
    write(tmp_path, make_slices(source_volume, rot=np.eye(3), seed=5))
    vol = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(vol.array, source_volume)
    np.testing.assert_allclose(vol.direction, np.eye(3)[::-1], atol=1e-9)


def test_rescale_applied_per_slice(tmp_path, source_volume):
    def intercept(value):
        def set_(ds):
            ds.RescaleSlope, ds.RescaleIntercept = 1, value
        return set_

    overrides = {str(k): intercept(-1024) for k in range(10)}
    write(tmp_path, make_slices(source_volume, **overrides))
    vol = read_dicom_series(tmp_path)
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, source_volume.astype(np.int64) - 1024)

    def half(ds):
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, 0
    out = tmp_path / "half"
    out.mkdir()
    write(out, make_slices(source_volume, **{"4": half}))
    vol = read_dicom_series(out)
    assert vol.array.dtype == np.float32
    expected = source_volume.astype(np.float32)
    expected[4] *= 0.5
    np.testing.assert_array_equal(vol.array, expected)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda ds: setattr(ds, "SeriesInstanceUID", generate_uid()), "SeriesInstanceUID differs"),
        (lambda ds: setattr(ds, "PixelSpacing", [SY, SX * 2]), "PixelSpacing differs"),
        (lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), "Orientation"),
    ],
)
def test_mismatched_series_names_the_offending_file(tmp_path, source_volume, change, message):
    slices = make_slices(source_volume, **{"6": change})
    write(tmp_path, slices)
    bad = next(name for name, ds in slices if ds.SOPInstanceUID == generate_uid(entropy_srcs=["slice6"]))
    with pytest.raises(MedicalImageError, match=message) as info:
        read_dicom_series(tmp_path)
    assert bad in str(info.value)


def test_mismatched_rows_is_refused(tmp_path, source_volume):
    slices = make_slices(source_volume)
    name, ds = slices[2]
    ds.Rows, ds.Columns = 32, 128
    write(tmp_path, slices)
    with pytest.raises(MedicalImageError, match=f"{name}: Rows differs"):
        read_dicom_series(tmp_path)


def test_duplicate_positions_are_refused(tmp_path, source_volume):
    def move(ds):
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ORIGIN + 2 * SZ * TILT[:, 2]]
    write(tmp_path, make_slices(source_volume, **{"3": move}))
    with pytest.raises(MedicalImageError, match="duplicate slice position"):
        read_dicom_series(tmp_path)


def test_missing_slice_is_a_non_uniform_gap(tmp_path, source_volume):
    slices = [s for s in make_slices(source_volume) if s[1].InstanceNumber and
              s[1].SOPInstanceUID != generate_uid(entropy_srcs=["slice4"])]
    write(tmp_path, slices)
    with pytest.raises(MedicalImageError, match="non-uniform slice gap"):
        read_dicom_series(tmp_path)
    vol = read_dicom_series(tmp_path, gap_tolerance=1.5)
    assert vol.array.shape == (9, 64, 64)
    np.testing.assert_array_equal(vol.array, np.delete(source_volume, 4, axis=0))


def test_sheared_stack_is_refused(tmp_path, source_volume):
    def shift(ds):
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ORIGIN + 5 * SZ * TILT[:, 2] + 2.0 * TILT[:, 0]]
    write(tmp_path, make_slices(source_volume, **{"5": shift}))
    with pytest.raises(MedicalImageError, match="off the slice normal"):
        read_dicom_series(tmp_path)


def test_no_images_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(MedicalImageError, match="no DICOM image files"):
        read_dicom_series(tmp_path)


def test_enhanced_ct_frames_sorted_by_per_frame_positions():
    path = real("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    positions = [f.PlanePositionSequence[0].ImagePositionPatient[2] for f in ds.PerFrameFunctionalGroupsSequence]
    assert positions == [-159.0, -149.0]
    vol = read_dicom_series(path)
    # orientation (-1,0,0, 0,1,0): normal (0,0,-1), so z=-149 comes first
    np.testing.assert_array_equal(vol.array, ds.pixel_array[::-1].astype(np.int64) - 1024)
    assert vol.array.dtype == np.int16
    assert vol.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    assert vol.origin == pytest.approx((99.5, -301.5, -149.0))
    np.testing.assert_allclose(vol.direction[0], [0, 0, -1])


def test_multiframe_without_positions_keeps_stored_order():
    path = real("emri_small.dcm")
    ds = pydicom.dcmread(path)
    vol = read_dicom_series(Path(path).read_bytes())
    np.testing.assert_array_equal(vol.array, ds.pixel_array)
    assert vol.meta["geometry"] == "assumed" and vol.meta["pixel_spacing_assumed"]
    assert vol.spacing == pytest.approx((float(ds.SpacingBetweenSlices), 1.0, 1.0))
