"""Retrieval-based diagnosis with and without WristMIR's region rerank, in process.

The service answers a diagnostic question by a vote of the top-``k`` hits
(:func:`medseek.search.diagnose.diagnose`); WristMIR's second stage first reranks the
global top-``k_prime`` by one named bone region (:func:`medseek.search.rerank.region_rerank`,
the service's formula with its default ``alpha``). This module scores both on a held-out
split against an archive, the way ``benchmarks/retrieval_seeds.py`` does through a real
store, but on embedding matrices, so a training run can report it cheaply:

* label ``j`` belongs to region ``j`` (``distal radius fracture`` ↔ ``distal radius``);
  the global vote predicts every label from the same top-``k``; the region vote predicts
  label ``j`` from the top-``k`` after reranking by region ``j``;
* a label is predicted when its vote is at least a threshold: 0.5 (the majority), or a
  per-label threshold fitted on the validation split (:func:`fit_vote_thresholds`: a rare
  label rarely fills half of the top ``k`` even for a true case);
* macro F1 is the mean of the per-label F1s, micro F1 pools the counts;
* confidence intervals resample patients (clusters) of the queries, 95 % percentile
  bootstrap, and the region − global difference is paired (same resampled queries).
"""

from __future__ import annotations

import numpy as np

__all__ = ["f1_scores", "fit_vote_thresholds", "knn_region_diagnosis", "knn_votes", "summarise_votes"]


def f1_scores(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """``(macro, micro)`` F1 of bool ``(N, L)`` predictions. Macro averages the labels
    that have a positive case or a prediction (F1 is undefined for the others)."""
    tp = (pred & truth).sum(0).astype(float)
    den = tp * 2 + (pred & ~truth).sum(0) + (~pred & truth).sum(0)
    macro = float(np.mean(2 * tp[den > 0] / den[den > 0])) if (den > 0).any() else float("nan")
    micro = float(2 * tp.sum() / den.sum()) if den.sum() > 0 else float("nan")
    return macro, micro


def _votes(order: np.ndarray, y_archive: np.ndarray, k: int) -> np.ndarray:
    """Fraction of the first ``k`` of each row of ``order`` (archive indices) that carry
    each label: ``(Q, L)``."""
    return y_archive[order[:, :k]].mean(axis=1)


def knn_votes(query: np.ndarray, query_regions: np.ndarray, archive: np.ndarray,
              archive_regions: np.ndarray, y_archive: np.ndarray, *, k: int = 10,
              k_prime: int = 50, alpha: float | None = None) -> dict[str, np.ndarray]:
    """Vote fractions ``(Q, L)`` of the top-``k`` hits: ``"global"`` from the global
    ranking, ``"region"`` (label ``j``) after reranking the global top-``k_prime`` by
    region ``j`` (service formula; ``alpha`` default: ``SearchConfig.rerank_alpha``).

    Shapes: ``query`` (Q, D), ``query_regions`` (Q, L, D), ``archive`` (A, D),
    ``archive_regions`` (A, L, D), unit rows; ``y_archive`` (A, L) bool."""
    from medseek.search.query import SearchConfig
    from medseek.search.rerank import region_rerank

    alpha = SearchConfig().rerank_alpha if alpha is None else alpha
    y_archive = np.asarray(y_archive, bool)
    n_q, n_l = len(query), y_archive.shape[1]
    if query_regions.shape[:2] != (n_q, n_l) or archive_regions.shape[:2] != (len(archive), n_l):
        raise ValueError(f"region embeddings must be (Q, L, D) and (A, L, D) with L = {n_l} labels, "
                         f"got {query_regions.shape} and {archive_regions.shape}")
    k_prime = min(max(k_prime, k), len(archive))
    scores = query @ archive.T  # (Q, A)
    order = np.argsort(-scores, axis=1, kind="stable")
    votes = {"global": _votes(order, y_archive, k), "region": np.zeros((n_q, n_l))}
    cand = order[:, :k_prime]
    for q in range(n_q):
        for j in range(n_l):
            mixed = region_rerank(query_regions[q, j], archive_regions[cand[q], j],
                                  scores[q, cand[q]], alpha)
            top = cand[q][np.argsort(-mixed, kind="stable")[:k]]
            votes["region"][q, j] = y_archive[top, j].mean()
    return votes


def fit_vote_thresholds(votes: np.ndarray, truth: np.ndarray, k: int = 10) -> np.ndarray:
    """Per label, the vote threshold (a multiple of ``1/k``) with the best F1 on a
    validation split; ties go to the higher threshold. ``(L,)``."""
    grid = np.arange(1, k + 1) / k
    best = np.full(truth.shape[1], 0.5)
    for j in range(truth.shape[1]):
        f1 = [f1_scores(votes[:, [j]] >= t - 1e-9, truth[:, [j]])[0] for t in grid]
        f1 = np.nan_to_num(np.asarray(f1), nan=-1.0)
        best[j] = grid[len(grid) - 1 - int(np.argmax(f1[::-1]))]
    return best


def knn_region_diagnosis(query: np.ndarray, query_regions: np.ndarray, archive: np.ndarray,
                         archive_regions: np.ndarray, y_archive: np.ndarray, y_query: np.ndarray,
                         query_patients: np.ndarray, labels: list[str], *, k: int = 10,
                         k_prime: int = 50, alpha: float | None = None,
                         thresholds: dict[str, np.ndarray] | float = 0.5,
                         n_boot: int = 1000, seed: int = 0) -> dict:
    """kNN diagnosis F1, global vs region-reranked (module docstring).

    Parameters
    ----------
    query, archive : (Q, D), (A, D) unit global embeddings
    query_regions, archive_regions : (Q, L, D), (A, L, D) unit region embeddings, region
        ``j`` for label ``j``
    y_archive, y_query : (A, L), (Q, L) bool labels
    query_patients : (Q,) cluster ids for the bootstrap
    labels : the L label names, for the report
    alpha : region weight (default: the service's ``SearchConfig.rerank_alpha``)
    thresholds : a vote threshold for every label, or per mode (``"global"``,
        ``"region"``) an ``(L,)`` array, e.g. from :func:`fit_vote_thresholds` on val
    """
    from medseek.search.query import SearchConfig

    alpha = SearchConfig().rerank_alpha if alpha is None else alpha
    if len(query) != len(y_query):
        raise ValueError(f"query has {len(query)} rows but y_query {len(y_query)}")
    probs = knn_votes(query, query_regions, archive, archive_regions, y_archive, k=k,
                      k_prime=k_prime, alpha=alpha)
    out = summarise_votes(probs, y_query, query_patients, labels, thresholds, n_boot, seed)
    out.update(k=k, k_prime=min(max(k_prime, k), len(archive)), alpha=alpha)
    return out


def summarise_votes(probs: dict[str, np.ndarray], y_query: np.ndarray, query_patients: np.ndarray,
                    labels: list[str], thresholds: dict[str, np.ndarray] | float = 0.5,
                    n_boot: int = 1000, seed: int = 0) -> dict:
    """F1 of thresholded votes (``{"global": (Q, L), "region": (Q, L)}``, e.g. from
    :func:`knn_votes` or from the service's hits) with patient-bootstrap CIs and the
    paired region − global difference."""
    from medseek.eval.bootstrap import bootstrap_ci

    y_query = np.asarray(y_query, bool)
    n_q, n_l = y_query.shape
    if not isinstance(thresholds, dict):
        thresholds = {key: np.full(n_l, float(thresholds)) for key in probs}
    pred = {key: p >= np.asarray(thresholds[key]) - 1e-9 for key, p in probs.items()}

    uniq = np.unique(query_patients)
    rows = [np.flatnonzero(query_patients == c) for c in uniq]

    def ci(stat) -> dict:
        est, lo, hi = bootstrap_ci(lambda idx: stat(np.concatenate([rows[i] for i in idx])),
                                   n=len(uniq), n_boot=n_boot, seed=seed)
        return {"value": est, "lo": lo, "hi": hi, "n": len(uniq)}

    out: dict = {"queries": n_q, "patients": len(uniq), "labels": list(labels),
                 "thresholds": {key: np.asarray(t).tolist() for key, t in thresholds.items()},
                 "support": y_query.sum(0).astype(int).tolist()}
    for m, name in enumerate(("macro_f1", "micro_f1")):
        for key in ("global", "region"):
            out[f"{name}_{key}"] = ci(lambda r, key=key, m=m: f1_scores(pred[key][r], y_query[r])[m])
        out[f"{name}_delta"] = ci(lambda r, m=m: f1_scores(pred["region"][r], y_query[r])[m]
                                  - f1_scores(pred["global"][r], y_query[r])[m])
    out["per_label_f1"] = {key: {lab: f1_scores(pred[key][:, [j]], y_query[:, [j]])[0]
                                 for j, lab in enumerate(labels)} for key in pred}
    return out
