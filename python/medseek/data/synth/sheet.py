"""Contact sheets: a grid of sample images with their labels, written as one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from medseek.data.synth.common import write_png


def contact_sheet(
    tiles: Sequence[tuple[np.ndarray, str]],
    path: str | Path,
    *,
    columns: int = 4,
    tile: int = 192,
    caption_lines: int = 3,
) -> Path:
    """Write ``tiles`` (grey uint8 image, caption) as a grid with captions under each.

    Images are resized to ``tile`` x ``tile``; captions are wrapped and cut to
    ``caption_lines`` lines. The output is deterministic (fixed font and PNG settings).
    """
    from PIL import Image, ImageDraw, ImageFont

    if not tiles:
        raise ValueError("tiles must not be empty")
    font = ImageFont.load_default()
    line_h = 12
    cap_h = caption_lines * line_h + 4
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("L", (columns * tile, rows * (tile + cap_h)), color=0)
    draw = ImageDraw.Draw(sheet)
    chars = max(8, tile // 6)
    for k, (img, caption) in enumerate(tiles):
        r, col = divmod(k, columns)
        x, y = col * tile, r * (tile + cap_h)
        pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).resize((tile, tile), Image.BILINEAR)
        sheet.paste(pil, (x, y))
        words, lines, cur = caption.split(), [], ""
        for w in words:
            if len(cur) + len(w) + 1 > chars:
                lines.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}".strip()
        lines.append(cur)
        for j, text in enumerate(lines[:caption_lines]):
            draw.text((x + 2, y + tile + 2 + j * line_h), text, fill=255, font=font)
    out = Path(path)
    write_png(out, np.asarray(sheet))
    return out
