"""CheXpert (Stanford) in its published layout.

::

    root/                               e.g. CheXpert-v1.0-small/
      train.csv  valid.csv              Path, Sex, Age, Frontal/Lateral, AP/PA, <14 labels>
      train/patient00001/study1/view1_frontal.jpg

``Path`` in the CSVs starts with the dataset folder name
(``CheXpert-v1.0-small/train/...``); it is resolved against ``root`` with that first
component dropped, or against ``root``'s parent.

Label semantics (published): ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain,
blank not mentioned (negative here). ``uncertain`` chooses the policy for ``-1``:
``"zeros"`` (U-Zeros), ``"ones"`` (U-Ones) or ``"tag"`` (keeps ``"X (uncertain)"``).
CheXpert ships no reports, so only image rows are produced.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from medseek.data.loaders._common import (
    ON_MISSING,
    UNCERTAIN_POLICIES,
    check_choice,
    chexpert_labels,
    keep_row,
    read_csv,
    require_columns,
)
from medseek.data.manifest import ManifestRecord

_FILES = (("train.csv", "train"), ("valid.csv", "val"))


def _resolve(base: Path, raw: str) -> Path:
    """Relative path under ``base`` of a CSV ``Path`` value."""
    parts = PurePosixPath(raw).parts
    if parts and parts[0] == base.name:
        return Path(*parts[1:])
    if (base / raw).exists() or len(parts) < 2:
        return Path(raw)
    return Path(*parts[1:])


def load_chexpert(
    root: str | Path,
    *,
    uncertain: str = "zeros",
    on_missing: str = "error",
) -> list[ManifestRecord]:
    """Manifest records for CheXpert, one per image, ``train.csv`` then ``valid.csv``.

    Parameters
    ----------
    root : str or Path
        The dataset folder holding ``train.csv`` / ``valid.csv``.
    uncertain : {"zeros", "ones", "tag"}
        Policy for uncertain (``-1``) labels.
    on_missing : {"error", "skip", "keep"}
        Policy for a listed image not on disk.
    """
    base = Path(root)
    check_choice("uncertain", uncertain, UNCERTAIN_POLICIES)
    check_choice("on_missing", on_missing, ON_MISSING)
    found = [(base / name, split) for name, split in _FILES if (base / name).is_file()]
    if not found:
        raise FileNotFoundError(f"no train.csv or valid.csv in {base}")
    records = []
    for csv_path, split in found:
        for n, row in enumerate(read_csv(csv_path)):
            if n == 0:
                require_columns(csv_path, row, ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"))
            rel = _resolve(base, row["Path"])
            where = f"{csv_path} row {n + 2}"
            if not keep_row((base / rel).is_file(), on_missing, f"{where}: image {base / rel} not found"):
                continue
            parts = rel.parts
            # .../patient00001/study1/view1_frontal.jpg
            patient, study = (parts[-3], parts[-2]) if len(parts) >= 3 else (rel.stem, rel.stem)
            try:
                labels = chexpert_labels(row, uncertain)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            frontal = (row.get("Frontal/Lateral") or "").strip().lower()
            view = (row.get("AP/PA") or "").strip().upper() if frontal == "frontal" else "LATERAL"
            meta = {"sex": row.get("Sex", ""), "age": row.get("Age", "")}
            records.append(
                ManifestRecord(
                    id=f"chexpert:{patient}/{study}/{rel.stem}",
                    path=rel.as_posix(),
                    kind="image",
                    modality="CR",
                    body_part="CHEST",
                    view=view,
                    patient_id=f"chexpert:{patient}",
                    study_id=f"chexpert:{patient}/{study}",
                    source_id=f"chexpert:{patient}/{study}",
                    labels=labels,
                    split=split,
                    meta=meta,
                )
            )
    return records
