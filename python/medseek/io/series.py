"""DICOM series and multi-frame DICOM into a :class:`Volume`.

Input: a directory, a zip archive (path, bytes or file object: what the service
receives), a list of paths or bytes, or one multi-frame file. Files that are not DICOM
Part 10 and DICOM objects without pixel data (DICOMDIR, reports) are skipped; their
count is ``meta["skipped_files"]``. All image files must share one Series Instance UID,
Rows, Columns, Pixel Spacing and orientation, else the first offending file is named.

Geometry (see :mod:`medseek.io.geometry`): slices sorted by position along the slice
normal, ``sz`` the median gap, gaps more than ``gap_tolerance`` (relative) from it an
error. For multi-frame objects the per-frame Plane Position/Orientation functional
groups are used the same way. A multi-frame object without positions (e.g. the plain
multi-frame MR in ``emri_small.dcm``) keeps its stored frame order, takes ``sz`` from
Spacing Between Slices, else Slice Thickness, else 1 mm, and sets
``meta["geometry"] = "assumed"``; a single slice takes ``sz`` the same way; missing
Pixel Spacing gives 1 mm and ``meta["pixel_spacing_assumed"] = True``. Directory and
list inputs are bounded like zip archives (``max_zip_members`` files,
``max_zip_uncompressed_bytes`` in all).

Values: rescale applied per slice; int16 when every slice has slope 1 and an integral
intercept and the result fits, else uint16 when it fits (a plain unsigned series), else
float32. MONOCHROME1 inverted, colour reduced to luminance, as for 2D images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset

from . import dicom as dcm
from .archive import read_zip
from .deid import DeidConfig, DeidRecord, deidentify
from .errors import LimitExceededError, MedicalImageError
from .geometry import order_slices
from .limits import ReadLimits
from .records import Volume
from .sources import Source, is_dicom, is_zip, read_source, source_name

_VOLUME_DTYPES = (np.int16, np.uint16)


def _gather(source: Source | Sequence[Source], limits: ReadLimits, name: str) -> list[tuple[str, bytes]]:
    """``[(label, bytes)]`` of every candidate file in ``source``."""
    if isinstance(source, (list, tuple)):
        if len(source) > limits.max_slices:
            raise LimitExceededError(f"{name}: {len(source)} inputs exceeds ReadLimits.max_slices={limits.max_slices}")
        items = []
        for i, item in enumerate(source):
            label = source_name(item) if isinstance(item, (str, os.PathLike)) else f"{name}[{i}]"
            items.append(read_source(item, limits, label))
        _check_total([(label, data) for data, label in items], limits, name)
        return [(label, data) for data, label in items]
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        files = sorted(p for p in Path(source).rglob("*") if p.is_file())
        if len(files) > limits.max_zip_members:
            raise LimitExceededError(
                f"{name}: {len(files)} files exceeds ReadLimits.max_zip_members={limits.max_zip_members}"
            )
        total = sum(p.stat().st_size for p in files)  # checked before anything is read
        if total > limits.max_zip_uncompressed_bytes:
            raise LimitExceededError(
                f"{name}: {total} bytes in all exceeds ReadLimits.max_zip_uncompressed_bytes="
                f"{limits.max_zip_uncompressed_bytes}"
            )
        return [(str(p), read_source(p, limits)[0]) for p in files]
    data, label = read_source(source, limits, name)
    if is_zip(data):
        return [(f"{label}!{member}", content) for member, content in read_zip(data, label, limits)]
    return [(label, data)]


def _check_total(items: list[tuple[str, bytes]], limits: ReadLimits, name: str) -> None:
    total = sum(len(data) for _, data in items)
    if total > limits.max_zip_uncompressed_bytes:
        raise LimitExceededError(
            f"{name}: {total} bytes in all exceeds ReadLimits.max_zip_uncompressed_bytes="
            f"{limits.max_zip_uncompressed_bytes}"
        )


def read_dicom_series(
    source: Source | Sequence[Source],
    *,
    limits: ReadLimits | None = None,
    deid: DeidConfig | None = None,
    gap_tolerance: float = 0.05,
    name: str | None = None,
) -> Volume:
    """Assemble a DICOM series (or one multi-frame object) into a volume.

    Parameters
    ----------
    source : path, bytes, file object, or a list of paths/bytes
        A directory, a zip archive, one multi-frame file, or the slice files.
    limits : ReadLimits, optional
        Checked per file and for the whole volume before pixels are decoded.
    deid : DeidConfig, optional
        De-identify every dataset; pseudonyms go in ``meta`` and ``deid``.
    gap_tolerance : float
        Largest relative deviation of a slice gap from the median gap (default 5 %).
    name : str, optional
        Label of the input in messages.

    Returns
    -------
    Volume
        ``array`` ``(D, H, W)`` C-contiguous int16/uint16/float32, ``spacing`` (sz, sy, sx) mm.

    Raises
    ------
    MedicalImageError
        No image files, inconsistent series, bad geometry, corrupt data.
    LimitExceededError
        Any declared size beyond ``limits``.
    """
    with dcm.quiet_validation():  # pydicom's warnings would quote header values
        return _read_series(source, limits, deid, gap_tolerance, name)


def _read_series(source, limits: ReadLimits | None, deid: DeidConfig | None,
                 gap_tolerance: float, name: str | None) -> Volume:
    limits = limits if limits is not None else ReadLimits()
    if not gap_tolerance >= 0:
        raise ValueError(f"gap_tolerance must be >= 0, got {gap_tolerance!r}")
    label = name if name is not None else (
        f"<{len(source)} inputs>" if isinstance(source, (list, tuple)) else source_name(source)
    )
    datasets: list[tuple[str, Dataset]] = []
    skipped = 0
    record: DeidRecord | None = None
    for item_name, data in _gather(source, limits, label):
        if not is_dicom(data):
            skipped += 1
            continue
        ds = dcm.read_dataset(data, item_name)
        if "PixelData" not in ds:
            skipped += 1
            continue
        with dcm.parse_errors(item_name):
            if deid is not None:
                rec = deidentify(ds, deid)
                record = record or rec
            dcm.check_pixel_header(ds, item_name, limits)
        datasets.append((item_name, ds))
    if not datasets:
        raise MedicalImageError(f"{label}: no DICOM image files found ({skipped} other files skipped)")
    with dcm.parse_errors(label):
        if len(datasets) == 1 and dcm.frame_count(datasets[0][1]) > 1:
            volume = _multiframe(*datasets[0], gap_tolerance)
        else:
            volume = _single_frames(datasets, limits, label, gap_tolerance)
    volume.meta["skipped_files"] = skipped
    volume.deid = record
    if record is not None:
        for key in ("patient", "study", "series"):
            volume.meta[f"{key}_pseudonym"] = getattr(record, f"{key}_pseudonym")
    return volume


def _check_consistent(datasets: list[tuple[str, Dataset]]) -> None:
    first_name, first = datasets[0]
    for item_name, ds in datasets[1:]:
        for keyword in ("SeriesInstanceUID", "Rows", "Columns", "SamplesPerPixel", "BitsAllocated"):
            if ds.get(keyword) != first.get(keyword):
                raise MedicalImageError(
                    f"{item_name}: {keyword} differs from that of {first_name} (not one series)"
                )
        if dcm.pixel_spacing(ds) != dcm.pixel_spacing(first):
            raise MedicalImageError(f"{item_name}: PixelSpacing differs from that of {first_name}")
        if dcm.frame_count(ds) != 1:
            raise MedicalImageError(f"{item_name}: multi-frame object mixed into a series of single frames")


def _vector(ds: Dataset, keyword: str, size: int, item_name: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise MedicalImageError(f"{item_name}: {keyword} is missing or not numeric") from None
    if out.shape != (size,) or not np.all(np.isfinite(out)):
        raise MedicalImageError(f"{item_name}: {keyword} must hold {size} finite values")
    return out


def _single_frames(
    datasets: list[tuple[str, Dataset]], limits: ReadLimits, label: str, gap_tolerance: float
) -> Volume:
    _check_consistent(datasets)
    first = datasets[0][1]
    limits.check_volume(len(datasets), int(first.Rows), int(first.Columns), label)
    names = [n for n, _ in datasets]
    positions = np.stack([_vector(ds, "ImagePositionPatient", 3, n) for n, ds in datasets])
    orientations = np.stack([_vector(ds, "ImageOrientationPatient", 6, n) for n, ds in datasets])
    geometry = order_slices(positions, orientations, names, gap_tolerance)
    sz = geometry.spacing_z if len(datasets) > 1 else _fallback_z(first)
    ordered = [datasets[i] for i in geometry.order]
    slices = [(dcm.decode(ds, n)[0], ds, 0) for n, ds in ordered]
    return _build(slices, first, sz, geometry.origin, geometry.direction, "positions")


def _multiframe(item_name: str, ds: Dataset, gap_tolerance: float) -> Volume:
    frames = dcm.frame_count(ds)
    pixels = dcm.decode(ds, item_name)
    names = [f"{item_name} frame {k}" for k in range(frames)]
    pos = [dcm.functional(ds, k, "PlanePositionSequence", "ImagePositionPatient") for k in range(frames)]
    ori = [dcm.functional(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient") for k in range(frames)]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and all(p is not None for p in pos) and all(o is not None for o in ori):
        positions = np.stack([_as_floats(p, 3, n) for p, n in zip(pos, names)])
        orientations = np.stack([_as_floats(o, 6, n) for o, n in zip(ori, names)])
        geometry = order_slices(positions, orientations, names, gap_tolerance)
        slices = [(pixels[k], ds, int(k)) for k in geometry.order]
        return _build(slices, ds, geometry.spacing_z, geometry.origin, geometry.direction, "positions")
    slices = [(pixels[k], ds, k) for k in range(frames)]
    # No positions: assume an axial stack (axes z, y, x along LPS S, P, L).
    return _build(slices, ds, _fallback_z(ds), np.zeros(3), np.eye(3)[::-1], "assumed")


def _as_floats(value: object, size: int, item_name: str) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise MedicalImageError(f"{item_name}: position/orientation is not numeric") from None
    if out.shape != (size,):
        raise MedicalImageError(f"{item_name}: position/orientation must hold {size} values")
    return out


def _fallback_z(ds: Dataset) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(ds.get(keyword) or 0)
        except (TypeError, ValueError):
            continue
        if value > 0:
            return value
    return 1.0


def _build(
    slices: list[tuple[np.ndarray, Dataset, int]],
    first: Dataset,
    sz: float,
    origin: np.ndarray,
    direction: np.ndarray,
    geometry: str,
) -> Volume:
    """Rescale slice by slice into one array whose dtype suits every slice."""
    prepared = []
    for arr, ds, frame in slices:
        if arr.ndim == 3:
            arr = dcm.luminance(arr)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            arr = dcm.invert_monochrome1(arr, ds)
        prepared.append((arr, *dcm.rescale_of(ds, frame)))
    integral = all(
        np.issubdtype(a.dtype, np.integer) and s == 1 and float(i).is_integer() for a, s, i in prepared
    )
    if integral:
        lo = min(int(a.min()) + int(i) for a, _, i in prepared)
        hi = max(int(a.max()) + int(i) for a, _, i in prepared)
        dtype = next(
            (t for t in _VOLUME_DTYPES if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max), np.float32
        )
    else:
        dtype = np.float32
    h, w = prepared[0][0].shape
    out = np.empty((len(prepared), h, w), dtype=dtype)
    for k, (arr, slope, intercept) in enumerate(prepared):
        if integral:
            out[k] = arr.astype(np.int64) + int(intercept) if intercept else arr
        else:
            out[k] = arr.astype(np.float64) * slope + intercept
    spacing_yx = dcm.pixel_spacing(first)
    meta = dcm.technical_meta(first)
    meta["geometry"] = geometry
    meta["pixel_spacing_assumed"] = spacing_yx is None
    sy, sx = spacing_yx or (1.0, 1.0)
    return Volume(
        array=out,
        spacing=(float(sz), float(sy), float(sx)),
        origin=tuple(float(v) for v in origin),
        direction=np.asarray(direction, dtype=np.float64),
        modality=dcm.text(first.get("Modality")),
        body_part=dcm.text(first.get("BodyPartExamined")),
        meta=meta,
    )
