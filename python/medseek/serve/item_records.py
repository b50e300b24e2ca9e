"""The store records of ingested items and of their children (image regions, volume
chunks, organs), and the z-ranges of chunks in the volume as uploaded.

Like :mod:`medseek.serve.ingest`, every function raises ``InvalidField`` naming the request
field for anything wrong, and nothing here logs. z-ranges are half-open everywhere:
slices ``[z_start, z_end)``.
"""

from __future__ import annotations

import numpy as np

from medseek.index import ItemRecord

from .ingest import Decoded, InvalidField, check_region_name


def build_record(item, collection: str, dec: Decoded, field: str) -> ItemRecord:
    """The store record of an ``IngestItem``; header values fill what the request left empty
    (de-identified DICOM pseudonyms win over the request's)."""
    try:
        return ItemRecord(
            id=item.id, collection=collection,
            modality=item.modality or dec.modality, body_part=item.body_part or dec.body_part,
            view=item.view or dec.view, labels=tuple(item.labels),
            patient_pseudonym=dec.patient_pseudonym or item.patient_pseudonym or None,
            study_pseudonym=dec.study_pseudonym or item.study_pseudonym or None,
            source_document=item.source_document or None, content_sha256=dec.sha256,
            report_text=item.report if item.report.strip() else None)
    except (ValueError, TypeError) as exc:
        raise InvalidField(field, str(exc)) from None


def region_record(parent: ItemRecord, region, collection: str, field: str,
                  automatic: bool = False) -> ItemRecord:
    """The store record of a region crop of ``parent``: id ``<parent id>/region/<name>``
    (``<parent id>/region/auto/<name>`` when the server's localiser found the box,
    ``medseek.serve.auto_regions``), the parent's metadata and provenance, ``parent_id``,
    ``region`` and ``box``."""
    check_region_name(region.name, f"{field}.name")
    box = (region.box.x0, region.box.y0, region.box.x1, region.box.y1)
    child_id = (f"{parent.id}/region/auto/{region.name}" if automatic
                else f"{parent.id}/region/{region.name}")
    try:
        return ItemRecord(
            id=child_id, collection=collection,
            modality=parent.modality, body_part=parent.body_part, view=parent.view,
            labels=parent.labels, patient_pseudonym=parent.patient_pseudonym,
            study_pseudonym=parent.study_pseudonym, source_document=parent.source_document,
            parent_id=parent.id, region=region.name, box=box)
    except (ValueError, TypeError) as exc:
        raise InvalidField(field, str(exc)) from None


def source_z_ranges(z_range: np.ndarray, z_scale: float, source_depth: int,
                    resampled_depth: int) -> np.ndarray:
    """Chunk z-ranges in the resampled volume -> slices of the volume as uploaded.

    Resampled slice ``i`` samples uploaded coordinate ``i * z_scale``; an uploaded slice
    belongs to the chunk holding its nearest resampled slice, so the chunks tile the
    uploaded volume (overlapping chunks share slices). A chunk holding no uploaded slice's
    nearest sample (strong upsampling) gets the slices its samples lie between.

    Parameters
    ----------
    z_range : np.ndarray, int, shape (C, 2)
        Slices ``[z0, z1)`` of each chunk in the resampled volume.
    z_scale : float > 0
    source_depth, resampled_depth : int >= 1

    Returns
    -------
    np.ndarray, int64, shape (C, 2)
        Slices ``[z0, z1)`` of the volume as uploaded (``z1`` exclusive).
    """
    k = np.arange(source_depth)
    nearest = np.clip(np.floor(k / z_scale + 0.5), 0, resampled_depth - 1).astype(np.int64)
    out = np.empty((len(z_range), 2), dtype=np.int64)
    for c, (a, b) in enumerate(np.asarray(z_range, dtype=np.int64)):
        mine = k[(nearest >= a) & (nearest < b)]
        if mine.size:
            out[c] = mine[0], mine[-1] + 1
        else:  # the uploaded slices around the chunk's samples a .. b - 1
            out[c] = (min(int(np.floor(a * z_scale)), source_depth - 1),
                      min(int(np.ceil((b - 1) * z_scale)), source_depth - 1) + 1)
    return out


def check_z_end(z_end: int, depth: int, field: str) -> None:
    """Refuse a half-open z-range that ends past a volume of ``depth`` slices."""
    if z_end > depth:
        raise InvalidField(field, f"z_end {z_end} is past the volume's end: it has {depth} "
                                  f"slices [0, {depth}) and z_end is exclusive")


def _child(parent: ItemRecord, **fields) -> ItemRecord:
    """A child of ``parent`` with its metadata, labels and provenance."""
    return ItemRecord(
        collection=fields.pop("collection"), modality=parent.modality,
        body_part=parent.body_part, view=parent.view, labels=parent.labels,
        patient_pseudonym=parent.patient_pseudonym, study_pseudonym=parent.study_pseudonym,
        source_document=parent.source_document, parent_id=parent.id, **fields)


def chunk_record(parent: ItemRecord, n: int, z_range, collection: str,
                 field: str) -> ItemRecord:
    """The store record of chunk ``n`` of volume ``parent``: id ``<parent id>/chunk/<n>``,
    the parent's metadata and provenance, ``parent_id`` and ``z_range`` (uploaded slices
    ``[z0, z1)``)."""
    try:
        return _child(parent, id=f"{parent.id}/chunk/{n}", collection=collection,
                      z_range=(int(z_range[0]), int(z_range[1])))
    except (ValueError, TypeError) as exc:
        raise InvalidField(field, str(exc)) from None


def organ_record(parent: ItemRecord, region, collection: str, field: str,
                 source_depth: int) -> ItemRecord:
    """The store record of an organ of volume ``parent``: id ``<parent id>/region/<name>``,
    ``region`` = the name, ``z_range`` = the organ's slices ``[z_start, z_end)`` (checked
    against the volume)."""
    check_region_name(region.name, f"{field}.name")
    if region.HasField("box") or not region.HasField("z_range"):
        raise InvalidField(field, "a volume's region needs a z_range (organ slices) and no box")
    z0, z1 = int(region.z_range.z_start), int(region.z_range.z_end)
    if z0 >= z1:
        raise InvalidField(f"{field}.z_range", f"z_start {z0} must be before z_end {z1} "
                                               "(slices [z_start, z_end), z_end exclusive)")
    check_z_end(z1, source_depth, f"{field}.z_range")
    try:
        return _child(parent, id=f"{parent.id}/region/{region.name}", collection=collection,
                      region=region.name, z_range=(z0, z1))
    except (ValueError, TypeError) as exc:
        raise InvalidField(field, str(exc)) from None
