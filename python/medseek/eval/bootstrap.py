"""Percentile bootstrap confidence intervals over queries."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["bootstrap_ci"]

# Resampled index rows are drawn in blocks of at most this many entries, so that the
# memory stays bounded for large query sets (n_boot × Q int64 would be 32 MB at 4k × 1k).
_BLOCK_ENTRIES = 1 << 21


def bootstrap_ci(
    values: np.ndarray | Callable[[np.ndarray], float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    *,
    n: int | None = None,
) -> tuple[float, float, float]:
    """Point estimate and percentile bootstrap interval of a mean (or any statistic).

    Parameters
    ----------
    values : np.ndarray, shape (Q,), float, or callable
        Per-query values (NaN entries, e.g. queries with no relevant item, are dropped
        before resampling); the statistic is their mean. Or a callable
        ``statistic(indices: np.ndarray (m,) int64) -> float`` evaluated on resampled
        unit indices in ``[0, n)`` (for statistics that are not a mean, such as AUROC);
        resamples where it returns NaN are dropped.
    n_boot : int, >= 1
        Number of bootstrap resamples.
    alpha : float in (0, 1)
        The interval covers ``1 - alpha``: the ``alpha/2`` and ``1 - alpha/2`` quantiles
        of the resampled statistic (linear interpolation).
    seed : int
        Seeds :func:`numpy.random.default_rng`; same inputs and seed, same result.
    n : int, optional
        Number of units to resample; required with a callable, forbidden otherwise.

    Returns
    -------
    (estimate, lo, hi) : tuple of float
        ``estimate`` is the statistic on the original data (the mean of the non-NaN
        values, or ``statistic(arange(n))``). All three are NaN when there is nothing
        to resample.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    nan3 = (float("nan"),) * 3

    if callable(values):
        if n is None or isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int when values is a callable, got {n!r}")
        if n == 0:
            return nan3
        estimate = float(values(np.arange(n)))
        stats = np.array([float(values(rng.integers(0, n, size=n))) for _ in range(n_boot)])
    else:
        if n is not None:
            raise ValueError(f"n is only used with a callable statistic, got n={n!r}")
        v = np.asarray(values, dtype=np.float64)
        if v.ndim != 1:
            raise ValueError(f"values must be 1-D (Q,), got shape {v.shape}")
        if np.isinf(v).any():
            raise ValueError(f"values must not contain inf, found {v[np.isinf(v)][0]}")
        v = v[~np.isnan(v)]
        m = v.size
        if m == 0:
            return nan3
        estimate = float(v.mean())
        stats = np.empty(n_boot)
        block = max(1, _BLOCK_ENTRIES // m)
        for start in range(0, n_boot, block):
            rows = min(block, n_boot - start)
            stats[start : start + rows] = v[rng.integers(0, m, size=(rows, m))].mean(axis=1)

    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return (estimate, float("nan"), float("nan"))
    lo, hi = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (estimate, float(lo), float(hi))
