"""Metrics of generated reports against reference reports: BLEU-4, ROUGE-L, clinical F1.

Written here so that a paired patient bootstrap can resample them: each metric is first
reduced to per-report statistics (:func:`bleu_stats`, :func:`rouge_l`,
:func:`finding_counts`), and the corpus value is a function of the sum (BLEU, micro F1) or
the mean (ROUGE-L) of the resampled rows.

Tokens are the lower-cased runs of letters and digits (punctuation is not a token).

- BLEU-4 (Papineni et al. 2002), corpus level: clipped n-gram matches and candidate n-gram
  counts summed over reports for n = 1..4, geometric mean of the four precisions (0 when
  any is 0, no smoothing), times the brevity penalty ``exp(1 - r/c)`` when ``c <= r``
  (``c``, ``r``: total candidate and reference lengths).
- ROUGE-L (Lin 2004), per report: longest common subsequence ``L`` of the token lists,
  ``P = L/|cand|``, ``R = L/|ref|``, ``F = (1 + b²) P R / (R + b² P)`` with ``b = 1.2`` (the
  coco-caption convention); the corpus value is the mean over reports.
- Clinical-efficacy F1: the findings a text asserts (:func:`medseek.text.extract_evidence`,
  mentions neither negated nor hedged) are compared per report; a denied or hedged finding
  counts as not asserted, the same as one not mentioned (so "no effusion" in both texts
  earns nothing and costs nothing). Micro F1 pools tp/fp/fn over findings and reports;
  macro F1 averages the per-finding F1 over the findings scored.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from medseek.text.evidence import extract_evidence

__all__ = ["BLEU_N", "bleu_from_stats", "bleu_stats", "ce_f1", "finding_counts", "rouge_l",
           "tokens"]

BLEU_N = 4
_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    """Lower-cased runs of letters and digits."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    return _TOKEN.findall(text.lower())


def _ngrams(toks: list[str], n: int) -> Counter:
    return Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))


def bleu_stats(candidate: str, reference: str) -> np.ndarray:
    """Per-report BLEU statistics: ``[match_1..match_4, count_1..count_4, c_len, r_len]``
    (float64, shape (10,)); sum them over reports and pass to :func:`bleu_from_stats`."""
    c, r = tokens(candidate), tokens(reference)
    out = np.zeros(2 * BLEU_N + 2, dtype=np.float64)
    for n in range(1, BLEU_N + 1):
        cn, rn = _ngrams(c, n), _ngrams(r, n)
        out[n - 1] = sum(min(k, rn[g]) for g, k in cn.items())
        out[BLEU_N + n - 1] = max(len(c) - n + 1, 0)
    out[-2], out[-1] = len(c), len(r)
    return out


def bleu_from_stats(stats: np.ndarray) -> float:
    """Corpus BLEU-4 of summed :func:`bleu_stats` (module docstring)."""
    s = np.asarray(stats, dtype=np.float64)
    if s.shape != (2 * BLEU_N + 2,):
        raise ValueError(f"stats must have shape ({2 * BLEU_N + 2},), got {s.shape}")
    matches, counts = s[:BLEU_N], s[BLEU_N:2 * BLEU_N]
    if (counts == 0).any() or (matches == 0).any():
        return 0.0
    log_p = float(np.mean(np.log(matches / counts)))
    c, r = s[-2], s[-1]
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return bp * math.exp(log_p)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str, beta: float = 1.2) -> float:
    """ROUGE-L F of one candidate against one reference (module docstring)."""
    c, r = tokens(candidate), tokens(reference)
    if not c or not r:
        return 0.0
    lcs = _lcs(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return (1 + beta ** 2) * p * rec / (rec + beta ** 2 * p)


def asserted_findings(text: str) -> set[str]:
    """Findings ``text`` asserts: mentioned neither negated nor hedged."""
    return {ev.finding for ev in extract_evidence(text) if ev.positive}


def finding_counts(candidate: str, reference: str, findings: Sequence[str]) -> np.ndarray:
    """Per-finding ``[tp, fp, fn]`` of one candidate against its reference, shape
    ``(len(findings), 3)`` int64."""
    c, r = asserted_findings(candidate), asserted_findings(reference)
    return np.array([[f in c and f in r, f in c and f not in r, f in r and f not in c]
                     for f in findings], dtype=np.int64).reshape(len(findings), 3)


def ce_f1(counts: np.ndarray) -> dict[str, float]:
    """Micro and macro F1 of summed :func:`finding_counts` (shape (F, 3)).

    Macro averages over the findings with any reference or candidate positive (a finding
    neither side ever asserts has no F1)."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 3:
        raise ValueError(f"counts must have shape (F, 3), got {c.shape}")

    def f1(tp: float, fp: float, fn: float) -> float:
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")

    tp, fp, fn = c.sum(axis=0)
    per = [f1(*row) for row in c]
    defined = [v for v in per if not math.isnan(v)]
    return {"micro_f1": f1(tp, fp, fn) if tp + fp + fn else 0.0,
            "macro_f1": float(np.mean(defined)) if defined else 0.0}
