"""CT-RATE (chest CT volumes with reports) in its published layout.

::

    root/                                   the ``dataset`` folder
      train/train_1/train_1_a/train_1_a_1.nii.gz     <split>_<patient>_<scan>_<reconstruction>
      valid/valid_1/valid_1_a/valid_1_a_1.nii.gz
      radiology_text_reports/train_reports.csv       VolumeName, ClinicalInformation_EN,
                                                     Technique_EN, Findings_EN, Impressions_EN
      multi_abnormality_labels/train_predicted_labels.csv   VolumeName, <18 abnormalities 0/1>
      metadata/train_metadata.csv                    VolumeName, XYSpacing, ZSpacing, ...

Tables are matched by folder and by a file name starting with ``train`` or ``valid``
(the release names validation tables both ``valid_*`` and ``validation_*``).
"""

from __future__ import annotations

import re
from pathlib import Path

from medseek.data.loaders._common import ON_MISSING, check_choice, keep_row, read_csv
from medseek.data.manifest import ManifestRecord

_NAME = re.compile(r"^(train|valid)_(\d+)_([a-z]+)_(\d+)\.nii(\.gz)?$")
_SPLIT = {"train": "train", "valid": "val"}
_META_KEYS = ("XYSpacing", "ZSpacing", "Rows", "Columns", "Manufacturer", "PatientSex", "PatientAge")


def _tables(folder: Path, split: str) -> dict[str, dict[str, str]]:
    """Rows of every CSV in ``folder`` whose name starts with ``split``, keyed by VolumeName."""
    out: dict[str, dict[str, str]] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob(f"{split}*.csv")) + sorted(folder.glob(f"{split}*.csv.gz")):
        for n, row in enumerate(read_csv(path)):
            name = row.get("VolumeName")
            if name is None:
                raise ValueError(f"{path}: missing column 'VolumeName'")
            out[name] = row
    return out


def _labels(row: dict[str, str] | None, where: str) -> tuple[str, ...]:
    if row is None:
        return ()
    out = []
    for key, raw in row.items():
        if key == "VolumeName" or raw is None or raw.strip() == "":
            continue
        try:
            v = float(raw)
        except ValueError:
            raise ValueError(f"{where}: label {key!r} must be 0 or 1, got {raw!r}") from None
        if v == 1:
            out.append(key)
        elif v != 0:
            raise ValueError(f"{where}: label {key!r} must be 0 or 1, got {raw!r}")
    return tuple(sorted(out))


def load_ct_rate(root: str | Path, *, on_missing: str = "error") -> list[ManifestRecord]:
    """Manifest records for CT-RATE: one volume row per listed volume, one report row each.

    Volumes are listed from the report tables (and from the files on disk when a
    volume has no report row). Patient id ``ct-rate:train_1``, study ``train_1_a``.

    Parameters
    ----------
    root : str or Path
        The ``dataset`` folder.
    on_missing : {"error", "skip", "keep"}
        Policy for a volume listed in a table but not on disk.
    """
    base = Path(root)
    check_choice("on_missing", on_missing, ON_MISSING)
    records: list[ManifestRecord] = []
    for prefix in ("train", "valid"):
        reports = _tables(base / "radiology_text_reports", prefix)
        labels = _tables(base / "multi_abnormality_labels", prefix)
        metas = _tables(base / "metadata", prefix)
        on_disk = {p.name for p in (base / prefix).glob("*/*/*.nii*")} if (base / prefix).is_dir() else set()
        names = sorted(set(reports) | set(labels) | on_disk, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])
        for name in names:
            m = _NAME.match(name)
            if m is None:
                raise ValueError(f"CT-RATE volume name {name!r} does not match <split>_<n>_<scan>_<n>.nii.gz")
            patient = f"{m.group(1)}_{m.group(2)}"
            scan = f"{patient}_{m.group(3)}"
            rel = Path(prefix) / patient / scan / name
            if not keep_row((base / rel).is_file(), on_missing, f"CT-RATE volume {name}: {base / rel} not found"):
                continue
            lab = _labels(labels.get(name), f"labels of {name}")
            meta = {k: metas[name][k] for k in _META_KEYS if name in metas and metas[name].get(k)}
            common = dict(
                modality="CT",
                body_part="CHEST",
                patient_id=f"ct-rate:{patient}",
                study_id=f"ct-rate:{scan}",
                source_id=f"ct-rate:{scan}",
                labels=lab,
                split=_SPLIT[prefix],
            )
            records.append(ManifestRecord(id=f"ct-rate:{name}", path=rel.as_posix(), kind="volume",
                                          view="AXIAL", meta=meta, **common))
            rep = reports.get(name)
            if rep is not None:
                text = "\n".join(
                    t.strip() for t in (rep.get("Findings_EN", ""), rep.get("Impressions_EN", "")) if t and t.strip()
                )
                records.append(ManifestRecord(
                    id=f"ct-rate:{name}:report", path="", kind="report", report=text,
                    meta={"clinical_information": rep.get("ClinicalInformation_EN", ""),
                          "technique": rep.get("Technique_EN", "")},
                    **common,
                ))
    if not records and not any((base / d).is_dir() for d in ("train", "valid", "radiology_text_reports")):
        raise FileNotFoundError(f"no CT-RATE train/, valid/ or radiology_text_reports/ under {base}")
    return records
