"""Contrastive evidence sets and counterfactual-contrastive inference with abstention.

A diagnostic question names competing hypotheses ("distal radius fracture" vs none;
effusion vs atelectasis vs normal). A plain kNN vote lets the nearest cases, often
redundant and all of one kind, reinforce a single answer. Following contrastive reference
selection, each hypothesis instead gets one compact evidence set of archive items whose
labels support it, chosen to *discriminate*:

* relevant: only the ``pool`` candidates of the hypothesis most similar to the query;
* contrastive: a candidate that looks like the other hypotheses' evidence separates
  nothing, so its relevance is lowered by its similarity to the rivals' nearest candidates::

      selection_i = sim(q, e_i) - beta * max_{g != h} mean_{j in rivals_g} cos(e_i, e_j)

  (``rivals_g``: the ``m`` candidates of hypothesis g most similar to the query);
* diverse and provenance-capped: greedy MMR over ``selection`` with the service's caps
  (:func:`medseek.search.diversify.diversify`), so one patient or study counts once.

``beta = 0``, ``lam = 1`` and no caps give the similarity-only sets (the top ``m`` of each
hypothesis by similarity), the baseline the contrastive sets are measured against.

The decision compares the query with the sets pairwise: for hypotheses a and b,
``margin(a, b)`` is the mean over ranks r < n of ``s_a[r] - s_b[r]``, where ``s_h`` are the
query similarities of set h sorted in decreasing order and ``n = min(|a|, |b|, top_m)``
(the r-th best evidence of a against the r-th best of b). The answer is the hypothesis
whose smallest margin over the others is largest, and that smallest margin is the
decision's confidence. It abstains, saying why, when a hypothesis has no evidence, when no
hypothesis beats every other (margin <= ``TIE_TOL``: a tie or a cycle), or when the margin
is below a threshold calibrated for a target risk on held-out cases
(:func:`medseek.eval.selective.calibrate_threshold`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ._checks import (as_float_array, check_count, check_finite_float, check_unit_interval,
                      check_unit_rows)
from .diversify import diversify

__all__ = ["TIE_TOL", "ContrastiveDecision", "EvidenceSet", "Hypothesis", "check_hypotheses",
           "decide", "hypothesis_membership", "hypothesis_signature", "pairwise_margins",
           "select_evidence"]


#: margins this small are ties: float32 embeddings round cosines at about 1e-7
TIE_TOL = 1e-6


@dataclass(frozen=True)
class Hypothesis:
    """One answer to a diagnostic question and the archive labels that support it.

    An item supports the hypothesis when it carries any of ``labels``. Empty ``labels``
    makes it the complement ("none"): an item supports it when it carries none of the
    other hypotheses' labels.
    """

    name: str
    labels: tuple[str, ...] = ()


def check_hypotheses(hypotheses: Sequence[Hypothesis]) -> tuple[Hypothesis, ...]:
    """At least two hypotheses with distinct non-empty names, at most one complement, and
    no label claimed by two hypotheses (it would support both and separate nothing)."""
    if isinstance(hypotheses, (str, Hypothesis)) or not isinstance(hypotheses, Sequence):
        raise TypeError(f"hypotheses must be a sequence of Hypothesis, got {hypotheses!r}")
    hs = tuple(hypotheses)
    if len(hs) < 2:
        raise ValueError(f"hypotheses: a contrastive decision needs at least 2, got {len(hs)}")
    owner: dict[str, str] = {}
    for i, h in enumerate(hs):
        if not isinstance(h, Hypothesis):
            raise TypeError(f"hypotheses[{i}] must be a Hypothesis, got {type(h).__name__}")
        if not isinstance(h.name, str) or not h.name.strip():
            raise ValueError(f"hypotheses[{i}].name must be a non-empty str, got {h.name!r}")
        for lab in h.labels:
            if not isinstance(lab, str) or not lab:
                raise ValueError(f"hypotheses[{i}].labels must be non-empty str, got {lab!r}")
            if lab in owner and owner[lab] != h.name:
                raise ValueError(f"hypotheses: label {lab!r} is claimed by both "
                                 f"{owner[lab]!r} and {h.name!r}")
            owner[lab] = h.name
    names = [h.name for h in hs]
    if len(set(names)) != len(names):
        raise ValueError(f"hypotheses: names must be distinct, got {names}")
    complements = [h.name for h in hs if not h.labels]
    if len(complements) > 1:
        raise ValueError(f"hypotheses: at most one may have no labels (the complement), got "
                         f"{complements}")
    return hs


def hypothesis_signature(hypotheses: Sequence[Hypothesis]) -> str:
    """A canonical text key of a set of hypotheses (order-free), e.g. for a stored
    calibration: ``"fracture=distal radius fracture|none="``."""
    hs = check_hypotheses(hypotheses)
    return "|".join(sorted(f"{h.name}={','.join(sorted(h.labels))}" for h in hs))


def hypothesis_membership(labels: Sequence[Sequence[str]],
                          hypotheses: Sequence[Hypothesis]) -> np.ndarray:
    """``(K, H)`` bool: which hypotheses each candidate's labels support. A row with two
    True entries is ambiguous evidence; :func:`select_evidence` leaves it out."""
    hs = check_hypotheses(hypotheses)
    if isinstance(labels, str) or any(isinstance(r, str) for r in labels):
        raise TypeError("labels must be a sequence of label sequences, not of str")
    named = set().union(*(h.labels for h in hs))
    out = np.zeros((len(labels), len(hs)), dtype=bool)
    for i, row in enumerate(labels):
        row = set(row)
        for j, h in enumerate(hs):
            out[i, j] = bool(row & set(h.labels)) if h.labels else not (row & named)
    return out


@dataclass(frozen=True)
class EvidenceSet:
    """The evidence chosen for one hypothesis.

    Attributes
    ----------
    hypothesis : str
    indices : np.ndarray, int64, shape (n,)
        Candidate indices, in pick order.
    similarity : np.ndarray, float64, shape (n,)
        Their similarity to the query (what the decision compares).
    selection : np.ndarray, float64, shape (n,)
        Their contrastive selection score (similarity minus beta times rival similarity).
    available : int
        Unambiguous candidates supporting the hypothesis (before the pool and the caps).
    """

    hypothesis: str
    indices: np.ndarray
    similarity: np.ndarray
    selection: np.ndarray
    available: int


def _rival_similarity(embs: np.ndarray, own: np.ndarray, rivals: list[np.ndarray]) -> np.ndarray:
    """For each candidate in ``own``: the largest, over rival hypotheses, of its mean cosine
    to that rival's nearest candidates (0 when there is no rival evidence)."""
    out = np.zeros(own.size)
    for r in rivals:
        if r.size:
            out = np.maximum(out, (embs[own] @ embs[r].T).mean(axis=1))
    return out


def select_evidence(
    scores: np.ndarray, embs: np.ndarray, membership: np.ndarray, names: Sequence[str],
    provenance: Mapping[str, Sequence[str | None]] | None = None, *, m: int = 5,
    pool: int = 40, beta: float = 0.5, lam: float = 0.7,
    caps: Mapping[str, int | None] | None = None, dup_threshold: float | None = None,
) -> list[EvidenceSet]:
    """One contrastive evidence set of at most ``m`` items per hypothesis (module docstring).

    Parameters
    ----------
    scores : np.ndarray, float, shape (K,)
        Similarity of each candidate to the query (cosine scale).
    embs : np.ndarray, float, shape (K, d)
        L2-normalised candidate embeddings.
    membership : np.ndarray, bool, shape (K, H)
        :func:`hypothesis_membership`; rows supporting several hypotheses are left out.
    names : sequence of H str
        Hypothesis names, in ``membership``'s column order.
    provenance : mapping of str to K (str or None), optional
        ``{"patient": ..., "study": ..., "document": ...}`` pseudonyms for ``caps``.
    m : int >= 1
        Most items per set.
    pool : int >= m
        Only the ``pool`` candidates of a hypothesis most similar to the query compete.
    beta : float >= 0
        Weight of the rival similarity (0: similarity only).
    lam : float in [0, 1]
        MMR weight of the selection score against diversity (1: no diversity term).
    caps, dup_threshold
        As in :func:`medseek.search.diversify.diversify`.

    Returns
    -------
    list of EvidenceSet, one per hypothesis in ``names`` order (possibly empty sets).
    """
    s = as_float_array("scores", scores, 1).astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    e = as_float_array("embs", embs, 2).astype(np.float64)
    if e.shape[0] != s.shape[0]:
        raise ValueError(f"embs must have {s.shape[0]} rows (one per score), got {e.shape}")
    check_unit_rows("embs", e)
    mem = np.asarray(membership)
    if mem.dtype != bool or mem.shape != (s.shape[0], len(names)):
        raise ValueError(f"membership must be bool of shape ({s.shape[0]}, {len(names)}), got "
                         f"{mem.dtype} {mem.shape}")
    m = check_count("m", m)
    pool = check_count("pool", pool, minimum=m)
    beta = check_finite_float("beta", beta, minimum=0.0)
    lam = check_unit_interval("lam", lam)
    prov = dict(provenance or {})
    for key, values in prov.items():
        if len(values) != s.shape[0]:
            raise ValueError(f"provenance[{key!r}] must have {s.shape[0]} entries, got "
                             f"{len(values)}")

    clean = mem & (mem.sum(axis=1) == 1)[:, None]  # ambiguous evidence separates nothing
    pools = []
    for j in range(len(names)):
        idx = np.flatnonzero(clean[:, j])
        pools.append(idx[np.argsort(-s[idx], kind="stable")][:pool])  # most similar first
    nearest = [p[:m] for p in pools]  # what each similarity-only set would be
    sets = []
    for j, name in enumerate(names):
        own = pools[j]
        rivals = [nearest[g] for g in range(len(names)) if g != j]
        sel = s[own] - beta * _rival_similarity(e, own, rivals) if beta else s[own].copy()
        picked = np.zeros(0, dtype=np.int64)
        if own.size:
            sub_prov = {key: [prov[key][i] for i in own] for key in prov}
            # MMR compares selection with cosines; both on the cosine scale
            div = diversify(sel, e[own], sub_prov, k=m, lam=lam, caps=caps,
                            dup_threshold=dup_threshold)
            picked = div.selected
        chosen = own[picked]
        sets.append(EvidenceSet(name, chosen.astype(np.int64), s[chosen], sel[picked],
                                int(clean[:, j].sum())))
    return sets


def pairwise_margins(sets: Sequence[EvidenceSet], top_m: int | None = None
                     ) -> dict[tuple[str, str], float]:
    """``margin(a, b)`` for every ordered pair of distinct hypotheses: the mean rank-wise
    similarity difference of their sets' best ``n = min(|a|, |b|, top_m)`` items (NaN when
    either set is empty). Antisymmetric: ``margin(b, a) = -margin(a, b)``."""
    if top_m is not None:
        top_m = check_count("top_m", top_m)
    ranked = {st.hypothesis: np.sort(np.asarray(st.similarity, dtype=np.float64))[::-1]
              for st in sets}
    out = {}
    for a, sa in ranked.items():
        for b, sb in ranked.items():
            if a == b:
                continue
            n = min(sa.size, sb.size, top_m if top_m is not None else sa.size)
            out[(a, b)] = float(np.mean(sa[:n] - sb[:n])) if n else math.nan
    return out


@dataclass(frozen=True)
class ContrastiveDecision:
    """The answer of :func:`decide`.

    ``decision`` is None when it abstained, and ``reason`` says why (empty when answered).
    ``margin`` is the best hypothesis' smallest margin over the others (NaN when a set is
    empty); ``leader`` that hypothesis, even when it abstained.
    """

    decision: str | None
    leader: str | None
    margin: float
    threshold: float
    reason: str
    support: dict[str, float] = field(default_factory=dict)
    margins: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def abstained(self) -> bool:
        return self.decision is None


def decide(sets: Sequence[EvidenceSet], threshold: float = 0.0, top_m: int | None = None
           ) -> ContrastiveDecision:
    """Counterfactual-contrastive decision over the evidence sets (module docstring):
    answer the hypothesis that beats every other by the largest smallest margin, or abstain
    when a set is empty, no hypothesis beats all others, or that margin is < ``threshold``.

    ``support`` is each set's mean query similarity over its best ``top_m`` items (for
    display; the decision uses the pairwise margins).
    """
    threshold = check_finite_float("threshold", threshold)
    if len(sets) < 2:
        raise ValueError(f"sets: a decision needs at least 2 hypotheses, got {len(sets)}")
    margins = pairwise_margins(sets, top_m)
    support = {st.hypothesis: float(np.mean(np.sort(st.similarity)[::-1][:top_m]))
               if st.similarity.size else math.nan for st in sets}
    empty = [st.hypothesis for st in sets if st.indices.size == 0]
    if empty:
        return ContrastiveDecision(None, None, math.nan, threshold,
                                   f"no evidence for {', '.join(map(repr, empty))} among the "
                                   "candidates: nothing to compare against", support, margins)
    names = [st.hypothesis for st in sets]
    worst = {a: min(margins[(a, b)] for b in names if b != a) for a in names}
    leader = max(names, key=lambda a: worst[a])  # first maximum: ties go to the earlier name
    margin = worst[leader]
    runner = min((b for b in names if b != leader), key=lambda b: margins[(leader, b)])
    if margin <= TIE_TOL:
        reason = (f"no hypothesis beats every other: {leader!r} leads {runner!r} by "
                  f"{margin:.4f}")
        return ContrastiveDecision(None, leader, margin, threshold, reason, support, margins)
    if margin < threshold:
        reason = (f"margin {margin:.4f} of {leader!r} over {runner!r} is below the threshold "
                  f"{threshold:.4f}")
        return ContrastiveDecision(None, leader, margin, threshold, reason, support, margins)
    return ContrastiveDecision(leader, leader, margin, threshold, "", support, margins)
