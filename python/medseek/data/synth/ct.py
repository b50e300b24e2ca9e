"""``synth-ct``: chest CT volumes (NIfTI, HU, int16) with organ-wise report sentences.

Each case varies slice count (40-400), slice thickness (0.625-5 mm) and in-plane
spacing (0.5-1.0 mm) with a modest matrix (128-192 by default). Findings are placed
in organs and lobes; the manifest's volume row lists every organ as a region with
its z-range (slice indices ``z0`` inclusive, ``z1`` exclusive; in ``meta["regions_mm"]``
the same range in millimetres from the inferior edge of slice 0, ``z * slice spacing``) and its organ-wise sentence, as SigVLP's chunk-wise
alignment needs. NIfTI files carry an LPS-voxel affine: columns ``(-sx, 0, 0)``,
``(0, -sy, 0)``, ``(0, 0, sz)`` in RAS+ world coordinates.

Output: ``out/volumes/<case>.nii.gz``, ``out/manifest.parquet``, ``out/contact_sheet.png``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from medseek.data.manifest import ManifestRecord, Region, assign_splits, write_manifest
from medseek.data.synth.common import case_rng, stable_id
from medseek.data.synth.ct_draw import HU, LOBES, ORGANS, CTGeometry, draw_ct

SLICE_THICKNESSES = (0.625, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
FINDING_RATES = {"nodule": 0.3, "mass": 0.06, "consolidation": 0.15, "pleural effusion": 0.15,
                 "emphysema": 0.2, "cardiomegaly": 0.15, "pericardial effusion": 0.06,
                 "liver lesion": 0.12, "kidney cyst": 0.12, "vertebral fracture": 0.06, "rib fracture": 0.06}
REPORT_ORGANS = ("lungs", "pleura", "heart", "aorta", "liver", "kidneys", "bones")
# which organ sentence reports each finding
REPORT_ORGAN_OF = {"nodule": "lungs", "mass": "lungs", "consolidation": "lungs", "emphysema": "lungs",
                   "pleural effusion": "pleura", "cardiomegaly": "heart", "pericardial effusion": "heart",
                   "liver lesion": "liver", "kidney cyst": "kidneys", "vertebral fracture": "bones",
                   "rib fracture": "bones"}


def sample_geometry(rng, matrix=(128, 192), slices=(40, 400)) -> CTGeometry:
    m = int(rng.integers(matrix[0] // 16, matrix[1] // 16 + 1)) * 16 if matrix[1] >= 16 else matrix[0]
    m = int(min(max(m, matrix[0]), matrix[1]))
    sxy = round(float(rng.uniform(0.5, 1.0)), 3)
    dz = float(rng.choice(SLICE_THICKNESSES))
    coverage = rng.uniform(220.0, 320.0)
    d = int(np.clip(round(coverage / dz), slices[0], slices[1]))
    return CTGeometry(shape=(d, m, m), spacing=(dz, sxy, sxy))


def _sphere(g: CTGeometry, center_vox, radius_mm):
    d, h, w = g.shape
    sz, sy, sx = g.spacing
    cz, cy, cx = center_vox
    z = (np.arange(d)[:, None, None] - cz) * sz
    y = (np.arange(h)[None, :, None] - cy) * sy
    x = (np.arange(w)[None, None, :] - cx) * sx
    return z * z + y * y + x * x <= radius_mm ** 2


def _pick(lab, value, rng):
    idx = np.flatnonzero(lab.ravel() == value)
    if idx.size == 0:
        return None
    return np.unravel_index(int(idx[rng.integers(idx.size)]), lab.shape)


def place_findings(vol, lab, g: CTGeometry, names: list[str], p: dict, rng) -> list[dict]:
    """Draw findings into ``vol``; return one dict per drawn finding (name, organ, size, z-range)."""
    out = []
    lungs = (lab >= ORGANS["right upper lobe"]) & (lab <= ORGANS["left lower lobe"])
    for name in names:
        mask, organ, size = None, "", 0.0
        if name in ("nodule", "mass", "consolidation"):
            organ = str(rng.choice(LOBES))
            c = _pick(lab, ORGANS[organ], rng)
            if c is None:
                continue
            size = float(rng.uniform(4, 9) if name == "nodule" else rng.uniform(18, 30) if name == "mass" else rng.uniform(20, 35))
            mask = _sphere(g, c, size / 2 if name != "consolidation" else size) & (lungs if name == "mass" else lab == ORGANS[organ])
            vol[mask] = {"nodule": 35.0, "mass": 38.0, "consolidation": 22.0}[name]
        elif name == "pleural effusion":
            organ = str(rng.choice(["right", "left"]))
            side = lab.copy()
            side_lobes = [ORGANS[l] for l in LOBES if l.startswith(organ)]
            y = np.arange(g.shape[1])[None, :, None] / g.shape[1]
            depth = rng.uniform(0.72, 0.85)
            mask = np.isin(side, side_lobes) & (y > depth)
            size = float((1 - depth) * g.extent[1])
            vol[mask] = HU["fluid"]
        elif name == "emphysema":
            organ = "upper lobes"
            from scipy.ndimage import gaussian_filter

            field = gaussian_filter(rng.standard_normal(g.shape).astype(np.float32), 2.0)
            mask = np.isin(lab, [ORGANS["right upper lobe"], ORGANS["left upper lobe"]]) & (field > 0.8 * field.std())
            vol[mask] = -960.0
        elif name == "pericardial effusion":
            organ = "heart"
            r = p["heart_mask_r"]
            mask = (r > 1.0) & (r <= 1.2) & ~lungs
            size = float(rng.uniform(5, 15))
            vol[mask] = HU["fluid"]
        elif name == "cardiomegaly":
            organ = "heart"
            mask = lab == ORGANS["heart"]
        elif name in ("liver lesion", "kidney cyst"):
            organ = "liver" if name == "liver lesion" else "kidneys"
            c = _pick(lab, ORGANS[organ], rng)
            if c is None:
                continue
            size = float(rng.uniform(8, 20) if organ == "liver" else rng.uniform(6, 14))
            mask = _sphere(g, c, size / 2) & (lab == ORGANS[organ])
            vol[mask] = 15.0 if organ == "liver" else 5.0
        elif name in ("vertebral fracture", "rib fracture"):
            organ = "spine" if name == "vertebral fracture" else "ribs"
            c = _pick(lab, ORGANS[organ], rng)
            if c is None:
                continue
            size = float(rng.uniform(3, 6))
            # a lucent fracture plane through the bone at one level
            zs = max(1, int(round(size / g.spacing[0])))
            mask = np.zeros(g.shape, dtype=bool)
            mask[c[0]: c[0] + zs] = lab[c[0]: c[0] + zs] == ORGANS[organ]
            if organ == "ribs":
                mask &= _sphere(g, c, 12.0)
            vol[mask] = 60.0
        if mask is None or not mask.any():
            continue
        zs = np.flatnonzero(mask.any(axis=(1, 2)))
        out.append({"name": name, "organ": organ, "size_mm": round(size, 1), "z0": int(zs[0]), "z1": int(zs[-1]) + 1})
    return out


def _a(f: dict) -> str:
    """Article for a size phrase: "an 8 mm", "a 12 mm"."""
    return "an" if f"{f['size_mm']:.0f}".startswith(("8", "11", "18")) else "a"


def organ_sentences(found: list[dict], rng) -> dict[str, str]:
    """One sentence per reported organ, naming the findings placed in it."""
    by = {k: [f for f in found if REPORT_ORGAN_OF[f["name"]] == k] for k in REPORT_ORGANS}
    phr = {
        "nodule": lambda f: f"{_a(f)} {f['size_mm']:.0f} mm solid nodule in the {f['organ']}",
        "mass": lambda f: f"{_a(f)} {f['size_mm']:.0f} mm mass in the {f['organ']}",
        "consolidation": lambda f: f"consolidation in the {f['organ']}",
        "emphysema": lambda f: "centrilobular emphysema in both upper lobes",
        "pleural effusion": lambda f: f"{'small' if f['size_mm'] < 40 else 'moderate'} {f['organ']} pleural effusion",
        "cardiomegaly": lambda f: "cardiomegaly",
        "pericardial effusion": lambda f: "a pericardial effusion",
        "liver lesion": lambda f: f"{_a(f)} {f['size_mm']:.0f} mm hypodense liver lesion",
        "kidney cyst": lambda f: f"{_a(f)} {f['size_mm']:.0f} mm simple renal cyst",
        "vertebral fracture": lambda f: "a fracture of a thoracic vertebral body",
        "rib fracture": lambda f: "a rib fracture",
    }
    normal = {
        "lungs": ["Lungs: no nodule, mass or consolidation.", "Lungs: clear lung parenchyma."],
        "pleura": ["Pleura: no pleural effusion.", "Pleura: no effusion or thickening."],
        "heart": ["Heart: normal size, no pericardial effusion.", "Heart: not enlarged."],
        "aorta": ["Aorta: normal calibre.", "Aorta: thoracic aorta of normal diameter."],
        "liver": ["Liver: partially imaged, unremarkable.", "Liver: no focal lesion in the imaged part."],
        "kidneys": ["Kidneys: imaged upper poles unremarkable.", "Kidneys: no lesion in the imaged portions."],
        "bones": ["Bones: no acute fracture.", "Bones: no destructive osseous lesion."],
    }
    out = {}
    for organ in REPORT_ORGANS:
        items = by.get(organ, [])
        if items:
            text = "; ".join(dict.fromkeys(phr[f["name"]](f) for f in items))
            out[organ] = f"{organ.capitalize()}: {text[0].upper()}{text[1:]}."
        else:
            out[organ] = str(rng.choice(normal[organ]))
    return out


def nifti_bytes(vol: np.ndarray, spacing: tuple[float, float, float]) -> bytes:
    """Gzipped NIfTI-1 of a ``(D, H, W)`` int16 volume, deterministic (gzip mtime 0)."""
    import nibabel as nib

    sz, sy, sx = spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    d, h, w = vol.shape
    affine[:3, 3] = [sx * (w - 1) / 2, sy * (h - 1) / 2, -sz * (d - 1) / 2]
    img = nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)), affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def render_ct(seed: int, key: str, names: list[str], matrix=(128, 192), slices=(40, 400)):
    """(int16 volume, label map, geometry, placed findings) of one case."""
    rng = case_rng(seed, key, "geometry")
    g = sample_geometry(rng, matrix, slices)
    p = {"body_rx": rng.uniform(0.82, 0.9), "body_ry": rng.uniform(0.6, 0.72), "dome": rng.uniform(0.22, 0.3),
         "apex": rng.uniform(0.9, 0.97), "heart_scale": rng.uniform(0.9, 1.05), "lung_hu": rng.uniform(-880, -820)}
    if "cardiomegaly" in names:
        p["heart_scale"] = rng.uniform(1.22, 1.4)
    vol, lab = draw_ct(g, p, case_rng(seed, key, "vessels"))
    found = place_findings(vol, lab, g, names, p, case_rng(seed, key, "findings"))
    vol += case_rng(seed, key, "noise").normal(0.0, 12.0, size=vol.shape).astype(np.float32)
    return np.clip(np.round(vol), -1024, 3071).astype(np.int16), lab, g, found


def _organ_ranges(lab: np.ndarray) -> dict[str, tuple[int, int]]:
    present = {}
    zsets = {v: np.flatnonzero((lab == v).any(axis=(1, 2))) for v in set(ORGANS.values())}
    for name, v in ORGANS.items():
        zs = zsets[v]
        if zs.size:
            present[name] = (int(zs[0]), int(zs[-1]) + 1)
    lobes = [present[l] for l in LOBES if l in present]
    if lobes:
        present["lungs"] = present["pleura"] = (min(a for a, _ in lobes), max(b for _, b in lobes))
    bones = [present[b] for b in ("spine", "ribs") if b in present]
    if bones:
        present["bones"] = (min(a for a, _ in bones), max(b for _, b in bones))
    return present


def build_synth_ct(out: str | Path, *, n: int = 24, seed: int = 0, matrix=(128, 192), slices=(40, 400),
                   progress: bool = True) -> list[ManifestRecord]:
    """Build ``n`` chest CT cases into ``out``; return the manifest records."""
    from tqdm import tqdm

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not (16 <= matrix[0] <= matrix[1]):
        raise ValueError(f"matrix must be (lo, hi) with 16 <= lo <= hi, got {matrix}")
    if not (1 <= slices[0] <= slices[1]):
        raise ValueError(f"slices must be (lo, hi) with 1 <= lo <= hi, got {slices}")
    root = Path(out)
    (root / "volumes").mkdir(parents=True, exist_ok=True)
    records, tiles = [], []
    for i in tqdm(range(n), desc="synth-ct", disable=not progress):
        key = f"CT{i:05d}"
        rng = case_rng(seed, key, "labels")
        names = [f for f, rate in FINDING_RATES.items() if rng.random() < rate]
        vol, lab, g, found = render_ct(seed, key, names, matrix, slices)
        sentences = organ_sentences(found, case_rng(seed, key, "text"))
        ranges = _organ_ranges(lab)
        regions = [Region(name=o, z0=ranges[o][0], z1=ranges[o][1], text=sentences.get(o, ""))
                   for o in list(REPORT_ORGANS) + list(LOBES) if o in ranges]
        regions += [Region(name=f"{f['name']} ({f['organ']})", z0=f["z0"], z1=f["z1"],
                           text=sentences[REPORT_ORGAN_OF[f["name"]]])
                    for f in found]
        sz = g.spacing[0]
        labels = tuple(sorted({f["name"] for f in found})) or ("normal",)
        rel = f"volumes/{key}.nii.gz"
        (root / rel).write_bytes(nifti_bytes(vol, g.spacing))
        pid = stable_id("ct-pt-", f"{seed}:{key}")
        impression = ("No acute cardiopulmonary abnormality." if labels == ("normal",)
                      else "Impression: " + ", ".join(labels) + ".")
        report = " ".join(sentences[o] for o in REPORT_ORGANS) + " " + impression
        meta = {"shape": list(g.shape), "spacing": list(g.spacing),
                "regions_mm": {r.name: [round(r.z0 * sz, 2), round(r.z1 * sz, 2)] for r in regions},
                "findings": found}
        common = dict(modality="CT", body_part="CHEST", patient_id=pid, study_id=pid, source_id=pid, labels=labels)
        records.append(ManifestRecord(id=key, path=rel, kind="volume", view="AXIAL", report=report,
                                      regions=tuple(regions), meta=meta, **common))
        records.append(ManifestRecord(id=f"{key}:report", path="", kind="report", report=report,
                                      meta={"organ_sentences": sentences}, **common))
        if len(tiles) < 16:
            mid = vol[int(np.mean(ranges.get("heart", (0, g.shape[0]))))]
            win = np.clip((mid.astype(np.float32) + 1000.0) / 1400.0, 0, 1)
            tiles.append(((win * 255).astype(np.uint8), f"{key} {g.shape[0]}x{sz}mm: " + ", ".join(labels)))
    records = assign_splits(records, SPLIT_FRACTIONS, seed)
    write_manifest(records, root / "manifest.parquet")
    from medseek.data.synth.sheet import contact_sheet

    contact_sheet(tiles, root / "contact_sheet.png")
    return records
