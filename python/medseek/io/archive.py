"""Safe reading of a zip archive (e.g. an uploaded DICOM series) into memory.

Nothing is ever extracted to disk. Before any member is inflated the central directory
is checked against :class:`ReadLimits`: member count, total and per-member uncompressed
size, and compression ratio, per member (members over 1 MiB only; small blank files
compress very well) and for the whole archive (over 1 MiB in all: many small members
that each compress a thousand-fold are a bomb too). Member names that are absolute,
contain ``..`` or a drive letter are refused (zip-slip), and so are encrypted members.
Members are then inflated piece by piece under two caps: a member stops one byte past
the size its directory entry declared, and the archive stops at
``max_zip_uncompressed_bytes`` in all, so a lying directory cannot inflate further.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import PurePosixPath

from .errors import LimitExceededError, MedicalImageError
from .limits import ReadLimits

_RATIO_MIN_BYTES = 1 << 20
#: bytes inflated per read of a member
_PIECE = 1 << 20


def _check_member_name(member: str, name: str) -> None:
    text = member.replace("\\", "/")
    parts = PurePosixPath(text).parts
    if text.startswith("/") or ".." in parts or (len(text) > 1 and text[1] == ":") or "\x00" in text:
        raise MedicalImageError(f"{name}: unsafe zip member name {member!r} (absolute or '..')")


def read_zip(data: bytes, name: str, limits: ReadLimits) -> list[tuple[str, bytes]]:
    """Return ``[(member name, bytes)]`` for the regular files of a zip archive.

    Directories and macOS resource forks (``__MACOSX/``) are skipped.

    Raises
    ------
    MedicalImageError
        Corrupt archive, unsafe member name, encrypted member.
    LimitExceededError
        Too many members, too large, or a suspicious compression ratio.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise MedicalImageError(f"{name}: corrupt zip archive ({type(exc).__name__})") from None
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        if len(infos) > limits.max_zip_members:
            raise LimitExceededError(
                f"{name}: {len(infos)} zip members exceeds ReadLimits.max_zip_members={limits.max_zip_members}"
            )
        total, packed = 0, 0
        for info in infos:
            _check_member_name(info.filename, name)
            label = f"{name}!{info.filename}"
            if info.flag_bits & 0x1:
                raise MedicalImageError(f"{label}: encrypted zip member")
            limits.check_file_bytes(info.file_size, label)
            _check_ratio(info.file_size, info.compress_size, label, limits)
            total += info.file_size
            packed += info.compress_size
        if total > limits.max_zip_uncompressed_bytes:
            raise LimitExceededError(
                f"{name}: {total} uncompressed bytes exceeds "
                f"ReadLimits.max_zip_uncompressed_bytes={limits.max_zip_uncompressed_bytes}"
            )
        _check_ratio(total, packed, f"{name} (all members)", limits)
        members, inflated = [], 0
        for info in infos:
            if info.filename.startswith("__MACOSX/"):
                continue
            label = f"{name}!{info.filename}"
            content = _inflate(archive, info, label, limits, inflated)
            inflated += len(content)
            members.append((info.filename, content))
    return members


def _check_ratio(size: int, packed: int, label: str, limits: ReadLimits) -> None:
    if size > _RATIO_MIN_BYTES and size > limits.max_zip_ratio * max(packed, 1):
        raise LimitExceededError(
            f"{label}: compression ratio {size / max(packed, 1):.0f} exceeds "
            f"ReadLimits.max_zip_ratio={limits.max_zip_ratio}"
        )


def _inflate(archive: zipfile.ZipFile, info: zipfile.ZipInfo, label: str, limits: ReadLimits,
             inflated: int) -> bytes:
    """One member, read piece by piece; refused as soon as it passes its declared size or
    what is left of ``max_zip_uncompressed_bytes`` after the ``inflated`` bytes of the
    members before it (so at most one piece past either is ever inflated)."""
    room = limits.max_zip_uncompressed_bytes - inflated
    cap = min(info.file_size, room)
    pieces, size = [], 0
    try:
        with archive.open(info) as fh:
            while True:
                piece = fh.read(min(_PIECE, cap + 1 - size))
                if not piece:
                    break
                pieces.append(piece)
                size += len(piece)
                if size > cap:
                    break
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise MedicalImageError(f"{label}: corrupt zip member ({type(exc).__name__})") from None
    if size > info.file_size:
        raise LimitExceededError(f"{label}: inflates past its declared size {info.file_size}")
    if size > room:
        raise LimitExceededError(f"{label}: inflating it passes ReadLimits.max_zip_uncompressed_bytes="
                                 f"{limits.max_zip_uncompressed_bytes} for the whole archive")
    return b"".join(pieces)
