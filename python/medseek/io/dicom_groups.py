"""DICOM as a PACS exports it (a folder, a zip, a DICOMDIR medium) -> ingest items.

A PACS export is a heap of files, most without an extension, that hold many objects:
the slices of CT/MR series, radiographs, localizers, secondary captures, reports. This
module finds the DICOM among them by content, groups it by Study / Series Instance UID
and says, for each group, what the ingest API should receive:

* the single-frame slices of one cross-sectional series (every slice with Image Position
  and Orientation, same size and orientation) -> ONE ``volume`` item, slices sorted by
  position along the slice normal, sent as a zip of the slices (what
  :func:`medseek.io.read_volume` reads on the server);
* a multi-frame object -> one ``volume`` item, sent as the file itself;
* a single-frame image that is not part of such a stack (a CR/DX radiograph, a lone
  slice) -> one ``image`` item, sent as the file itself.

Skipped by rule, each with its reason (:class:`SkippedFile`): localizers / scouts,
secondary captures (SOP Class Secondary Capture, modality OT or SC), non-image objects
(SR, presentation states, key objects, RT objects, segmentations, the DICOMDIR itself, any
object without Pixel Data), duplicate slice positions, and whatever breaks a limit or
cannot be parsed. Files that are not DICOM at all are listed in
:attr:`DicomGrouping.others`, not skipped: the caller handles them by their own rules.

What counts as DICOM, and the skip rules: :mod:`medseek.io.dicom_rules` (a Part 10 file,
or a bare data set whose first tag is in group 0002/0008 and that holds SOP Class and SOP
Instance UIDs).

Bounds: grouping reads headers only (``stop_before_pixels``; a file on disk is read up
to its pixel data, no further), each file is refused past ``ReadLimits.max_file_bytes``,
a folder, zip or DICOMDIR past ``max_zip_members`` files, a series past ``max_slices`` or
the declared voxels of ``check_volume``, a volume's zip past
``max_zip_uncompressed_bytes``. File content is loaded again only when an item's bytes
are asked for, one item at a time, so a large folder is never held in memory at once.

Privacy: item ids are a hash of the UIDs (never the UID text: UIDs can identify a patient);
skip reasons name the file and the rule, never a header value; a volume's zip names its
members by slice number, not by the (possibly identifying) exported file names.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from . import dicom as dcm
from .archive import read_zip
from .dicom_rules import (DICOMDIR_SOP_CLASS, Loader, PathLoader, as_part10, load, looks_bare,
                          read_header, skip_reason, values)
from .errors import LimitExceededError, MedicalImageError
from .limits import ReadLimits
from .sources import is_zip

#: projection modalities: each single-frame file is its own image, never a slice
PROJECTION_MODALITIES = frozenset({
    "CR", "DX", "MG", "IO", "PX", "RG", "RF", "XA", "US", "OP", "XC", "ES", "GM", "SM", "DG",
})
#: two slices closer than this along the normal (mm) are at the same position
_SAME_POSITION_MM = 1e-3


@dataclass(frozen=True)
class SkippedFile:
    """A DICOM object left out by rule; ``reason`` names the rule, never a header value."""

    name: str
    reason: str


@dataclass(eq=False)
class DicomItem:
    """One ingest item made of DICOM: a volume (a series or a multi-frame object) or an image.

    Attributes
    ----------
    kind : {"image", "volume"}
        The ``pb.IngestItem`` content field its bytes go into.
    study_uid, series_uid : str
        The raw UIDs (identifying: kept out of ``repr``; never print them).
    modality : str or None
    item_id : str
        Stable id: ``<modality>-<20 hex digits of SHA-256 over the UIDs>``.
    n_files : int
        Files (slices) it is made of.
    """

    kind: str
    study_uid: str = field(repr=False)
    series_uid: str = field(repr=False)
    modality: str | None
    item_id: str
    _sources: list[tuple[str, bytes | Loader, bool]] = field(repr=False)
    _limits: ReadLimits = field(repr=False)
    _order: int = field(default=0, repr=False)  # first appearance of its files in the input

    @property
    def n_files(self) -> int:
        return len(self._sources)

    @property
    def names(self) -> list[str]:
        """The file names, in slice order (for a volume: along the slice normal)."""
        return [name for name, _, _ in self._sources]

    @property
    def files(self) -> list[tuple[str, bytes]]:
        """``[(name, bytes)]`` in slice order, as found (loaded again on every access)."""
        return [(name, load(source, name, self._limits)) for name, source, _ in self._sources]

    def payload(self) -> bytes:
        """The bytes the ingest API reads for ``kind``: the Part 10 file of an image or a
        multi-frame volume, a zip (stored, not deflated: DICOM compresses poorly and
        stored members can never look like a zip bomb) of the Part 10 slices of a series.

        Raises
        ------
        LimitExceededError
            The slices together pass ``ReadLimits.max_zip_uncompressed_bytes``.
        """
        parts = [as_part10(load(source, name, self._limits), name) if not p10
                 else load(source, name, self._limits) for name, source, p10 in self._sources]
        if self.kind == "image" or len(parts) == 1:
            return parts[0]
        total = sum(len(p) for p in parts)
        if total > self._limits.max_zip_uncompressed_bytes:
            raise LimitExceededError(
                f"{self.item_id}: {total} bytes of slices exceeds "
                f"ReadLimits.max_zip_uncompressed_bytes={self._limits.max_zip_uncompressed_bytes}")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
            for k, part in enumerate(parts):
                archive.writestr(f"{k:05d}.dcm", part)
        return buf.getvalue()


@dataclass
class DicomGrouping:
    """What :func:`group_dicom` found: ``items`` in order of first appearance, ``skipped``
    DICOM objects with their reasons, and ``others``: names of files that are not DICOM."""

    items: list[DicomItem] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    others: list[str] = field(default_factory=list)


@dataclass
class _Header:
    """What grouping needs of one DICOM object (read without its pixels)."""

    name: str
    source: bytes | Loader
    part10: bool
    order: int
    study: str
    series: str
    instance: str
    modality: str | None
    rows: int
    columns: int
    frames: int
    position: np.ndarray | None
    orientation: np.ndarray | None
    echo: str
    instance_number: int
    size: int


# -- reading one file's header ----------------------------------------------------------

def _floats(value, size: int) -> np.ndarray | None:
    try:
        out = np.asarray([float(v) for v in values(value)], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (size,) and np.all(np.isfinite(out)) else None


def _header(name: str, source: bytes | Loader, order: int, ds: Dataset, part10: bool,
            size: int) -> _Header:
    try:
        number = int(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    return _Header(
        name=name, source=source, part10=part10, order=order,
        study=str(ds.get("StudyInstanceUID", "") or ""),
        series=str(ds.get("SeriesInstanceUID", "") or ""),
        instance=str(ds.get("SOPInstanceUID", "") or ""),
        modality=(dcm.text(ds.get("Modality")) or "").upper() or None,
        rows=int(ds.Rows), columns=int(ds.Columns), frames=dcm.frame_count(ds),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        echo=str(ds.get("EchoNumbers", "") or ""), instance_number=number, size=size)


# -- grouping -----------------------------------------------------------------------------

def item_id(modality: str | None, *uids: str) -> str:
    """``<modality>-<hash>``: a stable id that does not reveal the UIDs it is made of."""
    digest = hashlib.sha256("\x00".join(uids).encode("utf-8")).hexdigest()[:20]
    return f"{(modality or 'dicom').lower()}-{digest}"


def group_dicom(files: Iterable[tuple[str, bytes | Loader]], *,
                limits: ReadLimits | None = None) -> DicomGrouping:
    """Group DICOM objects into ingest items by Study / Series Instance UID.

    Parameters
    ----------
    files : iterable of (name, bytes or a callable returning bytes)
        Every file of a folder, zip or medium. A callable is called when the file's
        header is read and again when an item's bytes are built.
    limits : ReadLimits, optional
        ``max_zip_members`` files at most; per file ``max_file_bytes``; per volume
        ``max_slices``, the declared voxels and ``max_zip_uncompressed_bytes``.

    Returns
    -------
    DicomGrouping

    Raises
    ------
    LimitExceededError
        More than ``limits.max_zip_members`` files.
    """
    limits = limits if limits is not None else ReadLimits()
    out = DicomGrouping()
    headers: list[_Header] = []
    with dcm.quiet_validation():  # pydicom's warnings would quote header values
        for order, (name, source) in enumerate(files):
            if order >= limits.max_zip_members:
                raise LimitExceededError(f"more than ReadLimits.max_zip_members="
                                         f"{limits.max_zip_members} files to group")
            header = _classify(name, source, order, limits, out)
            if header is not None:
                headers.append(header)
    series: dict[tuple[str, str], list[_Header]] = {}
    copies: dict[str, str] = {}  # SOP Instance UID -> the first file holding it
    for h in headers:
        if h.instance and h.instance in copies:  # e.g. one slice exported twice, recoded
            out.skipped.append(SkippedFile(h.name, f"another copy of the object in "
                                                   f"{copies[h.instance]}"))
            continue
        copies[h.instance] = h.name
        series.setdefault((h.study, h.series), []).append(h)
    for members in series.values():
        out.items.extend(_series_items(members, limits, out.skipped))
    out.items.sort(key=lambda item: item._order)
    return out


def _classify(name: str, source: bytes | Loader, order: int, limits: ReadLimits,
              out: DicomGrouping) -> _Header | None:
    """Read one file's header: a header to group, or recorded in ``out`` as skipped/other."""
    try:
        found = read_header(name, source, limits)
        if found is None:
            out.others.append(name)
            return None
        ds, has_pixels, part10, size = found
        with dcm.parse_errors(name):
            reason = skip_reason(ds, has_pixels)
            if reason is None and not (ds.get("StudyInstanceUID") and ds.get("SeriesInstanceUID")):
                reason = "no Study/Series Instance UID (cannot be grouped)"
            if reason is not None:
                out.skipped.append(SkippedFile(name, reason))
                return None
            header = _header(name, source, order, ds, part10, size)
        if header.frames > 1:  # declared sizes, before any pixel is read
            limits.check_volume(header.frames, header.rows, header.columns, name)
        else:
            limits.check_image(header.rows, header.columns, name)
        return header
    except MedicalImageError as exc:  # limits included: this file only, the rest go on
        out.skipped.append(SkippedFile(name, str(exc).removeprefix(f"{name}: ")))
        return None


def _series_items(members: list[_Header], limits: ReadLimits,
                  skipped: list[SkippedFile]) -> list[DicomItem]:
    """The items of one series: multi-frame objects and projection images one each,
    stacks of positioned slices (split by size, orientation and echo) one volume each."""
    items, stacks = [], {}
    for h in members:
        if h.frames > 1:
            items.append(_make_item("volume", [h], limits, h.instance))
        elif (h.modality in PROJECTION_MODALITIES or h.position is None
              or h.orientation is None):
            items.append(_make_item("image", [h], limits, h.instance))
        else:
            key = (h.modality, h.rows, h.columns, tuple(np.round(h.orientation, 3)), h.echo)
            stacks.setdefault(key, []).append(h)
    for key, stack in stacks.items():
        stack = _sorted_unique(stack, skipped)
        if len(stack) == 1:  # a lone slice is an image
            items.append(_make_item("image", stack, limits, stack[0].instance))
            continue
        reason = _volume_over_limits(stack, limits)
        if reason is not None:
            skipped.extend(SkippedFile(h.name, reason) for h in stack)
            continue
        extra = () if len(stacks) == 1 else (repr(key),)
        items.append(_make_item("volume", stack, limits, *extra))
    return items


def _sorted_unique(stack: list[_Header], skipped: list[SkippedFile]) -> list[_Header]:
    """Slices sorted along the normal of their (shared) orientation; a slice at the
    position of an earlier one (lower Instance Number) is skipped as a duplicate."""
    o = stack[0].orientation
    normal = np.cross(o[:3], o[3:])
    stack = sorted(stack, key=lambda h: (float(normal @ h.position), h.instance_number, h.order))
    kept = [stack[0]]
    for h in stack[1:]:
        if abs(float(normal @ (h.position - kept[-1].position))) < _SAME_POSITION_MM:
            skipped.append(SkippedFile(h.name,
                                       f"duplicate slice: same position as {kept[-1].name}"))
        else:
            kept.append(h)
    return kept


def _volume_over_limits(stack: list[_Header], limits: ReadLimits) -> str | None:
    try:
        limits.check_volume(len(stack), stack[0].rows, stack[0].columns, "series")
    except LimitExceededError as exc:
        return str(exc).removeprefix("series: ")
    total = sum(h.size for h in stack)
    if total > limits.max_zip_uncompressed_bytes:
        return (f"series of {total} bytes exceeds ReadLimits.max_zip_uncompressed_bytes="
                f"{limits.max_zip_uncompressed_bytes}")
    return None


def _make_item(kind: str, members: list[_Header], limits: ReadLimits, *extra: str) -> DicomItem:
    first = members[0]
    return DicomItem(kind=kind, study_uid=first.study, series_uid=first.series,
                     modality=first.modality,
                     item_id=item_id(first.modality, first.study, first.series, *extra),
                     _sources=[(h.name, h.source, h.part10) for h in members], _limits=limits,
                     _order=min(h.order for h in members))


# -- folders, zips, media -----------------------------------------------------------------

def discover(path: Path, *, limits: ReadLimits | None = None) -> DicomGrouping:
    """Group the DICOM of a folder (recursively), a zip archive, a DICOMDIR medium (the
    files its records reference) or one DICOM file.

    Names are relative to the folder (posix), the zip member names, or relative to the
    DICOMDIR's folder.

    Raises
    ------
    MedicalImageError
        ``path`` is missing or none of the above; a corrupt zip or DICOMDIR.
    LimitExceededError
        More files than ``limits.max_zip_members``; a zip over its limits.
    """
    limits = limits if limits is not None else ReadLimits()
    path = Path(path)
    if path.is_dir():
        return group_dicom(_folder_files(path, limits), limits=limits)
    if not path.is_file():
        raise MedicalImageError(f"{path}: no such file or folder")
    with path.open("rb") as fh:
        head = fh.read(132)
    if is_zip(head):
        limits.check_file_bytes(path.stat().st_size, str(path))
        members = read_zip(path.read_bytes(), str(path), limits)
        return group_dicom(((n, d) for n, d in members if not n.endswith("/")), limits=limits)
    if path.name.upper() == "DICOMDIR" or _is_dicomdir(path, head, limits):
        return group_dicom(_medium_files(path, limits), limits=limits)
    if head[128:132] == b"DICM" or looks_bare(head):
        return group_dicom([(path.name, PathLoader(path))], limits=limits)
    raise MedicalImageError(f"{path}: not a folder, zip archive, DICOMDIR or DICOM file")


def is_dicom_source(path: Path) -> bool:
    """Whether :func:`discover` takes ``path``: a folder, a zip archive, a DICOMDIR, or a
    file whose content is DICOM (Part 10, or a bare data set by the rule above)."""
    path = Path(path)
    if path.is_dir():
        return True
    if not path.is_file():
        return False
    if path.name.upper() == "DICOMDIR":
        return True
    with path.open("rb") as fh:
        head = fh.read(132)
    return is_zip(head) or head[128:132] == b"DICM" or looks_bare(head)


def _folder_files(root: Path, limits: ReadLimits) -> list[tuple[str, Loader]]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):  # no symlinked folders: no loops
        dirnames.sort()
        for fname in sorted(filenames):
            p = Path(dirpath) / fname
            if not p.is_file():
                continue
            if len(files) >= limits.max_zip_members:
                raise LimitExceededError(f"{root}: more than ReadLimits.max_zip_members="
                                         f"{limits.max_zip_members} files")
            files.append((p.relative_to(root).as_posix(), PathLoader(p)))
    files.sort(key=lambda f: f[0])
    return files


def _is_dicomdir(path: Path, head: bytes, limits: ReadLimits) -> bool:
    if head[128:132] != b"DICM":
        return False
    found = read_header(path.name, PathLoader(path), limits)
    return found is not None and str(found[0].file_meta.get("MediaStorageSOPClassUID", "")) \
        == DICOMDIR_SOP_CLASS


def _medium_files(dicomdir: Path, limits: ReadLimits) -> list[tuple[str, Loader]]:
    """The files a DICOMDIR's directory records reference (Referenced File ID, PS3.10
    8.2), resolved in the medium's folder (as written, else in lower case: media mounted
    on a case-sensitive system). A reference that is absolute or holds '..' is refused.

    The records are read with ``pydicom.dcmread`` rather than ``pydicom.fileset.FileSet``,
    whose every instance makes a staging temporary directory it never removes."""
    limits.check_file_bytes(dicomdir.stat().st_size, str(dicomdir))
    root = dicomdir.parent
    with dcm.quiet_validation(), dcm.parse_errors(str(dicomdir)):
        ds = pydicom.dcmread(dicomdir)
        references = [values(r.get("ReferencedFileID")) for r in
                      ds.get("DirectoryRecordSequence") or () if "ReferencedFileID" in r]
    if len(references) > limits.max_zip_members:
        raise LimitExceededError(f"{dicomdir}: {len(references)} referenced files exceeds "
                                 f"ReadLimits.max_zip_members={limits.max_zip_members}")
    files = []
    for parts in references:
        parts = [str(p).strip() for p in parts]
        if not parts or any(p in ("", ".", "..") or "/" in p or "\\" in p for p in parts):
            raise MedicalImageError(f"{dicomdir}: a record's Referenced File ID is not a "
                                    f"relative path on the medium")
        path = root.joinpath(*parts)
        if not path.exists() and root.joinpath(*(p.lower() for p in parts)).exists():
            path = root.joinpath(*(p.lower() for p in parts))
        files.append((path.relative_to(root).as_posix(), PathLoader(path)))
    return files
