"""From uploaded content to encoder input and content hashes (the store records built from
them: :mod:`medseek.serve.item_records`).

Every function here raises ``InvalidField`` (a ``ValueError``) naming the request field
for anything wrong with the content; the servicer answers INVALID_ARGUMENT with it.
Content over a budget (``ReadLimits`` of the readers, ``RequestBudget`` of the server)
raises ``LimitExceededError`` naming the field, the budget and its value, before the work
it would cost is done; the servicer answers RESOURCE_EXHAUSTED with it.
DICOM, images and volumes alike, is de-identified while it is read (``DeidConfig`` of the
server) and refused when the server has no key: only keyed pseudonyms leave this module,
never an original identifier. PNG/JPEG text chunks and EXIF are never read. Nothing here
logs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from medseek.io import (DeidConfig, LimitExceededError, MedicalImageError, ReadLimits,
                        read_image, read_volume, unit_intensity)
from medseek.io.nifti import is_nifti
from medseek.io.sources import is_dicom, is_zip
from medseek.search.query import InvalidQuery

from .config import PreprocessSpec, RequestBudget

#: collection used when a request names none, by content kind
DEFAULT_COLLECTION = {"text": "report", "image": "image", "volume": "volume"}


class InvalidField(InvalidQuery):
    """Bad request content; ``field`` names the request field."""


#: Longest item id a client may give, in UTF-8 bytes (children ids add their suffix).
MAX_ID_BYTES = 256
#: Longest region (organ) name, in UTF-8 bytes.
MAX_REGION_NAME_BYTES = 64
#: Id segments the server gives the children it makes (``<parent>/region/<name>``,
#: ``<parent>/chunk/<n>``); a client's id may not contain them, or it could overwrite
#: another item's child, which that item's delete would later erase.
RESERVED_ID_SEGMENTS = ("/region/", "/chunk/")


def _check_name(value: str, field: str, max_bytes: int, what: str, empty: str) -> None:
    """The rules item ids and region names share: non-empty (else ``empty``), at most
    ``max_bytes`` of UTF-8, printable (no NUL or other control character)."""
    if not value:
        raise InvalidField(field, empty)
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidField(field, f"is {size} bytes of UTF-8, over the {max_bytes}-byte "
                                  f"limit of {what}")
    for i, ch in enumerate(value):
        if not ch.isprintable():
            raise InvalidField(field, f"must be printable: character {i} is U+{ord(ch):04X} "
                                      f"(a NUL or control character)")


def check_item_id(item_id: str, field: str) -> None:
    """Refuse an item id a client may not use (``InvalidField`` naming the rule).

    Rules: non-empty; at most ``MAX_ID_BYTES`` UTF-8 bytes; printable (no NUL or other
    control characters, which SQLite's JSON functions truncate: such an item could be
    found by a search but never fetched or erased); no leading or trailing whitespace; none
    of the ``RESERVED_ID_SEGMENTS`` of the server's own children. The message quotes no id.
    """
    _check_name(item_id, field, MAX_ID_BYTES, "an item id", "is required")
    if item_id != item_id.strip():
        raise InvalidField(field, "must not start or end with whitespace")
    for segment in RESERVED_ID_SEGMENTS:
        if segment in item_id:
            raise InvalidField(field, f"must not contain {segment!r}: that namespace is "
                                      f"reserved for the children the server makes")


def check_region_name(name: str, field: str) -> None:
    """Refuse a region name that would make a bad child id (``<parent>/region/<name>``):
    empty, over ``MAX_REGION_NAME_BYTES`` UTF-8 bytes, not printable, or holding a '/'."""
    _check_name(name, field, MAX_REGION_NAME_BYTES, "a region name", "must be non-empty")
    if "/" in name:
        raise InvalidField(field, "must not contain '/' (it becomes part of the child's id)")


def _over(field: str, message: str) -> LimitExceededError:
    return LimitExceededError(f"{field}: {message}")


def _reader_error(exc: MedicalImageError, field: str) -> ValueError:
    """A reader's error as this field's: a limit stays a limit (RESOURCE_EXHAUSTED)."""
    message = str(exc).removeprefix(f"{field}: ")
    if isinstance(exc, LimitExceededError):
        return _over(field, message)
    return InvalidField(field, message)


@dataclass
class Decoded:
    """Content ready for the encoder.

    Attributes
    ----------
    kind : {"text", "image", "volume"}
    payload : str, or np.ndarray float32 (1, H, W) in [0, 1], or (D, H, W) in [0, 1]
    sha256 : str
        Of the decoded content (text UTF-8, or dtype + shape + pixel bytes), so the same
        pixels with another (de-identified) header count as duplicates.
    pixels : np.ndarray, optional
        The full-resolution image (for region crops).
    modality, body_part, view, patient_pseudonym, study_pseudonym : str, optional
        From a DICOM header (pseudonyms only after de-identification).
    source_depth : int, optional
        Volumes: slices of the volume as uploaded.
    z_scale : float, optional
        Volumes: target over source z-spacing; payload slice ``i`` samples uploaded slice
        coordinate ``i * z_scale`` (``medseek.volume.resample``).
    """

    kind: str
    payload: object
    sha256: str
    pixels: np.ndarray | None = None
    modality: str | None = None
    body_part: str | None = None
    view: str | None = None
    patient_pseudonym: str | None = None
    study_pseudonym: str | None = None
    source_depth: int | None = None
    z_scale: float | None = None


def _sha_array(a: np.ndarray) -> str:
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(np.ascontiguousarray(a)).cast("B"))  # no copy of the pixels
    return h.hexdigest()


def decode_text(text: str, field: str, budget: RequestBudget | None = None) -> Decoded:
    """Text as it is; refused over ``budget.max_text_bytes`` (UTF-8) before any encoding."""
    budget = budget if budget is not None else RequestBudget()
    data = text.encode("utf-8", "surrogatepass")
    if len(data) > budget.max_text_bytes:
        raise _over(field, f"{len(data)} bytes of UTF-8 text exceeds "
                           f"RequestBudget.max_text_bytes={budget.max_text_bytes}")
    if not text.strip():
        raise InvalidField(field, "empty text")
    return Decoded("text", text, hashlib.sha256(data).hexdigest())


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float32 -> (H, W) float32, bilinear."""
    im = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    return np.asarray(im.resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)


def decode_image(data: bytes, field: str, spec: PreprocessSpec, limits: ReadLimits,
                 deid: DeidConfig | None) -> Decoded:
    """PNG / JPEG / DICOM bytes -> (1, H, W) float32 encoder input."""
    if not data:
        raise InvalidField(field, "empty image bytes")
    if is_dicom(data) and deid is None:
        raise InvalidField(field, "DICOM upload refused: the server has no de-identification "
                                  "key (ServeConfig.deid)")
    try:
        img = read_image(data, limits=limits, deid=deid, name=field)
    except MedicalImageError as exc:
        raise _reader_error(exc, field) from None
    pixels = img.pixels
    if pixels.ndim != 2 or min(pixels.shape) < 2:
        raise InvalidField(field, f"image must be 2-D and at least 2x2, got shape {pixels.shape}")
    if not np.isfinite(pixels).all():
        raise InvalidField(field, "image contains NaN or infinite values")
    unit = unit_intensity(pixels)  # the training data's rule (medseek.train.data)
    return Decoded("image", resize(unit, spec.image_size)[None], _sha_array(pixels),
                   pixels=unit, modality=img.modality, body_part=img.body_part, view=img.view,
                   patient_pseudonym=img.meta.get("patient_pseudonym"),
                   study_pseudonym=img.meta.get("study_pseudonym"))


def check_resample_budget(shape: tuple[int, ...], spacing, target_spacing, field: str,
                          budget: RequestBudget) -> tuple[int, int, int]:
    """The output shape of resampling ``shape`` from ``spacing`` to ``target_spacing``
    (``medseek.volume.resampled_shape``), refused over ``budget.max_resampled_voxels``
    before any voxel is computed: a tiny volume that declares an absurd spacing would
    otherwise resample into gigabytes."""
    from medseek.volume import resampled_shape

    s = tuple(float(v) for v in spacing)
    if len(s) != 3 or not all(math.isfinite(v) and v > 0 for v in s):
        raise InvalidField(field, f"voxel spacing must be three finite values > 0 mm, "
                                  f"got {spacing}")
    t = tuple(float(v) for v in (target_spacing if isinstance(target_spacing, tuple)
                                 else (target_spacing,) * 3))
    if all(math.isfinite(n * a / b) for n, a, b in zip(shape, s, t)):  # else: over any budget
        out_shape = resampled_shape(tuple(shape), s, t)
        voxels = math.prod(out_shape)
        if voxels <= budget.max_resampled_voxels:
            return out_shape
        size = f"{out_shape[0]}x{out_shape[1]}x{out_shape[2]} = {voxels} voxels"
    else:
        size = "an unbounded number of voxels"
    raise _over(field, f"volume of {shape[0]}x{shape[1]}x{shape[2]} voxels at spacing {s} mm "
                       f"resamples to {size} at {t} mm, exceeds "
                       f"RequestBudget.max_resampled_voxels={budget.max_resampled_voxels}")


def decode_volume(data: bytes, field: str, spec: PreprocessSpec, limits: ReadLimits,
                  deid: DeidConfig | None, budget: RequestBudget | None = None) -> Decoded:
    """NIfTI or zipped DICOM series -> resampled, windowed, cropped (D, H, W) float32.

    Costed before the work: the readers check the declared size against ``limits`` before
    inflating or decoding, and the resampled size is checked against ``budget`` before
    resampling. DICOM (anything that is not NIfTI) is refused without a de-identification
    key, as for images.
    """
    from medseek import volume as mv

    budget = budget if budget is not None else RequestBudget()
    if not data:
        raise InvalidField(field, "empty volume bytes")
    try:
        nifti = is_nifti(data, field)
    except MedicalImageError as exc:
        raise _reader_error(exc, field) from None
    if deid is None and not nifti and (is_dicom(data) or is_zip(data)):
        raise InvalidField(field, "DICOM upload refused (a DICOM file or a zipped series): the "
                                  "server has no de-identification key (ServeConfig.deid)")
    try:
        vol = read_volume(data, limits=limits, deid=deid, name=field)
    except MedicalImageError as exc:
        raise _reader_error(exc, field) from None
    arr = vol.array
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise InvalidField(field, f"volume must be 3-D (D, H, W), got shape {arr.shape}")
    check_resample_budget(arr.shape, vol.spacing, spec.target_spacing, field, budget)
    if arr.dtype == np.float32 and not np.isfinite(arr).all():
        raise InvalidField(field, "volume contains NaN or infinite values")
    sha = _sha_array(arr)
    try:
        res = mv.resample(np.ascontiguousarray(arr), vol.spacing, spec.target_spacing)
        win = mv.window(res, *spec.window)
        if spec.blend_window is not None:  # as the model was trained (train/data.py)
            win = mv.blend(win, mv.window(res, *spec.blend_window))
    except (ValueError, TypeError) as exc:
        raise InvalidField(field, str(exc)) from None
    del res
    # H and W are zero-padded (bottom, right) to the patch multiples, as in training
    # (medseek.train.data): 0 is the bottom of the window
    my, mx = spec.volume_multiple
    pad_h, pad_w = (-win.shape[1]) % my, (-win.shape[2]) % mx
    if pad_h or pad_w:
        win = np.pad(win, ((0, 0), (0, pad_h), (0, pad_w)))
    win = np.ascontiguousarray(win, dtype=np.float32)
    target_z = spec.target_spacing[0] if isinstance(spec.target_spacing, tuple) else spec.target_spacing
    return Decoded("volume", win, sha, modality=vol.modality,
                   body_part=vol.body_part,
                   patient_pseudonym=vol.meta.get("patient_pseudonym"),
                   study_pseudonym=vol.meta.get("study_pseudonym"), source_depth=arr.shape[0],
                   z_scale=float(target_z) / float(vol.spacing[0]))


def _box_pixels(shape: tuple[int, int], box, field: str) -> tuple[int, int, int, int]:
    """Pixel columns ``c0:c1`` and rows ``r0:r1`` a box ``(x0, y0, x1, y1)`` touches inside
    an (h, w) image; at least 2x2 of them (one rule for both region pathways)."""
    h, w = shape
    x0, y0, x1, y1 = (float(box.x0), float(box.y0), float(box.x1), float(box.y1))
    if not all(np.isfinite([x0, y0, x1, y1])):
        raise InvalidField(field, "box must be finite")
    c0, r0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    c1, r1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
    if c1 - c0 < 2 or r1 - r0 < 2:
        raise InvalidField(field, f"box ({x0}, {y0}, {x1}, {y1}) must cover at least 2x2 "
                                  f"pixels inside the {w}x{h} image")
    return c0, r0, c1, r1


def crop(unit: np.ndarray, box, field: str, spec: PreprocessSpec) -> np.ndarray:
    """The box ``(x0, y0, x1, y1)`` of a [0, 1] image, resized: (1, H, W) float32 (the
    crop pathway: a region embedded by the global image tower)."""
    c0, r0, c1, r1 = _box_pixels(unit.shape, box, field)
    return resize(unit[r0:r1, c0:c1], spec.image_size)[None]


def model_box(shape: tuple[int, int], box, field: str, spec: PreprocessSpec) -> np.ndarray:
    """A box ``(x0, y0, x1, y1)`` of an uploaded (h, w) image in the pixels of the
    encoder's input (the region pathway): (4,) float32, clipped to the image.

    :func:`decode_image` stretches the whole image to ``spec.image_size`` (H, W), so
    pixel-edge coordinates scale by W / w and H / h (pixel ``i`` spans ``[i, i + 1)`` in
    both, as in :meth:`medseek.models.ViT2D.region_weights`). The box is checked by the
    same rule as :func:`crop`'s, so both pathways accept the same requests.
    """
    _box_pixels(shape, box, field)
    h, w = shape
    big_h, big_w = spec.image_size
    x0, x1 = (min(max(float(v), 0.0), w) * big_w / w for v in (box.x0, box.x1))
    y0, y1 = (min(max(float(v), 0.0), h) * big_h / h for v in (box.y0, box.y1))
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def decode_content(kind: str, value, field: str, spec: PreprocessSpec, limits: ReadLimits,
                   deid: DeidConfig | None, budget: RequestBudget | None = None) -> Decoded:
    if kind == "text":
        return decode_text(value, field, budget)
    if kind == "image":
        return decode_image(value, field, spec, limits, deid)
    return decode_volume(value, field, spec, limits, deid, budget)
