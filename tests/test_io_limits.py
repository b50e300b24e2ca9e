"""Bombs, absurd sizes and hostile archives are refused from headers, before allocation."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medseek.io.errors import LimitExceededError, MedicalImageError
from medseek.io.images import read_image
from medseek.io.limits import ReadLimits
from medseek.io.series import read_dicom_series


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int, bit_depth: int = 16) -> bytes:
    """A valid, tiny PNG stream whose IHDR claims ``width x height`` grayscale pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def ct_small() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def encode(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_png_bomb_refused_before_allocation():
    data = png_declaring(100_000, 100_000)
    assert len(data) < 200
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceededError, match="100000x100000"):
            read_image(data, name="bomb.png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # 100000^2 16-bit pixels would be 20 GB


def test_limits_apply_to_jpeg_from_the_header():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((120, 90), np.uint8)).save(buf, format="JPEG")
    assert read_image(buf.getvalue()).pixels.shape == (120, 90)
    with pytest.raises(LimitExceededError, match="120x90"):
        read_image(buf.getvalue(), limits=ReadLimits(max_pixels=10_000))


def test_jpeg_bomb_refused_from_our_own_header_parse():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((120, 90), np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    assert struct.unpack(">HH", data[sof + 5 : sof + 9]) == (120, 90)
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)
    with pytest.raises(LimitExceededError, match="60000x60000"):
        read_image(bytes(data))


def test_dicom_declaring_huge_image_refused_before_decoding():
    ds = ct_small()
    ds.Rows, ds.Columns = 60_000, 60_000
    with pytest.raises(LimitExceededError, match="60000x60000"):
        read_image(encode(ds), name="huge.dcm")
    ds = ct_small()
    ds.NumberOfFrames = 100_000
    with pytest.raises(LimitExceededError, match="max_slices"):
        read_image(encode(ds), frame=0)
    ds.NumberOfFrames = 4000
    with pytest.raises(LimitExceededError, match="max_decoded_bytes|max_voxels"):
        read_dicom_series(encode(ds), limits=ReadLimits(max_voxels=10**6))


def test_dicom_with_pixel_data_shorter_than_declared_is_truncated():
    ds = ct_small()
    ds.NumberOfFrames = 2
    with pytest.raises(MedicalImageError, match="truncated pixel data"):
        read_image(encode(ds), frame=0)


def test_file_size_limit(tmp_path):
    path = Path(get_testdata_file("CT_small.dcm"))
    with pytest.raises(LimitExceededError, match="max_file_bytes"):
        read_image(path, limits=ReadLimits(max_file_bytes=1000))
    with pytest.raises(LimitExceededError, match="max_file_bytes"):
        read_image(io.BytesIO(path.read_bytes()), limits=ReadLimits(max_file_bytes=1000))


def zip_of(members: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("member", ["../evil.dcm", "a/../../evil.dcm", "/etc/evil.dcm", "C:/evil.dcm", "..\\evil.dcm"])
def test_zip_slip_names_are_refused(member):
    data = zip_of({"ok.dcm": encode(ct_small()), member: b"x"})
    with pytest.raises(MedicalImageError, match="unsafe zip member name"):
        read_dicom_series(data, name="upload.zip")


def test_zip_member_count_and_total_size():
    one = encode(ct_small())
    data = zip_of({f"s{k}.dcm": one for k in range(3)})
    with pytest.raises(LimitExceededError, match="max_zip_members"):
        read_dicom_series(data, limits=ReadLimits(max_zip_members=2))
    with pytest.raises(LimitExceededError, match="max_zip_uncompressed_bytes"):
        read_dicom_series(data, limits=ReadLimits(max_zip_uncompressed_bytes=2 * len(one)))


def test_zip_bomb_ratio_refused_before_inflating():
    data = zip_of({"zeros.dcm": bytes(64 << 20)})  # 64 MiB of zeros, ~64 kB compressed
    assert len(data) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceededError, match="compression ratio"):
            read_dicom_series(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_corrupt_zip_is_refused():
    data = zip_of({"a.dcm": encode(ct_small())})
    with pytest.raises(MedicalImageError, match="corrupt zip"):
        read_dicom_series(data[:-40] + bytes(40))


def test_read_limits_validate_their_fields():
    with pytest.raises(ValueError, match="max_pixels"):
        ReadLimits(max_pixels=0)
    with pytest.raises(ValueError, match="max_zip_ratio"):
        ReadLimits(max_zip_ratio=-1.0)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the values it repairs
def test_mutated_dicom_headers_only_raise_medical_image_error():
    """Seeded random byte flips in the header of a real file: every failure is ours."""
    base = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    rng = np.random.default_rng(0)
    failures = 0
    for it in range(60):
        data = bytearray(base)
        for _ in range(int(rng.integers(1, 20))):
            data[int(rng.integers(132, 2000))] = int(rng.integers(0, 256))
        if it % 3 == 0:
            data = data[: int(rng.integers(132, len(data)))]
        try:
            read_image(bytes(data))
        except MedicalImageError:
            failures += 1
    assert failures > 10  # the mutations really do break files


def test_series_directory_and_list_totals(tmp_path):
    one = encode(ct_small())
    for k in range(3):
        (tmp_path / f"s{k}.dcm").write_bytes(one)
    with pytest.raises(LimitExceededError, match="max_zip_members"):
        read_dicom_series(tmp_path, limits=ReadLimits(max_zip_members=2))
    with pytest.raises(LimitExceededError, match="max_zip_uncompressed_bytes"):
        read_dicom_series(tmp_path, limits=ReadLimits(max_zip_uncompressed_bytes=2 * len(one)))
    with pytest.raises(LimitExceededError, match="max_slices"):
        read_dicom_series([one] * 3, limits=ReadLimits(max_slices=2))
