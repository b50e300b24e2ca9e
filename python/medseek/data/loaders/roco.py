"""ROCO (Radiology Objects in COntext) in its published layout.

::

    root/data/{train,validation,test}/radiology/
        images/ROCO_00002.jpg
        captions.txt     "ROCO_00002\\t caption text"
        dlinks.txt       "ROCO_00002\\twget -r ftp://.../PMC4083729.tar.gz -P /path/to/Dir\\tfigure.jpg"

``dlinks.txt`` names the PubMed Central archive each figure came from; its PMC id is
the provenance document (``source_id``) and also the grouping unit (``patient_id``),
so that figures of one article never straddle splits and provenance caps can limit
near-duplicates from one paper. The modality is guessed from caption keywords.
"""

from __future__ import annotations

import re
from pathlib import Path

from medseek.data.loaders._common import ON_MISSING, check_choice, keep_row
from medseek.data.manifest import ManifestRecord

_SPLIT_DIRS = (("train", "train"), ("validation", "val"), ("test", "test"))
_PMC = re.compile(r"(PMC\d+)")
_MODALITY = (
    (re.compile(r"\b(ct|computed tomograph\w*|hrct|cta)\b", re.I), "CT"),
    (re.compile(r"\b(mri?|magnetic resonance|t1|t2|flair|dwi)\b", re.I), "MR"),
    (re.compile(r"\b(ultraso\w+|sonograph\w*|doppler|echocardiograph\w*|us)\b", re.I), "US"),
    (re.compile(r"\b(pet|scintigra\w+|spect)\b", re.I), "NM"),
    (re.compile(r"\b(angiogra\w+|dsa)\b", re.I), "XA"),
    (re.compile(r"\b(x-?ray|radiograph\w*|cxr|plain film)\b", re.I), "CR"),
)


def guess_modality(caption: str) -> str:
    """DICOM modality suggested by a caption's wording, ``"OT"`` when none matches."""
    for pattern, modality in _MODALITY:
        if pattern.search(caption):
            return modality
    return "OT"


def _read_tsv(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) < 2:
            raise ValueError(f"{path} line {n + 1}: expected 'ROCO_ID<TAB>...', got {line[:80]!r}")
        out[parts[0]] = parts[1:]
    return out


def load_roco(
    root: str | Path,
    *,
    subset: str = "radiology",
    on_missing: str = "error",
) -> list[ManifestRecord]:
    """Manifest records for ROCO: one image row per figure, its caption as report text.

    Parameters
    ----------
    root : str or Path
        The repository folder holding ``data/``.
    subset : {"radiology", "non-radiology"}
    on_missing : {"error", "skip", "keep"}
        Policy for a captioned figure whose image is not on disk.
    """
    base = Path(root)
    check_choice("subset", subset, ("radiology", "non-radiology"))
    check_choice("on_missing", on_missing, ON_MISSING)
    records: list[ManifestRecord] = []
    found = False
    for dirname, split in _SPLIT_DIRS:
        folder = base / "data" / dirname / subset
        captions_path = folder / "captions.txt"
        if not captions_path.is_file():
            continue
        found = True
        captions = _read_tsv(captions_path)
        links = _read_tsv(folder / "dlinks.txt") if (folder / "dlinks.txt").is_file() else {}
        for roco_id in sorted(captions):
            caption = " ".join(captions[roco_id])
            link = links.get(roco_id, [])
            match = _PMC.search(link[0]) if link else None
            doc = f"roco:{match.group(1)}" if match else f"roco:{roco_id}"
            rel = (folder / "images" / f"{roco_id}.jpg").relative_to(base)
            what = f"{captions_path} {roco_id}: image {base / rel} not found"
            if not keep_row((base / rel).is_file(), on_missing, what):
                continue
            records.append(
                ManifestRecord(
                    id=f"roco:{roco_id}",
                    path=rel.as_posix(),
                    kind="image",
                    modality=guess_modality(caption),
                    patient_id=doc,
                    study_id=doc,
                    source_id=doc,
                    report=caption,
                    split=split,
                    meta={"figure": link[1] if len(link) > 1 else ""},
                )
            )
    if not found:
        raise FileNotFoundError(f"no data/<split>/{subset}/captions.txt under {base}")
    return records
