"""2D reader on real DICOM files from pydicom / pydicom-data, and on PNG/JPEG made here."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medseek.io.errors import MedicalImageError
from medseek.io.images import read_image, unit_intensity


def real(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"{name} missing from pydicom / pydicom-data"
    return path


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_chest_cr_monochrome1_is_inverted_over_bits_stored():
    path = real("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    image = read_image(path)
    stored = ds.pixel_array
    top = (1 << int(ds.BitsStored)) - 1
    assert image.pixels.dtype == np.uint16
    np.testing.assert_array_equal(image.pixels, top - stored)
    assert (image.modality, image.body_part, image.view) == ("CR", "CHEST", "PA")
    assert image.photometric == "MONOCHROME1" and image.meta["inverted_monochrome1"]
    assert image.spacing is None  # the file's Pixel Spacing is 0\0: unknown, not zero


def test_monochrome1_and_monochrome2_of_one_image_are_mirror_images():
    ds = pydicom.dcmread(real("RG3_UNCR.dcm"))
    mono1 = read_image(dicom_bytes(ds)).pixels
    ds.PhotometricInterpretation = "MONOCHROME2"
    mono2 = read_image(dicom_bytes(ds)).pixels
    top = (1 << int(ds.BitsStored)) - 1
    np.testing.assert_array_equal(mono1.astype(np.int64) + mono2, np.full(mono1.shape, top))
    np.testing.assert_array_equal(mono2, ds.pixel_array)
    # higher = brighter: bone (bright on a MONOCHROME2 display) stays high after inversion
    assert read_image(real("RG3_UNCR.dcm")).body_part == "EXTREMITY"


def test_ct_rescale_keeps_int16_and_spacing():
    path = real("693_UNCR.dcm")
    ds = pydicom.dcmread(path)
    image = read_image(path)
    assert image.pixels.dtype == np.int16 and image.pixels.shape == (512, 512)
    expected = ds.pixel_array.astype(np.int64) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    np.testing.assert_array_equal(image.pixels, expected)
    assert image.pixels.min() < -1000  # air in HU, so the intercept really was applied
    assert image.spacing == pytest.approx((0.478516, 0.478516))
    assert image.modality == "CT"


def test_jpeg2000_lossless_equals_uncompressed_and_lossy_is_close():
    plain = read_image(real("693_UNCR.dcm")).pixels
    lossless = read_image(real("693_J2KR.dcm")).pixels
    np.testing.assert_array_equal(lossless, plain)
    lossy = read_image(real("693_J2KI.dcm")).pixels.astype(np.float64)
    # Lossy JPEG 2000 at ~150:1 (3.6 kB for 512 kB): measured RMSE 121 HU on a 1160 HU std.
    rmse = np.sqrt(np.mean((lossy - plain) ** 2))
    assert 0 < rmse < 0.15 * plain.std()
    assert np.corrcoef(lossy.ravel(), plain.ravel())[0, 1] > 0.99


def test_ct_small_and_mr_small():
    ct_path = real("CT_small.dcm")
    ct = read_image(ct_path)
    ds = pydicom.dcmread(ct_path)
    np.testing.assert_array_equal(ct.pixels, ds.pixel_array.astype(np.int64) - 1024)
    assert ct.spacing == pytest.approx((0.661468, 0.661468))
    mr = read_image(real("MR_small.dcm"))
    assert mr.pixels.dtype == np.int16 and mr.pixels.shape == (64, 64)
    assert mr.spacing == pytest.approx((0.3125, 0.3125)) and mr.modality == "MR"
    np.testing.assert_array_equal(mr.pixels, pydicom.dcmread(real("MR_small.dcm")).pixel_array)


def test_non_integral_rescale_gives_float32():
    path = real("MR2_UNCR.dcm")
    ds = pydicom.dcmread(path)
    image = read_image(path)
    assert image.pixels.dtype == np.float32
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(image.pixels, expected, rtol=1e-6)


def test_rgb_dicom_is_reduced_to_rec601_luminance():
    path = real("SC_rgb.dcm")
    rgb = pydicom.dcmread(path).pixel_array.astype(np.float64)
    image = read_image(path)
    expected = np.rint(rgb @ np.array([0.299, 0.587, 0.114]))
    assert image.pixels.dtype == np.uint8 and image.pixels.shape == (100, 100)
    np.testing.assert_array_equal(image.pixels, expected)
    assert image.meta["converted_to_luminance"] and image.photometric == "RGB"


def test_multiframe_needs_a_frame_index():
    path = real("emri_small.dcm")
    with pytest.raises(MedicalImageError, match="10 frames"):
        read_image(path)
    frame3 = read_image(path, frame=3).pixels
    np.testing.assert_array_equal(frame3, pydicom.dcmread(path).pixel_array[3])
    with pytest.raises(MedicalImageError, match="out of range"):
        read_image(path, frame=10)


def test_path_bytes_and_file_object_give_the_same_image():
    path = real("CT_small.dcm")
    data = Path(path).read_bytes()
    a = read_image(path).pixels
    np.testing.assert_array_equal(read_image(data).pixels, a)
    np.testing.assert_array_equal(read_image(io.BytesIO(data)).pixels, a)
    np.testing.assert_array_equal(read_image(memoryview(data)).pixels, a)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def test_16bit_png_stays_uint16():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 65536, size=(37, 23), dtype=np.uint16)
    image = read_image(_png(array))
    assert image.pixels.dtype == np.uint16
    np.testing.assert_array_equal(image.pixels, array)
    assert image.spacing is None and image.modality is None


def test_8bit_png_and_jpeg_stay_uint8():
    real_ct = read_image(real("CT_small.dcm")).pixels.astype(np.float64)
    gray = np.clip((real_ct + 1000) / 8, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(read_image(_png(gray)).pixels, gray)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="JPEG", quality=95)
    jpeg = read_image(buf.getvalue())
    assert jpeg.pixels.dtype == np.uint8 and jpeg.meta["format"] == "JPEG"
    assert np.abs(jpeg.pixels.astype(int) - gray).mean() < 3


def test_rgb_png_matches_pillow_luminance():
    rgb = pydicom.dcmread(real("US1_UNCR.dcm")).pixel_array  # a real ultrasound, RGB
    image = read_image(_png(rgb))
    pillow = np.asarray(Image.fromarray(rgb).convert("L"))
    assert image.pixels.dtype == np.uint8 and image.photometric == "RGB"
    assert np.abs(image.pixels.astype(int) - pillow).max() <= 1


def test_unrecognised_and_random_bytes_are_refused_with_the_name():
    rng = np.random.default_rng(1)
    with pytest.raises(MedicalImageError, match="upload.bin: unrecognised image format"):
        read_image(rng.bytes(4096), name="upload.bin")
    fake = bytes(128) + b"DICM" + rng.bytes(2000)
    with pytest.raises(MedicalImageError, match="corrupt"):
        read_image(fake)


def test_truncated_dicom_is_refused(tmp_path):
    data = Path(real("CT_small.dcm")).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) - 5000])
    with pytest.raises(MedicalImageError, match="cut.dcm") as info:
        read_image(path)
    assert "truncated" in str(info.value)
    with pytest.raises(MedicalImageError):
        read_image(data[:700])


def test_truncated_png_is_refused():
    data = _png(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    with pytest.raises(MedicalImageError, match="PNG"):
        read_image(data[: len(data) // 2])


def test_missing_path_and_directory_are_refused(tmp_path):
    with pytest.raises(MedicalImageError, match="nope.dcm"):
        read_image(tmp_path / "nope.dcm")
    with pytest.raises(MedicalImageError, match="directory"):
        read_image(tmp_path)
    with pytest.raises(TypeError, match="source"):
        read_image(12345)  # type: ignore[arg-type]


def test_palette_colour_goes_through_the_lut_to_luminance():
    ds = pydicom.dcmread(real("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64)
    index = np.rint((hu - hu.min()) * 255 / (hu.max() - hu.min())).astype(np.uint8)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = index.tobytes()
    del ds.RescaleSlope, ds.RescaleIntercept
    ramp = (np.arange(256, dtype=np.uint16) * 257).astype("<u2").tobytes()
    # red ramp, green constant mid-grey, blue zero: luminance differs from each channel
    green = np.full(256, 0x8000, dtype="<u2").tobytes()
    blue = bytes(512)
    for colour, data in (("Red", ramp), ("Green", green), ("Blue", blue)):
        descriptor = pydicom.datadict.tag_for_keyword(f"{colour}PaletteColorLookupTableDescriptor")
        ds.add_new(descriptor, "US", [256, 0, 16])
        ds.add_new(pydicom.datadict.tag_for_keyword(f"{colour}PaletteColorLookupTableData"), "OW", data)
    image = read_image(dicom_bytes(ds))
    expected = np.rint(0.299 * index.astype(np.float64) * 257 + 0.587 * 0x8000)
    assert image.pixels.dtype == np.uint16
    np.testing.assert_array_equal(image.pixels, expected)


def test_other_transfer_syntaxes_give_native_identical_pixels():
    reference = read_image(real("MR_small.dcm")).pixels
    for name in ("MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        pixels = read_image(real(name)).pixels
        assert pixels.dtype == np.dtype(np.int16) and pixels.dtype.isnative, name
        np.testing.assert_array_equal(pixels, reference, err_msg=name)


def test_unit_intensity_keeps_8_bit_contrast_and_stretches_deeper_images():
    dim = np.array([[60, 120], [90, 180]], dtype=np.uint8)  # a low-contrast 8-bit film
    np.testing.assert_array_equal(unit_intensity(dim), dim.astype(np.float32) / 255)
    twelve = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)  # 12 bits in 16-bit words
    np.testing.assert_allclose(unit_intensity(twelve), [[0, 0.25], [0.5, 1.0]])
    hu = np.array([[-1000, 0], [500, 1000]], dtype=np.int16)
    np.testing.assert_allclose(unit_intensity(hu), [[0, 0.5], [0.75, 1.0]])
    assert unit_intensity(np.full((2, 2), 7, np.uint16)).max() == 0  # constant: zeros
    assert unit_intensity(dim).dtype == np.float32 and unit_intensity(hu).dtype == np.float32


def test_training_and_serving_feed_the_encoder_the_same_pixels(tmp_path):
    """The service's encoder input of an upload equals the training item of the same
    file, for a low-contrast 8-bit film too (the service once stretched every upload to
    its own min and max, while training divided 8-bit films by 255)."""
    from medseek.data.iu import IUReport
    from medseek.data.synth.cxr import build_synth_cxr
    from medseek.io.limits import ReadLimits
    from medseek.models.factory import load_config
    from medseek.serve.ingest import decode_image
    from medseek.serve.work_config import PreprocessSpec
    from medseek.train.data import PairDataset

    reports = [IUReport("CXR9101", "", "", "Normal.", "", ("normal",), (), ())]
    build_synth_cxr(tmp_path, seed=0, size=96, reports=reports, progress=False)
    cfg = load_config("cxr-retrieval")
    ds = PairDataset.from_manifest(tmp_path, cfg, None)
    path = tmp_path / ds.records[0].path
    px = np.asarray(Image.open(path))
    Image.fromarray((40 + px.astype(np.float32) * 0.5).astype(np.uint8)).save(path)  # 40..167
    spec = PreprocessSpec(image_size=tuple(cfg.preprocess.image_size))
    served = decode_image(path.read_bytes(), "image", spec, ReadLimits(), None).payload
    trained = ds[0]["image"]
    assert served.shape == trained.shape == (1, 64, 64)
    np.testing.assert_allclose(served, trained, atol=1e-6)
    assert served.max() < 0.7  # the film's contrast is kept, not stretched
