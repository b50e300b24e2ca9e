"""A PNG contact sheet of search hits: the query (if any), then each hit with its rank,
id, score and, on a second caption line, its labels and matched region.

Hit pixels are read from ``paths[hit.id]`` when a mapping is given, else from
``root / hit.id`` (ids made by ``medseek ingest`` from a folder are relative paths).
Radiographs (PNG/JPEG/DICOM) show as they are; volumes (NIfTI, zipped DICOM series) show
their middle axial slice in a soft-tissue window. The query's region box, when given, is
drawn on the query tile. Hits without a readable file get a grey tile with the captions
only."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TILE = 160
CAPTION = 28
VOLUME_EXT = (".nii", ".nii.gz", ".zip")


def _pixels(data: bytes, name: str, window: tuple[float, float]) -> np.ndarray | None:
    """[0, 1] float pixels of an image, or of a volume's middle slice; None if unreadable."""
    from medseek.io import MedicalImageError, read_image, read_volume, unit_intensity

    try:
        if name.lower().endswith(VOLUME_EXT):
            arr = read_volume(data).array
            mid = arr[arr.shape[0] // 2].astype(np.float32)
            lo = window[0] - window[1] / 2
            return np.clip((mid - lo) / window[1], 0.0, 1.0)
        return unit_intensity(read_image(data).pixels)
    except (MedicalImageError, ValueError):
        return None


def _tile(data: bytes | None, captions: tuple[str, ...], name: str = "",
          box=None, window: tuple[float, float] = (40.0, 400.0)) -> Image.Image:
    from .ingest import resize

    tile = Image.new("L", (TILE, TILE + CAPTION), 40)
    pixels = _pixels(data, name, window) if data is not None else None
    if pixels is not None and pixels.ndim == 2 and min(pixels.shape) >= 2:
        arr = (np.clip(resize(pixels, (TILE, TILE)), 0, 1) * 255).astype(np.uint8)
        tile.paste(Image.fromarray(arr), (0, 0))
        if box is not None and (box.x1 > box.x0 and box.y1 > box.y0):
            sy, sx = TILE / pixels.shape[0], TILE / pixels.shape[1]
            ImageDraw.Draw(tile).rectangle(
                (box.x0 * sx, box.y0 * sy, box.x1 * sx, box.y1 * sy), outline=255)
    draw = ImageDraw.Draw(tile)
    for i, line in enumerate(captions[:2]):
        draw.text((4, TILE + 2 + 13 * i), line[:26], fill=255)
    return tile


def write_contact_sheet(resp, path: Path, root: Path | None = None,
                        query_image: bytes | None = None, *,
                        paths: Mapping[str, Path] | None = None,
                        query_name: str = "query.png", query_caption: str = "query",
                        query_box=None) -> Path:
    """Write the sheet of ``resp`` (a ``SearchResponse``) to ``path`` and return ``path``.

    Parameters
    ----------
    root : folder the hit ids are relative paths in (``medseek ingest`` of a folder)
    query_image : the query's bytes (image or volume), drawn first
    paths : hit id -> file, for archives whose ids are not paths (wins over ``root``)
    query_name : file name of the query bytes (its extension tells a volume)
    query_box : the query's region box (a ``Box``), drawn on the query tile
    """
    tiles = []
    if query_image is not None:
        tiles.append(_tile(query_image, (query_caption,), query_name, query_box))
    for n, hit in enumerate(resp.hits, 1):
        src = None
        if paths is not None and hit.id in paths:
            src = Path(paths[hit.id])
        elif root is not None:
            src = Path(root) / hit.id
        data = src.read_bytes() if src is not None and src.is_file() else None
        region = hit.matched_region
        second = ",".join(hit.item.labels) + (f" | {region}" if region else "")
        tiles.append(_tile(data, (f"{n}. {hit.score:.3f} {hit.id}", second),
                           src.name if src is not None else ""))
    if not tiles:
        tiles.append(_tile(None, ("no hits",)))
    sheet = Image.new("L", (len(tiles) * (TILE + 4), TILE + CAPTION), 0)
    for i, t in enumerate(tiles):
        sheet.paste(t, (i * (TILE + 4), 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
