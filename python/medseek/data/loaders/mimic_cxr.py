"""MIMIC-CXR-JPG (PhysioNet) in its published layout.

::

    root/
      files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg
      mimic-cxr-2.0.0-metadata.csv(.gz)   dicom_id, subject_id, study_id, ViewPosition, Rows, Columns, ...
      mimic-cxr-2.0.0-chexpert.csv(.gz)   subject_id, study_id, <14 CheXpert labels>
      mimic-cxr-2.0.0-split.csv(.gz)      dicom_id, study_id, subject_id, split (train/validate/test)

Free-text reports come from the separate MIMIC-CXR release as
``files/p10/p10000032/s50414267.txt``; pass that tree as ``reports_root`` (default:
``root/mimic-cxr-reports`` when it exists, else ``root`` itself is searched).
"""

from __future__ import annotations

from pathlib import Path

from medseek.data.loaders._common import (
    ON_MISSING,
    UNCERTAIN_POLICIES,
    check_choice,
    chexpert_labels,
    find_table,
    keep_row,
    read_csv,
    require_columns,
)
from medseek.data.manifest import ManifestRecord

PREFIX = "mimic-cxr-2.0.0"
_SPLITS = {"train": "train", "validate": "val", "validation": "val", "val": "val", "test": "test"}


def _study_dir(subject: str, study: str) -> Path:
    return Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"


def _report_text(reports_root: Path, subject: str, study: str) -> tuple[str, Path | None]:
    rel = (_study_dir(subject, study).parent / f"s{study}.txt")
    path = reports_root / rel
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace").strip(), path
    return "", None


def load_mimic_cxr(
    root: str | Path,
    *,
    reports_root: str | Path | None = None,
    uncertain: str = "zeros",
    on_missing: str = "error",
) -> list[ManifestRecord]:
    """Manifest records for MIMIC-CXR-JPG: one per image, one per study with a report.

    Parameters
    ----------
    root : str or Path
        The MIMIC-CXR-JPG folder (holding ``files/`` and the CSV tables).
    reports_root : str or Path, optional
        Folder holding the report ``files/`` tree.
    uncertain : {"zeros", "ones", "tag"}
        What a CheXpert ``-1`` becomes (see :func:`chexpert_labels`).
    on_missing : {"error", "skip", "keep"}
        Policy for a listed image whose JPEG is not on disk.
    """
    base = Path(root)
    check_choice("uncertain", uncertain, UNCERTAIN_POLICIES)
    check_choice("on_missing", on_missing, ON_MISSING)
    if reports_root is None:
        cand = base / "mimic-cxr-reports"
        rroot = cand if cand.is_dir() else base
    else:
        rroot = Path(reports_root)

    meta_path = find_table(base, f"{PREFIX}-metadata.csv")
    labels: dict[str, tuple[str, ...]] = {}
    try:
        lab_path = find_table(base, f"{PREFIX}-chexpert.csv")
    except FileNotFoundError:
        lab_path = None
    if lab_path is not None:
        for n, row in enumerate(read_csv(lab_path)):
            if n == 0:
                require_columns(lab_path, row, ("study_id",))
            try:
                labels[row["study_id"]] = chexpert_labels(row, uncertain)
            except ValueError as exc:
                raise ValueError(f"{lab_path} row {n + 2} (study {row['study_id']}): {exc}") from None
    splits: dict[str, str] = {}
    try:
        split_path = find_table(base, f"{PREFIX}-split.csv")
    except FileNotFoundError:
        split_path = None
    if split_path is not None:
        for n, row in enumerate(read_csv(split_path)):
            raw = row.get("split", "")
            if raw not in _SPLITS:
                raise ValueError(f"{split_path} row {n + 2}: unknown split {raw!r}")
            splits[row["dicom_id"]] = _SPLITS[raw]

    records: list[ManifestRecord] = []
    studies: dict[str, tuple[str, str]] = {}
    for n, row in enumerate(read_csv(meta_path)):
        if n == 0:
            require_columns(meta_path, row, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
        dicom, subject, study = row["dicom_id"], row["subject_id"], row["study_id"]
        rel = _study_dir(subject, study) / f"{dicom}.jpg"
        if not keep_row((base / rel).is_file(), on_missing, f"{meta_path} row {n + 2}: image {base / rel} not found"):
            continue
        meta = {k: row[k] for k in ("Rows", "Columns", "StudyDate") if row.get(k)}
        records.append(
            ManifestRecord(
                id=f"mimic-cxr:{dicom}",
                path=rel.as_posix(),
                kind="image",
                modality="DX",
                body_part="CHEST",
                view=(row.get("ViewPosition") or "").upper(),
                patient_id=f"mimic-cxr:p{subject}",
                study_id=f"mimic-cxr:s{study}",
                source_id=f"mimic-cxr:s{study}",
                labels=labels.get(study, ()),
                split=splits.get(dicom, ""),
                meta=meta,
            )
        )
        studies.setdefault(study, (subject, splits.get(dicom, "")))
    for study in sorted(studies):
        subject, split = studies[study]
        text, path = _report_text(rroot, subject, study)
        if path is None:
            continue
        try:
            rel_report = path.relative_to(base).as_posix()
        except ValueError:
            rel_report = ""
        records.append(
            ManifestRecord(
                id=f"mimic-cxr:s{study}:report",
                path=rel_report,
                kind="report",
                body_part="CHEST",
                patient_id=f"mimic-cxr:p{subject}",
                study_id=f"mimic-cxr:s{study}",
                source_id=f"mimic-cxr:s{study}",
                labels=labels.get(study, ()),
                report=text,
                split=split,
            )
        )
    return records
