"""Retrieval metrics over a score matrix.

Every function takes ``scores`` of shape ``(Q, N)`` (query × gallery, higher = better)
and ranks each row with the rule of :mod:`medseek.eval._ranking`: descending score,
ties by ascending gallery index, ``-inf`` items excluded (never retrieved, relevance
ignored). Per-query functions return ``(Q,)`` float64 arrays with ``NaN`` for queries
that have no relevant (non-excluded) item, so that averages and bootstrap intervals can
skip them; the ``mean_*`` / ``mrr`` / ``recall_at_k`` summaries average over the rest.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from medseek.eval._ranking import (
    as_bool_matrix,
    as_relevance,
    as_score_matrix,
    check_k,
    check_ks,
    nanmean_or_nan,
    sorted_relevance,
)

__all__ = [
    "average_precision",
    "cosine_scores",
    "crossmodal_recall",
    "hits_at_k",
    "label_overlap_relevance",
    "mean_average_precision",
    "mrr",
    "ndcg_at_k",
    "precision_at_k",
    "recall_at_k",
    "reciprocal_rank",
]


def _positives_matrix(positives: object, shape: tuple[int, int]) -> np.ndarray:
    """``positives`` as a ``(Q, N)`` float 0/1 matrix; accepts ``(Q,)`` int indices too."""
    arr = np.asarray(positives)
    if arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool:
        q, n = shape
        if arr.shape[0] != q:
            raise ValueError(f"positives must have length {q} (one index per query), got {arr.shape[0]}")
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise ValueError(f"positives indices must be in [0, {n}), got range [{arr.min()}, {arr.max()}]")
        out = np.zeros(shape, dtype=np.float64)
        out[np.arange(q), arr] = 1.0
        return out
    return (as_relevance(arr, shape, name="positives") > 0).astype(np.float64)


def _first_hit(rel_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of the first relevant item per query, and whether there is one."""
    relevant = rel_sorted > 0
    return np.argmax(relevant, axis=1), relevant.any(axis=1)


def hits_at_k(scores: np.ndarray, positives: np.ndarray, ks: Iterable[int]) -> np.ndarray:
    """Per-query hit indicator: is any positive among the top ``k``?

    Parameters
    ----------
    scores : np.ndarray, shape (Q, N), float
        Query × gallery scores, higher = better; ``-inf`` excludes an item.
    positives : np.ndarray, shape (Q, N) bool (or real >= 0, > 0 meaning positive), or (Q,) int
        The true matches; a ``(Q,)`` integer array gives the single matching gallery
        index of each query (exact-pair retrieval).
    ks : iterable of int
        Cut-offs, each in ``[1, N]``.

    Returns
    -------
    np.ndarray, shape (Q, len(ks)), float64
        1.0 / 0.0 per query and cut-off; NaN rows for queries without a positive.
    """
    scores = as_score_matrix(scores)
    ks = check_ks(ks, scores.shape[1])
    pos = _positives_matrix(positives, scores.shape)
    rel_sorted, _ = sorted_relevance(scores, pos)
    first, has = _first_hit(rel_sorted)
    hits = (first[:, None] < np.asarray(ks)[None, :]).astype(np.float64)
    hits[~has] = np.nan
    return hits


def recall_at_k(scores: np.ndarray, positives: np.ndarray, ks: Iterable[int]) -> dict[int, float]:
    """Recall@K: the fraction of queries with a positive among their top ``k``.

    This is the cross-modal retrieval convention (CLIP, ConVIRT, WristMIR): with one true
    match per query it is exactly "is the paired item in the top K". For text→image
    retrieval pass ``scores.T``. Queries without a positive are left out of the mean.

    Parameters
    ----------
    scores, positives, ks
        As for :func:`hits_at_k`.

    Returns
    -------
    dict[int, float]
        ``{k: recall}`` in the order of ``ks``; NaN when no query has a positive.
    """
    ks = list(ks)
    hits = hits_at_k(scores, positives, ks)
    return {int(k): nanmean_or_nan(hits[:, j]) for j, k in enumerate(ks)}


def cosine_scores(a_emb: np.ndarray, b_emb: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of ``a_emb`` with every row of ``b_emb``.

    Parameters
    ----------
    a_emb : np.ndarray, shape (Na, D), float
    b_emb : np.ndarray, shape (Nb, D), float
        Rows need not be normalised; all-zero rows are rejected.

    Returns
    -------
    np.ndarray, shape (Na, Nb), float64
    """
    a = _unit_rows(a_emb, "a_emb")
    b = _unit_rows(b_emb, "b_emb")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a_emb and b_emb must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    return a @ b.T


def _unit_rows(emb: np.ndarray, name: str) -> np.ndarray:
    arr = as_score_matrix(emb, name=name)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, found {arr[~np.isfinite(arr)][0]}")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has an all-zero row at index {int(np.argmin(norms[:, 0]))}")
    return arr / norms


def crossmodal_recall(a_emb: np.ndarray, b_emb: np.ndarray, ks: Iterable[int]) -> dict[str, dict[int, float]]:
    """Exact-pair Recall@K in both directions for paired embeddings.

    Row ``i`` of ``a_emb`` (e.g. an image) pairs with row ``i`` of ``b_emb`` (its
    report); every other row is a negative. Scores are cosine similarities.

    Parameters
    ----------
    a_emb, b_emb : np.ndarray, shape (N, D), float
    ks : iterable of int, each in [1, N]

    Returns
    -------
    dict
        ``{"a_to_b": {k: recall}, "b_to_a": {k: recall}}``.
    """
    a = np.asarray(a_emb)
    b = np.asarray(b_emb)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"a_emb and b_emb must be (N, D) with the same N, got {a.shape} and {b.shape}")
    sims = cosine_scores(a, b)
    ks = list(ks)
    identity = np.arange(a.shape[0])
    return {"a_to_b": recall_at_k(sims, identity, ks), "b_to_a": recall_at_k(sims.T, identity, ks)}


def precision_at_k(scores: np.ndarray, relevance: np.ndarray, k: int) -> np.ndarray:
    """Per-query precision among the top ``k``: (# relevant in top k) / k.

    Parameters
    ----------
    scores : np.ndarray, shape (Q, N), float
    relevance : np.ndarray, shape (Q, N), bool or real >= 0 (> 0 means relevant)
    k : int in [1, N]

    Returns
    -------
    np.ndarray, shape (Q,), float64
        NaN for queries with no relevant item. Excluded (``-inf``) items that fall into
        the top ``k`` (only when fewer than ``k`` remain) count as non-relevant.
    """
    scores = as_score_matrix(scores)
    k = check_k(k, scores.shape[1])
    rel = (as_relevance(relevance, scores.shape) > 0).astype(np.float64)
    rel_sorted, rel_kept = sorted_relevance(scores, rel)
    out = rel_sorted[:, :k].sum(axis=1) / k
    out[rel_kept.sum(axis=1) == 0] = np.nan
    return out


def ndcg_at_k(scores: np.ndarray, relevance: np.ndarray, k: int) -> np.ndarray:
    """Per-query normalised discounted cumulative gain at ``k``.

    ``DCG@k = sum_{r=1..k} rel_r / log2(r + 1)`` with linear gains (the relevance value
    itself) and ``r`` the 1-based rank; ``IDCG@k`` is the same sum over the query's
    relevance values sorted in descending order (excluded items left out).

    Parameters
    ----------
    scores : np.ndarray, shape (Q, N), float
    relevance : np.ndarray, shape (Q, N), float >= 0 (graded) or bool
    k : int >= 1
        A ``k`` beyond ``N`` means ``N`` (the ratio is the same, as in sklearn).

    Returns
    -------
    np.ndarray, shape (Q,), float64
        ``DCG@k / IDCG@k`` in [0, 1]; NaN for queries with no relevant item.

    Notes
    -----
    Ties are broken by gallery index (see module docstring). ``sklearn.metrics.ndcg_score``
    by default averages the gains of tied items (McSherry & Najork), and with
    ``ignore_ties=True`` orders ties by a reversed, unstable ``argsort``; so the two agree
    only when no scores tie (checked in the tests; with ties, sklearn agrees once the
    ties are broken by index beforehand). sklearn also scores a query without relevant
    items 0, where this returns NaN.
    """
    scores = as_score_matrix(scores)
    k = min(check_k(k, None), scores.shape[1])
    rel = as_relevance(relevance, scores.shape)
    rel_sorted, rel_kept = sorted_relevance(scores, rel)
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))  # (k,)
    dcg = rel_sorted[:, :k] @ discount
    ideal = -np.sort(-rel_kept, axis=1)[:, :k] @ discount
    out = np.full(scores.shape[0], np.nan)
    np.divide(dcg, ideal, out=out, where=ideal > 0)
    return out


def average_precision(scores: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """Per-query average precision over the full ranking.

    ``AP = (1/R) * sum over relevant ranks r of P@r``, with ``R`` the number of relevant
    (non-excluded) items.

    Parameters
    ----------
    scores : np.ndarray, shape (Q, N), float
    relevance : np.ndarray, shape (Q, N), bool (or real >= 0, > 0 meaning relevant)

    Returns
    -------
    np.ndarray, shape (Q,), float64
        NaN for queries with no relevant item.

    Notes
    -----
    Ties are broken by index, so tied items are ranked one after another. This differs
    from ``sklearn.metrics.average_precision_score``, which treats a run of tied scores
    as one threshold; without ties the two agree.
    """
    scores = as_score_matrix(scores)
    rel = (as_relevance(relevance, scores.shape) > 0).astype(np.float64)
    rel_sorted, _ = sorted_relevance(scores, rel)
    n_rel = rel_sorted.sum(axis=1)
    precision = np.cumsum(rel_sorted, axis=1) / np.arange(1, scores.shape[1] + 1)
    out = np.full(scores.shape[0], np.nan)
    np.divide((precision * rel_sorted).sum(axis=1), n_rel, out=out, where=n_rel > 0)
    return out


def mean_average_precision(scores: np.ndarray, relevance: np.ndarray) -> float:
    """Mean of :func:`average_precision` over queries with a relevant item (NaN if none)."""
    return nanmean_or_nan(average_precision(scores, relevance))


def reciprocal_rank(scores: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """Per-query ``1 / rank`` of the first relevant item (1-based rank).

    Returns
    -------
    np.ndarray, shape (Q,), float64
        NaN for queries with no relevant item.
    """
    scores = as_score_matrix(scores)
    rel = (as_relevance(relevance, scores.shape) > 0).astype(np.float64)
    rel_sorted, _ = sorted_relevance(scores, rel)
    first, has = _first_hit(rel_sorted)
    return np.where(has, 1.0 / (first + 1.0), np.nan)


def mrr(scores: np.ndarray, relevance: np.ndarray) -> float:
    """Mean reciprocal rank over queries with a relevant item (NaN if none)."""
    return nanmean_or_nan(reciprocal_rank(scores, relevance))


def label_overlap_relevance(
    query_labels: np.ndarray, gallery_labels: np.ndarray, mode: str = "any"
) -> np.ndarray:
    """Relevance from shared findings, the CT-CLIP volume-to-volume protocol.

    Parameters
    ----------
    query_labels : np.ndarray, shape (Q, L), bool
    gallery_labels : np.ndarray, shape (N, L), bool
        Multi-hot finding labels.
    mode : {"any", "jaccard"}
        ``"any"``: 1.0 when the two share at least one positive label, else 0.0.
        ``"jaccard"``: ``|a ∩ b| / |a ∪ b|`` (graded, for nDCG); 0.0 when both are
        all-negative. A "no finding" class that should match itself must therefore be
        one of the labels.

    Returns
    -------
    np.ndarray, shape (Q, N), float64
    """
    q = as_bool_matrix(query_labels, "query_labels")
    g = as_bool_matrix(gallery_labels, "gallery_labels")
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"query_labels and gallery_labels must have the same number of labels, got {q.shape[1]} and {g.shape[1]}"
        )
    qf = q.astype(np.float64)
    gf = g.astype(np.float64)
    shared = qf @ gf.T  # (Q, N) |a ∩ b|
    if mode == "any":
        return (shared > 0).astype(np.float64)
    if mode == "jaccard":
        union = qf.sum(axis=1)[:, None] + gf.sum(axis=1)[None, :] - shared
        out = np.zeros_like(shared)
        np.divide(shared, union, out=out, where=union > 0)
        return out
    raise ValueError(f"mode must be 'any' or 'jaccard', got {mode!r}")
