"""Input validation and the one ranking rule that every retrieval metric shares.

Ranking rule
------------
Each query's gallery is ordered by **descending score, ties broken by ascending gallery
index** (a stable sort of ``-scores``). The order is therefore a deterministic total
order: the same scores always give the same list, whatever the platform.

Gallery items whose score is ``-inf`` are *excluded* from that query: they are never
retrieved, and their relevance is ignored (not counted among the query's relevant
items, nor in the ideal DCG). This is how callers drop self-matches or same-patient
items without reshaping the score matrix. ``NaN`` scores are rejected.
"""

from __future__ import annotations

import numbers

import numpy as np


def as_score_matrix(scores: object, name: str = "scores") -> np.ndarray:
    """Validate a ``(Q, N)`` real score matrix and return it as float64.

    Raises
    ------
    TypeError
        When ``scores`` is not a real numeric array.
    ValueError
        When it is not 2-D, is empty, or holds NaN.
    """
    arr = np.asarray(scores)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (Q, N), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if np.isnan(arr).any():
        bad = tuple(int(i) for i in np.argwhere(np.isnan(arr))[0])
        raise ValueError(f"{name} must not contain NaN, found NaN at index {bad}")
    return arr


def as_relevance(relevance: object, shape: tuple[int, ...], name: str = "relevance") -> np.ndarray:
    """Validate a relevance matrix of ``shape`` (bool, or real >= 0) and return float64."""
    arr = np.asarray(relevance)
    if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name} must be a bool or real array, got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} to match scores, got {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, found {arr[~np.isfinite(arr)][0]}")
    if (arr < 0).any():
        raise ValueError(f"{name} must be >= 0, found {arr.min()}")
    return arr


def as_bool_matrix(labels: object, name: str, ndim: int = 2) -> np.ndarray:
    """Validate a bool (or 0/1 integer) array of rank ``ndim`` and return it as bool."""
    arr = np.asarray(labels)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating):
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0/1 (or bool), found {arr[~np.isin(arr, (0, 1))].flat[0]}")
        return arr.astype(bool)
    raise TypeError(f"{name} must be a bool array, got dtype {arr.dtype}")


def check_k(k: object, n: int | None, name: str = "k") -> int:
    """Validate a cut-off ``1 <= k <= n`` (no upper bound when ``n`` is None), as ``int``."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {k!r}")
    if n is None:
        if int(k) < 1:
            raise ValueError(f"{name} must be >= 1, got {k}")
        return int(k)
    if not 1 <= int(k) <= n:
        raise ValueError(f"{name} must be in [1, {n}] (the gallery size), got {k}")
    return int(k)


def check_ks(ks: object, n: int) -> list[int]:
    """Validate a non-empty sequence of cut-offs and return them as a list of ints."""
    if isinstance(ks, numbers.Integral):
        ks = [ks]
    ks = list(ks)  # type: ignore[arg-type]
    if not ks:
        raise ValueError("ks must hold at least one cut-off, got []")
    return [check_k(k, n, name="ks") for k in ks]


def rank_order(scores: np.ndarray) -> np.ndarray:
    """Gallery indices of each query in retrieval order.

    Parameters
    ----------
    scores : np.ndarray, shape (Q, N), float64
        Validated scores (see :func:`as_score_matrix`).

    Returns
    -------
    np.ndarray, shape (Q, N), int64
        ``order[q, r]`` is the gallery index at rank ``r`` (0-based) for query ``q``:
        descending score, ties by ascending index, ``-inf`` items last.
    """
    # A stable ascending sort of -scores is a descending sort that keeps tied items in
    # index order; -(-inf) = +inf puts excluded items at the end.
    return np.argsort(-scores, axis=1, kind="stable")


def sorted_relevance(scores: np.ndarray, relevance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relevance in retrieval order, with excluded (``-inf``) items zeroed.

    Returns
    -------
    rel_sorted : np.ndarray, shape (Q, N), float64
        ``rel_sorted[q, r]`` is the relevance of the item at rank ``r``.
    rel_kept : np.ndarray, shape (Q, N), float64
        ``relevance`` with excluded items set to 0 (in gallery order).
    """
    kept = np.isfinite(scores) | (scores > 0)  # +inf is a legitimate "always first"
    rel_kept = np.where(kept, relevance, 0.0)
    order = rank_order(scores)
    return np.take_along_axis(rel_kept, order, axis=1), rel_kept


def nanmean_or_nan(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (without a warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    finite = ~np.isnan(values)
    if not finite.any():
        return float("nan")
    return float(values[finite].mean())
