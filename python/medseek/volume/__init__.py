"""CT/MR volume preprocessing: resample, window, chunk along z, cut into 3D patches.

The work runs in the C++ module ``medseek._volume`` (OpenMP threads, GIL released); this
module checks every argument first and never converts an array silently. Each op has a
pure NumPy twin with the same signature in :mod:`medseek.volume.reference`.

Conventions
-----------
A volume is a ``(D, H, W)`` = ``(z, y, x)`` NumPy array, C-contiguous, dtype int16,
uint16 or float32; spacing is ``(sz, sy, sx)`` in mm. All outputs are freshly allocated.

* ``resample``: per axis ``n_out = max(1, floor(n * s / t + 0.5))`` (halves round up);
  output index ``i`` samples input coordinate ``x = i * (t / s)`` (first voxel centres
  aligned, as ITK with equal origins), trilinear, clamped to the last voxel.
* ``chunk``: stride ``depth - overlap``; ``C = max(1, ceil((D - overlap) / stride))``, the
  fewest chunks that cover every slice; chunk ``c`` starts at ``c * stride`` and holds
  ``min(depth, D - c * stride)`` real slices, the rest (last chunk only) is ``pad_value``.
* ``patchify``: position z is ``z_start[c] // pz + local patch z``, so ``z_start`` must be a
  multiple of ``pz`` (true for ``chunk`` output when ``overlap`` is a multiple of ``pz``).

Threads
-------
Calls that touch at least 2**21 elements run on OpenMP's default team (``OMP_NUM_THREADS``
if set, else one thread per core); smaller ones run on the calling thread. The GIL is
released while computing, so several Python threads may call at once. In a child forked
after the parent ran a threaded call, the engine runs single-threaded (GNU OpenMP cannot
restart its team after fork); use the "spawn"/"forkserver" start method for threaded
workers. On a host shared with other busy processes, ``OMP_WAIT_POLICY=passive`` in the
environment of the process (read by libgomp at load time, not by medseek) avoids long
stalls at OpenMP barriers; see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import numpy as np

from medseek import _volume
from medseek.volume._checks import (
    check_chunking,
    check_patchify,
    check_spacing,
    check_volume,
    check_window,
    chunk_count,
    resampled_shape,
)

__all__ = [
    "resample",
    "window",
    "blend",
    "chunk",
    "patchify",
    "resample_window_chunk",
    "resampled_shape",
    "chunk_count",
]


def resample(vol: np.ndarray, spacing, target_spacing) -> np.ndarray:
    """Trilinear resample to ``target_spacing``.

    Parameters
    ----------
    vol : np.ndarray, shape (D, H, W), int16 | uint16 | float32, C-contiguous
    spacing : sequence of 3 floats, (sz, sy, sx) mm, each finite and > 0
    target_spacing : float or sequence of 3 floats, mm, each finite and > 0

    Returns
    -------
    np.ndarray, shape ``resampled_shape(vol.shape, spacing, target_spacing)``, float32
    """
    check_volume(vol)
    s = check_spacing(spacing, "spacing")
    t = check_spacing(target_spacing, "target_spacing", allow_scalar=True)
    return _volume.resample(vol, s, t)


def window(vol: np.ndarray, center: float, width: float) -> np.ndarray:
    """Intensity window ``clip((v - (center - width / 2)) / width, 0, 1)``.

    Parameters
    ----------
    vol : np.ndarray, shape (D, H, W), int16 | uint16 | float32, C-contiguous
    center, width : float, finite; ``width > 0`` (e.g. HU 40 / 400 for soft tissue)

    Returns
    -------
    np.ndarray, shape (D, H, W), float32 in [0, 1] (evaluated in float64, rounded once)
    """
    check_volume(vol)
    c, w = check_window(center, width)
    return _volume.window(vol, c, w)


def blend(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The mean of the same volume under two windows (``PreprocessConfig.blend_window``):
    one channel that keeps the first window's contrast at half strength and adds the
    second's where the first clips (e.g. lung and emphysema beside soft tissue). Training
    blends the fused op's chunks, serving the windowed volume: the same float32 sum."""
    if first.shape != second.shape:
        raise ValueError(f"blend needs equal shapes, got {first.shape} and {second.shape}")
    return np.ascontiguousarray(0.5 * (first + second), dtype=np.float32)


def chunk(
    vol: np.ndarray, depth: int, overlap: int = 0, pad_value: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split along z into chunks of ``depth`` slices, ``depth - overlap`` apart.

    Parameters
    ----------
    vol : np.ndarray, shape (D, H, W), int16 | uint16 | float32, C-contiguous
    depth : int >= 1
    overlap : int, ``0 <= overlap < depth``
    pad_value : float, finite; fills the slices of the last chunk past ``D``

    Returns
    -------
    chunks : np.ndarray, shape (C, depth, H, W), float32, ``C = chunk_count(D, depth, overlap)``
    z_start : np.ndarray, shape (C,), int32, first slice of each chunk
    valid : np.ndarray, shape (C,), int32, real (unpadded) slices in each chunk
    """
    check_volume(vol)
    depth, overlap, pad_value = check_chunking(depth, overlap, pad_value)
    return _volume.chunk(vol, depth, overlap, pad_value)


def patchify(
    chunks: np.ndarray, z_start: np.ndarray, patch
) -> tuple[np.ndarray, np.ndarray]:
    """Cut chunks into non-overlapping ``(pz, py, px)`` patches (ViT tokens).

    Parameters
    ----------
    chunks : np.ndarray, shape (C, depth, H, W), float32, C-contiguous
    z_start : np.ndarray, shape (C,), int32, each >= 0 and a multiple of ``pz``
    patch : sequence of 3 ints (pz, py, px), dividing depth, H and W

    Returns
    -------
    tokens : np.ndarray, shape (C, N, pz*py*px), float32, ``N = (depth/pz)(H/py)(W/px)``;
        patches in z-major, then y, then x order, each flattened in (z, y, x) order
    positions : np.ndarray, shape (C, N, 3), int32, ``(z, y, x)`` patch-grid coordinates
        with ``z = z_start[c] // pz + local z`` (absolute depth, for 3D RoPE)
    """
    p = check_patchify(chunks, z_start, patch)
    return _volume.patchify(chunks, z_start, p)


def resample_window_chunk(
    vol: np.ndarray,
    spacing,
    target_spacing,
    center: float,
    width: float,
    depth: int,
    overlap: int = 0,
    pad_value: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``chunk(window(resample(vol, spacing, target_spacing), center, width), depth,
    overlap, pad_value)`` in one pass: no intermediate volume is materialised.

    Arguments and returns are those of :func:`resample`, :func:`window` and
    :func:`chunk`; ``pad_value`` is written as given (it is not windowed). The result
    equals the composition element for element.
    """
    check_volume(vol)
    s = check_spacing(spacing, "spacing")
    t = check_spacing(target_spacing, "target_spacing", allow_scalar=True)
    c, w = check_window(center, width)
    depth, overlap, pad_value = check_chunking(depth, overlap, pad_value)
    return _volume.resample_window_chunk(vol, s, t, c, w, depth, overlap, pad_value)
