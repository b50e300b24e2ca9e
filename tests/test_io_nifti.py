"""NIfTI reader on nibabel's bundled example images: canonical layout checked against
each file's own affine, voxel by voxel."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from medseek.io import nifti as nifti_module
from medseek.io.errors import LimitExceededError, MedicalImageError
from medseek.io.limits import ReadLimits
from medseek.io.nifti import read_nifti
from medseek.io.series import read_dicom_series

EXAMPLES = [
    ("anatomical.nii", None),  # NIfTI-1, LAS, int16
    ("example4d.nii.gz", 1),  # gzip, oblique LAS, 4D
    ("example_nifti2.nii.gz", 0),  # NIfTI-2
    ("functional.nii", 3),  # scl_slope/scl_inter != identity
    ("standard.nii.gz", None),  # RAS, anisotropic zooms (1, 3, 2)
]


def example(name: str) -> Path:
    return Path(data_path) / name


def assert_same_world(volume, img, index):
    """Every voxel of the source lands on the voxel of ``volume`` at the same LPS point."""
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4:
        data = data[..., index]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape[:3]], indexing="ij"), -1).reshape(-1, 3)
    ras = grid @ img.affine[:3, :3].T + img.affine[:3, 3]
    lps = ras * np.array([-1.0, -1.0, 1.0])
    steps = volume.direction.T * np.asarray(volume.spacing)  # columns: one step along z, y, x
    kji = np.linalg.solve(steps, (lps - np.asarray(volume.origin)).T).T
    assert np.abs(kji - np.rint(kji)).max() < 1e-4
    kji = np.rint(kji).astype(int)
    np.testing.assert_allclose(volume.array[kji[:, 0], kji[:, 1], kji[:, 2]], data.reshape(-1), rtol=1e-6)


@pytest.mark.parametrize("name, index", EXAMPLES)
def test_voxels_map_to_the_same_patient_point(name, index):
    img = nib.load(example(name))
    volume = read_nifti(example(name), volume_index=index)
    assert volume.array.flags.c_contiguous and volume.array.ndim == 3
    assert volume.array.dtype in (np.int16, np.uint16, np.float32)
    assert_same_world(volume, img, index)


@pytest.mark.parametrize("name, index", EXAMPLES)
def test_axes_point_to_superior_posterior_left(name, index):
    volume = read_nifti(example(name), volume_index=index)
    # LPS: axis 0 mostly +z (superior), axis 1 mostly +y (posterior), axis 2 mostly +x (left)
    assert np.argmax(np.abs(volume.direction), axis=1).tolist() == [2, 1, 0]
    assert np.all(np.diag(volume.direction[:, ::-1]) > 0.9)


def test_anatomical_layout_and_spacing_from_zooms():
    img = nib.load(example("anatomical.nii"))  # LAS, shape (33, 41, 25), 2 mm
    volume = read_nifti(example("anatomical.nii"))
    assert volume.array.shape == (25, 41, 33)
    assert volume.spacing == pytest.approx((2.0, 2.0, 2.0))
    data = np.asanyarray(img.dataobj)
    # LAS storage: i already runs to the left and k to superior; j runs anterior, so it
    # is flipped to run posterior: array[z, y, x] = data[x, ny - 1 - y, z]
    np.testing.assert_array_equal(volume.array, data[:, ::-1, :].transpose(2, 1, 0))


def test_anisotropic_zooms_follow_the_axes():
    volume = read_nifti(example("standard.nii.gz"))  # RAS, zooms (1, 3, 2)
    assert volume.array.shape == (7, 5, 4)
    assert volume.spacing == pytest.approx((2.0, 3.0, 1.0))


def test_scaled_data_become_float32():
    img = nib.load(example("functional.nii"))
    volume = read_nifti(example("functional.nii"), volume_index=3)
    assert volume.array.dtype == np.float32
    assert img.dataobj.slope != 1


def test_bytes_and_file_object_inputs():
    data = example("example4d.nii.gz").read_bytes()
    a = read_nifti(data, volume_index=0)
    b = read_nifti(io.BytesIO(data), volume_index=0)
    np.testing.assert_array_equal(a.array, b.array)
    plain = read_nifti(gzip.decompress(data), volume_index=0)
    np.testing.assert_array_equal(a.array, plain.array)


def test_4d_needs_volume_index():
    with pytest.raises(MedicalImageError, match="volume_index"):
        read_nifti(example("example4d.nii.gz"))
    with pytest.raises(MedicalImageError, match="out of range"):
        read_nifti(example("example4d.nii.gz"), volume_index=2)


def test_header_shape_is_checked_before_reading_data():
    raw = bytearray(example("anatomical.nii").read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])))
    header.set_data_shape((4000, 4000, 4000))
    raw[:348] = header.binaryblock
    with pytest.raises(LimitExceededError, match="max_voxels|max_slices"):
        read_nifti(bytes(raw))
    with pytest.raises(LimitExceededError):
        read_nifti(gzip.compress(bytes(raw)))


def test_truncated_and_non_nifti_are_refused():
    raw = example("anatomical.nii").read_bytes()
    with pytest.raises(MedicalImageError, match="truncated"):
        read_nifti(raw[: len(raw) // 2])
    with pytest.raises(MedicalImageError, match="not a NIfTI"):
        read_nifti(b"\x00" * 400)
    with pytest.raises(MedicalImageError, match="gzip"):
        read_nifti(b"\x1f\x8b" + b"\x00" * 100)


def test_gzip_bomb_stops_at_the_declared_size():
    raw = example("anatomical.nii").read_bytes()
    bomb = gzip.compress(raw + bytes(50_000_000), compresslevel=1)
    volume = read_nifti(bomb, limits=ReadLimits(max_file_bytes=10_000_000))
    assert volume.array.shape == (25, 41, 33)
    assert nifti_module.nifti_kind(raw) == 1


def test_read_volume_dispatches_on_content(tmp_path):
    from medseek.io import read_volume  # noqa: PLC0415  (re-exported API)

    nii = read_volume(example("anatomical.nii"))
    assert nii.meta["format"] == "NIfTI-1"
    from pydicom.data import get_testdata_file

    dcm = read_volume(get_testdata_file("emri_small.dcm"))
    assert dcm.array.shape == (10, 64, 64)
    assert read_dicom_series(get_testdata_file("emri_small.dcm")).array.shape == (10, 64, 64)
