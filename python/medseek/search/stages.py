"""What the pipeline's stages hand each other, and what a search returns.

``AnnBatch`` (filter + ANN of a batch) -> ``QueryCandidates`` (one query's live
candidates, read from the store) -> ``Ranking`` (rerank and diversify of that query; the
batch's hits are explained together) -> ``SearchResult`` of ``Hit``. ``RegionStage`` is
what the region rerank of one query needs: its region embedding and the batch's region
and chunk children.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medseek.index.reader import ChildRow
from medseek.index.records import ItemRecord

from .explain import ConceptMatch
from .query import QueryOptions
from .rerank import organ_embedding

__all__ = ["AnnBatch", "Hit", "QueryCandidates", "Ranking", "RegionStage", "SearchResult",
           "region_embeddings"]


@dataclass(frozen=True)
class Hit:
    """One search result.

    Attributes
    ----------
    id : str
    row_key : int
    score : float
        Final ranking score: the reranked score with a region query, else ``global_score``.
    global_score : float
        First-stage cosine.
    region_score : float or None
        Region cosine; None without a region query or when the hit lacks the region.
    record : ItemRecord
        Metadata and provenance; ``repr`` hides the patient and study pseudonyms.
    matched_region : str or None
        The region name when the hit had it.
    region_id : str or None
        Id of the region child that matched (the best-matching crop of that region).
    explanation : tuple of ConceptMatch, or None
        Shared concepts (None without a ``ConceptBank``).
    relaxed : bool
        Admitted only after the provenance caps were lifted.
    """

    id: str
    row_key: int
    score: float
    global_score: float
    region_score: float | None
    record: ItemRecord
    matched_region: str | None = None
    region_id: str | None = None
    explanation: tuple[ConceptMatch, ...] | None = None
    relaxed: bool = False

    @property
    def patient_pseudonym(self) -> str | None:
        return self.record.patient_pseudonym

    @property
    def study_pseudonym(self) -> str | None:
        return self.record.study_pseudonym

    @property
    def source_document(self) -> str | None:
        return self.record.source_document


@dataclass(frozen=True)
class SearchResult:
    """Hits of one query, what was skipped and why, and per-stage timings (seconds).

    Attributes
    ----------
    hits : list of Hit
    timings : dict of str to float
    candidates : int
        Live candidates ranked.
    skipped : list of (id, reason)
        Candidates diversification excluded, e.g. ``("b", "near_duplicate of a")``.
    stale : int
        Row keys the index returned that the store no longer holds.
    dup_threshold : float or None
        The near-duplicate threshold applied (configured floor, calibrated to the
        collection); None when no near-duplicate removal ran.
    near_duplicate_shortfall : int
        When fewer than k hits came back: how many of the missing ones the candidates
        dropped as near-duplicates of the hits account for (at most ``k - len(hits)``);
        0 when k hits came back or none was dropped as a near-duplicate.
    """

    hits: list[Hit]
    timings: dict[str, float]
    candidates: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stale: int = 0
    dup_threshold: float | None = None
    near_duplicate_shortfall: int = 0

    @property
    def notice(self) -> str | None:
        """Why fewer hits than asked for came back, when near-duplicates are the reason."""
        if not self.near_duplicate_shortfall:
            return None
        n_dup = sum(reason.startswith("near_duplicate") for _, reason in self.skipped)
        return (f"{len(self.hits)} hits, up to {self.near_duplicate_shortfall} fewer than "
                f"asked for: {n_dup} other candidates were near-duplicates (cosine >= "
                f"{self.dup_threshold:.4f}) of these hits")


@dataclass(frozen=True)
class AnnBatch:
    """What ``SearchPipeline.ann`` found for a batch of queries, for ``finish``.

    Attributes
    ----------
    collection : str
    queries : np.ndarray, float32, shape (q, d)
    options : QueryOptions
        The batch's options, resolved against the pipeline's config (no None left).
    scores : np.ndarray, float32, shape (q, K')
    keys : np.ndarray, int64, shape (q, K')
        Row keys, -1 where the index had fewer than K'.
    timings : dict of str to float
        "filter" and "ann" seconds of the batch.
    """

    collection: str
    queries: np.ndarray = field(repr=False)
    options: QueryOptions
    scores: np.ndarray = field(repr=False)
    keys: np.ndarray = field(repr=False)
    timings: dict[str, float]

    @property
    def k(self) -> int:
        """Hits wanted per query."""
        return self.options.k


@dataclass(frozen=True)
class QueryCandidates:
    """One query's live candidates, in the ANN's order.

    Attributes
    ----------
    ids : list of str, length n
    provenance : dict of str to list of (str or None)
        "patient", "study", "document" pseudonyms of each (never logged).
    row_keys : np.ndarray, int64, shape (n,)
    embeddings : np.ndarray, float32, shape (n, d)
    global_scores : np.ndarray, float64, shape (n,)
        First-stage cosines.
    stale : int
        Row keys of this query the store no longer holds in the collection.
    """

    ids: list[str]
    provenance: dict[str, list[str | None]] = field(repr=False)
    row_keys: np.ndarray = field(repr=False)
    embeddings: np.ndarray = field(repr=False)
    global_scores: np.ndarray = field(repr=False)
    stale: int = 0


@dataclass(frozen=True)
class RegionStage:
    """The region rerank of one query: its region and the batch's children.

    Attributes
    ----------
    name : str
    embedding : np.ndarray, float32, shape (d_r,)
        This query's region embedding.
    regions, chunks : dict of str to list of ChildRow
        Parent id -> its region children of ``name`` / its chunk children (read once for
        the batch; chunks only of parents whose region children have a z-range).
    """

    name: str
    embedding: np.ndarray = field(repr=False)
    regions: dict[str, list[ChildRow]] = field(repr=False)
    chunks: dict[str, list[ChildRow]] = field(repr=False)


@dataclass(frozen=True)
class Ranking:
    """Rerank and diversify of one query's ``QueryCandidates`` (the pipeline explains the
    picks of a whole batch together).

    Attributes
    ----------
    picks : np.ndarray, int, shape (h,)
        Positions (in the candidates) of the hits, best first.
    scores : np.ndarray, float64, shape (n,)
        Final score of every candidate (reranked, or the global one).
    region_sims : np.ndarray, float64, shape (n,)
        Region cosine of every candidate; NaN without one.
    region_ids : list of (str or None), length n
        Id of each candidate's best-matching region child.
    relaxed : np.ndarray, bool, shape (h,)
        Hits admitted only after the provenance caps were lifted.
    skipped : list of (id, reason)
    shortfall : int
        Missing hits the near-duplicates account for (``SearchResult``).
    """

    picks: np.ndarray
    scores: np.ndarray = field(repr=False)
    region_sims: np.ndarray = field(repr=False)
    region_ids: list[str | None] = field(repr=False)
    relaxed: np.ndarray = field(repr=False)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    shortfall: int = 0


def region_embeddings(ids: list[str], region: RegionStage) -> tuple[np.ndarray, list[str | None]]:
    """Best-matching region embedding of each candidate (NaN row if it has none), and the
    id of the region child it came from; several crops of one region: the best counts."""
    query, name = region.embedding, region.name
    d = query.shape[0]
    owners, vecs, child_ids = [], [], []
    for i, pid in enumerate(ids):
        for child in region.regions.get(pid, ()):
            vec = child_vector(child, region.chunks.get(pid, ()))
            if vec is None:
                continue
            if vec.shape != (d,):
                raise ValueError(f"region.embedding has dim {d} but the region embeddings "
                                 f"of {name!r} have dim {vec.shape[0]}")
            owners.append(i)
            vecs.append(vec)
            child_ids.append(child.id)
    out = np.full((len(ids), d), np.nan, dtype=np.float32)
    matched: list[str | None] = [None] * len(ids)
    if vecs:
        stacked = np.stack(vecs)  # (m, d): every usable child of every candidate
        sims = stacked.astype(np.float64) @ query.astype(np.float64)  # (m,)
        # best child per candidate: the first of each owner in descending-cosine order
        # (stable, so equal cosines keep row-key order)
        by_sim = np.argsort(-sims, kind="stable")
        owner_of = np.asarray(owners)[by_sim]
        _, first = np.unique(owner_of, return_index=True)
        for j in by_sim[first]:
            out[owners[j]] = stacked[j]
            matched[owners[j]] = child_ids[j]
    return out, matched


def child_vector(child: ChildRow, chunks: Sequence[ChildRow]) -> np.ndarray | None:
    """The embedding a region child stands for: its chunks' organ embedding, else its own."""
    if child.z_range is None or not chunks:
        return child.embedding
    usable = [c for c in chunks if c.z_range is not None and c.embedding is not None]
    if usable:
        vec = organ_embedding(np.stack([c.embedding for c in usable]),
                              np.array([c.z_range for c in usable], dtype=np.int64),
                              child.z_range)
        if vec is not None:
            return vec
    return child.embedding
