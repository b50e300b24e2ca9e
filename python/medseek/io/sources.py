"""Turn a reader's ``source`` argument into bytes, with size checks.

A source is a filesystem path (``str`` or :class:`os.PathLike`), a bytes-like object,
or a binary file-like object with ``read``. The gRPC service hands readers the uploaded
bytes; scripts hand them paths. Everything is read into memory once, after the size is
checked against :attr:`ReadLimits.max_file_bytes`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Union

from .errors import MedicalImageError
from .limits import ReadLimits

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


def source_name(source: object) -> str:
    """A short label for messages: the path, or ``"<bytes>"`` / ``"<file object>"``."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    name = getattr(source, "name", None)
    if isinstance(name, str):
        return name
    return "<file object>"


def read_source(source: Source, limits: ReadLimits, name: str | None = None) -> tuple[bytes, str]:
    """Read ``source`` fully into memory.

    Parameters
    ----------
    source : str, os.PathLike, bytes-like or binary file-like
        What to read.
    limits : ReadLimits
        ``max_file_bytes`` is checked before the content is read.
    name : str, optional
        Label for messages; defaults to :func:`source_name`.

    Returns
    -------
    (data, name) : tuple of bytes and str

    Raises
    ------
    MedicalImageError
        When the path does not exist, is a directory, or cannot be read.
    LimitExceededError
        When the input is larger than ``limits.max_file_bytes``.
    TypeError
        When ``source`` is none of the accepted kinds.
    """
    label = name if name is not None else source_name(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise MedicalImageError(f"{label}: cannot read ({exc.strerror or type(exc).__name__})") from None
        if path.is_dir():
            raise MedicalImageError(f"{label}: is a directory, expected a file")
        limits.check_file_bytes(size, label)
        try:
            with path.open("rb") as fh:
                data = fh.read(limits.max_file_bytes + 1)
        except OSError as exc:
            raise MedicalImageError(f"{label}: cannot read ({exc.strerror or type(exc).__name__})") from None
        limits.check_file_bytes(len(data), label)
        return data, label
    if isinstance(source, (bytes, bytearray, memoryview)):
        limits.check_file_bytes(memoryview(source).nbytes, label)
        return bytes(source), label
    if hasattr(source, "read"):
        data = source.read(limits.max_file_bytes + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"source: file object must be opened in binary mode, read() gave {type(data).__name__}")
        limits.check_file_bytes(len(data), label)
        return bytes(data), label
    raise TypeError(
        f"source must be a path, bytes or a binary file object, got {type(source).__name__}"
    )


def is_dicom(data: bytes) -> bool:
    """True for a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def is_png(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n"


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def is_zip(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def is_gzip(data: bytes) -> bool:
    return data[:2] == b"\x1f\x8b"
