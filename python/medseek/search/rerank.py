"""Second stage of retrieval: rerank the global top-K' by one anatomical region (WristMIR).

WristMIR retrieves in two stages: (1) coarse matching of whole-exam embeddings gives K'
candidates, (2) the candidates are reranked by the similarity of the embedding of a named
bone region (distal radius, distal ulna, ulnar styloid) of the query and of each
candidate. Here the two signals are mixed linearly::

    score_i = alpha * cos(q_region, c_region_i) + (1 - alpha) * global_i

so ``alpha = 1`` ranks by the region alone and ``alpha = 0`` keeps the global order. Both
terms are cosines of unit vectors, hence on the same scale.

A candidate that lacks the region (no crop stored, the bone not visible, a volume whose
chunks do not reach the organ) has no region cosine. It is given an imputed one: the mean
region cosine of the candidates that do have the region, less ``missing_penalty``::

    score_i = alpha * (mean_{j present} cos_j - missing_penalty) + (1 - alpha) * global_i

So it keeps its global term, and on the region term it counts as a typical candidate of
this query, penalised for the missing evidence. (Imputing from the candidate pool keeps
the fallback on the scale of the region cosines, which is often not that of the global
ones; taking the candidate's own global cosine instead let region-less candidates crowd
out every candidate whose region merely looked unrelated.) ``alpha = 0`` still reproduces
the global order exactly; when no candidate has the region the imputed cosine is
``-missing_penalty`` for all, which keeps the global order too; and with ``alpha = 1``,
``missing_penalty >= 2`` puts every candidate without the region last (cosines span
[-1, 1]). The imputed value depends on the candidate pool, so a reranked score compares
only candidates of the same query.

For volumes the organ embedding is built from the chunk embeddings of the volume: the
mean of the chunks overlapping the organ's z-range, weighted by the number of overlapping
slices, re-normalised (:func:`organ_embedding`).
"""

from __future__ import annotations

import numpy as np

from ._checks import as_float_array, check_finite_float, check_unit_interval, check_unit_rows

__all__ = ["mix_region_scores", "organ_embedding", "region_rerank", "region_similarity"]

#: Default ``missing_penalty``: a tenth of a cosine below the pool's mean region cosine.
MISSING_PENALTY = 0.1


def region_similarity(
    query_region_emb: np.ndarray, candidate_region_embs: np.ndarray,
    present: np.ndarray | None = None,
) -> np.ndarray:
    """Cosine of the query's region embedding with each candidate's; NaN where missing.

    Parameters
    ----------
    query_region_emb : np.ndarray, float32 or float64, shape (d,)
        L2-normalised.
    candidate_region_embs : np.ndarray, float32 or float64, shape (K', d)
        L2-normalised rows; a row of NaN marks a candidate without the region.
    present : np.ndarray, bool, shape (K',), optional
        Explicit mask of candidates that have the region (their rows must be finite); the
        other rows are ignored whatever they hold. Default: rows without NaN.

    Returns
    -------
    np.ndarray, float64, shape (K',)
        ``cos`` for present candidates, NaN for the others.
    """
    q = as_float_array("query_region_emb", query_region_emb, 1)
    c = as_float_array("candidate_region_embs", candidate_region_embs, 2)
    if c.shape[1] != q.shape[0]:
        raise ValueError(f"candidate_region_embs must have {q.shape[0]} columns (the query's "
                         f"dim), got shape {c.shape}")
    check_unit_rows("query_region_emb", q[None, :])
    if present is None:
        present = ~np.isnan(c).any(axis=1)
    else:
        if not isinstance(present, np.ndarray) or present.dtype != np.bool_:
            got = getattr(present, "dtype", type(present).__name__)
            raise TypeError(f"present must be a bool ndarray, got {got}")
        if present.shape != (c.shape[0],):
            raise ValueError(f"present must have shape ({c.shape[0]},), got {present.shape}")
    check_unit_rows("candidate_region_embs", c, present)
    out = np.full(c.shape[0], np.nan)
    # (K'_present, d) @ (d,) -> (K'_present,), accumulated in float64
    out[present] = c[present].astype(np.float64) @ q.astype(np.float64)
    return out


def mix_region_scores(
    region_sims: np.ndarray, global_scores: np.ndarray, alpha: float,
    missing_penalty: float = MISSING_PENALTY,
) -> np.ndarray:
    """Mix region cosines (NaN = missing) with global scores (see the module docstring).

    Parameters
    ----------
    region_sims : np.ndarray, float, shape (K',)
        From :func:`region_similarity`; NaN where a candidate lacks the region.
    global_scores : np.ndarray, float, shape (K',)
        First-stage cosines, finite.
    alpha : float in [0, 1]
        Weight of the region cosine.
    missing_penalty : float >= 0
        Taken off the imputed region cosine (the mean over candidates with the region) of
        a candidate without it.

    Returns
    -------
    np.ndarray, float64, shape (K',)
    """
    r = as_float_array("region_sims", region_sims, 1)
    g = as_float_array("global_scores", global_scores, 1)
    if g.shape != r.shape:
        raise ValueError(f"global_scores must have shape {r.shape} to match the candidates, "
                         f"got {g.shape}")
    if not np.isfinite(g).all():
        raise ValueError(f"global_scores must be finite, found {g[~np.isfinite(g)][0]} "
                         f"at index {int(np.flatnonzero(~np.isfinite(g))[0])}")
    a = check_unit_interval("alpha", alpha)
    penalty = check_finite_float("missing_penalty", missing_penalty, minimum=0.0)
    g = g.astype(np.float64)
    missing = np.isnan(r)
    imputed = (r[~missing].mean() if (~missing).any() else 0.0) - penalty
    return a * np.where(missing, imputed, r) + (1.0 - a) * g


def region_rerank(
    query_region_emb: np.ndarray, candidate_region_embs: np.ndarray, global_scores: np.ndarray,
    alpha: float, *, present: np.ndarray | None = None,
    missing_penalty: float = MISSING_PENALTY,
) -> np.ndarray:
    """New scores of the global top-K' after region-conditioned reranking.

    ``alpha * cos(query_region, candidate_region) + (1 - alpha) * global``; a candidate
    without the region gets the mean cosine of those with it, less ``missing_penalty``
    (module docstring). Sort by the result (descending, stable) for the new order.

    Parameters
    ----------
    query_region_emb : np.ndarray, float32 or float64, shape (d,)
    candidate_region_embs : np.ndarray, float32 or float64, shape (K', d)
        NaN rows (or ``present`` False) for candidates without the region.
    global_scores : np.ndarray, float, shape (K',)
    alpha : float in [0, 1]
    present : np.ndarray, bool, shape (K',), optional
    missing_penalty : float >= 0

    Returns
    -------
    np.ndarray, float64, shape (K',)
    """
    sims = region_similarity(query_region_emb, candidate_region_embs, present)
    return mix_region_scores(sims, global_scores, alpha, missing_penalty)


def organ_embedding(
    chunk_embs: np.ndarray, chunk_z: np.ndarray, organ_z: tuple[int, int]
) -> np.ndarray | None:
    """A volume's organ embedding from its chunk embeddings, weighted by z-overlap.

    ``e = normalise(sum_c w_c * chunk_c)`` with ``w_c`` the number of slices chunk ``c``
    shares with the organ's z-range. Ranges are half-open, ``[z0, z1)`` (``z1``
    exclusive, as in training: ``medseek.models.vit3d``), so ``w_c = max(0,
    min(z1_c, z1) - max(z0_c, z0))``.

    Parameters
    ----------
    chunk_embs : np.ndarray, float32 or float64, shape (C, d)
        L2-normalised chunk embeddings of one volume.
    chunk_z : np.ndarray, int, shape (C, 2)
        Slices ``[z0, z1)`` of each chunk, ``z0 < z1``.
    organ_z : (int, int)
        Slices ``[z0, z1)`` of the organ, ``z0 < z1``.

    Returns
    -------
    np.ndarray, float32, shape (d,), or None
        None when no chunk overlaps the organ, or the weighted sum vanishes.
    """
    e = as_float_array("chunk_embs", chunk_embs, 2)
    z = np.asarray(chunk_z)
    if z.dtype.kind not in "iu" or z.shape != (e.shape[0], 2):
        raise ValueError(f"chunk_z must be an int array of shape ({e.shape[0]}, 2), "
                         f"got {z.dtype} {z.shape}")
    if (z[:, 0] >= z[:, 1]).any():
        raise ValueError(f"chunk_z rows must be half-open with z0 < z1, got "
                         f"{z[z[:, 0] >= z[:, 1]][0].tolist()}")
    o = tuple(organ_z)
    if len(o) != 2 or not all(isinstance(v, (int, np.integer)) for v in o) or o[0] >= o[1]:
        raise ValueError(f"organ_z must be half-open (z0, z1) ints with z0 < z1, got {organ_z!r}")
    check_unit_rows("chunk_embs", e)
    overlap = np.minimum(z[:, 1], o[1]) - np.maximum(z[:, 0], o[0])  # slices shared
    w = np.clip(overlap, 0, None).astype(np.float64)
    if not w.any():
        return None
    v = w @ e.astype(np.float64)  # (d,)
    norm = np.linalg.norm(v)
    if norm < 1e-12:
        return None
    return (v / norm).astype(np.float32)
