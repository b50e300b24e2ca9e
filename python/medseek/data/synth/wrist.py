"""``synth-wrist``: pediatric wrist radiographs with region boxes and region captions.

Following WristMIR, every study has a global caption and one caption per bone region
(distal radius, distal ulna, ulnar styloid), and each image row carries the three
region boxes (pixels, ``[x0, y0, x1, y1]``) with that region's caption. Some patients
have several studies (follow-up films). Images are 8-bit grey PNG, ``size`` square.

Output: ``out/images/<study>_{PA,LAT}.png``, ``out/manifest.parquet``,
``out/contact_sheet.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseek.data.manifest import ManifestRecord, Region, assign_splits, write_manifest
from medseek.data.synth.common import case_rng, grid, png_bytes, stable_id
from medseek.data.synth.wrist_draw import (
    REGIONS,
    Fracture,
    boxes,
    draw_wrist,
    expose_wrist,
    fracture_points,
    sample_pose,
    sample_wrist,
)

DEFAULT_SIZE = 256
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
# Marginal rates, roughly those of pediatric wrist trauma series: distal radius
# fractures dominate, ulnar styloid fractures mostly accompany them.
P_RADIUS, P_ULNA, P_STYLOID_WITH_RADIUS, P_STYLOID_ALONE = 0.45, 0.12, 0.4, 0.05

_NAMES = {"distal radius": ("distal radius", "distal radial metaphysis"),
          "distal ulna": ("distal ulna", "distal ulnar metaphysis"),
          "ulnar styloid": ("ulnar styloid", "ulnar styloid process")}


def sample_fractures(rng: np.random.Generator) -> dict[str, Fracture]:
    """Draw which of the three regions are fractured, with displacement and angulation."""
    out: dict[str, Fracture] = {}
    radius = rng.random() < P_RADIUS
    for region, p in (("distal radius", 1.0 if radius else 0.0), ("distal ulna", P_ULNA),
                      ("ulnar styloid", P_STYLOID_WITH_RADIUS if radius else P_STYLOID_ALONE)):
        if rng.random() < p:
            grade = rng.choice([0, 1, 2], p=[0.5, 0.35, 0.15])  # non-, mildly, markedly displaced
            out[region] = Fracture(
                region=region,
                displacement=float([0.0, rng.uniform(0.25, 0.5), rng.uniform(0.6, 1.0)][grade]),
                angulation=float([rng.uniform(0, 5), rng.uniform(8, 18), rng.uniform(20, 35)][grade]),
                comminuted=bool(rng.random() < 0.1),
            )
    return out


def region_caption(region: str, frac: Fracture | None, rng: np.random.Generator) -> str:
    """One varied sentence about one region."""
    name = str(rng.choice(_NAMES[region]))
    if frac is None:
        return str(rng.choice([f"The {name} is intact.", f"No fracture of the {name}.",
                               f"{name.capitalize()}: no acute osseous abnormality."]))
    disp = ("nondisplaced" if frac.displacement < 0.2 else
            "minimally displaced" if frac.displacement < 0.55 else "displaced")
    kind = "comminuted" if frac.comminuted else str(rng.choice(["transverse", "oblique", "buckle" if disp == "nondisplaced" else "transverse"]))
    parts = [f"{disp.capitalize()} {kind} fracture of the {name}"]
    if frac.angulation >= 8 and region != "ulnar styloid":
        parts.append(f"with approximately {int(round(frac.angulation))} degrees of dorsal angulation")
    return " ".join(parts) + "."


def global_caption(side: str, fractures: dict[str, Fracture], follow_up: bool, rng) -> str:
    head = f"{side.capitalize()} wrist, two views" + (" (follow-up)" if follow_up else "") + "."
    if not fractures:
        return head + " " + str(rng.choice(["No acute fracture or dislocation.",
                                             "Normal alignment; no fracture identified.",
                                             "No radiographic evidence of fracture."]))
    names = [r for r in REGIONS if r in fractures]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    worst = max(f.displacement for f in fractures.values())
    tone = "Displaced" if worst >= 0.55 else "Nondisplaced or minimally displaced"
    return f"{head} {tone} fracture{'s' if len(names) > 1 else ''} of the {listed}."


def _patients(n: int, seed: int) -> list[tuple[int, int]]:
    """(patient index, study number) per case: about a quarter are follow-up studies."""
    rng = case_rng(seed, "wrist-patients")
    out, patient, study = [], -1, 0
    for i in range(n):
        if i > 0 and rng.random() < 0.25:
            study += 1
        else:
            patient, study = patient + 1, 0
        out.append((patient, study))
    return out


def render_wrist(seed: int, patient: int, study: int, fractures: dict[str, Fracture], size: int):
    """(images, boxes, anatomy, fracture sites) of one study; the last three keyed by view
    where they depend on it. Each view has its own positioning (rotation, shift)."""
    prng = case_rng(seed, "wrist", patient)
    age = int(prng.integers(4, 18))
    X, Y = grid(size)
    images, all_boxes, points = {}, {}, {}
    for view in ("PA", "LATERAL"):
        anatomy = sample_wrist(case_rng(seed, "wrist", patient, "anatomy"), age + study // 2)
        pose = sample_pose(case_rng(seed, "wrist", patient, study, view, "pose"))
        PX, PY = pose.to_patient(X, Y)
        dens = draw_wrist(PX, PY, anatomy, fractures, view)
        img = expose_wrist(dens, anatomy, case_rng(seed, "wrist", patient, study, view, "noise"))
        images[view] = np.round(img * 255).astype(np.uint8)
        all_boxes[view] = boxes(anatomy, view, size, pose)
        points[view] = fracture_points(anatomy, view, pose, size)
    return images, all_boxes, anatomy, points


def build_synth_wrist(out: str | Path, *, n: int = 200, seed: int = 0, size: int = DEFAULT_SIZE,
                      progress: bool = True) -> list[ManifestRecord]:
    """Build ``n`` wrist studies (PA + lateral each) into ``out``; return the records."""
    from tqdm import tqdm

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if size < 64:
        raise ValueError(f"size must be >= 64, got {size}")
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records: list[ManifestRecord] = []
    tiles = []
    for i, (patient, study) in enumerate(tqdm(_patients(n, seed), desc="synth-wrist", disable=not progress)):
        rng = case_rng(seed, "wrist-case", i)
        fractures = sample_fractures(rng)
        side = str(case_rng(seed, "wrist", patient).choice(["left", "right"]))
        images, view_boxes, anatomy, sites = render_wrist(seed, patient, study, fractures, size)
        captions = {r: region_caption(r, fractures.get(r), rng) for r in REGIONS}
        caption = global_caption(side, fractures, study > 0, rng)
        labels = tuple(f"{r} fracture" for r in REGIONS if r in fractures) or ("normal",)
        pid = stable_id("wr-pt-", f"{seed}:{patient}")
        sid = f"{pid}-s{study}"
        meta = {"age": anatomy.age, "side": side, "size": size, "bits": 8,
                "fractures": {r: {"displacement": round(f.displacement, 3), "angulation": round(f.angulation, 1),
                                  "comminuted": f.comminuted, "site_px": {v: list(sites[v][r]) for v in sites}}
                              for r, f in fractures.items()}}
        for view, suffix in (("PA", "PA"), ("LATERAL", "LAT")):
            rel = f"images/{sid}_{suffix}.png"
            (root / rel).write_bytes(png_bytes(images[view]))
            regions = tuple(Region(name=r, box=view_boxes[view][r], text=captions[r]) for r in REGIONS)
            records.append(ManifestRecord(
                id=f"{sid}_{suffix}", path=rel, kind="image", modality="CR", body_part="WRIST", view=view,
                patient_id=pid, study_id=sid, source_id=sid, labels=labels,
                report=caption, regions=regions, meta=meta,
            ))
        records.append(ManifestRecord(
            id=f"{sid}:report", path="", kind="report", body_part="WRIST", patient_id=pid, study_id=sid,
            source_id=sid, labels=labels, report=" ".join([caption] + [captions[r] for r in REGIONS]),
            meta={"global_caption": caption, "region_captions": captions},
        ))
        if len(tiles) < 16:
            tiles.append((images["PA"], f"{sid} PA: " + ", ".join(labels)))
            tiles.append((images["LATERAL"], f"{sid} LAT"))
    records = assign_splits(records, SPLIT_FRACTIONS, seed)
    write_manifest(records, root / "manifest.parquet")
    from medseek.data.synth.sheet import contact_sheet

    contact_sheet(tiles[:16], root / "contact_sheet.png")
    return records
