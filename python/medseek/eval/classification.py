"""Classification metrics: zero-shot prompts, AUROC/AUPRC, retrieval-based diagnosis.

AUROC and AUPRC are implemented here (NumPy only) so that the command does not need
scikit-learn; the tests check them against ``sklearn.metrics`` on tied random data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseek.eval._ranking import as_bool_matrix, as_score_matrix, check_k, nanmean_or_nan, rank_order
from medseek.eval.metrics import _unit_rows

__all__ = [
    "auprc",
    "auroc",
    "diagnosis_metrics",
    "knn_label_vote",
    "per_label_auroc_auprc",
    "zero_shot_scores",
]


def _binary_inputs(scores: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"labels must have shape {s.shape} to match scores, got {y.shape}")
    if np.isnan(s).any():
        raise ValueError(f"scores must not contain NaN, found NaN at index {int(np.argmax(np.isnan(s)))}")
    return s, as_bool_matrix(y, "labels", ndim=1)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the Mann–Whitney rank statistic.

    ``AUROC = (sum of positive ranks - P(P+1)/2) / (P * N)`` with average ranks for
    ties, so a tied positive/negative pair counts one half.

    Parameters
    ----------
    scores : np.ndarray, shape (n,), float
    labels : np.ndarray, shape (n,), bool

    Returns
    -------
    float
        NaN when ``labels`` holds only one class.
    """
    s, y = _binary_inputs(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    mean_rank = last - (counts - 1) / 2.0
    ranks = mean_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auprc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision–recall curve as average precision.

    ``AP = sum_t (R_t - R_{t-1}) * P_t`` over the distinct score thresholds ``t`` in
    descending order; a run of tied scores is a single threshold (sklearn's definition).

    Parameters
    ----------
    scores : np.ndarray, shape (n,), float
    labels : np.ndarray, shape (n,), bool

    Returns
    -------
    float
        NaN when ``labels`` holds only one class.
    """
    s, y = _binary_inputs(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order].astype(np.float64)
    # Last position of each run of equal scores: the cut points of the thresholds.
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tps = np.cumsum(y_sorted)[ends]
    precision = tps / (ends + 1.0)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _label_keys(n_labels: int, label_names: Sequence[str] | None) -> list:
    if label_names is None:
        return list(range(n_labels))
    names = [str(x) for x in label_names]
    if len(names) != n_labels:
        raise ValueError(f"label_names must have {n_labels} entries, got {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"label_names must be unique, got {names}")
    return names


def _labelled_scores(scores: object, labels: object, scores_name: str) -> tuple[np.ndarray, np.ndarray]:
    s = as_score_matrix(scores, name=scores_name)
    y = as_bool_matrix(labels, "labels")
    if y.shape != s.shape:
        raise ValueError(f"labels must have shape {s.shape} to match {scores_name}, got {y.shape}")
    return s, y


def per_label_auroc_auprc(
    scores: np.ndarray, labels: np.ndarray, label_names: Sequence[str] | None = None
) -> dict:
    """AUROC and AUPRC of each label column.

    Parameters
    ----------
    scores : np.ndarray, shape (N, L), float
        Higher = more likely positive.
    labels : np.ndarray, shape (N, L), bool
    label_names : sequence of L str, optional
        Dictionary keys; column indices when omitted.

    Returns
    -------
    dict
        ``{label: (auroc, auprc)}``; both NaN for a label whose column has one class.
    """
    s, y = _labelled_scores(scores, labels, "scores")
    keys = _label_keys(s.shape[1], label_names)
    return {key: (auroc(s[:, j], y[:, j]), auprc(s[:, j], y[:, j])) for j, key in enumerate(keys)}


def zero_shot_scores(
    image_emb: np.ndarray, prompt_emb: np.ndarray, mode: str = "difference", logit_scale: float = 100.0
) -> np.ndarray:
    """Zero-shot label scores from text-prompt embeddings (CheXzero style).

    Parameters
    ----------
    image_emb : np.ndarray, shape (N, D), float
    prompt_emb : np.ndarray, shape (L, 2, D) or (L, D), float
        Per label, ``[l, 0]`` embeds the positive prompt ("effusion") and ``[l, 1]`` the
        negative one ("no effusion"). A ``(L, D)`` array gives positive prompts only.
        Both inputs are L2-normalised here.
    mode : {"difference", "softmax"}
        With prompt pairs: ``"difference"`` scores ``cos(x, pos) - cos(x, neg)``;
        ``"softmax"`` the probability of the positive prompt in a two-way softmax of
        ``logit_scale * cos``, i.e. ``sigmoid(logit_scale * (cos_pos - cos_neg))``.
        Both rank images identically, so AUROC/AUPRC do not depend on the mode.
        With positive prompts only, the score is ``cos(x, pos)`` in either mode.
    logit_scale : float, > 0
        CLIP's (already exponentiated) logit multiplier, used by ``"softmax"``.

    Returns
    -------
    np.ndarray, shape (N, L), float64
    """
    if mode not in ("difference", "softmax"):
        raise ValueError(f"mode must be 'difference' or 'softmax', got {mode!r}")
    if not logit_scale > 0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
    x = _unit_rows(image_emb, "image_emb")
    p = np.asarray(prompt_emb, dtype=np.float64)
    if p.ndim == 2:
        pairs = False
        p = p[:, None, :]
    elif p.ndim == 3 and p.shape[1] == 2:
        pairs = True
    else:
        raise ValueError(f"prompt_emb must have shape (L, 2, D) or (L, D), got {p.shape}")
    if p.shape[2] != x.shape[1]:
        raise ValueError(f"prompt_emb dimension {p.shape[2]} does not match image_emb dimension {x.shape[1]}")
    n_labels, n_prompts, dim = p.shape
    unit = _unit_rows(p.reshape(-1, dim), "prompt_emb").reshape(n_labels, n_prompts, dim)
    cos = np.einsum("nd,lpd->nlp", x, unit)  # (N, L, P)
    if not pairs:
        return cos[:, :, 0]
    diff = cos[:, :, 0] - cos[:, :, 1]
    if mode == "difference":
        return diff
    return 1.0 / (1.0 + np.exp(-logit_scale * diff))


def knn_label_vote(
    scores: np.ndarray, gallery_labels: np.ndarray, k: int, weighted: bool = False, temperature: float = 0.1
) -> np.ndarray:
    """Retrieval-based diagnosis: label probabilities from the top-``k`` retrieved cases.

    Parameters
    ----------
    scores : np.ndarray, shape (Q, N), float
        Query × gallery similarities (ranking rule of :mod:`medseek.eval._ranking`;
        ``-inf`` excludes an item, e.g. the query itself or the same patient).
    gallery_labels : np.ndarray, shape (N, L), bool
    k : int in [1, N]
    weighted : bool
        False: each neighbour votes 1/k (the fraction of neighbours with the label).
        True: neighbour ``j`` votes ``softmax(s_j / temperature)`` over the top ``k``,
        so closer cases count more.
    temperature : float, > 0
        Softmax temperature for ``weighted``.

    Returns
    -------
    np.ndarray, shape (Q, L), float64
        Probabilities in [0, 1]. A query with fewer than ``k`` non-excluded items votes
        over those it has; one with none gets a NaN row.
    """
    s = as_score_matrix(scores)
    g = as_bool_matrix(gallery_labels, "gallery_labels")
    if g.shape[0] != s.shape[1]:
        raise ValueError(f"gallery_labels must have {s.shape[1]} rows (one per gallery item), got {g.shape[0]}")
    k = check_k(k, s.shape[1])
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    top = rank_order(s)[:, :k]  # (Q, k)
    top_scores = np.take_along_axis(s, top, axis=1)
    valid = top_scores > -np.inf
    if weighted:
        if np.isposinf(top_scores).any():
            raise ValueError("scores must be finite among the top k when weighted=True, found +inf")
        best = np.where(valid, top_scores, -np.inf).max(axis=1, keepdims=True)
        best = np.where(np.isfinite(best), best, 0.0)
        logits = np.where(valid, (top_scores - best) / temperature, -np.inf)
        weights = np.exp(logits)  # exp(-inf) = 0 for excluded slots
    else:
        weights = valid.astype(np.float64)
    votes = np.einsum("qk,qkl->ql", weights, g[top].astype(np.float64))  # (Q, L)
    total = weights.sum(axis=1, keepdims=True)
    out = np.full(votes.shape, np.nan)
    np.divide(votes, total, out=out, where=total > 0)
    return out


def diagnosis_metrics(
    probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5, label_names: Sequence[str] | None = None
) -> dict:
    """Per-label and macro F1, AUROC and AUPRC of predicted label probabilities.

    Parameters
    ----------
    probs : np.ndarray, shape (Q, L), float
        E.g. from :func:`knn_label_vote`; NaN is rejected.
    labels : np.ndarray, shape (Q, L), bool
        Ground truth of the queries.
    threshold : float
        A label is predicted when ``probs >= threshold``.
    label_names : sequence of L str, optional

    Returns
    -------
    dict
        ``{"per_label": {label: {"f1", "precision", "recall", "auroc", "auprc",
        "support"}}, "macro": {"f1", "auroc", "auprc"}, "threshold": threshold}``.
        ``F1 = 2TP / (2TP + FP + FN)``; precision, recall and F1 are NaN where their
        denominator is 0, AUROC/AUPRC NaN for one-class labels. Macro values average the
        labels where the value is defined.
    """
    p, y = _labelled_scores(probs, labels, "probs")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    keys = _label_keys(p.shape[1], label_names)
    pred = p >= threshold
    tp = (pred & y).sum(axis=0).astype(np.float64)
    fp = (pred & ~y).sum(axis=0).astype(np.float64)
    fn = (~pred & y).sum(axis=0).astype(np.float64)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        out = np.full(num.shape, np.nan)
        np.divide(num, den, out=out, where=den > 0)
        return out

    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    precision = ratio(tp, tp + fp)
    recall = ratio(tp, tp + fn)
    curves = per_label_auroc_auprc(p, y)
    per_label = {}
    for j, key in enumerate(keys):
        per_label[key] = {
            "f1": float(f1[j]),
            "precision": float(precision[j]),
            "recall": float(recall[j]),
            "auroc": curves[j][0],
            "auprc": curves[j][1],
            "support": int(y[:, j].sum()),
        }
    macro = {
        "f1": nanmean_or_nan(f1),
        "auroc": nanmean_or_nan(np.array([curves[j][0] for j in range(len(keys))])),
        "auprc": nanmean_or_nan(np.array([curves[j][1] for j in range(len(keys))])),
    }
    return {"per_label": per_label, "macro": macro, "threshold": float(threshold)}
