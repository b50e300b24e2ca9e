"""Vectorised drawing primitives on normalised grids, each returning a soft mask in [0, 1].

Edges are linear ramps ``edge`` wide (in normalised units), so shapes are
anti-aliased and a size change of a fraction of a pixel still changes the pixels.
"""

from __future__ import annotations

import numpy as np


def _ramp(signed: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (signed < 0), 0 outside, linear across ``edge``."""
    return np.clip(0.5 - signed / edge, 0.0, 1.0)


def ellipse(X, Y, cx, cy, rx, ry, angle=0.0, edge=0.006):
    """Filled ellipse centred ``(cx, cy)`` with radii ``(rx, ry)``, rotated by ``angle`` rad."""
    dx, dy = X - cx, Y - cy
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    r = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
    return _ramp((r - 1.0) * min(rx, ry), edge)


def gaussian(X, Y, cx, cy, sx, sy):
    """Unnormalised 2D Gaussian bump, peak 1."""
    return np.exp(-0.5 * (((X - cx) / sx) ** 2 + ((Y - cy) / sy) ** 2))


def segment(X, Y, p0, p1, width, edge=0.004):
    """Thick line segment from ``p0`` to ``p1`` (``width`` = full thickness)."""
    (x0, y0), (x1, y1) = p0, p1
    vx, vy = x1 - x0, y1 - y0
    length2 = vx * vx + vy * vy + 1e-12
    t = np.clip(((X - x0) * vx + (Y - y0) * vy) / length2, 0.0, 1.0)
    d = np.hypot(X - (x0 + t * vx), Y - (y0 + t * vy))
    return _ramp(d - width / 2, edge)


def polyline(X, Y, points, width, edge=0.004):
    """Union (max) of thick segments through ``points``."""
    out = np.zeros_like(X)
    for p0, p1 in zip(points[:-1], points[1:]):
        np.maximum(out, segment(X, Y, p0, p1, width, edge), out=out)
    return out


def curve_band(X, Y, fn, x0, x1, width, edge=0.004):
    """Band of full thickness ``width`` around ``y = fn(x)`` for ``x0 <= x <= x1``."""
    lo, hi = min(x0, x1), max(x0, x1)
    inside_x = _ramp(np.maximum(lo - X, X - hi), edge)
    return _ramp(np.abs(Y - fn(X)) - width / 2, edge) * inside_x


def smooth_noise(rng, shape, sigma):
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return field / (field.std() + 1e-6)
