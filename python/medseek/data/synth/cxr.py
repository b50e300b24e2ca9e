"""``synth-cxr``: PA and lateral phantom radiographs for real IU X-ray reports.

For each report, the MeSH major terms are parsed (:mod:`medseek.data.mesh`) and drawn
onto a per-patient phantom (:mod:`.cxr_anatomy`, :mod:`.cxr_findings`), so the label
distribution of the corpus is the real long-tailed one. Images are 8-bit grey PNG,
``size`` x ``size`` (default 256). The report text is read at run time from the
installed ``torchxrayvision`` wheel and written only into the caller's output folder.

Output layout::

    out/images/<uid>_PA.png  out/images/<uid>_LAT.png  out/manifest.parquet
    out/contact_sheet.png

Manifest rows: one per image (kind ``image``, view PA / LATERAL, ``regions``: the boxes of
the lung zones, costophrenic angles and cardiac silhouette as drawn, :mod:`.cxr_regions`;
the lateral view has the cardiac silhouette only) and one per report
(kind ``report``); patient and study ids are hashes of the IU uid; ``source_id`` is
the uid; labels are normalised finding names (``normal`` for normal studies).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from medseek.data.manifest import ManifestRecord, Region, assign_splits, write_manifest
from medseek.data.mesh import Finding, normalised_labels, parse_mesh_terms
from medseek.data.synth.common import case_rng, grid, stable_id, write_png
from medseek.data.synth.cxr_anatomy import draw_lateral, draw_pa, expose, pose_grid, sample_anatomy
from medseek.data.synth.cxr_findings import apply_modifiers, draw_overlays, unrendered
from medseek.data.synth.cxr_regions import canvas_boxes

DEFAULT_SIZE = 256
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def render_case(
    findings: Sequence[Finding], seed: int, key: str, size: int = DEFAULT_SIZE,
    views: Iterable[str] = ("PA", "LATERAL"),
    boxes: dict | None = None,
) -> dict[str, np.ndarray]:
    """Phantom radiographs of one patient with the given findings.

    Parameters
    ----------
    findings : sequence of Finding
    seed : int
        Corpus seed.
    key : str
        Case key (the report uid); anatomy, pose and noise depend only on
        ``(seed, key)``, so the same key with other findings is the same patient.
    size : int
        Image side in pixels (>= 64).
    views : iterable of {"PA", "LATERAL"}
    boxes : dict, optional
        Filled with view name -> {region name: (x0, y0, x1, y1) pixels} of the drawn
        anatomy (:mod:`.cxr_regions`: read from the canvas, so the images do not change).

    Returns
    -------
    dict
        View name -> ``(size, size)`` uint8 image.
    """
    if size < 64:
        raise ValueError(f"size must be >= 64, got {size}")
    findings = list(findings)
    anatomy = sample_anatomy(case_rng(seed, key, "anatomy"))
    apply_modifiers(anatomy, findings, case_rng(seed, key, "modifiers"))
    X, Y = grid(size)
    PX, PY = pose_grid(X, Y, anatomy)
    out = {}
    for view in ("PA", "LATERAL"):
        # PA is always drawn first: lateral devices reuse positions it records.
        canvas = (draw_pa if view == "PA" else draw_lateral)(PX, PY, anatomy, case_rng(seed, key, view, "markings"))
        if boxes is not None and view in views:
            boxes[view] = canvas_boxes(canvas)
        rngs = [case_rng(seed, key, "finding", i) for i in range(len(findings))]
        draw_overlays(canvas, findings, rngs)
        img = expose(canvas, case_rng(seed, key, view, "noise"))
        out[view] = np.round(img * 255.0).astype(np.uint8)
    wanted = list(views)
    for v in wanted:
        if v not in out:
            raise ValueError(f"views must be PA or LATERAL, got {v!r}")
    return {v: out[v] for v in wanted}


def _render_job(job: tuple[tuple[str, ...], int, str, int]) -> tuple[dict[str, bytes], dict]:
    from medseek.data.synth.common import png_bytes

    terms, seed, uid, size = job
    boxes: dict = {}
    images = render_case(parse_mesh_terms(terms), seed, uid, size, boxes=boxes)
    return {v: png_bytes(img) for v, img in images.items()}, boxes


def build_synth_cxr(
    out: str | Path,
    *,
    n: int | None = None,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    workers: int = 1,
    reports: Sequence | None = None,
    progress: bool = True,
) -> list[ManifestRecord]:
    """Build the synth-cxr corpus into ``out`` and return its manifest records.

    Parameters
    ----------
    out : str or Path
        Output folder (created).
    n : int, optional
        Use only the first ``n`` reports (all by default).
    seed : int
    size : int
        Image side in pixels.
    workers : int
        Processes that render; results are identical for any value.
    reports : sequence of IUReport, optional
        Reports to render; by default all IU reports from ``torchxrayvision``.
    progress : bool
        Show a tqdm progress bar.
    """
    from tqdm import tqdm

    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if reports is None:
        from medseek.data.iu import load_iu_reports

        reports = load_iu_reports()
    reports = list(reports)[: n if n is not None else None]
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(tuple(r.mesh_major), seed, r.uid, size) for r in reports]
    records: list[ManifestRecord] = []
    sheet_tiles = []
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers)
        results = pool.imap(_render_job, jobs, chunksize=8)
    else:
        pool = None
        results = map(_render_job, jobs)
    try:
        for rep, (pngs, boxes) in tqdm(zip(reports, results), total=len(jobs), desc="synth-cxr", disable=not progress):
            findings = parse_mesh_terms(rep.mesh_major)
            labels = normalised_labels(rep.mesh_major)
            patient = stable_id("iu-pt-", f"iu:{rep.uid}")
            study = stable_id("iu-st-", f"iu:{rep.uid}")
            missing = unrendered(findings)
            for view, suffix in (("PA", "PA"), ("LATERAL", "LAT")):
                rel = f"images/{rep.uid}_{suffix}.png"
                (root / rel).write_bytes(pngs[view])
                records.append(ManifestRecord(
                    id=f"{rep.uid}_{suffix}", path=rel, kind="image", modality="CR", body_part="CHEST",
                    view=view, patient_id=patient, study_id=study, source_id=f"iu:{rep.uid}", labels=labels,
                    regions=tuple(Region(name=name, box=box) for name, box in boxes[view].items()),
                    meta={"size": size, "bits": 8, "unrendered": missing},
                ))
            records.append(ManifestRecord(
                id=f"{rep.uid}:report", path="", kind="report", body_part="CHEST", patient_id=patient,
                study_id=study, source_id=f"iu:{rep.uid}", labels=labels, report=rep.text,
                meta={"mesh_major": list(rep.mesh_major),
                      "findings": [{"name": f.name, "side": f.side, "zone": f.zone, "severity": f.severity}
                                   for f in findings]},
            ))
            if len(sheet_tiles) < 16 and (labels != ("normal",) or len(sheet_tiles) < 4):
                from io import BytesIO

                from PIL import Image

                for view in ("PA", "LATERAL"):
                    img = np.asarray(Image.open(BytesIO(pngs[view])))
                    sheet_tiles.append((img, f"{rep.uid} {view}: " + ", ".join(labels)))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    records = assign_splits(records, SPLIT_FRACTIONS, seed)
    write_manifest(records, root / "manifest.parquet")
    if sheet_tiles:
        from medseek.data.synth.sheet import contact_sheet

        contact_sheet(sheet_tiles[:16], root / "contact_sheet.png")
    return records
