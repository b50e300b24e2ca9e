"""Calibrated finding thresholds: when does the finding head *show* a finding?

The finding head (``DualEncoderConfig.finding_head``) gives every embedding a logit per
lexicon finding. An explanation must only name a finding the image really shows, so each
finding gets its own logit threshold, fitted on a validation split against each item's
findings (:func:`medseek.train.data.item_findings`: its report's and its labels'): the
lowest threshold at which the images predicted positive are right at least
``target_precision`` of the time (at least ``min_support`` of them). A finding that never gets there, or has too few positives to tell, gets
:data:`NEVER` and is not shown at all. The thresholds are a buffer of the model, so they
travel with its weights into checkpoints, releases and exports.
"""

from __future__ import annotations

import numpy as np
import torch

NEVER = 1.0e4  # a logit no finding reaches: the finding is never shown


def precision_threshold(logits: np.ndarray, positive: np.ndarray, target_precision: float,
                        min_support: int) -> tuple[float, float, float]:
    """The lowest threshold ``t`` over ``logits`` (N,) such that the items with
    ``logit > t`` number at least ``min_support`` and are ``positive`` (N,) bool at least
    ``target_precision`` of the time. Returns ``(t, precision, recall)`` there, or
    ``(NEVER, nan, 0.0)`` when no threshold qualifies."""
    order = np.argsort(-logits, kind="stable")
    hits = np.cumsum(positive[order])  # true positives among the top n, n = 1..N
    n = np.arange(1, len(order) + 1)
    precision = hits / n
    # a cut between ranks n and n+1 is only a threshold when the logits differ there
    distinct = np.r_[logits[order][:-1] > logits[order][1:], True]
    ok = (precision >= target_precision) & (n >= min_support) & distinct
    if not ok.any() or positive.sum() == 0:
        return NEVER, float("nan"), 0.0
    best = int(np.flatnonzero(ok)[-1])  # the most items kept: the lowest threshold
    t = float(logits[order][best + 1]) if best + 1 < len(order) else float(logits[order][best]) - 1.0
    return t, float(precision[best]), float(hits[best] / positive.sum())


@torch.no_grad()
def calibrate_finding_thresholds(model, val_ds, tokenizer, *, target_precision: float = 0.9,
                                 min_support: int = 5, text_cache=None, device="cpu") -> dict:
    """Fit ``model.finding_threshold`` on ``val_ds`` (module doc); returns a JSON-ready
    report ``{finding: {threshold, val_precision, val_recall, val_positives}}``."""
    from medseek.text.concepts import concept_names

    from .data import item_findings
    from .loop import embed_dataset

    if model.finding_head is None:
        raise TypeError("calibrate_finding_thresholds needs a model with a finding head")
    if not 0 < target_precision <= 1:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision!r}")
    v, _ = embed_dataset(model, val_ds, tokenizer, device, text_cache=text_cache)
    logits = model.finding_logits(torch.from_numpy(v).to(device)).float().cpu().numpy()  # (N, F)
    truth = np.stack([item_findings(r.report, r.labels) for r in val_ds.records]) > 0  # (N, F)
    report, thresholds = {}, []
    for j, name in enumerate(concept_names()):
        t, p, r = precision_threshold(logits[:, j], truth[:, j], target_precision, min_support)
        thresholds.append(t)
        report[name] = {"threshold": t, "val_precision": p, "val_recall": r,
                        "val_positives": int(truth[:, j].sum())}
    model.finding_threshold.copy_(torch.tensor(thresholds, dtype=model.finding_threshold.dtype))
    return report
