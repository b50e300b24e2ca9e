"""Selective prediction: risk-coverage curves, AURC, and a threshold calibrated for a risk.

A classifier that may abstain answers the cases whose confidence is at least a threshold.
Lowering the threshold answers more (coverage) at the price of more errors among the
answered (risk). Cases of equal confidence are answered or refused together, so the curve
has one point per distinct confidence. A confidence of NaN or -inf (an answer the rule
could not give at all) is never answered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Calibration", "aurc", "calibrate_threshold", "risk_coverage", "selective_accuracy"]


def _checked(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct)
    if c.ndim != 1 or y.shape != c.shape:
        raise ValueError(f"confidence and correct must be 1-D of one length, got {c.shape} "
                         f"and {y.shape}")
    if y.dtype != bool:
        raise TypeError(f"correct must be bool, got {y.dtype}")
    if np.isposinf(c).any():
        raise ValueError("confidence must not be +inf")
    return np.where(np.isnan(c), -np.inf, c), y


def risk_coverage(confidence, correct) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The risk-coverage curve.

    Parameters
    ----------
    confidence : array, float, shape (n,)
    correct : array, bool, shape (n,)
        Whether the answer of each case is right (its value for an unanswerable case is
        ignored: such cases are never answered).

    Returns
    -------
    (thresholds, coverage, risk) : np.ndarray, float64, shape (p,)
        For each distinct finite confidence t, high to low: answering ``confidence >= t``
        covers ``coverage`` of the n cases with error rate ``risk`` among them.
    """
    c, y = _checked(confidence, correct)
    n = c.size
    order = np.argsort(-c, kind="stable")
    c, err = c[order], ~y[order]
    last = np.flatnonzero(np.r_[c[1:] != c[:-1], True])  # end of each tie group
    last = last[np.isfinite(c[last])]
    answered = last + 1
    risk = np.cumsum(err)[last] / answered
    return c[last], answered / max(n, 1), risk.astype(np.float64)


def aurc(confidence, correct) -> float:
    """Area under the risk-coverage curve: the mean, over the n cases in decreasing
    confidence, of the risk when answering down to that case (its tie group included).
    Unanswerable cases count as errors at full coverage (the area is over all n). Lower is
    better; NaN for no cases."""
    c, y = _checked(confidence, correct)
    n = c.size
    if n == 0:
        return math.nan
    order = np.argsort(-c, kind="stable")
    c, err = c[order], ~y[order] | ~np.isfinite(c[order])
    last = np.flatnonzero(np.r_[c[1:] != c[:-1], True])
    risk_at_group = np.cumsum(err)[last] / (last + 1)
    sizes = np.diff(np.r_[-1, last])
    return float(np.sum(risk_at_group * sizes) / n)


def selective_accuracy(confidence, correct, coverage: float) -> float:
    """Accuracy among the ``ceil(coverage * n)`` most confident cases (ties broken by
    order; unanswerable cases counted wrong). NaN for no cases."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    c, y = _checked(confidence, correct)
    if c.size == 0:
        return math.nan
    top = np.argsort(-c, kind="stable")[:math.ceil(coverage * c.size)]
    return float(np.mean(y[top] & np.isfinite(c[top])))


@dataclass(frozen=True)
class Calibration:
    """A threshold chosen on calibration cases: answering ``confidence >= threshold``
    covered ``coverage`` of them (``answered`` of ``n``) with error rate ``risk`` <=
    ``target_risk``. ``threshold`` is +inf when no threshold met the target (always
    abstain)."""

    threshold: float
    target_risk: float
    coverage: float
    risk: float
    answered: int
    n: int


def calibrate_threshold(confidence, correct, target_risk: float, min_answered: int = 1
                        ) -> Calibration:
    """The lowest threshold (largest coverage) whose risk on these cases is <= the target.

    Parameters
    ----------
    confidence, correct : as in :func:`risk_coverage` (held-out cases: the val split)
    target_risk : float in [0, 1)
    min_answered : int >= 1
        A threshold must answer at least this many cases (a risk of 0 on 2 answered cases
        is no evidence).
    """
    if not 0.0 <= target_risk < 1.0:
        raise ValueError(f"target_risk must be in [0, 1), got {target_risk}")
    if isinstance(min_answered, bool) or not isinstance(min_answered, int) or min_answered < 1:
        raise ValueError(f"min_answered must be an int >= 1, got {min_answered!r}")
    thresholds, coverage, risk = risk_coverage(confidence, correct)
    n = np.asarray(confidence).size
    answered = np.rint(coverage * n).astype(np.int64)
    ok = np.flatnonzero((risk <= target_risk + 1e-12) & (answered >= min_answered))
    if ok.size == 0:
        return Calibration(math.inf, float(target_risk), 0.0, math.nan, 0, n)
    i = int(ok[-1])  # thresholds decrease along the curve: the last one covers most
    return Calibration(float(thresholds[i]), float(target_risk), float(coverage[i]),
                       float(risk[i]), int(answered[i]), n)
