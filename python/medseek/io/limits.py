"""Size limits checked from headers before pixel memory is allocated.

Every reader takes a :class:`ReadLimits`. The checks use only what a header declares
(file size, DICOM ``Rows * Columns * NumberOfFrames * SamplesPerPixel * BitsAllocated``,
a PNG/JPEG size from :func:`PIL.Image.open`, a NIfTI header shape, a zip directory), so
a decompression bomb is refused before it can inflate.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LimitExceededError

_MIB = 1024 * 1024


@dataclass(frozen=True)
class ReadLimits:
    """Upper bounds on what a reader accepts.

    Attributes
    ----------
    max_file_bytes : int
        Largest single input (file, bytes object, zip member) in bytes.
    max_pixels : int
        Largest 2D image, ``rows * columns`` (per frame).
    max_voxels : int
        Largest volume, ``depth * rows * columns``, summed over all slices or frames.
    max_decoded_bytes : int
        Largest decoded pixel buffer of one input, ``voxels * bytes per sample``.
    max_slices : int
        Most slices in a DICOM series or frames in a multi-frame object.
    max_zip_members : int
        Most members in a zip archive (or files in a series directory).
    max_zip_uncompressed_bytes : int
        Largest total uncompressed size of a zip archive (checked from its directory, and
        again while inflating: inflation stops there), or total size of the files of a
        series directory or list.
    max_zip_ratio : float
        Largest compression ratio (uncompressed / compressed) of one zip member over
        1 MiB, and of a whole archive over 1 MiB (many small members each compressed a
        thousand-fold are a bomb too).

    The defaults suit a trusted batch job; a server reading uploads uses tighter ones
    (``medseek.serve.config.SERVE_LIMITS``). Every check happens before the memory it
    guards is allocated, and the message names the limit and its value.
    """

    max_file_bytes: int = 2048 * _MIB
    max_pixels: int = 64 * _MIB // 2  # 33.5 Mpx: above the largest mammogram
    max_voxels: int = 1024 * 1024 * 1024 // 2  # 512 Mvox: e.g. 2048 x 512 x 512
    max_decoded_bytes: int = 4096 * _MIB
    max_slices: int = 8192
    max_zip_members: int = 20000
    max_zip_uncompressed_bytes: int = 4096 * _MIB
    max_zip_ratio: float = 200.0

    def __post_init__(self) -> None:
        for name in (
            "max_file_bytes",
            "max_pixels",
            "max_voxels",
            "max_decoded_bytes",
            "max_slices",
            "max_zip_members",
            "max_zip_uncompressed_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ReadLimits.{name} must be a positive int, got {value!r}")
        if not self.max_zip_ratio > 0:
            raise ValueError(f"ReadLimits.max_zip_ratio must be > 0, got {self.max_zip_ratio!r}")

    def check_file_bytes(self, nbytes: int, name: str) -> None:
        if nbytes > self.max_file_bytes:
            raise LimitExceededError(
                f"{name}: {nbytes} bytes exceeds ReadLimits.max_file_bytes={self.max_file_bytes}"
            )

    def check_image(self, rows: int, columns: int, name: str) -> None:
        """Refuse a 2D image (or one frame) from its declared size."""
        if rows <= 0 or columns <= 0:
            raise LimitExceededError(f"{name}: declared image size {rows}x{columns} is empty")
        if rows * columns > self.max_pixels:
            raise LimitExceededError(
                f"{name}: declared image size {rows}x{columns} = {rows * columns} pixels exceeds "
                f"ReadLimits.max_pixels={self.max_pixels}"
            )

    def check_volume(self, depth: int, rows: int, columns: int, name: str) -> None:
        """Refuse a volume from its declared ``(depth, rows, columns)``."""
        if depth > self.max_slices:
            raise LimitExceededError(
                f"{name}: {depth} slices/frames exceeds ReadLimits.max_slices={self.max_slices}"
            )
        self.check_image(rows, columns, name)
        if depth * rows * columns > self.max_voxels:
            raise LimitExceededError(
                f"{name}: declared volume {depth}x{rows}x{columns} = {depth * rows * columns} "
                f"voxels exceeds ReadLimits.max_voxels={self.max_voxels}"
            )

    def check_decoded_bytes(self, nbytes: int, name: str) -> None:
        if nbytes > self.max_decoded_bytes:
            raise LimitExceededError(
                f"{name}: decoded pixel data would take {nbytes} bytes, exceeds "
                f"ReadLimits.max_decoded_bytes={self.max_decoded_bytes}"
            )
