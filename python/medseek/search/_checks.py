"""Argument validation shared by the search stages (errors name the argument and value)."""

from __future__ import annotations

import math

import numpy as np

#: Allowed ``| ||v|| - 1 |`` of embeddings handed to the search stages (the index's policy).
NORM_TOL = 1e-3


def as_float_array(name: str, x: object, ndim: int) -> np.ndarray:
    """``x`` as a float ndarray of rank ``ndim`` (float32 stays float32; ints are refused)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy float array, got {type(x).__name__}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    return x


def check_unit_rows(name: str, x: np.ndarray, rows: np.ndarray | None = None) -> None:
    """Raise ``ValueError`` if a (selected) row of ``x`` is non-finite or not unit norm."""
    sub = x if rows is None else x[rows]
    if sub.size == 0:
        return
    finite = np.isfinite(sub).all(axis=-1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite.reshape(-1))[0])
        row = bad if rows is None else int(np.flatnonzero(rows)[bad])
        raise ValueError(f"{name} row {row} contains NaN or inf")
    norms = np.linalg.norm(sub.reshape(-1, sub.shape[-1]), axis=1)
    off = np.abs(norms - 1.0) > NORM_TOL
    if off.any():
        bad = int(np.flatnonzero(off)[0])
        row = bad if rows is None else int(np.flatnonzero(rows)[bad])
        raise ValueError(f"{name} must be L2-normalised: row {row} has norm {norms[bad]:.6g}")


def check_unit_interval(name: str, value: object) -> float:
    """A float in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a float in [0, 1], got {value!r}")
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return v


def check_count(name: str, value: object, minimum: int = 1) -> int:
    """An int >= ``minimum`` (bools refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_finite_float(name: str, value: object, minimum: float | None = None) -> float:
    """A finite float, optionally >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (minimum is not None and v < minimum):
        bound = "" if minimum is None else f" and >= {minimum}"
        raise ValueError(f"{name} must be finite{bound}, got {value}")
    return v
