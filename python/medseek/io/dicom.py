"""DICOM helpers shared by the 2D reader and the series/multi-frame volume reader.

Pixel values come out with the Modality LUT (Rescale Slope/Intercept) applied and
MONOCHROME1 inverted, so that a higher value is always brighter. Colour images are
reduced to luminance (see :func:`luminance`).
"""

from __future__ import annotations

import io
import math
import struct
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError

from .errors import MedicalImageError
from .limits import ReadLimits

#: Rec. 601 luma weights, the ones Pillow's ``convert("L")`` uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR"}


#: What pydicom raises, at read time or when an element is first accessed (it converts
#: lazily), on malformed input. NotImplementedError comes from unknown VRs.
PARSE_ERRORS = (
    InvalidDicomError, BytesLengthException, EOFError, ValueError, KeyError, TypeError, IndexError, AttributeError,
    NotImplementedError, OSError, ArithmeticError, struct.error,
)


@contextmanager
def parse_errors(name: str) -> Iterator[None]:
    """Turn pydicom's exceptions on malformed input into :class:`MedicalImageError`.

    The original message is dropped (it may quote a header value); the type is kept.
    """
    try:
        yield
    except MedicalImageError:
        raise
    except PARSE_ERRORS as exc:
        raise MedicalImageError(f"{name}: corrupt or truncated DICOM ({type(exc).__name__})") from None


_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: int | None = None


@contextmanager
def quiet_validation() -> Iterator[None]:
    """Switch pydicom's value validation off while a reader works on a dataset.

    pydicom validates a value when it first converts it and, on a malformed one, warns
    and logs a message that quotes the value: a malformed (original) SOP Instance UID, a
    patient name. No identifier may reach stderr or a log, so readers run inside this.
    The switch (``pydicom.config.settings.reading_validation_mode``) is process-wide:
    readers on several threads share it, and the mode found by the first one in is put
    back when the last one leaves.
    """
    global _quiet_depth, _quiet_saved
    settings = pydicom.config.settings
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = settings.reading_validation_mode
            settings.reading_validation_mode = pydicom.config.IGNORE
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                settings.reading_validation_mode = _quiet_saved


def read_dataset(data: bytes, name: str) -> Dataset:
    """Parse DICOM Part 10 bytes, pixel data included but not decoded.

    Raises
    ------
    MedicalImageError
        Not DICOM, or corrupt/truncated so that the header cannot be parsed.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise MedicalImageError(f"{name}: not a DICOM Part 10 file (no 'DICM' marker at offset 128)")
    with parse_errors(name):
        ds = pydicom.dcmread(io.BytesIO(data))
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            raise MedicalImageError(f"{name}: corrupt DICOM (file meta has no Transfer Syntax UID)")
        ds.file_meta.TransferSyntaxUID.is_compressed  # raises ValueError for a non-syntax UID
    return ds


def frame_count(ds: Dataset) -> int:
    try:
        n = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n = 1
    return max(n, 1)


def check_pixel_header(ds: Dataset, name: str, limits: ReadLimits) -> None:
    """Refuse missing or absurd pixel data from the header alone (nothing is decoded).

    Checks that Pixel Data, Rows and Columns exist, then ``frames x rows x columns``
    against ``limits`` and ``rows * columns * frames * samples * BitsAllocated / 8``
    against ``limits.max_decoded_bytes``; for uncompressed data also that the stored
    bytes are not shorter than that (a truncated file).
    """
    if "PixelData" not in ds:
        raise MedicalImageError(f"{name}: DICOM object has no Pixel Data (not an image)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError):
        raise MedicalImageError(f"{name}: missing or invalid Rows/Columns/BitsAllocated") from None
    frames = frame_count(ds)
    if frames > 1:
        limits.check_volume(frames, rows, cols, name)
    else:
        limits.check_image(rows, cols, name)
    expected = rows * cols * frames * samples * bits // 8
    limits.check_decoded_bytes(expected, name)
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        stored = len(ds.PixelData)
        if stored < expected:
            raise MedicalImageError(
                f"{name}: truncated pixel data ({stored} bytes stored, {expected} expected "
                f"for {frames} frame(s) of {rows}x{cols}x{samples} at {bits} bits)"
            )


def decode(ds: Dataset, name: str) -> np.ndarray:
    """Decode the pixel data: ``(F, H, W)`` or ``(F, H, W, 3)`` (RGB), the stored dtype."""
    try:
        arr = ds.pixel_array
    except Exception as exc:  # decoders raise many types; any failure means a bad file
        # Decoder messages describe codecs and buffer sizes (e.g. a missing plugin), not
        # header values, so the first line is kept.
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise MedicalImageError(
            f"{name}: cannot decode pixel data ({type(exc).__name__}: {detail})"
        ) from None
    if not arr.dtype.isnative:  # big-endian transfer syntax
        arr = arr.astype(arr.dtype.newbyteorder("="))
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
    colour = arr.shape[-1] == 3 and (photometric in _COLOUR or int(ds.get("SamplesPerPixel") or 1) == 3)
    if frame_count(ds) == 1:
        arr = arr[np.newaxis]
    if arr.ndim != (4 if colour else 3):
        raise MedicalImageError(f"{name}: unexpected decoded pixel shape {arr.shape}")
    return arr


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma ``0.299 R + 0.587 G + 0.114 B`` of ``(..., 3)`` RGB.

    Integer input is rounded and returned in its own dtype (8-bit stays 8-bit, 16-bit
    stays 16-bit); float input gives float32.
    """
    y = rgb[..., 0] * LUMA_WEIGHTS[0] + rgb[..., 1] * LUMA_WEIGHTS[1] + rgb[..., 2] * LUMA_WEIGHTS[2]
    if np.issubdtype(rgb.dtype, np.integer):
        info = np.iinfo(rgb.dtype)
        return np.clip(np.rint(y), info.min, info.max).astype(rgb.dtype)
    return y.astype(np.float32)


def invert_monochrome1(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Map stored MONOCHROME1 values onto MONOCHROME2 over the BitsStored range.

    Unsigned ``v -> (2**BitsStored - 1) - v``; signed ``v -> -1 - v``. Either maps the
    representable range onto itself, so the dtype is kept.
    """
    if np.issubdtype(arr.dtype, np.signedinteger):
        return (-1 - arr).astype(arr.dtype)
    if np.issubdtype(arr.dtype, np.unsignedinteger):
        bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
        top = (1 << bits) - 1
        return (top - np.minimum(arr, top)).astype(arr.dtype)
    return (arr.max() + arr.min() - arr).astype(arr.dtype)


def narrow(values: np.ndarray, allowed: tuple[type, ...]) -> np.ndarray:
    """Integer ``values`` in the first of ``allowed`` integer dtypes that holds their
    range, else float32."""
    if values.size == 0:
        return values.astype(allowed[0])
    lo, hi = int(values.min()), int(values.max())
    for dtype in allowed:
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return values.astype(dtype)
    return values.astype(np.float32)


def rescale(arr: np.ndarray, slope: float, intercept: float, allowed: tuple[type, ...]) -> np.ndarray:
    """Apply ``slope * v + intercept`` keeping integers when the result is integral.

    The dtype is kept when it is in ``allowed`` and the rescale is the identity; an
    integral rescale (slope 1, integer intercept) keeps the input dtype if it is allowed
    and holds the result, else takes the first of ``allowed`` integer dtypes that does;
    anything else gives float32.
    """
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise MedicalImageError(f"rescale slope/intercept must be finite, got {slope}, {intercept}")
    integral = np.issubdtype(arr.dtype, np.integer) and slope == 1 and float(intercept).is_integer()
    own = arr.dtype.type in allowed
    if integral and intercept == 0 and own:
        return arr
    if integral:
        candidates = ((arr.dtype.type,) if own else ()) + tuple(allowed)
        return narrow(arr.astype(np.int64) + int(intercept), candidates)
    return (arr.astype(np.float64) * slope + intercept).astype(np.float32)


def _item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    if seq:
        return seq[0]
    return None


def functional(ds: Dataset, frame: int, macro: str, keyword: str) -> Any:
    """Attribute ``keyword`` of functional-group ``macro`` for ``frame`` (0-based):
    the per-frame group first, then the shared group, then the top level."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    sources = []
    if per_frame and frame < len(per_frame):
        sources.append(_item(per_frame[frame], macro))
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        sources.append(_item(shared[0], macro))
    for item in sources:
        if item is not None and keyword in item and item[keyword].value not in (None, ""):
            return item[keyword].value
    value = ds.get(keyword)
    return None if value in (None, "") else value


def rescale_of(ds: Dataset, frame: int) -> tuple[float, float]:
    slope = functional(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = functional(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    return (float(slope) if slope is not None else 1.0, float(intercept) if intercept is not None else 0.0)


def positive_pair(value: Any) -> tuple[float, float] | None:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b):
        return (a, b)
    return None


def pixel_spacing(ds: Dataset, frame: int = 0) -> tuple[float, float] | None:
    """``(row spacing, column spacing)`` in mm, i.e. ``(sy, sx)``, or None if unknown.

    Pixel Spacing (per-frame, shared or top level) first; for projection radiographs
    without it, Imager Pixel Spacing (at the detector, not corrected for magnification).
    Zero, negative or missing values give None.
    """
    found = positive_pair(functional(ds, frame, "PixelMeasuresSequence", "PixelSpacing"))
    return found or positive_pair(ds.get("ImagerPixelSpacing"))


def technical_meta(ds: Dataset) -> dict[str, Any]:
    """Non-identifying technical attributes, for ``meta`` dicts (an allow-list)."""
    meta: dict[str, Any] = {}
    for keyword in (
        "Modality", "SOPClassUID", "Manufacturer", "ManufacturerModelName", "BodyPartExamined",
        "ViewPosition", "ImageLaterality", "Laterality", "PhotometricInterpretation",
        "BitsAllocated", "BitsStored", "PixelRepresentation", "Rows", "Columns",
        "NumberOfFrames", "SliceThickness", "KVP", "WindowCenter", "WindowWidth", "ImageType",
    ):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        if isinstance(value, pydicom.multival.MultiValue):
            value = [_plain(v) for v in value]
        else:
            value = _plain(value)
        meta[keyword] = value
    meta["TransferSyntaxUID"] = str(ds.file_meta.get("TransferSyntaxUID", ""))
    return meta


def text(value: Any) -> str | None:
    """A DICOM string value stripped, or None when absent or empty."""
    out = str(value).strip() if value is not None else ""
    return out or None


def _plain(value: Any) -> Any:
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)
