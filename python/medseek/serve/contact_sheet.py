"""A PNG contact sheet of search hits: the query image (if any), then each hit with its
rank, id and score. Hit pixels are read from ``root / hit.id`` (ids made by
``medseek ingest`` from a folder are relative paths); hits without a readable image get a
grey tile with the caption only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TILE = 160


def _tile(data: bytes | None, caption: str) -> Image.Image:
    tile = Image.new("L", (TILE, TILE + 28), 40)
    if data is not None:
        from medseek.io import MedicalImageError, read_image

        from .ingest import resize, to_unit_range

        try:
            pixels = read_image(data).pixels
        except MedicalImageError:
            pixels = None
        if pixels is not None:
            arr = (resize(to_unit_range(pixels), (TILE, TILE)) * 255).astype(np.uint8)
            tile.paste(Image.fromarray(arr), (0, 0))
    ImageDraw.Draw(tile).text((4, TILE + 4), caption[:26], fill=255)
    return tile


def write_contact_sheet(resp, path: Path, root: Path | None = None,
                        query_image: bytes | None = None) -> None:
    tiles = []
    if query_image is not None:
        tiles.append(_tile(query_image, "query"))
    for n, hit in enumerate(resp.hits, 1):
        src = Path(root) / hit.id if root is not None else None
        data = src.read_bytes() if src is not None and src.is_file() else None
        tiles.append(_tile(data, f"{n}. {hit.id} {hit.score:.3f}"))
    if not tiles:
        tiles.append(_tile(None, "no hits"))
    sheet = Image.new("L", (len(tiles) * (TILE + 4), TILE + 28), 0)
    for i, t in enumerate(tiles):
        sheet.paste(t, (i * (TILE + 4), 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
