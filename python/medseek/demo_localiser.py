"""``medseek demo`` step: regions found automatically (WristMIR's first stage).

:func:`demo_step` ingests a few fresh wrist phantoms *without* boxes into a running server
started with ``auto_regions`` on, shows the region children the localiser stored for them
(marked automatic) next to the generator's own boxes, and runs a region query that names a
bone but draws no box. It writes ``auto_regions.png`` (each film with the found boxes in
colour and the generator's in white) and returns what it saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: seed of the demo's phantoms: one no shipped model was trained on (releases use 1)
DEMO_SEED = 23
COLOURS = {"distal radius": (255, 80, 80), "distal ulna": (80, 200, 80),
           "ulnar styloid": (80, 140, 255)}


def _phantoms(n: int, size: int = 128) -> list[tuple[str, np.ndarray, dict]]:
    """``n`` PA wrist films: (id, uint8 image, generator's boxes by region)."""
    from medseek.data.synth.wrist import render_wrist

    out = []
    for p in range(n):
        images, boxes, _, _ = render_wrist(DEMO_SEED, p, 0, {}, size)
        out.append((f"auto-demo-{p}", images["PA"], boxes["PA"]))
    return out


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def demo_step(client, out_dir: str | Path, log=print, n: int = 4) -> dict:
    """Ingest ``n`` wrist films without boxes, read back their automatic region children,
    query by region name without a box; returns ``{"items", "children", "mean_iou",
    "query_hits", "matched_region", "png"}`` (``children`` 0: the server's
    ``auto_regions`` is off, said in the log)."""
    from PIL import Image, ImageDraw

    from medseek.data.synth.common import png_bytes
    from medseek.serve.v1 import retrieval_pb2 as pb

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    films = _phantoms(n)
    client.ingest([pb.IngestItem(id=i, image=png_bytes(img), body_part="WRIST", view="PA")
                   for i, img, _ in films])
    names = list(COLOURS)
    kids = client.get([f"{i}/region/auto/{r}" for i, _, _ in films for r in names]).items
    found = {(k.parent_id, k.region): (k.box.x0, k.box.y0, k.box.x1, k.box.y1)
             for k in kids if k.automatic}
    if not found:
        log("auto regions: the server stored no automatic regions (start it with "
            "auto_regions on: medseek serve --auto-regions)")
        return {"items": n, "children": 0, "mean_iou": None, "query_hits": 0,
                "matched_region": None, "png": None}
    ious = [_iou(found[(i, r)], truth[r]) for i, _, truth in films for r in names if (i, r) in found]
    tiles = []
    for i, img, truth in films:
        tile = Image.fromarray(img).convert("RGB").resize((256, 256), Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        for r in names:
            draw.rectangle([v * 2 for v in truth[r]], outline=(255, 255, 255))
            if (i, r) in found:
                draw.rectangle([v * 2 for v in found[(i, r)]], outline=COLOURS[r], width=2)
        tiles.append(tile)
    sheet = Image.new("RGB", (256 * len(tiles), 256))
    for k, tile in enumerate(tiles):
        sheet.paste(tile, (256 * k, 0))
    png = out_dir / "auto_regions.png"
    sheet.save(png)
    q_img = _phantoms(n + 1)[-1][1]  # a film not ingested
    resp = client.search(pb.SearchRequest(image=png_bytes(q_img), k=3,
                                          region=pb.Region(name="distal radius")))
    matched = sorted({h.matched_region for h in resp.hits if h.matched_region})
    log(f"auto regions: {len(found)} boxes found on {n} films without boxes, mean IoU "
        f"{np.mean(ious):.2f} with the generator's; a 'distal radius' query without a box "
        f"reranked {len(resp.hits)} hits by {matched or 'no region'} -> {png}")
    return {"items": n, "children": len(found), "mean_iou": float(np.mean(ious)),
            "query_hits": len(resp.hits), "matched_region": matched[0] if matched else None,
            "png": str(png)}
