"""What a search asks for: the pipeline's configuration, and per call the typed query.

- ``SearchConfig``: the pipeline's standing configuration (K', caps, thresholds, ...).
- ``QueryOptions``: the per-call choices of one search (k, filters, diversify, explain,
  mmr_lambda, K'); None fields take ``SearchConfig``'s value (``QueryOptions.resolve``).
  Options are hashable, so requests with equal options share a micro-batch.
- ``SearchQuery``: a whole request before it is embedded (the query's kind and content,
  collection, options, region), as the server builds it from a ``SearchRequest``.
- ``RegionQuery``: the embedded region of a query, for the region rerank.

Invalid values raise ``InvalidQuery`` (a ``ValueError``) whose ``field`` names the
request field, e.g. ``"mmr_lambda: must be in [0, 1], got 1.5"``.

z-ranges are half-open everywhere on the serving side, as in training and the corpus
manifests: ``(z0, z1)`` covers slices ``z0 <= z < z1`` (``z1`` exclusive), so a range's
length is ``z1 - z0`` and a non-empty one has ``z0 < z1``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ._checks import (as_float_array, check_count, check_finite_float, check_unit_interval,
                      check_unit_rows)
from .diversify import DEFAULT_CAPS
from .rerank import MISSING_PENALTY

__all__ = ["MAX_K", "PROVENANCE_FIELDS", "QUERY_KINDS", "Box", "InvalidQuery", "QueryOptions",
           "RegionQuery", "RegionSpec", "SearchConfig", "SearchFilters", "SearchQuery",
           "check_k", "check_kind"]

#: Most hits one query may ask for.
MAX_K = 1000
#: What a query can be: text, image bytes, volume bytes, or a stored item's id.
QUERY_KINDS = ("text", "image", "volume", "item_id")

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


class InvalidQuery(ValueError):
    """A query field with a bad value; ``field`` names it as the request spells it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def check_kind(kind: object) -> str:
    """``kind`` if it is one of ``QUERY_KINDS``, else ``InvalidQuery`` on "query"."""
    if kind not in QUERY_KINDS:
        raise InvalidQuery("query", "one of text, image, volume or item_id is required")
    return kind


def check_k(k: int | None) -> None:
    """A request's k: None (the default) or in [1, MAX_K]."""
    if k is not None and not 1 <= k <= MAX_K:
        raise InvalidQuery("k", f"must be in [1, {MAX_K}], got {k}")


@dataclass(frozen=True)
class QueryOptions:
    """The per-call choices of one search (module docstring).

    Attributes
    ----------
    k : int >= 1, optional
        Hits wanted (default ``SearchConfig.k``); a request's is at most ``MAX_K``.
    filters : SearchFilters
        Metadata filters (sequences as tuples keep the options hashable).
    diversify : bool
        MMR + provenance caps + near-duplicate removal; False keeps the (reranked) top k.
    explain : bool
        Attach concept explanations (the pipeline needs a ``ConceptBank``).
    mmr_lambda : float in [0, 1], optional
        MMR weight of relevance (default ``SearchConfig.lam``).
    k_prime : int >= 1, optional
        Candidates taken from the ANN index (default ``SearchConfig.k_prime``); grown to k.
    """

    k: int | None = None
    filters: SearchFilters = field(default_factory=SearchFilters)
    diversify: bool = True
    explain: bool = True
    mmr_lambda: float | None = None
    k_prime: int | None = None

    def __post_init__(self) -> None:
        for name in ("k", "k_prime"):  # a request's k is capped by SearchQuery (MAX_K)
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise InvalidQuery(name, f"must be an int, got {value!r}")
            if value < 1:
                raise InvalidQuery(name, f"must be >= 1, got {value}")
            object.__setattr__(self, name, int(value))
        if self.mmr_lambda is not None:
            lam = self.mmr_lambda
            if isinstance(lam, bool) or not isinstance(lam, (int, float, np.integer, np.floating)):
                raise InvalidQuery("mmr_lambda", f"must be a float in [0, 1], got {lam!r}")
            if not (math.isfinite(float(lam)) and 0.0 <= float(lam) <= 1.0):
                raise InvalidQuery("mmr_lambda", f"must be in [0, 1], got {float(lam)}")
            object.__setattr__(self, "mmr_lambda", float(lam))
        if not isinstance(self.filters, SearchFilters):
            raise InvalidQuery("filters", f"must be a SearchFilters, got "
                                          f"{type(self.filters).__name__}")
        for name in ("diversify", "explain"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InvalidQuery(name, f"must be a bool, got {getattr(self, name)!r}")

    def resolve(self, config: SearchConfig) -> QueryOptions:
        """These options with every None filled from ``config`` (``k_prime >= k``)."""
        k = config.k if self.k is None else self.k
        k_prime = max(config.k_prime if self.k_prime is None else self.k_prime, k)
        lam = config.lam if self.mmr_lambda is None else self.mmr_lambda
        return QueryOptions(k, self.filters, self.diversify, self.explain, lam, k_prime)


class Box(NamedTuple):
    """A pixel box ``(x0, y0, x1, y1)`` of the uploaded image."""

    x0: float
    y0: float
    x1: float
    y1: float


@dataclass(frozen=True)
class RegionSpec:
    """The region a query reranks by, before it is embedded.

    Attributes
    ----------
    name : str
        The region's name, as stored on region children.
    box : Box, optional
        Image queries: the region's box on the query image.
    z_range : (int, int), optional
        Volume queries: the organ's slices ``[z0, z1)`` of the volume as uploaded
        (``z1`` exclusive, module docstring).
    """

    name: str
    box: Box | None = None
    z_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidQuery("region.name", "must be non-empty")
        if self.z_range is not None:
            z0, z1 = (int(v) for v in self.z_range)
            if z0 >= z1:
                raise InvalidQuery("region.z_range", f"z_start {z0} must be before z_end {z1} "
                                                     "(slices [z_start, z_end), z_end exclusive)")
            object.__setattr__(self, "z_range", (z0, z1))


@dataclass(frozen=True)
class SearchQuery:
    """One search request before it is embedded.

    Attributes
    ----------
    kind : str
        One of ``QUERY_KINDS``.
    content : str or bytes
        The text, the image or volume bytes, or the stored item's id (never in repr).
    collection : str, optional
        Collection searched; None: the kind's default, or the stored item's.
    options : QueryOptions
        Its ``k``, when given, is at most ``MAX_K``.
    region : RegionSpec, optional
        Rerank by this region (a box, an organ's z-range, or a stored item's region).
    request_id : str
        Echoed in the answer.
    """

    kind: str | None
    content: str | bytes | memoryview = field(repr=False)  # a view: a large upload (serve.wire)
    collection: str | None = None
    options: QueryOptions = field(default_factory=QueryOptions)
    region: RegionSpec | None = None
    request_id: str = ""

    def __post_init__(self) -> None:
        check_kind(self.kind)
        if not isinstance(self.options, QueryOptions):
            raise InvalidQuery("options", f"must be a QueryOptions, got "
                                          f"{type(self.options).__name__}")
        check_k(self.options.k)
        if not isinstance(self.content, (str, bytes, memoryview)):
            raise InvalidQuery(self.kind, f"must be str, bytes or a memoryview, got "
                                          f"{type(self.content).__name__}")
