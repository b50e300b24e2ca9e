"""Dataset manifests: one table that lists every image, volume and report of a corpus.

On-disk format
--------------
A manifest is one **Parquet** file (written with pyarrow, zstd-compressed, no
timestamps, so the same records always give the same bytes). One row per item,
columns in this order:

============  ==========================  ================================================
column        Arrow type                  meaning
============  ==========================  ================================================
id            string                      unique item id
path          string                      file, relative to the manifest's directory
                                          ("" for a report row that has no file)
kind          string                      ``image``, ``volume`` or ``report``
modality      string                      DICOM modality: CR, DX, CT, MR, US, ... ("" unknown)
body_part     string                      ``CHEST``, ``WRIST``, ...
view          string                      PA, AP, LATERAL, LL, AXIAL, ... ("" unknown)
patient_id    string                      patient; splits never separate one patient
study_id      string                      study (exam) the item belongs to
source_id     string                      provenance document (a report uid, a PMC id)
labels        list<string>                normalised finding names
report        string                      report text or caption ("" when none)
regions       list<struct<name: string,   image regions carry ``box`` = [x0, y0, x1, y1]
              box: list<double>,          in pixels (x right, y down, x1/y1 exclusive,
              z0: int32, z1: int32,       0 <= x0 < x1 <= width); volume regions carry
              text: string>>              slice indices ``z0`` (inclusive) ``z1``
                                          (exclusive); ``text`` is a region-level
                                          sentence (may be "")
split         string                      ``train``, ``val``, ``test`` or "" (unassigned)
meta          string                      JSON object of extra fields (spacing, age, ...)
============  ==========================  ================================================

Parquet was chosen over JSONL because it keeps list and struct columns typed, reads
column subsets fast for large archives, and round-trips exactly through pyarrow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

KINDS = ("image", "volume", "report")
SPLITS = ("train", "val", "test", "")
MANIFEST_NAME = "manifest.parquet"


@dataclass(frozen=True)
class Region:
    """A named region of an image (``box``) or of a volume (``z0``/``z1``)."""

    name: str
    box: tuple[float, float, float, float] | None = None
    z0: int | None = None
    z1: int | None = None
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "box": None if self.box is None else [float(v) for v in self.box],
            "z0": self.z0,
            "z1": self.z1,
            "text": self.text,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Region":
        box = d.get("box")
        return cls(
            name=str(d["name"]),
            box=None if box is None else tuple(float(v) for v in box),  # type: ignore[arg-type]
            z0=None if d.get("z0") is None else int(d["z0"]),
            z1=None if d.get("z1") is None else int(d["z1"]),
            text=str(d.get("text") or ""),
        )


@dataclass(frozen=True)
class ManifestRecord:
    """One row of a manifest; see the module docstring for the meaning of each field."""

    id: str
    path: str
    kind: str
    modality: str = ""
    body_part: str = ""
    view: str = ""
    patient_id: str = ""
    study_id: str = ""
    source_id: str = ""
    labels: tuple[str, ...] = ()
    report: str = ""
    regions: tuple[Region, ...] = ()
    split: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> str:
        """The unit that splits keep together: the patient, else the study, else the id."""
        return self.patient_id or self.study_id or self.id


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest: the row index, its id, the field and why."""

    row: int
    id: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"row {self.row} (id {self.id!r}) {self.field}: {self.message}"


def _schema():
    import pyarrow as pa

    region = pa.struct(
        [
            ("name", pa.string()),
            ("box", pa.list_(pa.float64())),
            ("z0", pa.int32()),
            ("z1", pa.int32()),
            ("text", pa.string()),
        ]
    )
    return pa.schema(
        [
            ("id", pa.string()),
            ("path", pa.string()),
            ("kind", pa.string()),
            ("modality", pa.string()),
            ("body_part", pa.string()),
            ("view", pa.string()),
            ("patient_id", pa.string()),
            ("study_id", pa.string()),
            ("source_id", pa.string()),
            ("labels", pa.list_(pa.string())),
            ("report", pa.string()),
            ("regions", pa.list_(region)),
            ("split", pa.string()),
            ("meta", pa.string()),
        ]
    )


_STR_FIELDS = (
    "id", "path", "kind", "modality", "body_part", "view",
    "patient_id", "study_id", "source_id", "report", "split",
)


def write_manifest(records: Sequence[ManifestRecord], path: str | Path) -> Path:
    """Write records to a Parquet manifest, byte-identical for identical records.

    Parameters
    ----------
    records : sequence of ManifestRecord
        Rows, written in the given order.
    path : str or Path
        Target file; a directory means ``<dir>/manifest.parquet``.

    Returns
    -------
    Path
        The file written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(path)
    if out.is_dir():
        out = out / MANIFEST_NAME
    columns: dict[str, list] = {name: [] for name in _schema().names}
    for i, rec in enumerate(records):
        if not isinstance(rec, ManifestRecord):
            raise TypeError(f"records[{i}] must be a ManifestRecord, got {type(rec).__name__}")
        for name in _STR_FIELDS:
            columns[name].append(str(getattr(rec, name)))
        columns["labels"].append([str(v) for v in rec.labels])
        columns["regions"].append([r.to_dict() for r in rec.regions])
        columns["meta"].append(json.dumps(dict(rec.meta), sort_keys=True))
    table = pa.Table.from_pydict(columns, schema=_schema())
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out, compression="zstd", write_statistics=False)
    return out


def read_manifest(path: str | Path) -> list[ManifestRecord]:
    """Read a Parquet manifest written by :func:`write_manifest`.

    Parameters
    ----------
    path : str or Path
        The file, or a directory holding ``manifest.parquet``.
    """
    import pyarrow.parquet as pq

    src = Path(path)
    if src.is_dir():
        src = src / MANIFEST_NAME
    if not src.is_file():
        raise FileNotFoundError(f"manifest not found: {src}")
    table = pq.read_table(src)
    missing = [n for n in _schema().names if n not in table.column_names]
    if missing:
        raise ValueError(f"manifest {src} lacks columns {missing}")
    rows = table.to_pylist()
    out = []
    for row in rows:
        kwargs = {name: row[name] or "" for name in _STR_FIELDS}
        out.append(
            ManifestRecord(
                **kwargs,
                labels=tuple(row["labels"] or ()),
                regions=tuple(Region.from_dict(r) for r in row["regions"] or ()),
                meta=json.loads(row["meta"] or "{}"),
            )
        )
    return out


def _file_extent(path: Path, kind: str) -> tuple[int, ...] | None:
    """(width, height) of an image or (depth,) of a volume, None if unreadable."""
    if kind == "image":
        from PIL import Image

        try:
            with Image.open(path) as im:
                return im.size
        except OSError:  # includes PIL.UnidentifiedImageError
            return None
    if kind == "volume":
        import nibabel as nib
        from nibabel.filebasedimages import ImageFileError

        try:
            shape = nib.load(str(path)).shape
        except (OSError, ValueError, ImageFileError):
            return None
        # NIfTI stores (x, y, z); the z extent is the third axis.
        return (int(shape[2]),) if len(shape) >= 3 else None
    return None


def _region_problems(i: int, rec: ManifestRecord, extent: tuple[int, ...] | None) -> list[Problem]:
    out = []
    for reg in rec.regions:
        where = f"regions[{reg.name}]"
        if rec.kind == "image":
            if reg.box is None or len(reg.box) != 4:
                out.append(Problem(i, rec.id, where, f"image region needs a 4-value box, got {reg.box}"))
                continue
            x0, y0, x1, y1 = reg.box
            if not (x0 < x1 and y0 < y1):
                out.append(Problem(i, rec.id, where, f"empty box {list(reg.box)}"))
            elif extent is not None:
                w, h = extent
                if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                    out.append(Problem(i, rec.id, where, f"box {list(reg.box)} outside image {w}x{h}"))
        elif rec.kind == "volume":
            if reg.z0 is None or reg.z1 is None:
                out.append(Problem(i, rec.id, where, f"volume region needs z0 and z1, got {reg.z0}, {reg.z1}"))
                continue
            if not reg.z0 < reg.z1:
                out.append(Problem(i, rec.id, where, f"empty z-range [{reg.z0}, {reg.z1})"))
            elif extent is not None and (reg.z0 < 0 or reg.z1 > extent[0]):
                out.append(Problem(i, rec.id, where, f"z-range [{reg.z0}, {reg.z1}) outside depth {extent[0]}"))
        else:
            out.append(Problem(i, rec.id, where, f"a {rec.kind} row cannot have regions"))
    return out


def validate_manifest(records: Sequence[ManifestRecord], root: str | Path) -> list[Problem]:
    """Check a manifest and report every offending row.

    Checks: unique ids; ``kind`` and ``split`` in their vocabularies; image and volume
    files exist under ``root``; no patient in two splits (reported on each row of the
    patient that is not in the patient's first split); regions inside the image or
    volume (files are opened only when a row has regions).

    Parameters
    ----------
    records : sequence of ManifestRecord
    root : str or Path
        Directory that ``path`` is relative to (the manifest's directory).

    Returns
    -------
    list of Problem
        Empty when the manifest is valid, ordered by row.
    """
    base = Path(root)
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    first_split: dict[str, tuple[str, int]] = {}
    for i, rec in enumerate(records):
        if not rec.id:
            problems.append(Problem(i, rec.id, "id", "empty id"))
        elif rec.id in seen:
            problems.append(Problem(i, rec.id, "id", f"duplicate of row {seen[rec.id]}"))
        else:
            seen[rec.id] = i
        if rec.kind not in KINDS:
            problems.append(Problem(i, rec.id, "kind", f"must be one of {KINDS}, got {rec.kind!r}"))
        if rec.split not in SPLITS:
            problems.append(Problem(i, rec.id, "split", f"must be one of {SPLITS}, got {rec.split!r}"))
        elif rec.split:
            prev = first_split.setdefault(rec.group, (rec.split, i))
            if prev[0] != rec.split:
                problems.append(
                    Problem(i, rec.id, "split",
                            f"patient {rec.group!r} is in {rec.split!r} here but in {prev[0]!r} at row {prev[1]}")
                )
        extent = None
        if rec.kind in ("image", "volume"):
            if not rec.path:
                problems.append(Problem(i, rec.id, "path", f"a {rec.kind} row needs a path"))
            elif not (base / rec.path).is_file():
                problems.append(Problem(i, rec.id, "path", f"file not found: {rec.path}"))
            elif rec.regions:
                extent = _file_extent(base / rec.path, rec.kind)
                if extent is None:
                    problems.append(Problem(i, rec.id, "path", f"cannot read {rec.kind} {rec.path}"))
        problems.extend(_region_problems(i, rec, extent))
    return problems


def _unit_hash(seed: int, key: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:8], "big")


def assign_splits(
    records: Iterable[ManifestRecord],
    fractions: Mapping[str, float],
    seed: int = 0,
) -> list[ManifestRecord]:
    """Assign ``split`` by patient: every record of one patient lands in one split.

    Patients are ordered by a hash of ``(seed, patient)``, so the result does not
    depend on record order and is the same on every machine; the first
    ``round(f * n_patients)`` (cumulatively) go to the first split named in
    ``fractions``, and so on; the last split takes the remainder.

    Parameters
    ----------
    records : iterable of ManifestRecord
    fractions : mapping of split name to fraction
        Names from ``train``/``val``/``test``; fractions >= 0 summing to 1 (± 1e-6).
    seed : int

    Returns
    -------
    list of ManifestRecord
        Copies in input order with ``split`` set.
    """
    recs = list(records)
    if not fractions:
        raise ValueError("fractions must name at least one split, got {}")
    for name, frac in fractions.items():
        if name not in SPLITS or not name:
            raise ValueError(f"fractions: unknown split {name!r}; use train, val or test")
        if frac < 0:
            raise ValueError(f"fractions[{name!r}] must be >= 0, got {frac}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {total} from {dict(fractions)}")
    groups = sorted({r.group for r in recs}, key=lambda g: (_unit_hash(seed, g), g))
    n = len(groups)
    names = list(fractions)
    where: dict[str, str] = {}
    start, acc = 0, 0.0
    for k, name in enumerate(names):
        acc += fractions[name]
        stop = n if k == len(names) - 1 else min(n, round(acc * n))
        for g in groups[start:stop]:
            where[g] = name
        start = stop
    return [replace(r, split=where[r.group]) for r in recs]
