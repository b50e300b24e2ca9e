"""What the pipeline's stages hand each other, and what a search returns.

``AnnBatch`` (filter + ANN of a batch) -> ``QueryCandidates`` (one query's live
candidates, read from the store) -> ``Ranking`` (rerank and diversify of that query; the
batch's hits are explained together) -> ``SearchResult`` of ``Hit``. ``RegionStage`` is
what the region rerank of one query needs: its region embedding and the batch's
``RegionTable`` (the region embeddings of every candidate of the batch, resolved once).
``CandidateTable`` is a batch's candidates prepared once for all its queries, and
``search_result`` builds one query's ``SearchResult`` from its ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medseek.index.reader import Candidates, ChildRow
from medseek.index.records import ItemRecord

from .diversify import group_codes
from .explain import ConceptMatch
from .query import QueryOptions, RegionQuery
from .rerank import organ_embedding

__all__ = ["AnnBatch", "Hit", "QueryCandidates", "Ranking", "RegionStage", "RegionTable",
           "SearchResult", "region_embeddings"]


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
    groups : dict of str to np.ndarray, int64, shape (n,)
        "patient", "study", "document": the group code of each candidate's pseudonym
        (``diversify.group_codes``, coded once for the batch; -1: none), which is all the
        provenance caps need; the pseudonyms themselves stay in the store. Empty when the
        query is not diversified.
    row_keys : np.ndarray, int64, shape (n,)
    embeddings : np.ndarray, float32, shape (n, d)
    global_scores : np.ndarray, float64, shape (n,)
        First-stage cosines.
    batch_rows : np.ndarray, int64, shape (n,)
        Each candidate's position in the batch's read (what ``RegionTable`` indexes).
    stale : int
        Row keys of this query the store no longer holds in the collection.
    """

    ids: list[str]
    groups: dict[str, np.ndarray] = field(repr=False)
    row_keys: np.ndarray = field(repr=False)
    embeddings: np.ndarray = field(repr=False)
    global_scores: np.ndarray = field(repr=False)
    batch_rows: np.ndarray = field(repr=False)
    stale: int = 0


@dataclass(frozen=True)
class RegionTable:
    """The region embeddings of a batch's candidates, resolved once for the batch.

    Attributes
    ----------
    vectors : np.ndarray, float32, shape (m, d_r)
        The embedding each usable region child stands for (``child_vector``: its chunks'
        organ embedding, else its own); the same for every query of the batch. The rows
        of one candidate are contiguous, in the children's row-key order.
    child_ids : np.ndarray, object, shape (m,)
    starts, counts : np.ndarray, int64, shape (c,)
        Per candidate of the batch's read (its position there): its first row of
        ``vectors`` and how many it has (0: no usable region child).
    """

    vectors: np.ndarray = field(repr=False)
    child_ids: np.ndarray = field(repr=False)
    starts: np.ndarray = field(repr=False)
    counts: np.ndarray = field(repr=False)

    @classmethod
    def of(cls, name: str, parents: Sequence[str],
           resolved: dict[str, tuple[tuple[str, ...], np.ndarray]]) -> RegionTable:
        """From the batch's candidates (``parents``: their ids, in the batch read's order)
        and each one's resolved region children (``resolve_region_vectors``; parents
        without a usable child are absent)."""
        parts, child_ids = [], []
        starts = np.zeros(len(parents), dtype=np.int64)
        counts = np.zeros(len(parents), dtype=np.int64)
        for p, pid in enumerate(parents):
            got = resolved.get(pid)
            if got is not None:
                starts[p], counts[p] = len(child_ids), len(got[0])
                child_ids.extend(got[0])
                parts.append(got[1])
        dims = sorted({v.shape[1] for v in parts})
        if len(dims) > 1:
            raise ValueError(f"the region embeddings of {name!r} mix dims {dims}")
        vectors = np.concatenate(parts) if parts else np.empty((0, 0), np.float32)
        ids = np.empty(len(child_ids), dtype=object)
        ids[:] = child_ids
        return cls(vectors, ids, starts, counts)


def resolve_region_vectors(name: str, regions: dict[str, list[ChildRow]],
                           chunks: dict[str, list[ChildRow]]
                           ) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """Parent id -> (ids of its usable region children of ``name``, the (m, d) embeddings
    they stand for: ``child_vector``), from its region and chunk children (parent id ->
    children, as ``StoreReader.children`` reads them); parents without one are absent.
    It depends on the stored children only, so the pipeline keeps it per parent
    (``StoreReader.per_parent``) and ``RegionTable.of`` assembles a batch's from it."""
    out = {}
    for pid, kids in regions.items():
        usable = [(c.id, v) for c in kids
                  if (v := child_vector(c, chunks.get(pid, ()))) is not None]
        if usable:
            dims = sorted({v.shape[0] for _, v in usable})
            if len(dims) > 1:
                raise ValueError(f"the region embeddings of {name!r} mix dims {dims}")
            out[pid] = (tuple(i for i, _ in usable), np.stack([v for _, v in usable]))
    return out


@dataclass(frozen=True)
class RegionStage:
    """The region rerank of one query: its region and the batch's region table.

    Attributes
    ----------
    name : str
    embedding : np.ndarray, float32, shape (d_r,)
        This query's region embedding.
    table : RegionTable
        The region embeddings of the batch's candidates (read and resolved once).
    """

    name: str
    embedding: np.ndarray = field(repr=False)
    table: RegionTable = field(repr=False)


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


def region_embeddings(rows: np.ndarray, region: RegionStage
                      ) -> tuple[np.ndarray, list[str | None]]:
    """Best-matching region embedding of each candidate (NaN row if it has none), and the
    id of the region child it came from; several crops of one region: the best counts.

    ``rows`` (int (n,)): the candidates' positions in the batch's read, which index
    ``region.table``."""
    query, name, table = region.embedding, region.name, region.table
    d, n = query.shape[0], rows.shape[0]
    counts = table.counts[rows]  # usable children per candidate
    owners = np.repeat(np.arange(n), counts)  # candidate by candidate, in child order
    first = np.cumsum(counts) - counts
    kids = np.repeat(table.starts[rows] - first, counts) + np.arange(owners.size)
    out = np.full((n, d), np.nan, dtype=np.float32)
    matched = np.full(n, None, dtype=object)
    if kids.size:
        if table.vectors.shape[1] != d:
            raise ValueError(f"region.embedding has dim {d} but the region embeddings "
                             f"of {name!r} have dim {table.vectors.shape[1]}")
        stacked = table.vectors[kids]  # (m, d): every usable child of every candidate
        sims = stacked.astype(np.float64) @ query.astype(np.float64)  # (m,)
        # best child per candidate: the first of each owner in descending-cosine order
        # (stable, so equal cosines keep row-key order)
        by_sim = np.argsort(-sims, kind="stable")
        _, first_of = np.unique(owners[by_sim], return_index=True)
        best = by_sim[first_of]
        out[owners[best]] = stacked[best]
        matched[owners[best]] = table.child_ids[kids[best]]
    return out, matched.tolist()


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


@dataclass(frozen=True)
class CandidateTable:
    """A batch's candidates (one store read, sorted by row key) prepared once for every
    query of the batch: which are live in the searched collection, their ids, and the
    group codes of their provenance (equal within the batch, so caps compare them)."""

    cands: Candidates
    live: np.ndarray  # bool (n,): in the searched collection
    ids: np.ndarray  # object (n,)
    groups: dict[str, np.ndarray]  # key -> int64 (n,)

    @classmethod
    def of(cls, cands: Candidates, collection: str, groups: bool = True) -> CandidateTable:
        """``cands`` prepared for ``collection``'s queries; ``groups``: code the provenance
        (only diversification's caps need it)."""
        ids = np.empty(len(cands.ids), dtype=object)
        ids[:] = cands.ids
        live = np.fromiter((c == collection for c in cands.collections), bool,
                           len(cands.collections))
        coded = {} if not groups else cands.groups if cands.groups is not None else {
            key: group_codes(values) for key, values in cands.provenance.items()}
        return cls(cands, live, ids, coded)

    def query(self, keys: np.ndarray, scores: np.ndarray,
              rescore_with: np.ndarray | None = None) -> QueryCandidates | None:
        """One query's live candidates, in the ANN's order; None when none is live. With
        ``rescore_with`` (the query vector), the global scores are the exact cosines of the
        stored embeddings instead of the index's, and the candidates are put in their
        order."""
        found = self.cands.row_keys
        at = np.searchsorted(found, keys)
        hit = at < found.size
        hit[hit] = found[at[hit]] == keys[hit]
        rows = at[hit]  # rows of cands, in the ANN's order
        live = self.live[rows]
        stale = int(keys.size) - int(live.sum())
        if not live.any():
            return None
        rows = rows[live]
        global_scores = scores[np.flatnonzero(hit)[live]].astype(np.float64)  # (K',)
        embeddings = self.cands.embeddings
        if rescore_with is not None:
            global_scores = (embeddings[rows].astype(np.float64)
                             @ rescore_with.astype(np.float64))
            order = np.argsort(-global_scores, kind="stable")
            rows, global_scores = rows[order], global_scores[order]
        return QueryCandidates(
            ids=self.ids[rows].tolist(),
            groups={key: codes[rows] for key, codes in self.groups.items()},
            row_keys=found[rows], embeddings=embeddings[rows],
            global_scores=global_scores, batch_rows=rows, stale=stale)


def search_result(c: QueryCandidates, r: Ranking, explanations: list, region: RegionQuery | None,
          records: dict, timings: dict[str, float], dup_threshold: float | None) -> SearchResult:
    """The ``SearchResult`` of one ranked query, with the hits' records (``records``: by
    row key) and their ``explanations`` (one per pick)."""
    hits, stale = [], c.stale
    for n, i in enumerate(r.picks):
        record = records.get(int(c.row_keys[i]))
        if record is None:  # deleted between the two reads
            stale += 1
            continue
        has_region = not np.isnan(r.region_sims[i])
        hits.append(Hit(
            id=c.ids[i], row_key=int(c.row_keys[i]), score=float(r.scores[i]),
            global_score=float(c.global_scores[i]),
            region_score=float(r.region_sims[i]) if has_region else None,
            record=record,
            matched_region=region.name if region is not None and has_region else None,
            region_id=r.region_ids[i], explanation=explanations[n],
            relaxed=bool(r.relaxed[n])))
    return SearchResult(hits, timings, len(c.ids), r.skipped, stale, dup_threshold,
                        r.shortfall)
