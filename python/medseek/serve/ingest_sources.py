"""What ``medseek ingest`` sends: the ``IngestItem`` s of a folder, a zip, a DICOMDIR or a
JSONL manifest.

DICOM is found by content and grouped by study and series (:mod:`medseek.io.dicom_groups`):
a series of slices is one volume item, a radiograph one image item, and what was skipped is
summarised on stderr. Other files are taken by extension (images, volumes, ``.txt``
reports); a manifest names each item's file or text and its metadata.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".dcm")
VOLUME_EXT = (".nii", ".nii.gz", ".zip")
TEXT_EXT = (".txt",)


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(IMAGE_EXT):
        return "image"
    if name.endswith(VOLUME_EXT):
        return "volume"
    if name.endswith(TEXT_EXT):
        return "text"
    return None


def iter_items(source: Path, collection: str = ""):
    """IngestItems of a folder, zip, DICOMDIR or DICOM file (DICOM grouped by series, see
    ``_iter_discovered``; other files by extension, id = relative path) or a JSONL
    manifest, one per line:
    ``{"id", "path" | "text", "collection", "modality", "body_part", "view", "labels",
    "patient_pseudonym", "study_pseudonym", "source_document", "regions"}``; ``regions``
    is a list of ``{"name", "box": [x0, y0, x1, y1]}`` (images) or
    ``{"name", "z_range": [z0, z1]}`` (a volume's organs: slices ``[z0, z1)``, ``z1``
    exclusive, as in the corpus manifests)."""
    from medseek.io.dicom_groups import is_dicom_source

    from .v1 import retrieval_pb2 as pb

    if is_dicom_source(source):  # a folder, a zip, a DICOMDIR or one DICOM file
        yield from _iter_discovered(pb, source, collection)
        return
    for n, line in enumerate(source.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        meta = {k: row[k] for k in ("modality", "body_part", "view", "labels",
                                    "patient_pseudonym", "study_pseudonym", "source_document")
                if row.get(k) is not None}
        if "text" in row:
            content = {"text": row["text"]}
        elif "path" in row:
            path = source.parent / row["path"]
            kind = _kind_of(path)
            if kind is None:
                raise ValueError(f"{source}:{n + 1}: path {row['path']!r} has no known extension")
            content = {kind: path.read_text() if kind == "text" else path.read_bytes()}
        else:
            raise ValueError(f"{source}:{n + 1}: each line needs 'text' or 'path'")
        regions = [_region(pb, r, f"{source}:{n + 1}") for r in row.get("regions") or ()]
        yield pb.IngestItem(id=str(row["id"]), collection=row.get("collection", collection),
                            regions=regions, **content, **meta)


def _iter_discovered(pb, source: Path, collection: str):
    """IngestItems of a folder, zip, DICOMDIR or DICOM file: DICOM grouped by study and
    series (``medseek.io.dicom_groups``: a series is one volume, a radiograph one image,
    whatever the file names), id a hash of its UIDs; a DICOM volume goes to the server's
    volume collection whatever ``collection`` says. The other files of a folder are taken
    by extension (id = relative path), as before. What was skipped, and why, goes to stderr."""
    from medseek.io import MedicalImageError
    from medseek.io.dicom_groups import discover

    try:
        grouping = discover(source)
    except MedicalImageError as exc:
        raise SystemExit(f"medseek ingest: {exc}") from None
    _print_dicom_summary(grouping, source, collection)
    for group in grouping.items:
        try:
            content = group.payload()
        except MedicalImageError as exc:  # vanished or unreadable since it was grouped
            print(f"skipped {group.item_id} ({', '.join(group.names[:3])}): {exc}",
                  file=sys.stderr)
            continue
        yield pb.IngestItem(id=group.item_id,
                            collection=collection if group.kind == "image" else "",
                            **{group.kind: content})
    if not source.is_dir():
        return
    for name in grouping.others:
        path = source / name
        kind = _kind_of(path)
        if kind is None:
            continue
        data = path.read_text() if kind == "text" else path.read_bytes()
        yield pb.IngestItem(id=name, collection=collection, **{kind: data})


def _print_dicom_summary(grouping, source: Path, collection: str, most: int = 50) -> None:
    """On stderr: the DICOM items found and each skipped file (name and reason, the first
    ``most``); non-DICOM files without a known extension are counted."""
    if not grouping.items and not grouping.skipped:
        return
    volumes = sum(g.kind == "volume" for g in grouping.items)
    images = len(grouping.items) - volumes
    unknown = [n for n in grouping.others if _kind_of(source / n) is None]
    print(f"dicom: {volumes} volume(s), {images} image(s) from "
          f"{sum(g.n_files for g in grouping.items)} files; {len(grouping.skipped)} skipped"
          + (f"; {len(unknown)} other file(s) not DICOM, without a known extension, ignored"
             if unknown else ""), file=sys.stderr)
    if volumes and collection:
        print(f"dicom: volumes go to the server's volume collection, not {collection!r}",
              file=sys.stderr)
    for skipped in grouping.skipped[:most]:
        print(f"  skipped {skipped.name}: {skipped.reason}", file=sys.stderr)
    if len(grouping.skipped) > most:
        print(f"  ... and {len(grouping.skipped) - most} more skipped", file=sys.stderr)


def _region(pb, raw: dict, where: str):
    """A manifest region: {"name", "box": [x0, y0, x1, y1]} or {"name", "z_range": [z0, z1]}."""
    if not isinstance(raw, dict) or not raw.get("name") or ("box" in raw) == ("z_range" in raw):
        raise ValueError(f"{where}: each region needs a name and one of box or z_range, "
                         f"got {raw!r}")
    if "box" in raw:
        if len(raw["box"]) != 4:
            raise ValueError(f"{where}: region box must be [x0, y0, x1, y1], got {raw['box']!r}")
        return pb.Region(name=raw["name"], box=pb.Box(**dict(zip(("x0", "y0", "x1", "y1"),
                                                                 raw["box"]))))
    z = raw["z_range"]
    if len(z) != 2 or not all(isinstance(v, int) and v >= 0 for v in z):
        raise ValueError(f"{where}: region z_range must be [z0, z1] slice ints >= 0 "
                         f"(z1 exclusive), got {z!r}")
    return pb.Region(name=raw["name"], z_range=pb.ZRange(z_start=z[0], z_end=z[1]))
