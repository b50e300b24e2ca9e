"""Report concept vectors and the hybrid text embedding built on them.

A report's concept vector is the multi-hot vector of the lexicon findings it asserts
(:func:`medseek.text.evidence.concept_vector`) plus one ``normal`` axis, set when it
asserts none, so that every report has a direction and two normal reports match.

:func:`hybrid_embedding` joins a sentence embedding and a concept vector into one unit
vector whose inner product with another is the weighted mean of the two cosines:
``<h_a, h_b> = w cos(t_a, t_b) + (1 - w) cos(c_a, c_b)``. An ANN index over these
vectors therefore ranks by that mean directly; on the real IU reports it beats either
part alone (``benchmarks/RESULTS.md``, report-to-report nDCG@10).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .evidence import concept_vector, extract_evidence
from .lexicon import FINDINGS

NORMAL_AXIS = "normal"


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
