"""Argument checks and shape rules shared by the C++-backed ops and their NumPy reference.

Nothing here converts an array: a volume of the wrong dtype, rank or memory layout is
refused with an error that names the argument, so the caller decides whether a copy is
worth it.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

VOLUME_DTYPES = (np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.float32))


def check_array(arr: object, name: str, ndim: int, dtypes: tuple[np.dtype, ...]) -> None:
    """Refuse anything but a non-empty, C-contiguous ndarray of rank ``ndim`` and a listed dtype."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(arr).__name__}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if not any(arr.dtype == d for d in dtypes):  # '==' is False for a swapped byte order
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} dtype must be one of ({names}), got {arr.dtype.str}")
    if not arr.flags.c_contiguous:
        raise ValueError(
            f"{name} must be C-contiguous (use np.ascontiguousarray), got strides {arr.strides}"
        )
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")


def check_volume(vol: object, name: str = "vol") -> None:
    """A volume is a ``(D, H, W)`` int16, uint16 or float32 array, C-contiguous, non-empty."""
    check_array(vol, name, 3, VOLUME_DTYPES)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def check_spacing(
    value: object, name: str, allow_scalar: bool = False
) -> tuple[float, float, float]:
    """Return ``(sz, sy, sx)`` in mm as floats; each must be finite and > 0.

    ``allow_scalar`` accepts one number for an isotropic spacing.
    """
    if allow_scalar and _is_real(value):
        items: list[object] = [value] * 3
    else:
        try:
            items = list(value)
        except TypeError:
            raise TypeError(f"{name} must be a sequence of 3 numbers, got {value!r}") from None
        if len(items) != 3:
            raise ValueError(f"{name} must have 3 entries (z, y, x), got {value!r}")
    if not all(_is_real(v) for v in items):
        raise TypeError(f"{name} entries must be real numbers, got {value!r}")
    out = tuple(float(v) for v in items)
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"{name} must be finite and > 0 on every axis, got {value!r}")
    return out


def check_window(center: object, width: object) -> tuple[float, float]:
    """``center`` finite, ``width`` finite and > 0."""
    if not _is_real(center) or not math.isfinite(center):
        raise ValueError(f"center must be a finite number, got {center!r}")
    if not _is_real(width) or not (math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a finite number > 0, got {width!r}")
    return float(center), float(width)


def check_chunking(depth: object, overlap: object, pad_value: object) -> tuple[int, int, float]:
    """``depth >= 1`` and ``0 <= overlap < depth`` integers; ``pad_value`` finite."""
    if not _is_int(depth):
        raise TypeError(f"depth must be an int, got {depth!r}")
    if not _is_int(overlap):
        raise TypeError(f"overlap must be an int, got {overlap!r}")
    depth, overlap = int(depth), int(overlap)
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not 0 <= overlap < depth:
        raise ValueError(f"overlap must satisfy 0 <= overlap < depth = {depth}, got {overlap}")
    if not _is_real(pad_value) or not math.isfinite(pad_value):
        raise ValueError(f"pad_value must be a finite number, got {pad_value!r}")
    return depth, overlap, float(pad_value)


def check_patchify(
    chunks: np.ndarray, z_start: np.ndarray, patch: object
) -> tuple[int, int, int]:
    """Validate ``patchify`` arguments; return ``patch`` as ``(pz, py, px)``."""
    check_array(chunks, "chunks", 4, (np.dtype(np.float32),))
    check_array(z_start, "z_start", 1, (np.dtype(np.int32),))
    n = chunks.shape[0]
    if z_start.shape != (n,):
        raise ValueError(
            f"z_start must have one entry per chunk ({n}), got shape {z_start.shape}"
        )
    try:
        items = list(patch)
    except TypeError:
        raise TypeError(
            f"patch must be a sequence of 3 ints (pz, py, px), got {patch!r}"
        ) from None
    if len(items) != 3 or not all(_is_int(p) for p in items):
        raise TypeError(f"patch must be a sequence of 3 ints (pz, py, px), got {patch!r}")
    pz, py, px = (int(p) for p in items)
    for axis, (p, extent) in enumerate(zip((pz, py, px), chunks.shape[1:])):
        if p < 1 or extent % p:
            raise ValueError(
                f"patch {(pz, py, px)} must divide the chunk shape {chunks.shape[1:]}: "
                f"axis {axis} has extent {extent}, patch {p}"
            )
    bad = np.flatnonzero((z_start < 0) | (z_start % pz != 0))
    if bad.size:
        raise ValueError(
            f"z_start must be >= 0 and a multiple of patch[0] = {pz}, "
            f"got z_start[{bad[0]}] = {z_start[bad[0]]}"
        )
    return pz, py, px


def resampled_shape(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    target_spacing: tuple[float, float, float],
) -> tuple[int, int, int]:
    """Output shape of ``resample``: per axis ``max(1, floor(n * s / t + 0.5))``.

    Halves round up (not Python's round-half-to-even), identically in C++.
    """
    return tuple(
        max(1, math.floor(n * s / t + 0.5)) for n, s, t in zip(shape, spacing, target_spacing)
    )


def chunk_count(d: int, depth: int, overlap: int) -> int:
    """Number of chunks: ``max(1, ceil((d - overlap) / (depth - overlap)))``.

    The smallest count whose chunks, ``depth - overlap`` apart, cover all ``d`` slices;
    so no chunk is padding only and only the last one is padded.
    """
    stride = depth - overlap
    return max(1, -(-(d - overlap) // stride))
