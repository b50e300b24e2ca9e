"""Concept-based explanations of hits (CEMRAG).

CEMRAG decomposes a visual representation into interpretable clinical concepts. Here each
item gets a concept score vector, one score per finding concept, either

* from embeddings: ``cos(embedding, concept_embedding_c) - baseline_c``, the concept
  embeddings being text-tower embeddings of concept prompts ("pleural effusion") and the
  baseline a per-concept offset (e.g. the mean cosine over the archive) so that a score
  above 0 means "more of this concept than usual"; or
* from report evidence: the multi-hot ``medseek.text.evidence.concept_vector`` of a report.

A concept explains a hit when it is present in both the query and the hit (both scores
above ``min_score``); its contribution is the product ``query_score * hit_score``, so
concepts strong on both sides rank first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._checks import as_float_array, check_count, check_finite_float, check_unit_rows

__all__ = ["ConceptBank", "ConceptMatch", "concept_scores", "explain", "explain_pairs"]


@dataclass(frozen=True, slots=True)
class ConceptMatch:
    """One shared concept of a query and a hit (slots: a search builds thousands a
    second, and a slotted one is built in half the time)."""

    concept: str
    query_score: float
    hit_score: float
    contribution: float


@dataclass(frozen=True)
class ConceptBank:
    """Concept prompt embeddings for embedding-based explanations.

    Attributes
    ----------
    names : tuple of str, length C
        Concept names (e.g. ``medseek.text.lexicon.TOP14``), unique.
    embeddings : np.ndarray, float32, shape (C, d)
        L2-normalised text embeddings of one prompt per concept, in the collection's space.
    baseline : np.ndarray, float64, shape (C,), optional
        Subtracted from the cosines; zeros when omitted.
    """

    names: tuple[str, ...]
    embeddings: np.ndarray
    baseline: np.ndarray | None = None

    def __post_init__(self) -> None:
        names = tuple(self.names)
        if not names or not all(isinstance(s, str) for s in names) or len(set(names)) != len(names):
            raise ValueError(f"names must be unique non-empty str, got {self.names!r}")
        object.__setattr__(self, "names", names)
        e = as_float_array("embeddings", self.embeddings, 2)
        if e.shape[0] != len(names):
            raise ValueError(f"embeddings must have {len(names)} rows (one per name), "
                             f"got {e.shape}")
        check_unit_rows("embeddings", e)
        if self.baseline is not None:
            b = np.asarray(self.baseline, dtype=np.float64)
            if b.shape != (len(names),) or not np.isfinite(b).all():
                raise ValueError(f"baseline must be finite with shape ({len(names)},), "
                                 f"got {b.shape}")
            object.__setattr__(self, "baseline", b)

    def scores(self, embs: np.ndarray) -> np.ndarray:
        """``concept_scores(embs, self.embeddings, self.baseline)``.

        The bank's own embeddings were checked when it was made, so only ``embs`` is
        checked here, and their float64 copy is made once: the search pipeline scores
        every micro-batch with the same bank."""
        single = isinstance(embs, np.ndarray) and embs.ndim == 1
        x = as_float_array("embs", embs[None, :] if single else embs, 2)
        c64 = self.__dict__.get("_embeddings64")
        if c64 is None or x.shape[1] != c64.shape[1]:
            if x.shape[1] != self.embeddings.shape[1]:  # concept_scores names the mismatch
                return concept_scores(embs, self.embeddings, self.baseline)
            c64 = self.embeddings.astype(np.float64)
            object.__setattr__(self, "_embeddings64", c64)  # a cache, not a field
        check_unit_rows("embs", x)
        out = x.astype(np.float64) @ c64.T  # (n, C)
        if self.baseline is not None:
            out = out - self.baseline[None, :]
        return out[0] if single else out

    @classmethod
    def from_linear(cls, names: Sequence[str], weight: np.ndarray, bias: np.ndarray,
                    threshold: np.ndarray, never: float | None = None) -> "ConceptBank | None":
        """A bank whose score is a linear classifier's calibrated margin.

        For logits ``W e + b`` (``weight`` (C, d), ``bias`` (C,)) and per-concept logit
        thresholds ``t`` (C,), the score of a unit embedding ``e`` is
        ``(W_c·e + b_c - t_c) / ‖W_c‖``: the embedding's signed distance to the concept's
        decision hyperplane, positive exactly when the logit exceeds its threshold.

        Concepts whose threshold is ``never`` or above (calibration found no threshold at
        which the classifier is right often enough) are left out: their score would say
        "absent" with a confidence the classifier does not have. None when none is left.
        """
        w = np.asarray(weight, dtype=np.float64)
        b = np.asarray(bias, dtype=np.float64)
        t = np.asarray(threshold, dtype=np.float64)
        if w.ndim != 2 or b.shape != (w.shape[0],) or t.shape != (w.shape[0],):
            raise ValueError(f"weight (C, d), bias (C,) and threshold (C,) must agree, got "
                             f"{w.shape}, {b.shape}, {t.shape}")
        if never is not None:
            keep = np.flatnonzero(t < never)
            if keep.size == 0:
                return None
            names, w, b, t = [tuple(names)[i] for i in keep], w[keep], b[keep], t[keep]
        norms = np.linalg.norm(w, axis=1)
        if not (norms > 0).all():
            raise ValueError(f"weight rows {np.flatnonzero(norms == 0)[:5].tolist()} are zero")
        return cls(tuple(names), (w / norms[:, None]).astype(np.float32), (t - b) / norms)

    @classmethod
    def from_prompt_pairs(cls, names: Sequence[str], present: np.ndarray,
                          absent: np.ndarray) -> "ConceptBank":
        """A bank from paired prompts ("pleural effusion" / "no pleural effusion"): the
        score is ``e·(p_c - a_c) / ‖p_c - a_c‖``, positive exactly when the embedding is
        closer to the concept's prompt than to its negation."""
        p = as_float_array("present", present, 2).astype(np.float64)
        a = as_float_array("absent", absent, 2).astype(np.float64)
        if p.shape != a.shape:
            raise ValueError(f"present and absent must have one shape, got {p.shape}, {a.shape}")
        d = p - a
        norms = np.linalg.norm(d, axis=1)
        if not (norms > 0).all():
            bad = [names[i] for i in np.flatnonzero(norms == 0)[:5]]
            raise ValueError(f"the prompts of {bad} embed the same as their negations")
        return cls(tuple(names), (d / norms[:, None]).astype(np.float32))


def concept_scores(
    embs: np.ndarray, concept_embs: np.ndarray, baseline: np.ndarray | None = None
) -> np.ndarray:
    """Concept scores of embeddings: ``cos(e, concept_c) - baseline_c``.

    Parameters
    ----------
    embs : np.ndarray, float32 or float64, shape (n, d) or (d,)
        L2-normalised.
    concept_embs : np.ndarray, float32 or float64, shape (C, d)
        L2-normalised concept prompt embeddings.
    baseline : np.ndarray, float, shape (C,), optional

    Returns
    -------
    np.ndarray, float64, shape (n, C) (or (C,) for a single embedding)
    """
    single = isinstance(embs, np.ndarray) and embs.ndim == 1
    x = as_float_array("embs", embs[None, :] if single else embs, 2)
    c = as_float_array("concept_embs", concept_embs, 2)
    if c.shape[1] != x.shape[1]:
        raise ValueError(f"concept_embs must have {x.shape[1]} columns (the embeddings' dim), "
                         f"got shape {c.shape}")
    check_unit_rows("embs", x)
    check_unit_rows("concept_embs", c)
    out = x.astype(np.float64) @ c.astype(np.float64).T  # (n, C)
    if baseline is not None:
        out = out - np.asarray(baseline, dtype=np.float64)[None, :]
    return out[0] if single else out


def explain(
    query_concepts: np.ndarray, hit_concepts: np.ndarray, concept_names: Sequence[str],
    top: int = 3, *, min_score: float = 0.0,
) -> list[tuple[ConceptMatch, ...]]:
    """The concepts a query shares with each hit, strongest first.

    Parameters
    ----------
    query_concepts : np.ndarray, float, shape (C,)
        Concept scores of the query: ``concept_scores(query_emb, concept_embs)`` for an
        embedding (or ``ConceptBank.scores``), or a report's concept vector.
    hit_concepts : np.ndarray, float, shape (K, C)
        Concept scores of the hits.
    concept_names : sequence of str, length C
    top : int >= 1
        Most concepts listed per hit.
    min_score : float
        A concept is present on a side when its score is ``> min_score``.

    Returns
    -------
    list of K tuples of ConceptMatch
        Per hit, shared concepts sorted by ``contribution = query_score * hit_score``
        (descending; ties by concept order), at most ``top``; empty when none is shared.
    """
    q = as_float_array("query_concepts", query_concepts, 1)
    h = as_float_array("hit_concepts", hit_concepts, 2)
    if h.shape[1] != q.shape[0]:
        raise ValueError(f"concept_names ({len(concept_names)}), query_concepts {q.shape} and "
                         f"hit_concepts {h.shape} must agree on the number of concepts")
    return explain_pairs(np.broadcast_to(q, h.shape), h, concept_names, top,
                         min_score=min_score)


def explain_pairs(
    query_concepts: np.ndarray, hit_concepts: np.ndarray, concept_names: Sequence[str],
    top: int = 3, *, min_score: float = 0.0,
) -> list[tuple[ConceptMatch, ...]]:
    """``explain`` of many (query, hit) pairs at once: row ``i`` of each side is one pair.

    The search pipeline explains every hit of a micro-batch in one call (the hits of
    several queries, each hit paired with its own query's row), so the cost follows the
    number of hits explained, not the number of calls.

    Parameters
    ----------
    query_concepts : np.ndarray, float, shape (K, C)
        Concept scores of the query each hit is explained against.
    hit_concepts : np.ndarray, float, shape (K, C)
    concept_names, top, min_score
        As in ``explain``.

    Returns
    -------
    list of K tuples of ConceptMatch (as ``explain``)
    """
    q = as_float_array("query_concepts", query_concepts, 2).astype(np.float64, copy=False)
    h = as_float_array("hit_concepts", hit_concepts, 2).astype(np.float64, copy=False)
    names = list(concept_names)
    if q.shape != h.shape or len(names) != h.shape[1]:
        raise ValueError(f"concept_names ({len(names)}), query_concepts {q.shape} and "
                         f"hit_concepts {h.shape} must agree on the number of concepts")
    if not (np.isfinite(q).all() and np.isfinite(h).all()):
        raise ValueError("query_concepts and hit_concepts must be finite")
    top = check_count("top", top)
    floor = check_finite_float("min_score", min_score)
    shared = (q > floor) & (h > floor)  # (K, C)
    contrib = np.where(shared, q * h, -np.inf)
    order = np.argsort(-contrib, axis=1, kind="stable")[:, :top]  # ties: concept order
    # the kept (row, concept) pairs in row-major order: each row's in contribution order
    rows, ranks = np.nonzero(np.take_along_axis(shared, order, axis=1))
    cols = order[rows, ranks]
    # every value converted to Python floats at once, every match built in one map
    matches = list(map(ConceptMatch, [names[c] for c in cols.tolist()], q[rows, cols].tolist(),
                       h[rows, cols].tolist(), contrib[rows, cols].tolist()))
    ends = np.cumsum(np.bincount(rows, minlength=h.shape[0])).tolist()
    return [tuple(matches[a:b]) for a, b in zip([0] + ends[:-1], ends)]
