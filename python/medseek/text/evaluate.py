"""Agreement of extracted findings with human MeSH labels of chest X-ray reports.

A report is predicted positive for a MeSH heading when :func:`extract_evidence` finds,
in its findings and impression, at least one mention of a lexicon finding mapped to
that heading that is neither negated nor uncertain (``uncertain="negative"``, the
default) -- or neither negated (``uncertain="positive"``). The truth is whether the
heading is the first path component of one of the report's human ``mesh_major``
terms. Counts are pooled over reports per heading, then over headings (micro).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from . import lexicon as lx
from .evidence import extract_evidence


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f}


def predicted_headings(
    text: str, uncertain: str = "negative", use_negation: bool = True
) -> set[str]:
    """MeSH headings asserted by ``text`` (see the module docstring for the rule).

    ``use_negation=False`` counts negated mentions as positives too: an ablation that
    shows what the negation scope is worth."""
    if uncertain not in ("negative", "positive"):
        raise ValueError(f"uncertain must be 'negative' or 'positive', got {uncertain!r}")
    out: set[str] = set()
    for ev in extract_evidence(text):
        if ev.implied and not use_negation:
            continue  # a denial with no finding word: nothing to mis-read as positive
        if (ev.negated and use_negation) or (ev.uncertain and uncertain == "negative"):
            continue
        out.update(lx.FINDINGS_BY_NAME[ev.finding].headings)
    return out


def evaluate_against_mesh(
    reports: Sequence,
    findings: Sequence[str] = lx.TOP14,
    uncertain: str = "negative",
    use_negation: bool = True,
) -> dict:
    """Report-level precision, recall and F1 of the extractor against MeSH labels.

    Parameters
    ----------
    reports : sequence of IUReport
        Reports with ``text`` and ``mesh_major`` (see :mod:`medseek.data.iu`).
    findings : sequence of str
        Lexicon finding names to score; each is scored on its first MeSH heading.
    uncertain : {"negative", "positive"}
        Whether a mention that is only hedged counts as a positive prediction.
    use_negation : bool
        False counts negated mentions as positives (ablation).

    Returns
    -------
    dict
        ``{"per_finding": {name: {"heading", "tp", "fp", "fn", "support",
        "precision", "recall", "f1"}}, "micro": {...}, "macro_f1": float,
        "n_reports": int, "uncertain": str}``.
    """
    headings = {name: lx.FINDINGS_BY_NAME[name].headings[0] for name in findings}
    counts = {name: [0, 0, 0] for name in findings}  # tp, fp, fn
    for report in reports:
        truth = {m.split("/")[0].strip().lower() for m in report.mesh_major}
        pred = {h.lower() for h in predicted_headings(report.text, uncertain, use_negation)}
        for name, heading in headings.items():
            t, p = heading.lower() in truth, heading.lower() in pred
            c = counts[name]
            c[0] += t and p
            c[1] += p and not t
            c[2] += t and not p
    per = {}
    for name, (tp, fp, fn) in counts.items():
        per[name] = {"heading": headings[name], "tp": tp, "fp": fp, "fn": fn,
                     "support": tp + fn, **_prf(tp, fp, fn)}
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
    return {
        "per_finding": per,
        "micro": {"tp": tp, "fp": fp, "fn": fn, **_prf(tp, fp, fn)},
        "macro_f1": sum(v["f1"] for v in per.values()) / max(len(per), 1),
        "n_reports": len(reports),
        "uncertain": uncertain,
    }


def laterality_agreement(
    scores: np.ndarray, query_sides: Sequence[Mapping[str, frozenset[str]]],
    item_sides: Sequence[Mapping[str, frozenset[str]]], k: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """How often the top ``k`` hits state a query's one-sided findings on the same side.

    A query's *one-sided* findings are those it asserts on exactly one side ("small right
    pleural effusion"; not "bilateral effusions" or an effusion with no side). A hit
    *agrees* when it asserts one of them on that side (a bilateral mention counts: it
    includes that side); it is *opposite* when it does not agree and asserts one of them
    on the other side only.

    Parameters
    ----------
    scores : np.ndarray, shape (Q, N), float
        Higher is better; ties are broken by item index (as ``ndcg_at_k``); an item to
        leave out (the query itself) scores ``-inf``.
    query_sides, item_sides : sequences of length Q and N
        Per report, finding name -> the sides it is asserted on
        (:func:`medseek.text.concepts.finding_sides`).
    k : int >= 1, at most N

    Returns
    -------
    (same, opposite) : two np.ndarray, shape (Q,), float64
        Fractions of the top ``k`` hits; NaN for queries without a one-sided finding.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != (len(query_sides), len(item_sides)):
        raise ValueError(f"scores must be (Q, N) = ({len(query_sides)}, {len(item_sides)}), "
                         f"got shape {scores.shape}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[1]}], got {k}")
    other = {"left": "right", "right": "left"}
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, k)
    same = np.full(scores.shape[0], np.nan)
    opposite = np.full(scores.shape[0], np.nan)
    for q, sides in enumerate(query_sides):
        one_sided = [(f, next(iter(s))) for f, s in sides.items() if len(s) == 1]
        if not one_sided:
            continue
        n_same = n_opp = 0
        for h in top[q]:
            hit = item_sides[h]
            if any(side in hit.get(f, ()) for f, side in one_sided):
                n_same += 1
            elif any(other[side] in hit.get(f, ()) for f, side in one_sided):
                n_opp += 1
        same[q], opposite[q] = n_same / k, n_opp / k
    return same, opposite


def format_table(result: dict) -> str:
    """The result of :func:`evaluate_against_mesh` as a Markdown table."""
    rows = ["| finding | MeSH heading | support | precision | recall | F1 |",
            "|---|---|---:|---:|---:|---:|"]
    for name, v in result["per_finding"].items():
        rows.append(f"| {name} | {v['heading']} | {v['support']} | {v['precision']:.3f} "
                    f"| {v['recall']:.3f} | {v['f1']:.3f} |")
    m = result["micro"]
    rows.append(f"| **micro** | | {m['tp'] + m['fn']} | {m['precision']:.3f} | {m['recall']:.3f} "
                f"| **{m['f1']:.3f}** |")
    rows.append(f"| macro | | | | | {result['macro_f1']:.3f} |")
    return "\n".join(rows)
