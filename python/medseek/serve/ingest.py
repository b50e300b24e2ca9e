"""From uploaded content to encoder input, content hashes and store records.

Every function here raises ``InvalidField`` (a ``ValueError``) naming the request field
for anything wrong with the content; the servicer answers INVALID_ARGUMENT with it.
DICOM is de-identified while it is read (``DeidConfig`` of the server): only keyed
pseudonyms leave this module, never an original identifier. PNG/JPEG text chunks and EXIF
are never read. Nothing here logs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from medseek.index import ItemRecord
from medseek.io import DeidConfig, MedicalImageError, ReadLimits, read_image, read_volume
from medseek.io.sources import is_dicom

from .config import PreprocessSpec

#: collection used when a request names none, by content kind
DEFAULT_COLLECTION = {"text": "report", "image": "image", "volume": "volume"}


class InvalidField(ValueError):
    """Bad request content; ``field`` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


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
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def decode_text(text: str, field: str) -> Decoded:
    if not text.strip():
        raise InvalidField(field, "empty text")
    return Decoded("text", text, hashlib.sha256(text.encode("utf-8")).hexdigest())


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """Scale by the image's own min and max into [0, 1] (a constant image gives 0)."""
    x = pixels.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)).astype(np.float32)


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
        raise InvalidField(field, str(exc).removeprefix(f"{field}: ")) from None
    pixels = img.pixels
    if pixels.ndim != 2 or min(pixels.shape) < 2:
        raise InvalidField(field, f"image must be 2-D and at least 2x2, got shape {pixels.shape}")
    if not np.isfinite(pixels).all():
        raise InvalidField(field, "image contains NaN or infinite values")
    unit = to_unit_range(pixels)
    return Decoded("image", resize(unit, spec.image_size)[None], _sha_array(pixels),
                   pixels=unit, modality=img.modality, body_part=img.body_part, view=img.view,
                   patient_pseudonym=img.meta.get("patient_pseudonym"),
                   study_pseudonym=img.meta.get("study_pseudonym"))


def decode_volume(data: bytes, field: str, spec: PreprocessSpec, limits: ReadLimits,
                  deid: DeidConfig | None) -> Decoded:
    """NIfTI or zipped DICOM series -> resampled, windowed, cropped (D, H, W) float32."""
    from medseek import volume as mv

    if not data:
        raise InvalidField(field, "empty volume bytes")
    try:
        vol = read_volume(data, limits=limits, deid=deid, name=field)
    except MedicalImageError as exc:
        raise InvalidField(field, str(exc).removeprefix(f"{field}: ")) from None
    arr = vol.array
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise InvalidField(field, f"volume must be 3-D (D, H, W), got shape {arr.shape}")
    if arr.dtype == np.float32 and not np.isfinite(arr).all():
        raise InvalidField(field, "volume contains NaN or infinite values")
    try:
        res = mv.resample(np.ascontiguousarray(arr), vol.spacing, spec.target_spacing)
        win = mv.window(res, *spec.window)
    except (ValueError, TypeError) as exc:
        raise InvalidField(field, str(exc)) from None
    # H and W are zero-padded (bottom, right) to the patch multiples, as in training
    # (medseek.train.data): 0 is the bottom of the window
    my, mx = spec.volume_multiple
    pad_h, pad_w = (-win.shape[1]) % my, (-win.shape[2]) % mx
    if pad_h or pad_w:
        win = np.pad(win, ((0, 0), (0, pad_h), (0, pad_w)))
    win = np.ascontiguousarray(win, dtype=np.float32)
    target_z = spec.target_spacing[0] if isinstance(spec.target_spacing, tuple) else spec.target_spacing
    return Decoded("volume", win, _sha_array(arr), modality=vol.modality,
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
                   deid: DeidConfig | None) -> Decoded:
    if kind == "text":
        return decode_text(value, field)
    if kind == "image":
        return decode_image(value, field, spec, limits, deid)
    return decode_volume(value, field, spec, limits, deid)


def build_record(item, collection: str, dec: Decoded, field: str) -> ItemRecord:
    """The store record of an ``IngestItem``; header values fill what the request left empty
    (de-identified DICOM pseudonyms win over the request's)."""
    try:
        return ItemRecord(
            id=item.id, collection=collection,
            modality=item.modality or dec.modality, body_part=item.body_part or dec.body_part,
            view=item.view or dec.view, labels=tuple(item.labels),
            patient_pseudonym=dec.patient_pseudonym or item.patient_pseudonym or None,
            study_pseudonym=dec.study_pseudonym or item.study_pseudonym or None,
            source_document=item.source_document or None, content_sha256=dec.sha256)
    except (ValueError, TypeError) as exc:
        raise InvalidField(field, str(exc)) from None


def region_record(parent: ItemRecord, region, collection: str, field: str) -> ItemRecord:
    """The store record of a region crop of ``parent``: id ``<parent id>/region/<name>``,
    the parent's metadata and provenance, ``parent_id``, ``region`` and ``box``."""
    box = (region.box.x0, region.box.y0, region.box.x1, region.box.y1)
    try:
        return ItemRecord(
            id=f"{parent.id}/region/{region.name}", collection=collection,
            modality=parent.modality, body_part=parent.body_part, view=parent.view,
            labels=parent.labels, patient_pseudonym=parent.patient_pseudonym,
            study_pseudonym=parent.study_pseudonym, source_document=parent.source_document,
            parent_id=parent.id, region=region.name, box=box)
    except (ValueError, TypeError) as exc:
        raise InvalidField(field, str(exc)) from None


def source_z_ranges(z_range: np.ndarray, z_scale: float, source_depth: int,
                    resampled_depth: int) -> np.ndarray:
    """Chunk z-ranges in the resampled volume -> slices of the volume as uploaded.

    Resampled slice ``i`` samples uploaded coordinate ``i * z_scale``; an uploaded slice
    belongs to the chunk holding its nearest resampled slice, so the chunks tile the
    uploaded volume (overlapping chunks share slices). A chunk holding no uploaded slice's
    nearest sample (strong upsampling) gets the slices its samples lie between.

    Parameters
    ----------
    z_range : np.ndarray, int, shape (C, 2)
        First and last slice (inclusive) of each chunk in the resampled volume.
    z_scale : float > 0
    source_depth, resampled_depth : int >= 1

    Returns
    -------
    np.ndarray, int64, shape (C, 2)
    """
    k = np.arange(source_depth)
    nearest = np.clip(np.floor(k / z_scale + 0.5), 0, resampled_depth - 1).astype(np.int64)
    out = np.empty((len(z_range), 2), dtype=np.int64)
    for c, (a, b) in enumerate(np.asarray(z_range, dtype=np.int64)):
        mine = k[(nearest >= a) & (nearest <= b)]
        if mine.size:
            out[c] = mine[0], mine[-1]
        else:
            out[c] = (min(int(np.floor(a * z_scale)), source_depth - 1),
                      min(int(np.ceil(b * z_scale)), source_depth - 1))
    return out


def _child(parent: ItemRecord, **fields) -> ItemRecord:
    """A child of ``parent`` with its metadata, labels and provenance."""
    return ItemRecord(
        collection=fields.pop("collection"), modality=parent.modality,
        body_part=parent.body_part, view=parent.view, labels=parent.labels,
        patient_pseudonym=parent.patient_pseudonym, study_pseudonym=parent.study_pseudonym,
        source_document=parent.source_document, parent_id=parent.id, **fields)


def chunk_record(parent: ItemRecord, n: int, z_range, collection: str,
                 field: str) -> ItemRecord:
    """The store record of chunk ``n`` of volume ``parent``: id ``<parent id>/chunk/<n>``,
    the parent's metadata and provenance, ``parent_id`` and ``z_range`` (uploaded slices)."""
    try:
        return _child(parent, id=f"{parent.id}/chunk/{n}", collection=collection,
                      z_range=(int(z_range[0]), int(z_range[1])))
    except (ValueError, TypeError) as exc:
        raise InvalidField(field, str(exc)) from None


def organ_record(parent: ItemRecord, region, collection: str, field: str,
                 source_depth: int) -> ItemRecord:
    """The store record of an organ of volume ``parent``: id ``<parent id>/region/<name>``,
    ``region`` = the name, ``z_range`` = the organ's slices (checked against the volume)."""
    if not region.name:
        raise InvalidField(f"{field}.name", "must be non-empty")
    if region.HasField("box") or not region.HasField("z_range"):
        raise InvalidField(field, "a volume's region needs a z_range (organ slices) and no box")
    z0, z1 = int(region.z_range.z_start), int(region.z_range.z_end)
    if z0 > z1:
        raise InvalidField(f"{field}.z_range", f"z_start {z0} is after z_end {z1}")
    if z1 >= source_depth:
        raise InvalidField(f"{field}.z_range", f"z_end {z1} is past the volume's last slice "
                                               f"{source_depth - 1}")
    try:
        return _child(parent, id=f"{parent.id}/region/{region.name}", collection=collection,
                      region=region.name, z_range=(z0, z1))
    except (ValueError, TypeError) as exc:
        raise InvalidField(field, str(exc)) from None
