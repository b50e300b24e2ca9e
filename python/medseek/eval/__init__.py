"""Evaluation of retrieval and classification: metrics, modality gap, bootstrap, plots.

The metrics take a ``(Q, N)`` score matrix (higher = better) and share one ranking
rule: descending score, ties broken by ascending gallery index, ``-inf`` items excluded
(see :mod:`medseek.eval._ranking`).

Names are loaded lazily (PEP 562), so importing ``medseek.eval.commands`` for
``medseek --help`` does not import NumPy; scikit-learn (the modality-gap classifier)
and matplotlib (plots) load only when those functions run.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "bootstrap_ci": "medseek.eval.bootstrap",
    "auprc": "medseek.eval.classification",
    "auroc": "medseek.eval.classification",
    "diagnosis_metrics": "medseek.eval.classification",
    "knn_label_vote": "medseek.eval.classification",
    "per_label_auroc_auprc": "medseek.eval.classification",
    "zero_shot_scores": "medseek.eval.classification",
    "ModalityGap": "medseek.eval.gap",
    "modality_gap": "medseek.eval.gap",
    "average_precision": "medseek.eval.metrics",
    "cosine_scores": "medseek.eval.metrics",
    "crossmodal_recall": "medseek.eval.metrics",
    "hits_at_k": "medseek.eval.metrics",
    "label_overlap_relevance": "medseek.eval.metrics",
    "mean_average_precision": "medseek.eval.metrics",
    "mrr": "medseek.eval.metrics",
    "ndcg_at_k": "medseek.eval.metrics",
    "precision_at_k": "medseek.eval.metrics",
    "recall_at_k": "medseek.eval.metrics",
    "reciprocal_rank": "medseek.eval.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medseek.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
