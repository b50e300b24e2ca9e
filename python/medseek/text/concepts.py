"""Report concept vectors and the hybrid text embedding built on them.

A report's concept vector is the multi-hot vector of the lexicon findings it asserts
(:func:`medseek.text.evidence.concept_vector`) plus one ``normal`` axis, set when it
asserts none, so that every report has a direction and two normal reports match.

:func:`hybrid_embedding` joins a sentence embedding and a concept vector into one unit
vector whose inner product with another is the weighted mean of the two cosines:
``<h_a, h_b> = w cos(t_a, t_b) + (1 - w) cos(c_a, c_b)``. An ANN index over these
vectors therefore ranks by that mean directly; on the real IU reports it beats either
part alone (``benchmarks/RESULTS.md``, report-to-report nDCG@10).

Laterality is an extension, not a change of those axes (a shipped model's finding head
and its calibrated thresholds are tied to :func:`concept_names`):
:func:`lateral_report_concepts` returns the same ``len(concept_names())`` columns first,
then one ``left <finding>`` axis per finding, then one ``right <finding>`` axis per
finding (:func:`lateral_concept_names`). A finding asserted on the left sets its
``left`` axis, one asserted bilaterally sets both, one asserted with no side sets
neither. So for one finding the concept cosines order as same side (1) > bilateral
against one side (0.82) > stated side against no side (0.71) > opposite sides (0.5):
"right pleural effusion" still finds left effusions, below right, bilateral and unsided
ones.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .evidence import Evidence, concept_vector, extract_evidence
from .lexicon import FINDINGS

NORMAL_AXIS = "normal"
#: the sides of :func:`lateral_concept_names`, in axis order; "bilateral" sets both
SIDES = ("left", "right")


def concept_names() -> tuple[str, ...]:
    """Axis names of :func:`report_concepts`: every lexicon finding, then ``normal``."""
    return tuple(f.name for f in FINDINGS) + (NORMAL_AXIS,)


def report_concepts(texts: Sequence[str]) -> np.ndarray:
    """Concept vectors of reports.

    Parameters
    ----------
    texts : sequence of str, length N

    Returns
    -------
    np.ndarray
        ``(N, len(concept_names()))`` float32 of 0/1; exactly the ``normal`` axis is set
        for a report that asserts no finding.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of str, got a single str")
    names = concept_names()[:-1]
    rows = np.zeros((len(texts), len(names) + 1), dtype=np.float32)
    for i, text in enumerate(texts):
        vec = concept_vector(extract_evidence(text), names)
        rows[i, :-1] = vec
        rows[i, -1] = 0.0 if vec.any() else 1.0
    return rows


def lateral_concept_names() -> tuple[str, ...]:
    """Axis names of :func:`lateral_report_concepts`: :func:`concept_names`, then
    ``"left <finding>"`` for every lexicon finding, then ``"right <finding>"``."""
    findings = tuple(f.name for f in FINDINGS)
    return concept_names() + tuple(f"{side} {name}" for side in SIDES for name in findings)


def finding_sides(evidences: Sequence[Evidence]) -> dict[str, frozenset[str]]:
    """The sides each asserted finding is stated on.

    Parameters
    ----------
    evidences : sequence of Evidence
        One report's evidence (:func:`medseek.text.evidence.extract_evidence`).

    Returns
    -------
    dict
        Finding name -> subset of :data:`SIDES`, for every finding with a positive
        mention (neither negated nor hedged, as in :func:`concept_vector`); a
        ``bilateral`` mention gives both sides, a mention with no side none, and
        mentions on both sides in different sentences give both.
    """
    out: dict[str, set[str]] = {}
    for ev in evidences:
        if not ev.positive:
            continue
        sides = out.setdefault(ev.finding, set())
        if ev.laterality == "bilateral":
            sides.update(SIDES)
        elif ev.laterality in SIDES:
            sides.add(ev.laterality)
    return {name: frozenset(sides) for name, sides in out.items()}


def lateral_report_concepts(texts: Sequence[str]) -> np.ndarray:
    """Laterality-aware concept vectors of reports (module docstring).

    Parameters
    ----------
    texts : sequence of str, length N

    Returns
    -------
    np.ndarray
        ``(N, len(lateral_concept_names()))`` float32 of 0/1; the first
        ``len(concept_names())`` columns equal :func:`report_concepts`.
    """
    base = report_concepts(texts)  # (also refuses a single str)
    index = {name: i for i, name in enumerate(lateral_concept_names())}
    rows = np.zeros((len(texts), len(index)), dtype=np.float32)
    rows[:, : base.shape[1]] = base
    for i, text in enumerate(texts):  # extract_evidence caches sentences: no second parse
        for name, sides in finding_sides(extract_evidence(text)).items():
            for side in sides:
                rows[i, index[f"{side} {name}"]] = 1.0
    return rows


def hybrid_embedding(text_emb: np.ndarray, concepts: np.ndarray, text_weight: float = 0.5) -> np.ndarray:
    """Concatenate ``sqrt(w)·text`` and ``sqrt(1-w)·concepts/‖concepts‖`` row-wise.

    Parameters
    ----------
    text_emb : np.ndarray, float32, shape (N, D)
        L2-normalised sentence embeddings.
    concepts : np.ndarray, shape (N, C)
        Non-negative concept vectors, no all-zero row (see :func:`report_concepts`).
    text_weight : float in [0, 1]
        ``w`` above.

    Returns
    -------
    np.ndarray
        ``(N, D + C)`` float32, unit rows.
    """
    if not 0.0 <= text_weight <= 1.0:
        raise ValueError(f"text_weight must be in [0, 1], got {text_weight}")
    t = np.asarray(text_emb, dtype=np.float64)
    c = np.asarray(concepts, dtype=np.float64)
    if t.ndim != 2 or c.ndim != 2 or t.shape[0] != c.shape[0]:
        raise ValueError(f"text_emb (N, D) and concepts (N, C) must agree on N, got {t.shape} and {c.shape}")
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"concepts has all-zero rows at {np.flatnonzero(norms[:, 0] == 0)[:5].tolist()}")
    tn = np.linalg.norm(t, axis=1)
    if np.abs(tn - 1.0).max() > 1e-3:
        raise ValueError(f"text_emb rows must be L2-normalised, got norms in [{tn.min():.4f}, {tn.max():.4f}]")
    out = np.concatenate([np.sqrt(text_weight) * t, np.sqrt(1.0 - text_weight) * c / norms], axis=1)
    return np.ascontiguousarray(out, dtype=np.float32)
