"""PNG thumbnails for the HTTP gateway and its viewer.

The store keeps metadata, provenance and embeddings, never pixels (an ingest acknowledges
a row, not a file), so a stored item's picture can only come from outside it:

- ``render_content``: uploaded bytes (the query the viewer shows beside a hit), or the
  item's source file when the gateway is given the folder its ids are paths in (ids made
  by ``medseek ingest`` of a folder; a region or chunk child shows its parent's file);
- ``render_card``: otherwise, a card drawn from the metadata the store does keep.

A radiograph shows as it is; a volume shows one axial slice (the middle of the item's
z-range, else of the volume), CT in a soft-tissue window, other modalities stretched
between their 1st and 99th percentiles. The shown plane keeps its aspect ratio, so a box
in source pixels maps onto the thumbnail by ``width`` and ``height`` alone; the viewer
draws boxes and z-ranges over the picture itself, so the PNG carries no annotation.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medseek.io import ReadLimits, read_image, read_volume

from .errors import CORRUPT_CONTENT_ERRORS

#: soft-tissue window (centre, width) in HU of CT slices
CT_WINDOW = (40.0, 400.0)
#: the thumbnail sizes the gateway accepts (longest side, pixels)
MIN_SIZE, MAX_SIZE = 32, 512


@dataclass(frozen=True)
class Thumbnail:
    """A rendered picture and the geometry of what it shows.

    Attributes
    ----------
    png : bytes
    source : str
        ``"file"`` (the item's source file), ``"upload"`` (request bytes) or
        ``"metadata"`` (a card: no pixels were available).
    width, height : int or None
        Pixel size of the shown plane in the source (boxes are in these pixels).
    depth, slice : int or None
        Of a volume: its slices, and the one shown.
    """

    png: bytes
    source: str
    width: int | None = None
    height: int | None = None
    depth: int | None = None
    slice: int | None = None

    def as_json(self) -> dict:
        return {"png": "data:image/png;base64," + base64.b64encode(self.png).decode("ascii"),
                "source": self.source, "width": self.width, "height": self.height,
                "depth": self.depth, "slice": self.slice}


def check_size(size: int, field: str = "size") -> int:
    """``size`` if it is an int within [MIN_SIZE, MAX_SIZE], else ``ValueError`` naming it."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"{field}: must be an integer in [{MIN_SIZE}, {MAX_SIZE}], "
                         f"got {size!r}")
    return size


def _to_png(unit: np.ndarray, size: int) -> bytes:
    """A [0, 1] (h, w) plane as an 8-bit PNG whose longest side is ``size``."""
    h, w = unit.shape
    scale = size / max(h, w)
    out = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = Image.fromarray((np.clip(unit, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.resize(out, Image.Resampling.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def _stretch(plane: np.ndarray, lo_q: float = 0.0, hi_q: float = 100.0) -> np.ndarray:
    """``plane`` to [0, 1] between two percentiles (a flat plane is mid-grey)."""
    x = plane.astype(np.float64)
    lo, hi = np.percentile(x, [lo_q, hi_q])
    if not np.isfinite([lo, hi]).all() or hi <= lo:
        return np.full(x.shape, 0.5)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _slice_of(depth: int, z_range: tuple[int, int] | None) -> int:
    """The slice shown: the middle of ``z_range`` (clamped into the volume), else of it."""
    if z_range is None:
        return depth // 2
    z0, z1 = z_range
    return int(min(max((z0 + max(z1 - 1, z0)) // 2, 0), depth - 1))


def render_content(data: bytes, kind: str, *, size: int = 160, modality: str = "",
                   z_range: tuple[int, int] | None = None, source: str = "upload",
                   limits: ReadLimits | None = None) -> Thumbnail:
    """Render image or volume bytes (``kind`` "image" or "volume").

    Raises ``MedicalImageError`` (a ``ValueError``) naming what is unreadable.
    """
    check_size(size)
    limits = limits if limits is not None else ReadLimits()
    if kind == "image":
        pixels = read_image(data, limits=limits, name=kind).pixels
        h, w = pixels.shape
        return Thumbnail(_to_png(_stretch(pixels), size), source, w, h)
    if kind != "volume":
        raise ValueError(f"kind must be 'image' or 'volume', got {kind!r}")
    vol = read_volume(data, limits=limits, name=kind)
    arr = vol.array
    z = _slice_of(arr.shape[0], z_range)
    plane = arr[z].astype(np.float64)
    if (modality or vol.modality or "").upper() == "CT":
        lo = CT_WINDOW[0] - CT_WINDOW[1] / 2
        unit = np.clip((plane - lo) / CT_WINDOW[1], 0.0, 1.0)
    else:
        unit = _stretch(plane, 1.0, 99.0)
    d, h, w = arr.shape
    return Thumbnail(_to_png(unit, size), source, w, h, depth=d, slice=z)


def card_lines(item) -> list[str]:
    """What a card says about an item (a ``medseek.v1.Item``): kind, metadata, labels."""
    meta = " / ".join(v for v in (item.modality, item.body_part, item.view) if v)
    lines = [item.collection or "item", meta or "no metadata"]
    if item.labels:
        lines.append(", ".join(item.labels))
    if item.region:
        lines.append(f"region {item.region}")
    if item.HasField("z_range"):
        lines.append(f"slices {item.z_range.z_start}-{item.z_range.z_end}")
    lines.append("(no pixels stored)")
    return lines


def render_card(item, size: int = 160) -> Thumbnail:
    """A grey card with ``card_lines(item)``: what the gateway shows without a file."""
    check_size(size)
    img = Image.new("L", (size, size), 48)
    draw = ImageDraw.Draw(img)
    chars = max(8, size // 7)
    for n, line in enumerate(card_lines(item)):
        y = 8 + 14 * n
        if y > size - 14:
            break
        draw.text((8, y), line[:chars], fill=230 if n == 0 else 190)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Thumbnail(buf.getvalue(), "metadata")


def source_file(root: Path | None, item) -> Path | None:
    """The file an item's pixels come from: ``root / id`` (a child: its parent's id), if
    it exists inside ``root``; ids that climb out of it (``..``, absolute) give None."""
    if root is None:
        return None
    rel = item.parent_id or item.id
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base) or path == base or not path.is_file():
        return None
    return path


def kind_of_file(path: Path) -> str:
    """"volume" for NIfTI and zipped series, else "image" (PNG, JPEG, DICOM)."""
    name = path.name.lower()
    return "volume" if name.endswith((".nii", ".nii.gz", ".zip")) else "image"


def render_item(item, root: Path | None, size: int = 160) -> Thumbnail:
    """The item's source file rendered (a chunk or organ at its z-range), else its card.

    A file that exists but does not read as an image or volume also gives the card: the
    archive folder is the operator's, not the request's, so it is no request error.
    """
    path = source_file(root, item)
    if path is not None:
        z = (item.z_range.z_start, item.z_range.z_end) if item.HasField("z_range") else None
        try:
            return render_content(path.read_bytes(), kind_of_file(path), size=size,
                                  modality=item.modality, z_range=z, source="file")
        except (ValueError, *CORRUPT_CONTENT_ERRORS):  # unreadable file: show the card
            pass
    return render_card(item, size)
