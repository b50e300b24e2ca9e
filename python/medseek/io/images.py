"""2D image reader: DICOM, PNG and JPEG into :class:`Image2D`.

Behaviour, whatever the format:

* higher value = brighter: DICOM MONOCHROME1 is inverted (:func:`~.dicom.invert_monochrome1`);
* DICOM Rescale Slope/Intercept (or a Modality LUT Sequence) is applied; integers stay
  integers when the rescale is integral and the result fits, else float32;
* bit depth is kept: 8-bit gives uint8, 16-bit PNG or DICOM gives uint16/int16;
* colour (RGB, YBR, palette, RGBA, CMYK) is reduced to Rec. 601 luminance
  ``0.299 R + 0.587 G + 0.114 B``, rounded, in the source bit depth; alpha is ignored;
* the size is checked from the header (:class:`ReadLimits`) before any pixel is decoded.
  PNG width/height are read from the IHDR chunk and JPEG ones from the start-of-frame
  segment by this module, then again from :func:`PIL.Image.open` (which parses only the
  header). Pillow's own decompression-bomb error is reported the same way.
* DICOM must be a Part 10 file (128-byte preamble and ``DICM``).

PNG text chunks and JPEG EXIF are never read into ``meta`` (they may hold identifiers).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from . import dicom as dcm
from .deid import DeidConfig, DeidRecord, deidentify
from .errors import LimitExceededError, MedicalImageError
from .limits import ReadLimits
from .records import Image2D
from .sources import Source, is_dicom, is_jpeg, is_png, read_source

_DICOM_2D_DTYPES = (np.uint8, np.int16, np.uint16)


def read_image(
    source: Source,
    *,
    limits: ReadLimits | None = None,
    deid: DeidConfig | None = None,
    frame: int | None = None,
    name: str | None = None,
) -> Image2D:
    """Read a 2D image from a path, bytes or binary file object.

    Parameters
    ----------
    source : str, os.PathLike, bytes-like or binary file-like
        A DICOM Part 10 file, a PNG or a JPEG (recognised by content, not name).
    limits : ReadLimits, optional
        Size limits; defaults to ``ReadLimits()``.
    deid : DeidConfig, optional
        De-identify a DICOM dataset before anything is taken from it and put the
        pseudonyms in ``meta``. Without it ``meta`` holds no identifier at all. Not used
        for PNG/JPEG, whose text chunks and EXIF are never read.
    frame : int, optional
        0-based frame of a multi-frame DICOM; required when it has more than one.
    name : str, optional
        Label of the input in error messages (defaults to the path or ``"<bytes>"``).

    Returns
    -------
    Image2D
        ``pixels`` of shape ``(H, W)``.

    Raises
    ------
    MedicalImageError
        Unrecognised format, corrupt or truncated data, or a frame out of range.
    LimitExceededError
        Declared size beyond ``limits``.
    """
    limits = limits if limits is not None else ReadLimits()
    data, label = read_source(source, limits, name)
    if is_dicom(data):
        return _read_dicom_image(data, label, limits, deid, frame)
    if is_png(data) or is_jpeg(data):
        if frame not in (None, 0):
            raise MedicalImageError(f"{label}: frame={frame} given but PNG/JPEG images have one frame")
        return _read_pil_image(data, label, limits)
    raise MedicalImageError(f"{label}: unrecognised image format (expected DICOM, PNG or JPEG)")


def unit_intensity(pixels: np.ndarray) -> np.ndarray:
    """Pixels of :func:`read_image` → float32 in [0, 1], the encoders' input scale, one rule
    for training (``medseek.train.data``) and serving (``medseek.serve.ingest``):

    * ``uint8`` is divided by 255: an 8-bit PNG, JPEG or DICOM already spans its display
      range, and a dark or low-contrast film stays dark or low-contrast, as the model saw
      such films in training;
    * anything else (16-bit words holding 10–16 bits, rescaled DICOM integers, floats) is
      stretched to its own minimum and maximum: the stored depth says nothing about the
      range used. A constant image gives zeros.
    """
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / np.float32(255.0)
    x = pixels.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)).astype(np.float32)


def _read_dicom_image(
    data: bytes, name: str, limits: ReadLimits, deid: DeidConfig | None, frame: int | None
) -> Image2D:
    with dcm.quiet_validation():
        ds = dcm.read_dataset(data, name)
        with dcm.parse_errors(name):
            return _dicom_to_image(ds, name, limits, deid, frame)


def _dicom_to_image(
    ds: Dataset, name: str, limits: ReadLimits, deid: DeidConfig | None, frame: int | None
) -> Image2D:
    record: DeidRecord | None = deidentify(ds, deid) if deid is not None else None
    dcm.check_pixel_header(ds, name, limits)
    frames = dcm.frame_count(ds)
    if frame is None:
        if frames > 1:
            raise MedicalImageError(
                f"{name}: has {frames} frames; pass frame= or read it with read_dicom_series"
            )
        frame = 0
    if not 0 <= frame < frames:
        raise MedicalImageError(f"{name}: frame={frame} out of range for {frames} frame(s)")
    arr = dcm.decode(ds, name)[frame]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    meta = dcm.technical_meta(ds)
    if arr.ndim == 3:
        arr = dcm.luminance(arr)
        meta["converted_to_luminance"] = True
    if photometric == "MONOCHROME1":
        arr = dcm.invert_monochrome1(arr, ds)
        meta["inverted_monochrome1"] = True
    if "ModalityLUTSequence" in ds:
        arr = dcm.narrow(np.asarray(apply_modality_lut(arr, ds)).astype(np.int64), _DICOM_2D_DTYPES)
    else:
        slope, intercept = dcm.rescale_of(ds, frame)
        arr = dcm.rescale(arr, slope, intercept, _DICOM_2D_DTYPES)
    _add_pseudonyms(meta, record)
    return Image2D(
        pixels=np.ascontiguousarray(arr),
        spacing=dcm.pixel_spacing(ds, frame),
        modality=dcm.text(ds.get("Modality")),
        body_part=dcm.text(ds.get("BodyPartExamined")),
        view=dcm.text(ds.get("ViewPosition")),
        photometric=photometric,
        meta=meta,
        deid=record,
    )


def _add_pseudonyms(meta: dict[str, Any], record: DeidRecord | None) -> None:
    if record is None:
        return
    meta["patient_pseudonym"] = record.patient_pseudonym
    meta["study_pseudonym"] = record.study_pseudonym
    meta["series_pseudonym"] = record.series_pseudonym
    meta["sop_pseudonym"] = record.sop_pseudonym


def _png_size(data: bytes, name: str) -> tuple[int, int]:
    """``(width, height)`` from the PNG IHDR chunk, which must come first."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise MedicalImageError(f"{name}: corrupt PNG (no IHDR chunk after the signature)")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the first JPEG start-of-frame segment, or None if not found.

    Walks the marker segments from the start; stops at start-of-scan (entropy-coded
    data follows, so no frame header came first) or at anything malformed.
    """
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS and pos + 9 <= len(data):
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return width, height
        pos += 2 + length
    return None


def _read_pil_image(data: bytes, name: str, limits: ReadLimits) -> Image2D:
    # Our own header check first, so a bomb is refused before Pillow sees it (Pillow
    # warns or raises on its own, larger, global limit).
    declared = _png_size(data, name) if is_png(data) else _jpeg_size(data)
    if declared is not None:
        limits.check_image(declared[1], declared[0], name)
    try:
        im = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
    except Image.DecompressionBombError:
        raise LimitExceededError(f"{name}: declared image size refused by Pillow's decompression-bomb check") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MedicalImageError(f"{name}: corrupt image header ({type(exc).__name__})") from None
    with im:
        width, height = im.size
        limits.check_image(height, width, name)
        mode = im.mode
        try:
            pixels = _pil_to_gray(im)
        except (OSError, SyntaxError, ValueError) as exc:
            raise MedicalImageError(f"{name}: corrupt or truncated {im.format} data ({type(exc).__name__})") from None
        fmt = im.format
    meta = {
        "format": fmt,
        "mode": mode,
        "Rows": int(height),
        "Columns": int(width),
        "converted_to_luminance": mode not in ("L", "LA", "I;16", "I;16B", "I;16L", "I", "F", "1"),
    }
    return Image2D(pixels=np.ascontiguousarray(pixels), spacing=None, photometric=mode, meta=meta)


def _pil_to_gray(im: Image.Image) -> np.ndarray:
    """Decode a Pillow image to ``(H, W)``: uint8, uint16/int16, or float32 (mode F)."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.uint8)
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        return dcm.narrow(np.asarray(im).astype(np.int64), (np.uint16, np.int16))
    if mode == "F":
        return np.asarray(im, dtype=np.float32)
    if mode == "1":
        return np.asarray(im, dtype=np.uint8) * np.uint8(255)
    if mode == "LA":
        return np.asarray(im)[..., 0].astype(np.uint8)
    if mode not in ("RGB", "RGBA"):
        im = im.convert("RGB")  # palette, CMYK, YCbCr, ...: through RGB to luminance
    return dcm.luminance(np.asarray(im)[..., :3].astype(np.uint8))
