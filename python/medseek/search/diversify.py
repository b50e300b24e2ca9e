"""Diversification of a ranked candidate list: greedy MMR with provenance caps.

Nearest-neighbour retrieval returns redundant evidence: several images of one patient, one
study, or near-identical figures of one source document. Following document-aware
reference selection (relevance, embedding diversity, and source provenance balanced), the
K candidates are picked greedily by maximal marginal relevance::

    mmr_i = lam * relevance_i - (1 - lam) * max_{s in selected} cos(e_i, e_s)

(the diversity term is 0 while nothing is selected, so the first pick is the most
relevant candidate). After each pick, candidates become ineligible, with a reason, when

* ``near_duplicate``: their cosine to the pick is ``>= dup_threshold``;
* ``cap:<key>``: the pick filled the cap of their provenance group (``caps["patient"] = 1``
  allows one hit per patient pseudonym). A missing value (None) belongs to no group and
  never counts against a cap.

A candidate skipped for several reasons records the first found, in that order (caps in
the order of ``caps``). Ties of ``mmr`` go to the lower candidate index, which is the
higher first-stage rank when candidates arrive sorted.

When the caps leave fewer than ``k`` eligible candidates, the result has fewer than ``k``
items by default: a cap is a promise about the evidence set (no patient counted twice),
and silently breaking it would mislead. With ``relax_caps=True`` the remaining slots are
filled by continuing the same greedy MMR over the cap-skipped candidates with every cap
lifted (near-duplicates stay excluded); those picks are flagged in ``relaxed``.
``lam = 1`` with no caps and no ``dup_threshold`` reproduces the plain top-k by relevance.

An absolute ``dup_threshold`` means different things in different embedding spaces: a
weakly trained model packs a whole collection into a narrow cone (median pairwise cosine
0.9, a query's 10th neighbour at 0.998), where a fixed 0.98 calls nearly every candidate a
duplicate of the first hit. :func:`calibrate_dup_threshold` raises the threshold to a high
quantile of the collection's pairwise cosines, so a near-duplicate must be both above the
configured floor and rarer than (by default) 1 in 1000 pairs of that collection; it never
rises above :data:`DUP_CEILING`, so exact duplicates are always removed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ._checks import (as_float_array, check_count, check_finite_float, check_unit_interval,
                      check_unit_rows)

__all__ = ["DEFAULT_CAPS", "DUP_CEILING", "Diversified", "Skip", "calibrate_dup_threshold",
           "diversify", "diversify_checked", "group_codes", "pairwise_cosine_quantile"]

#: Default provenance caps: one hit per patient and per study, two per source document.
DEFAULT_CAPS: Mapping[str, int] = {"patient": 1, "study": 1, "document": 2}

#: Highest near-duplicate threshold calibration may give: vectors this close (float32
#: rounding of one vector is ~1e-7) are always duplicates, however packed the collection.
DUP_CEILING = 0.9999


@dataclass(frozen=True)
class Skip:
    """Why a candidate was excluded: ``reason`` ("near_duplicate" or "cap:<key>") and the
    index ``by`` of the selected candidate that excluded it."""

    reason: str
    by: int


@dataclass(frozen=True)
class Diversified:
    """Result of :func:`diversify`.

    Attributes
    ----------
    selected : np.ndarray, int64, shape (m,), m <= k
        Candidate indices in pick order.
    mmr : np.ndarray, float64, shape (m,)
        The MMR value of each pick when it was picked.
    relaxed : np.ndarray, bool, shape (m,)
        True for picks made after the caps were lifted (``relax_caps``).
    skipped : dict of int to Skip
        Candidates excluded by a constraint before selection stopped (candidates never
        reached are absent).
    """

    selected: np.ndarray
    mmr: np.ndarray
    relaxed: np.ndarray
    skipped: dict[int, Skip] = field(default_factory=dict)


def pairwise_cosine_quantile(sample: np.ndarray, quantile: float) -> float | None:
    """The ``quantile`` of the cosines between distinct rows of ``sample``.

    Parameters
    ----------
    sample : np.ndarray, float32 or float64, shape (n, d)
        L2-normalised vectors (a sample of a collection).
    quantile : float in [0, 1]

    Returns
    -------
    float, or None when ``sample`` has fewer than two rows (no pair).
    """
    e = as_float_array("sample", sample, 2)
    check_unit_rows("sample", e)
    q = check_unit_interval("quantile", quantile)
    n = e.shape[0]
    if n < 2:
        return None
    e64 = e.astype(np.float64)
    cos = (e64 @ e64.T)[np.triu_indices(n, 1)]  # n (n - 1) / 2 pairs
    return float(np.quantile(cos, q))


def calibrate_dup_threshold(threshold: float, pair_quantile: float | None,
                            ceiling: float = DUP_CEILING) -> float:
    """Effective near-duplicate threshold: ``max(threshold, min(pair_quantile, ceiling))``.

    ``pair_quantile`` is a high quantile of the collection's pairwise cosines
    (:func:`pairwise_cosine_quantile`); None (no estimate) leaves ``threshold`` as it is.
    The configured ``threshold`` is a floor; ``ceiling`` caps only the calibration.
    """
    threshold = check_finite_float("threshold", threshold)
    if pair_quantile is None:
        return threshold
    return max(threshold, min(check_finite_float("pair_quantile", pair_quantile), ceiling))


def group_codes(values: Sequence[str | None]) -> np.ndarray:
    """Provenance values -> int64 group codes: equal values share a code, None is -1 (no
    group). What :func:`diversify` accepts in place of the values, e.g. coded once for a
    batch of queries whose candidates overlap.

    Raises TypeError when a value is neither a str nor None."""
    if isinstance(values, str) or not isinstance(values, (Sequence, np.ndarray)):
        raise TypeError(f"values must be a sequence of str or None, got {type(values).__name__}")
    seen: dict = {None: -1}
    # one dict lookup per value; the values are checked once per distinct value below
    codes = np.fromiter((seen.setdefault(v, len(seen) - 1) for v in values), np.int64,
                        len(values))
    bad = next((v for v in seen if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise TypeError(f"values must be str or None, got {bad!r}")
    return codes


def _group_codes(name: str, values: object, n: int) -> np.ndarray:
    """Provenance values -> int group codes, -1 for None (no group); an int array is taken
    as codes already."""
    if isinstance(values, str) or not isinstance(values, (Sequence, np.ndarray)):
        raise TypeError(f"provenance[{name!r}] must be a sequence of str or None, "
                        f"got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"provenance[{name!r}] must have {n} entries (one per candidate), "
                         f"got {len(values)}")
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        if values.ndim != 1 or (values.size and values.min() < -1):
            raise ValueError(f"provenance[{name!r}] as group codes must be 1-D ints >= -1, "
                             f"got shape {values.shape}")
        return values.astype(np.int64, copy=False)
    try:
        return group_codes(values)
    except TypeError:  # name the bad entry
        i, v = next((i, v) for i, v in enumerate(values)
                    if v is not None and not isinstance(v, str))
        raise TypeError(f"provenance[{name!r}][{i}] must be a str or None, got {v!r}") from None


def _check_caps(caps: Mapping[str, int | None] | None, provenance: Mapping) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, cap in (caps or {}).items():
        if cap is None:
            continue
        check_count(f"caps[{key!r}]", cap)
        if key not in provenance:
            raise ValueError(f"caps names {key!r} but provenance has no {key!r} entry "
                             f"(has {sorted(provenance)})")
        out[key] = int(cap)
    return out


def diversify(
    scores: np.ndarray, embs: np.ndarray,
    provenance: Mapping[str, Sequence[str | None]] | None = None, k: int = 10,
    lam: float = 0.7, caps: Mapping[str, int | None] | None = None,
    dup_threshold: float | None = None, *, relax_caps: bool = False,
) -> Diversified:
    """Pick up to ``k`` candidates by greedy MMR under provenance caps (module docstring).

    Parameters
    ----------
    scores : np.ndarray, float32 or float64, shape (K,)
        Relevance of each candidate, on the cosine scale (first-stage or reranked score).
    embs : np.ndarray, float32 or float64, shape (K, d)
        L2-normalised candidate embeddings (the diversity term is their cosine).
    provenance : mapping of str to sequence of (str or None), each of length K, optional
        E.g. ``{"patient": [...], "study": [...], "document": [...]}`` pseudonyms; an int
        array in place of a sequence is taken as its :func:`group_codes`.
    k : int >= 1
    lam : float in [0, 1]
        1 = relevance only, 0 = diversity only.
    caps : mapping of str to (int >= 1 or None), optional
        Most picks per provenance group, keyed like ``provenance``; None or absent = no
        cap. Default: no caps (:data:`DEFAULT_CAPS` is what ``SearchConfig`` uses).
    dup_threshold : float in [-1, 1], optional
        Cosine at or above which a candidate is a near-duplicate of a pick. None: off.
    relax_caps : bool
        Fill slots the caps leave empty with cap-skipped candidates (flagged ``relaxed``).

    Returns
    -------
    Diversified
    """
    rel = as_float_array("scores", scores, 1).astype(np.float64)
    if not np.isfinite(rel).all():
        raise ValueError(f"scores must be finite, found {rel[~np.isfinite(rel)][0]} "
                         f"at index {int(np.flatnonzero(~np.isfinite(rel))[0])}")
    e = as_float_array("embs", embs, 2)
    n = rel.shape[0]
    if e.shape[0] != n:
        raise ValueError(f"embs must have {n} rows (one per score), got shape {e.shape}")
    check_unit_rows("embs", e)
    k = check_count("k", k)
    lam = check_unit_interval("lam", lam)
    if dup_threshold is not None:
        dup_threshold = check_finite_float("dup_threshold", dup_threshold)
        if not -1.0 <= dup_threshold <= 1.0:
            raise ValueError(f"dup_threshold must be in [-1, 1] or None, got {dup_threshold}")
    provenance = dict(provenance or {})
    limits = _check_caps(caps, provenance)
    codes = {key: _group_codes(key, provenance[key], n) for key in limits}
    return _greedy_mmr(rel, e, codes, limits, k, lam, dup_threshold, relax_caps)


def diversify_checked(
    scores: np.ndarray, embs: np.ndarray, groups: Mapping[str, np.ndarray], k: int,
    lam: float, caps: Mapping[str, int | None] | None, dup_threshold: float | None, *,
    relax_caps: bool = False,
) -> Diversified:
    """:func:`diversify` for inputs the caller has already checked, e.g. the search
    pipeline's: finite float64 ``scores`` (K,), unit float32 ``embs`` (K, d) from the
    store or its index (checked when written), provenance as int64 :func:`group_codes`
    (K,) per key, ``k``, ``lam`` and ``dup_threshold`` in range (``SearchConfig`` and
    ``QueryOptions`` check them). Only the caps are checked against ``groups``; the
    result is :func:`diversify`'s on the same inputs, without re-checking 200 x d
    floats per query."""
    limits = _check_caps(caps, groups)
    return _greedy_mmr(scores, embs, dict(groups), limits, k, lam, dup_threshold, relax_caps)


def _greedy_mmr(rel: np.ndarray, e: np.ndarray, codes: dict[str, np.ndarray],
                limits: dict[str, int], k: int, lam: float, dup_threshold: float | None,
                relax_caps: bool) -> Diversified:
    """The greedy MMR selection of :func:`diversify` on checked inputs: ``rel`` float64
    (n,), ``e`` (n, d) unit rows, ``codes[key]`` int64 (n,) for each capped key."""
    n = rel.shape[0]
    counts = {key: np.zeros(int(codes[key].max(initial=-1)) + 1, dtype=np.int64)
              for key in limits}
    # cosines in float64, one row per pick: k rows of (K,), not the K x K Gram matrix
    # (200 x 200 x d multiply-adds per query, of which greedy MMR reads k rows)
    e64 = e.astype(np.float64)
    lam_rel, w = lam * rel, 1.0 - lam  # mmr = lam * rel - (1 - lam) * max_sim
    eligible = np.ones(n, dtype=bool)
    max_sim = np.zeros(n)  # diversity term; replaced by the first pick's cosines
    selected: list[int] = []
    mmr_values: list[float] = []
    relaxed: list[bool] = []
    skipped: dict[int, Skip] = {}

    def exclude(hit: np.ndarray, why: Skip) -> None:
        """Make the eligible candidates of mask ``hit`` ineligible, for ``why``."""
        hit &= eligible
        if hit.any():
            eligible[hit] = False
            for j in np.flatnonzero(hit).tolist():
                skipped[j] = why

    def pick(use_caps: bool) -> None:
        nonlocal max_sim
        while len(selected) < k and eligible.any():
            mmr = np.where(eligible, lam_rel - w * max_sim, -np.inf)
            i = int(np.argmax(mmr))  # first maximum: ties go to the lower index
            selected.append(i)
            mmr_values.append(float(mmr[i]))
            relaxed.append(not use_caps)
            eligible[i] = False
            skipped.pop(i, None)
            sims = e64 @ e64[i]  # (K,)
            max_sim = sims if len(selected) == 1 else np.maximum(max_sim, sims)
            if dup_threshold is not None:
                exclude(sims >= dup_threshold, Skip("near_duplicate", i))
            for key, cap in limits.items():
                g = codes[key][i]
                if g < 0:
                    continue
                counts[key][g] += 1
                if use_caps and counts[key][g] >= cap:
                    exclude(codes[key] == g, Skip(f"cap:{key}", i))

    pick(use_caps=True)
    if relax_caps and len(selected) < k:
        chosen = np.array(selected, dtype=np.int64)
        for j, s in list(skipped.items()):
            if not s.reason.startswith("cap:"):
                continue
            # it was ineligible while later picks were made: check it against all of them
            sims = e64[chosen] @ e64[j]
            if dup_threshold is not None and sims.max() >= dup_threshold:
                skipped[j] = Skip("near_duplicate", int(chosen[np.argmax(sims)]))
            else:
                eligible[j] = True
        pick(use_caps=False)
    return Diversified(np.array(selected, dtype=np.int64), np.array(mmr_values),
                       np.array(relaxed, dtype=bool), skipped)
