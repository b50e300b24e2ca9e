"""Helpers shared by the dataset loaders: CSV reading, missing-file policy, labels."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path
from typing import Iterator

ON_MISSING = ("error", "skip", "keep")

# The 14 CheXpert observations, in the column order of the published CSVs (MIMIC-CXR's
# -chexpert.csv uses the same names, alphabetically ordered).
CHEXPERT_LABELS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

UNCERTAIN_POLICIES = ("ones", "zeros", "tag")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def find_table(root: Path, stem: str) -> Path:
    """``root/stem`` or ``root/stem.gz``, whichever exists."""
    for cand in (root / stem, root / f"{stem}.gz"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"neither {root / stem} nor {root / stem}.gz exists")


def read_csv(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a CSV (plain or gzip) as dicts; a BOM on the header is dropped."""
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8-sig")
    yield from csv.DictReader(io.StringIO(text, newline=""))


def require_columns(path: Path, row: dict[str, str], columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")


def keep_row(exists: bool, on_missing: str, what: str) -> bool:
    """Apply the ``on_missing`` policy to one row whose file may be absent."""
    if exists:
        return True
    if on_missing == "error":
        raise FileNotFoundError(f"{what} (pass on_missing='skip' or 'keep' to continue)")
    return on_missing == "keep"


def chexpert_labels(values: dict[str, str], uncertain: str) -> tuple[str, ...]:
    """Positive findings of one CheXpert-style row.

    The published semantics: ``1`` (or ``1.0``) positive, ``0`` negative, ``-1``
    uncertain (mentioned with hedging), blank not mentioned (treated as negative).
    ``uncertain`` picks what ``-1`` becomes: ``"ones"`` (positive, U-Ones),
    ``"zeros"`` (negative, U-Zeros) or ``"tag"`` (the label ``"<name> (uncertain)"``).
    """
    out = []
    for name in CHEXPERT_LABELS:
        raw = (values.get(name) or "").strip()
        if not raw:
            continue
        try:
            v = float(raw)
        except ValueError as exc:
            raise ValueError(f"label {name!r} must be 1, 0, -1 or blank, got {raw!r}") from exc
        if v == 1:
            out.append(name)
        elif v == -1:
            if uncertain == "ones":
                out.append(name)
            elif uncertain == "tag":
                out.append(f"{name} (uncertain)")
        elif v != 0:
            raise ValueError(f"label {name!r} must be 1, 0, -1 or blank, got {raw!r}")
    return tuple(sorted(out))
