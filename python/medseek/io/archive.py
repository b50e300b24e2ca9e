"""Safe reading of a zip archive (e.g. an uploaded DICOM series) into memory.

Nothing is ever extracted to disk. Before any member is inflated the central directory
is checked against :class:`ReadLimits`: member count, total and per-member uncompressed
size, and compression ratio (members over 1 MiB only; small blank files compress very
well). Member names that are absolute, contain ``..`` or a drive letter are refused
(zip-slip), and so are encrypted members. A member whose data inflates past the size its
directory entry declared is refused while reading.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import PurePosixPath

from .errors import LimitExceededError, MedicalImageError
from .limits import ReadLimits

_RATIO_MIN_BYTES = 1 << 20


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
        total = 0
        for info in infos:
            _check_member_name(info.filename, name)
            label = f"{name}!{info.filename}"
            if info.flag_bits & 0x1:
                raise MedicalImageError(f"{label}: encrypted zip member")
            limits.check_file_bytes(info.file_size, label)
            if info.file_size > _RATIO_MIN_BYTES and info.file_size > limits.max_zip_ratio * max(info.compress_size, 1):
                raise LimitExceededError(
                    f"{label}: compression ratio {info.file_size / max(info.compress_size, 1):.0f} exceeds "
                    f"ReadLimits.max_zip_ratio={limits.max_zip_ratio}"
                )
            total += info.file_size
        if total > limits.max_zip_uncompressed_bytes:
            raise LimitExceededError(
                f"{name}: {total} uncompressed bytes exceeds "
                f"ReadLimits.max_zip_uncompressed_bytes={limits.max_zip_uncompressed_bytes}"
            )
        members = []
        for info in infos:
            if info.filename.startswith("__MACOSX/"):
                continue
            label = f"{name}!{info.filename}"
            try:
                with archive.open(info) as fh:
                    content = fh.read(info.file_size + 1)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
                raise MedicalImageError(f"{label}: corrupt zip member ({type(exc).__name__})") from None
            if len(content) > info.file_size:
                raise LimitExceededError(f"{label}: inflates past its declared size {info.file_size}")
            members.append((info.filename, content))
    return members
