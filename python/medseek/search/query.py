"""What a search asks for: the pipeline's configuration, metadata filters, a region query."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ._checks import (as_float_array, check_count, check_finite_float, check_unit_interval,
                      check_unit_rows)
from .diversify import DEFAULT_CAPS
from .rerank import MISSING_PENALTY

__all__ = ["PROVENANCE_FIELDS", "RegionQuery", "SearchConfig", "SearchFilters"]

#: Provenance keys of the caps -> the ItemRecord field holding that pseudonym.
PROVENANCE_FIELDS: Mapping[str, str] = {
    "patient": "patient_pseudonym", "study": "study_pseudonym", "document": "source_document"}


@dataclass(frozen=True)
class SearchConfig:
    """How many candidates to consider and how to rerank and diversify them.

    Attributes
    ----------
    k_prime : int
        Candidates taken from the ANN index (the first stage's K').
    k : int
        Hits returned by default; ``k <= k_prime``.
    lam : float in [0, 1]
        MMR weight of relevance (1 = no diversity term).
    caps : mapping of str to (int or None)
        Most hits per provenance group; keys from ``PROVENANCE_FIELDS``.
    dup_threshold : float, optional
        Floor of the near-duplicate threshold: a candidate whose cosine to a hit is at or
        above the effective threshold is dropped. None: no near-duplicate removal.
    dup_quantile : float in (0, 1), optional
        Calibration of the threshold to the collection: effective threshold =
        ``max(dup_threshold, min(q, DUP_CEILING))`` with ``q`` this quantile of the
        collection's pairwise cosines (so a near-duplicate is also rarer than 1 in 1000
        pairs at 0.999). None: ``dup_threshold`` applies as is.
    dup_sample : int >= 2
        Stored vectors sampled (fixed seed) to estimate that quantile.
    dup_refresh : float >= 0
        The estimate is cached per collection and redone when the collection's size has
        changed by more than this fraction since.
    rerank_alpha : float in [0, 1]
        Weight of the region cosine in the reranked score.
    missing_region_penalty : float >= 0
        See ``medseek.search.rerank``.
    relax_caps : bool
        Fill slots the caps leave empty (see ``medseek.search.diversify``).
    region_collection, chunk_collection : str
        Collections holding region children and volume chunks.
    explain_top : int
        Most concepts per hit in the explanation.
    """

    k_prime: int = 200
    k: int = 10
    lam: float = 0.7
    caps: Mapping[str, int | None] = field(default_factory=lambda: dict(DEFAULT_CAPS))
    dup_threshold: float | None = 0.98
    dup_quantile: float | None = 0.999
    dup_sample: int = 1024
    dup_refresh: float = 0.1
    rerank_alpha: float = 0.5
    missing_region_penalty: float = MISSING_PENALTY
    relax_caps: bool = False
    region_collection: str = "region"
    chunk_collection: str = "chunk"
    explain_top: int = 3

    def __post_init__(self) -> None:
        check_count("k_prime", self.k_prime)
        check_count("k", self.k)
        if self.k > self.k_prime:
            raise ValueError(f"k must be <= k_prime ({self.k_prime}), got {self.k}")
        check_unit_interval("lam", self.lam)
        check_unit_interval("rerank_alpha", self.rerank_alpha)
        check_finite_float("missing_region_penalty", self.missing_region_penalty, 0.0)
        check_count("explain_top", self.explain_top)
        unknown = set(self.caps) - set(PROVENANCE_FIELDS)
        if unknown:
            raise ValueError(f"caps keys must be among {sorted(PROVENANCE_FIELDS)}, "
                             f"got {sorted(unknown)}")
        for key, cap in self.caps.items():
            if cap is not None:
                check_count(f"caps[{key!r}]", cap)
        object.__setattr__(self, "caps", dict(self.caps))  # a copy: the caller's dict may change
        if self.dup_threshold is not None:
            t = check_finite_float("dup_threshold", self.dup_threshold)
            if not -1.0 <= t <= 1.0:
                raise ValueError(f"dup_threshold must be in [-1, 1] or None, got {t}")
        if self.dup_quantile is not None:
            q = check_finite_float("dup_quantile", self.dup_quantile)
            if not 0.0 < q < 1.0:
                raise ValueError(f"dup_quantile must be in (0, 1) or None, got {q}")
        check_count("dup_sample", self.dup_sample, 2)
        check_finite_float("dup_refresh", self.dup_refresh, 0.0)


@dataclass(frozen=True)
class SearchFilters:
    """Metadata filters (``Store.filter_row_keys`` arguments); None = no filter."""

    modality: str | Sequence[str] | None = None
    body_part: str | Sequence[str] | None = None
    view: str | Sequence[str] | None = None
    labels_any: Sequence[str] | None = None
    exclude_patients: Sequence[str] | None = field(default=None, repr=False)
    exclude_studies: Sequence[str] | None = field(default=None, repr=False)

    def as_kwargs(self) -> dict:
        return {name: getattr(self, name) for name in (
            "modality", "body_part", "view", "labels_any", "exclude_patients", "exclude_studies")}

    def is_empty(self) -> bool:
        return all(v is None for v in self.as_kwargs().values())


@dataclass(frozen=True)
class RegionQuery:
    """The query's region for the second stage.

    Attributes
    ----------
    name : str
        Region name as stored on the region children, e.g. "distal_radius" or "liver".
    embedding : np.ndarray, float32, shape (d_r,) or (q, d_r)
        L2-normalised region embedding of the query (a crop, or for a volume
        ``organ_embedding`` of its chunks); one row per query of a batch, or a single
        (d_r,) embedding that serves every query of it.
    """

    name: str
    embedding: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty str, got {self.name!r}")
        e = self.embedding
        if not isinstance(e, np.ndarray) or e.ndim not in (1, 2):
            raise ValueError(f"embedding must be a (d,) or (q, d) array, got "
                             f"{getattr(e, 'shape', type(e).__name__)}")
        as_float_array("embedding", e, e.ndim)
        check_unit_rows("embedding", e.reshape(-1, e.shape[-1]))
