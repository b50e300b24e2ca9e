"""Pure NumPy reference of every op in :mod:`medseek.volume`, with identical signatures.

Slow and plain on purpose: tests compare the C++ engine against these, and benchmarks
import them from here. The arithmetic mirrors the C++ kernels (float64, the same
operations in the same order, one rounding to float32 at the end), so the two agree to
float32 rounding.
"""

from __future__ import annotations

import numpy as np

from medseek.volume._checks import (
    check_chunking,
    check_patchify,
    check_spacing,
    check_volume,
    check_window,
    chunk_count,
    resampled_shape,
)

__all__ = ["resample", "window", "chunk", "patchify", "resample_window_chunk"]


def _axis_map(n_in: int, spacing: float, target: float, n_out: int):
    """Per output index i: input neighbours lo, hi (int64) and weight frac (float64).

    ``x = i * (t / s)``; at or past the last voxel centre both neighbours are the last
    voxel and the weight is 0 (clamp to edge).
    """
    x = np.arange(n_out, dtype=np.float64) * (target / spacing)
    lo = np.floor(x)
    clamp = lo >= n_in - 1
    frac = np.where(clamp, 0.0, x - lo)
    lo = np.where(clamp, n_in - 1, lo.astype(np.int64))
    hi = np.where(clamp, n_in - 1, lo + 1)
    return lo, hi, frac


def _lerp(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a + w * (b - a)``, the form the C++ kernels use."""
    return a + w * (b - a)


def resample(vol: np.ndarray, spacing, target_spacing) -> np.ndarray:
    """Trilinear resample; see :func:`medseek.volume.resample`.

    vol (D, H, W) int16 | uint16 | float32 -> (D', H', W') float32. Interpolates along
    z, then x, then y, in float64.
    """
    check_volume(vol)
    s = check_spacing(spacing, "spacing")
    t = check_spacing(target_spacing, "target_spacing", allow_scalar=True)
    d_out, h_out, w_out = resampled_shape(vol.shape, s, t)
    zl, zh, zw = _axis_map(vol.shape[0], s[0], t[0], d_out)
    yl, yh, yw = _axis_map(vol.shape[1], s[1], t[1], h_out)
    xl, xh, xw = _axis_map(vol.shape[2], s[2], t[2], w_out)
    v = vol.astype(np.float64)
    v = _lerp(v[zl], v[zh], zw[:, None, None])  # (D', H, W)
    v = _lerp(v[:, :, xl], v[:, :, xh], xw)  # (D', H, W')
    v = _lerp(v[:, yl], v[:, yh], yw[:, None])  # (D', H', W')
    return v.astype(np.float32, order="C")


def window(vol: np.ndarray, center: float, width: float) -> np.ndarray:
    """``clip((v - (center - width / 2)) / width, 0, 1)`` in float64, returned as float32."""
    check_volume(vol)
    c, w = check_window(center, width)
    return np.clip((vol.astype(np.float64) - (c - w / 2)) / w, 0.0, 1.0).astype(np.float32)


def chunk(
    vol: np.ndarray, depth: int, overlap: int = 0, pad_value: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chunks ``(C, depth, H, W)`` float32, ``z_start`` and ``valid`` int32 ``(C,)``."""
    check_volume(vol)
    depth, overlap, pad_value = check_chunking(depth, overlap, pad_value)
    d, h, w = vol.shape
    n = chunk_count(d, depth, overlap)
    z_start = np.arange(n, dtype=np.int64) * (depth - overlap)
    valid = np.minimum(depth, d - z_start)
    chunks = np.full((n, depth, h, w), pad_value, dtype=np.float32)
    for c in range(n):
        chunks[c, : valid[c]] = vol[z_start[c] : z_start[c] + valid[c]]
    return chunks, z_start.astype(np.int32), valid.astype(np.int32)


def patchify(chunks: np.ndarray, z_start: np.ndarray, patch) -> tuple[np.ndarray, np.ndarray]:
    """Tokens ``(C, N, pz*py*px)`` float32 and positions ``(C, N, 3)`` int32."""
    pz, py, px = check_patchify(chunks, z_start, patch)
    n, depth, h, w = chunks.shape
    gz, gy, gx = depth // pz, h // py, w // px
    tokens = (
        chunks.reshape(n, gz, pz, gy, py, gx, px)
        .transpose(0, 1, 3, 5, 2, 4, 6)  # (C, gz, gy, gx, pz, py, px)
        .reshape(n, gz * gy * gx, pz * py * px)
    )
    grid = np.stack(np.meshgrid(np.arange(gz), np.arange(gy), np.arange(gx), indexing="ij"), -1)
    positions = np.broadcast_to(grid.reshape(1, -1, 3), (n, gz * gy * gx, 3)).copy()
    positions[:, :, 0] += (z_start.astype(np.int64) // pz)[:, None]
    return np.ascontiguousarray(tokens, dtype=np.float32), positions.astype(np.int32)


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
    overlap, pad_value)``."""
    check_volume(vol)
    check_window(center, width)
    check_chunking(depth, overlap, pad_value)
    resampled = resample(vol, spacing, target_spacing)
    return chunk(window(resampled, center, width), depth, overlap, pad_value)
