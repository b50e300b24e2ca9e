"""Retrieval-based diagnosis: label probabilities voted by the nearest retrieved cases.

WristMIR reports retrieval-based fracture diagnosis from its reranked neighbours; the vote
itself is :func:`medseek.eval.classification.knn_label_vote`, reused here for one query.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseek.eval.classification import knn_label_vote

from ._checks import as_float_array

__all__ = ["diagnose", "vote_weights"]


def diagnose(
    neighbour_scores: np.ndarray, neighbour_labels: Sequence[Sequence[str]] | np.ndarray,
    k: int, weighted: bool = False, *, label_names: Sequence[str] | None = None,
    temperature: float = 0.1,
) -> dict[str, float]:
    """Retrieval-based diagnosis: label probabilities voted by the ``k`` nearest neighbours.

    A thin adapter over :func:`medseek.eval.classification.knn_label_vote` for one query.

    Parameters
    ----------
    neighbour_scores : np.ndarray, float, shape (K,)
        Similarity of each retrieved neighbour to the query (``-inf`` excludes one).
    neighbour_labels : sequence of K label sequences, or np.ndarray, bool, shape (K, L)
        Each neighbour's finding labels (e.g. ``Hit.record.labels``), or a multi-hot
        matrix whose columns are ``label_names``.
    k : int in [1, K]
    weighted : bool
        Votes weighted by ``softmax(score / temperature)`` instead of 1/k.
    label_names : sequence of str, optional
        Labels to report (required with a matrix); default: every label seen, sorted.
    temperature : float > 0

    Returns
    -------
    dict of str to float
        Label -> probability in [0, 1] (NaN if every neighbour is excluded), in
        ``label_names`` order.
    """
    s = as_float_array("neighbour_scores", np.asarray(neighbour_scores, dtype=np.float64), 1)
    if isinstance(neighbour_labels, np.ndarray) and neighbour_labels.ndim == 2:
        if label_names is None:
            raise ValueError("label_names is required when neighbour_labels is a matrix")
        names = [str(x) for x in label_names]
        matrix = neighbour_labels
    else:
        rows = [tuple(r) for r in neighbour_labels]
        if any(isinstance(r, str) for r in neighbour_labels):
            raise TypeError("neighbour_labels must be a sequence of label sequences, not of str")
        names = sorted({x for r in rows for x in r}) if label_names is None else list(label_names)
        col = {name: j for j, name in enumerate(names)}
        matrix = np.zeros((len(rows), len(names)), dtype=bool)
        for i, r in enumerate(rows):
            for x in r:
                if x in col:
                    matrix[i, col[x]] = True
    if matrix.shape[0] != s.shape[0]:
        raise ValueError(f"neighbour_labels must have {s.shape[0]} rows (one per score), "
                         f"got {matrix.shape[0]}")
    if not names:
        return {}
    probs = knn_label_vote(s[None, :], matrix, k, weighted=weighted, temperature=temperature)[0]
    return {name: float(p) for name, p in zip(names, probs)}


def vote_weights(neighbour_scores: np.ndarray, k: int, weighted: bool = False, *,
                 temperature: float = 0.1) -> np.ndarray:
    """The weight each neighbour's vote carries in :func:`diagnose` (same arguments).

    Each neighbour is voted as a label of its own (an identity label matrix), so these are
    exactly the weights ``knn_label_vote`` applies: ``softmax(score / temperature)`` over the
    top ``k`` (``weighted``), else ``1/k``; zero outside the top ``k`` and for ``-inf``.

    Returns
    -------
    np.ndarray, float64, shape (K,)
        Sums to 1 (NaN everywhere if every neighbour is excluded).
    """
    s = as_float_array("neighbour_scores", np.asarray(neighbour_scores, dtype=np.float64), 1)
    own = np.eye(s.shape[0], dtype=bool)  # (K, K): neighbour j carries only label j
    return knn_label_vote(s[None, :], own, k, weighted=weighted, temperature=temperature)[0]
