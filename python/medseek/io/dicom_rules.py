"""What is DICOM, and which DICOM objects are images to ingest (for
:mod:`medseek.io.dicom_groups`).

What counts as DICOM (decision): a DICOM Part 10 file (128-byte preamble, ``DICM``); or a
bare data set without preamble (old PACS exports, ACR-NEMA style) when its first tag is in
group 0002 or 0008 (little endian, as such exports write it) AND pydicom, forced, reads
SOP Class UID (0008,0016) and SOP Instance UID (0008,0018) from it. The group check keeps
``force=True`` from "parsing" a PNG or a text file into nonsense; the two UIDs are what
every composite object carries. A bare data set is sent to the server with a preamble
and file meta group prepended to its unchanged bytes (:func:`as_part10`): the server's
readers take Part 10 only.

Headers are read without pixels (``stop_before_pixels``); whether Pixel Data follows is
seen from the tag where pydicom stopped, so a file on disk is never read past its header.
Skip reasons (:func:`skip_reason`) name the rule, never a header value.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from . import dicom as dcm
from .errors import MedicalImageError
from .limits import ReadLimits

Loader = Callable[[], bytes]

#: Media Storage Directory Storage: the DICOMDIR of a medium
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Secondary Capture Image Storage and its multi-frame variants (PS3.4 B.5)
SECONDARY_CAPTURE_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",
})
SECONDARY_CAPTURE_MODALITIES = frozenset({"OT", "SC"})
#: modalities of objects that are not images to retrieve, even when they carry pixels
NON_IMAGE_MODALITIES = {
    "SR": "structured report", "PR": "presentation state", "KO": "key object selection",
    "DOC": "encapsulated document", "SEG": "segmentation", "REG": "registration",
    "RTSTRUCT": "RT structure set", "RTPLAN": "RT plan", "RTDOSE": "RT dose",
    "RTRECORD": "RT treatment record", "RWV": "real world value map", "FID": "fiducials",
}
#: ImageType values (any of its components) and series-description words of a scout
LOCALIZER_IMAGE_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM"})
_LOCALIZER_WORDS = re.compile(r"\b(localizer|localiser|scout|topogram|scanogram)\b", re.I)
#: tags that mark the start of pixel data, where a header-only read stops
_PIXEL_TAGS = frozenset({(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)})
#: Deflated Explicit VR Little Endian: pydicom inflates the whole data set, unbounded
_DEFLATED = b"1.2.840.10008.1.2.1.99"


class PathLoader:
    """A loader of a file on disk; :func:`group_dicom` reads its header straight from the
    file (up to the pixel data), so grouping a folder never reads the pixels."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> bytes:
        return self.path.read_bytes()


def load(source: bytes | Loader, name: str, limits: ReadLimits) -> bytes:
    """The bytes of a source (calling a loader), refused past ``limits.max_file_bytes``."""
    data = source if isinstance(source, (bytes, bytearray)) else source()
    limits.check_file_bytes(len(data), name)
    return bytes(data)


def looks_bare(head: bytes) -> bool:
    """A data set without preamble: its first tag's group is 0002 or 0008 (little endian)."""
    return len(head) >= 8 and struct.unpack("<H", head[:2])[0] in (0x0002, 0x0008)


def read_header(name: str, source: bytes | Loader, limits: ReadLimits
                ) -> tuple[Dataset, bool, bool, int] | None:
    """``(dataset without pixels, has pixel data, is Part 10, size)``, or None when the
    content is not DICOM. Raises ``MedicalImageError``/``LimitExceededError`` naming it."""
    if isinstance(source, PathLoader):
        try:
            size = source.path.stat().st_size
            limits.check_file_bytes(size, name)
            with source.path.open("rb") as fh:
                return _parse_header(fh, name, size)
        except OSError as exc:
            raise MedicalImageError(f"{name}: cannot read ({exc.strerror or type(exc).__name__})"
                                    ) from None
    data = load(source, name, limits)
    return _parse_header(io.BytesIO(data), name, len(data))


def _parse_header(fh, name: str, size: int) -> tuple[Dataset, bool, bool, int] | None:
    head = fh.read(132)
    part10 = len(head) >= 132 and head[128:132] == b"DICM"
    if not part10 and not looks_bare(head):
        return None
    if _DEFLATED in _meta_group(head + fh.read(4096)):
        raise MedicalImageError(f"{name}: deflated transfer syntax is not read (its data set "
                                f"would be inflated whole, before any size check)")
    fh.seek(0)
    with dcm.parse_errors(name):
        ds = pydicom.dcmread(fh, stop_before_pixels=True, force=not part10)
        stop = fh.tell()
        tag = fh.read(4)
        has_pixels = len(tag) == 4 and (struct.unpack("<HH", tag) in _PIXEL_TAGS
                                        or struct.unpack(">HH", tag) in _PIXEL_TAGS)
        has_pixels = has_pixels and stop < size
        if not part10 and not ("SOPClassUID" in ds and "SOPInstanceUID" in ds):
            return None  # force=True "read" something that is no DICOM object
    return ds, has_pixels, part10, size


def _meta_group(head: bytes) -> bytes:
    """The file meta group's bytes at the start of ``head`` (a Part 10 file or a bare data
    set that begins with it), by its group length; the first bytes when it has none."""
    start = 132 if head[128:132] == b"DICM" else 0
    if head[start:start + 6] == b"\x02\x00\x00\x00UL":  # (0002,0000) explicit VR
        return head[start:start + 12 + struct.unpack("<I", head[start + 8:start + 12])[0]]
    return head[start:start + 1024] if head[start:start + 2] == b"\x02\x00" else b""


# -- rules --------------------------------------------------------------------------------

def skip_reason(ds: Dataset, has_pixels: bool) -> str | None:
    """Why an object is no item to ingest (None: it is one). Reasons name the rule only."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    media_class = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or "")
    if DICOMDIR_SOP_CLASS in (sop_class, media_class) or "DirectoryRecordSequence" in ds:
        return "DICOMDIR (media directory, not an image)"
    modality = (dcm.text(ds.get("Modality")) or "").upper()
    if modality in NON_IMAGE_MODALITIES:
        return f"non-image object: {NON_IMAGE_MODALITIES[modality]} (modality {modality})"
    if sop_class in SECONDARY_CAPTURE_SOP_CLASSES:
        return "secondary capture (SOP Class Secondary Capture Image Storage)"
    if modality in SECONDARY_CAPTURE_MODALITIES:
        return f"secondary capture (modality {modality})"
    image_type = {str(v).strip().upper() for v in values(ds.get("ImageType"))}
    if image_type & LOCALIZER_IMAGE_TYPES:
        word = sorted(image_type & LOCALIZER_IMAGE_TYPES)[0]
        return f"localizer (ImageType contains {word})"
    description = str(ds.get("SeriesDescription", "") or "")
    found = _LOCALIZER_WORDS.search(description)
    if found:
        return f"localizer (series description says {found.group(1).lower()!r})"
    if not has_pixels:
        return "no Pixel Data (not an image)"
    if "Rows" not in ds or "Columns" not in ds:
        return "no Rows/Columns (not an image)"
    return None


def values(value) -> list:
    """A DICOM value as a list: empty when absent, one item for a single value."""
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def as_part10(data: bytes, name: str) -> bytes:
    """A bare data set as a Part 10 file: preamble, ``DICM`` and a file meta group are
    prepended; the data set's own bytes are kept unchanged."""
    if data[128:132] == b"DICM":
        return data
    if struct.unpack("<H", data[:2])[0] == 0x0002:  # a meta group, only the preamble missing
        return b"\x00" * 128 + b"DICM" + data
    with dcm.quiet_validation(), dcm.parse_errors(name):
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        implicit, little = ds.original_encoding
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_file_meta_info(buf, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buf.getvalue() + data
