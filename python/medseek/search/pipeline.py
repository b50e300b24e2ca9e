"""The query pipeline: filter → ANN top-K' → region rerank → diversify → explain.

``SearchPipeline`` ties the pure stages (rerank.py, diversify.py, explain.py) to the
``Catalog`` (one ANN index per collection) and the ``Store`` (metadata, provenance,
embeddings; the truth):

1. *filter*: metadata filters become the ``allowed`` row keys of the ANN search
   (``Store.filter_row_keys``); nothing is over-fetched and filtered afterwards.
2. *ann*: exact or approximate top-K' by cosine in the collection's index.
3. *fetch*: the candidates' ids, provenance and embeddings from the store (full records
   are read for the final hits only); row keys the index still holds but the store no
   longer does (deleted, not yet caught up) are dropped and counted as ``stale``.
4. *rerank* (with a ``RegionQuery``): region children of the candidates (collection
   ``region_collection``, same ``parent_id``, same region name) give the region
   embedding; a region child with a ``z_range`` whose parent has chunk children
   (``chunk_collection``) gets the overlap-weighted organ embedding of those chunks
   instead; several crops of one region: the best-matching one counts.
5. *diversify*: greedy MMR with provenance caps and near-duplicate removal. The
   near-duplicate threshold is ``config.dup_threshold`` raised to a high quantile of the
   collection's pairwise cosines (``config.dup_quantile``), estimated from a fixed-seed
   sample of its stored vectors and cached per collection until its size changes by more
   than ``config.dup_refresh`` (``SearchPipeline.dup_threshold``). When fewer than k hits
   remain because the other candidates were near-duplicates of the hits, the result says
   so (``SearchResult.near_duplicate_shortfall``, ``notice``).
6. *explain*: shared concepts of query and hit, with a ``ConceptBank``.

A batch of queries runs in two steps, which a server may put on different threads:
``ann`` (filter + ANN, once for the batch, under the index's lock) and ``finish`` (the
rest, with ONE store read per batch for the candidates, one for their region children and
one for the hits' records). ``search`` is ``ann`` then ``finish``.

Per-stage wall times (seconds) come back in ``SearchResult.timings``; the filter, ANN and
store-read stages of a batch run once, and each result reports the batch's time for them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from medseek.index.records import ItemRecord

from ._checks import check_count
from .diversify import calibrate_dup_threshold, pairwise_cosine_quantile
from .diversify import diversify as diversify_candidates
from .explain import ConceptBank, ConceptMatch, explain as explain_hits
from .query import RegionQuery, SearchConfig, SearchFilters
from .rerank import mix_region_scores, organ_embedding, region_similarity
from .store_reads import ChildRow, StoreReader

if TYPE_CHECKING:  # annotations only: importing the catalog imports faiss
    from medseek.index.catalog import Catalog
    from medseek.index.store import Store

__all__ = ["AnnBatch", "Hit", "RegionQuery", "SearchConfig", "SearchFilters",
           "SearchPipeline", "SearchResult"]

STAGES = ("filter", "ann", "fetch", "rerank", "diversify", "explain", "total")


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
    k : int
        Hits wanted per query.
    scores : np.ndarray, float32, shape (q, K')
    keys : np.ndarray, int64, shape (q, K')
        Row keys, -1 where the index had fewer than K'.
    timings : dict of str to float
        "filter" and "ann" seconds of the batch.
    """

    collection: str
    queries: np.ndarray = field(repr=False)
    k: int
    scores: np.ndarray = field(repr=False)
    keys: np.ndarray = field(repr=False)
    timings: dict[str, float]


class SearchPipeline:
    """The query pipeline over a catalog and its store (module docstring).

    Parameters
    ----------
    catalog : Catalog
        Opened catalog of ``store``.
    store : Store
    config : SearchConfig
    concepts : ConceptBank, optional
        Enables explanations (its dim must equal the searched collection's).
    collection_concepts : mapping of str to ConceptBank, optional
        Banks of collections whose embeddings live in another space than ``concepts``
        (e.g. the hybrid report collection); they replace ``concepts`` there.
    """

    def __init__(self, catalog: Catalog, store: Store, config: SearchConfig = SearchConfig(),
                 concepts: ConceptBank | None = None,
                 collection_concepts: Mapping[str, ConceptBank] | None = None) -> None:
        if catalog.store.config.path.resolve() != store.config.path.resolve():
            raise ValueError("catalog must be built on the same store file as store")
        self.catalog, self.store, self.config, self.concepts = catalog, store, config, concepts
        self.collection_concepts = dict(collection_concepts or {})
        self.reader = StoreReader(store)
        # (collection, dup_quantile, dup_sample) -> (size when estimated, pair quantile)
        self._dup_cache: dict[tuple, tuple[int, float | None]] = {}
        self._dup_lock = threading.Lock()

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> SearchPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def search(
        self, collection: str, query_emb: np.ndarray, k: int | None = None,
        filters: SearchFilters | None = None, region: RegionQuery | None = None,
        diversify: bool = True, explain: bool = True,
    ) -> SearchResult | list[SearchResult]:
        """Search ``collection`` for the query embedding(s).

        Parameters
        ----------
        collection : str
        query_emb : np.ndarray, float32, shape (d,) or (q, d)
            L2-normalised query embedding(s) in the collection's space.
        k : int, optional
            Hits per query (default ``config.k``); ``k_prime`` grows to ``k`` if smaller.
        filters : SearchFilters, optional
        region : RegionQuery, optional
            Enables the region rerank.
        diversify : bool
            MMR + caps; False keeps the (reranked) top-k.
        explain : bool
            Attach concept explanations (needs ``concepts``).

        Returns
        -------
        SearchResult for a (d,) query, list of SearchResult for (q, d).
        """
        single = isinstance(query_emb, np.ndarray) and query_emb.ndim == 1
        queries = np.ascontiguousarray(query_emb[None, :] if single else query_emb)
        k = self.config.k if k is None else check_count("k", k)
        if region is not None and region.embedding.ndim == 2 and (
                single or region.embedding.shape[0] != queries.shape[0]):
            raise ValueError(f"region.embedding must have one row per query ({queries.shape[0]}), "
                             f"got shape {region.embedding.shape}")
        results = self.finish(self.ann(collection, queries, k, filters), region, diversify,
                              explain)
        return results[0] if single else results

    def ann(self, collection: str, queries: np.ndarray, k: int | None = None,
            filters: SearchFilters | None = None) -> AnnBatch:
        """The filter and ANN stages of ``search`` for a (q, d) batch: top-K' row keys."""
        queries = np.ascontiguousarray(queries)
        k = self.config.k if k is None else check_count("k", k)
        k_prime = max(self.config.k_prime, k)
        filters = filters or SearchFilters()
        t = time.perf_counter()
        allowed = None if filters.is_empty() else self.store.filter_row_keys(
            collection, **filters.as_kwargs())
        t_filter = time.perf_counter() - t
        t = time.perf_counter()
        scores, keys = self.catalog.search(collection, queries, k_prime, allowed)  # (q, K')
        t_ann = time.perf_counter() - t
        return AnnBatch(collection, queries, k, scores, keys,
                        {"filter": t_filter, "ann": t_ann})

    def finish(self, batch: AnnBatch, region: RegionQuery | None = None,
               diversify: bool = True, explain: bool = True) -> list[SearchResult]:
        """The stages after the ANN for every query of ``batch`` (see ``search``)."""
        t_start = time.perf_counter()
        collection, queries, k = batch.collection, batch.queries, batch.k
        n_q = queries.shape[0]
        if region is not None and region.embedding.ndim == 2 and region.embedding.shape[0] != n_q:
            raise ValueError(f"region.embedding must have one row per query ({n_q}), "
                             f"got shape {region.embedding.shape}")
        timings = [dict.fromkeys(STAGES, 0.0) for _ in range(n_q)]
        # fetch: one read for the candidates of every query
        t = time.perf_counter()
        valid = batch.keys >= 0
        cands = self.reader.candidates(np.unique(batch.keys[valid]))  # sorted by row key
        per_query = [self._query_candidates(cands, collection, batch.keys[qi][valid[qi]],
                                            batch.scores[qi][valid[qi]])
                     for qi in range(n_q)]
        shared_fetch = time.perf_counter() - t
        # rerank: one read for the region (and chunk) children of every live candidate
        t = time.perf_counter()
        regions = chunks = None
        if region is not None:
            parents = list(dict.fromkeys(i for c in per_query if c is not None for i in c[0]))
            regions = self.reader.children(parents, self.config.region_collection, region.name)
            with_z = [pid for pid, rows in regions.items()
                      if any(r.z_range is not None for r in rows)]
            chunks = self.reader.children(with_z, self.config.chunk_collection) if with_z else {}
        shared_rerank = time.perf_counter() - t
        t = time.perf_counter()
        dup = self.dup_threshold(collection) if diversify else None  # cached: cheap
        shared_diversify = time.perf_counter() - t
        bank = self.collection_concepts.get(collection, self.concepts)
        ranked = []
        for qi in range(n_q):
            region_vec = None
            if region is not None:
                e = region.embedding
                region_vec = e if e.ndim == 1 else e[qi]
            ranked.append(self._rank(per_query[qi], queries[qi], k, region, region_vec,
                                     regions, chunks, diversify, explain, timings[qi], dup,
                                     bank))
        # the hits' full records: one read for the batch
        t = time.perf_counter()
        wanted = [r[1] for r in ranked if r is not None]
        keys = np.concatenate(wanted) if wanted else np.empty(0, np.int64)
        found = self.reader.items(np.unique(keys))
        records = {it.row_key: it for it in found if it is not None}
        shared_fetch += time.perf_counter() - t
        results = []
        for qi in range(n_q):
            tm = timings[qi]
            tm.update(batch.timings)
            tm["fetch"] += shared_fetch
            tm["rerank"] += shared_rerank if region is not None else 0.0
            tm["diversify"] += shared_diversify
            tm["total"] = batch.timings["filter"] + batch.timings["ann"] + (
                time.perf_counter() - t_start)
            if per_query[qi] is None:  # no live candidate: every valid key was stale
                results.append(SearchResult([], tm, 0, stale=int(valid[qi].sum()),
                                            dup_threshold=dup))
                continue
            results.append(self._hits(per_query[qi], ranked[qi], region, records, tm, dup))
        return results

    def dup_threshold(self, collection: str) -> float | None:
        """The near-duplicate threshold diversification applies in ``collection``.

        ``max(config.dup_threshold, min(q, DUP_CEILING))``, ``q`` the ``config.dup_quantile``
        of the pairwise cosines of up to ``config.dup_sample`` of the collection's stored
        vectors (fixed-seed sample). ``q`` is cached per collection and estimated again
        only when the collection's size (its index's length) has changed by more than
        ``config.dup_refresh`` of the size it was estimated at. None when
        ``config.dup_threshold`` is None.
        """
        cfg = self.config
        if cfg.dup_threshold is None:
            return None
        if cfg.dup_quantile is None:
            return float(cfg.dup_threshold)
        try:
            size = len(self.catalog.index(collection))
        except ValueError:  # no index: the collection holds nothing yet
            return float(cfg.dup_threshold)
        key = (collection, cfg.dup_quantile, cfg.dup_sample)
        with self._dup_lock:  # shared by shallow copies of this pipeline
            got = self._dup_cache.get(key)
            if got is None or abs(size - got[0]) > cfg.dup_refresh * got[0]:
                got = (size, self._pair_quantile(collection, cfg.dup_quantile,
                                                 cfg.dup_sample))
                self._dup_cache[key] = got
        return calibrate_dup_threshold(cfg.dup_threshold, got[1])

    def _pair_quantile(self, collection: str, quantile: float, sample: int) -> float | None:
        """``quantile`` of the pairwise cosines of a fixed-seed sample of ``collection``'s
        stored vectors (the store's, which diversification compares too)."""
        keys = self.store.filter_row_keys(collection)
        if keys.size > sample:
            keys = np.sort(np.random.default_rng(0).choice(keys, sample, replace=False))
        return pairwise_cosine_quantile(self.reader.candidates(keys).embeddings, quantile)

    # -- one query, after the ANN stage ----------------------------------------------------
    @staticmethod
    def _query_candidates(cands, collection, keys, scores):
        """One query's live candidates out of the batch's read, in the ANN's order:
        (ids, prov, row_keys, embs, global_scores, stale), or None when none is live."""
        found = cands.row_keys
        at = np.searchsorted(found, keys)
        hit = at < found.size
        hit[hit] = found[at[hit]] == keys[hit]
        rows = at[hit]  # rows of cands, in the ANN's order
        live = np.fromiter((cands.collections[r] == collection for r in rows.tolist()),
                           dtype=bool, count=rows.size)
        stale = int(keys.size) - int(live.sum())
        if not live.any():
            return None
        rows = rows[live]
        rl = rows.tolist()
        ids = [cands.ids[r] for r in rl]
        prov = {key: [values[r] for r in rl] for key, values in cands.provenance.items()}
        global_scores = scores[np.flatnonzero(hit)[live]].astype(np.float64)  # (K',)
        return ids, prov, cands.row_keys[rows], cands.embeddings[rows], global_scores, stale

    def _rank(self, c, query, k, region, region_vec, regions, chunks, diversify, explain,
              timings, dup_threshold, bank):
        """Rerank, diversify, explain one query's candidates: (picks, their row keys,
        ranked, region_sims, region_ids, relaxed, explanations, skipped, near-duplicate
        shortfall), or None."""
        if c is None:
            return None
        ids, prov, row_keys, embs, global_scores, _ = c
        t = time.perf_counter()
        ranked = global_scores
        region_sims = np.full(len(ids), np.nan)
        region_ids: list[str | None] = [None] * len(ids)
        if region is not None:
            region_embs, region_ids = self._region_embeddings(ids, region.name, region_vec,
                                                              regions, chunks)
            region_sims = region_similarity(region_vec, region_embs)
            ranked = mix_region_scores(region_sims, global_scores, self.config.rerank_alpha,
                                       self.config.missing_region_penalty)
        order = np.argsort(-ranked, kind="stable")  # ties keep the first-stage order
        timings["rerank"] = time.perf_counter() - t

        t = time.perf_counter()
        skipped: list[tuple[str, str]] = []
        relaxed = np.zeros(min(k, order.size), dtype=bool)
        shortfall = 0
        if diversify:
            ordered_prov = {key: [prov[key][i] for i in order] for key in self.config.caps}
            div = diversify_candidates(
                ranked[order], embs[order], ordered_prov, k, self.config.lam, self.config.caps,
                dup_threshold, relax_caps=self.config.relax_caps)
            picks, relaxed = order[div.selected], div.relaxed
            for j, why in sorted(div.skipped.items()):
                skipped.append((ids[order[j]], f"{why.reason} of {ids[order[why.by]]}"))
            if picks.size < k:
                n_dup = sum(why.reason == "near_duplicate" for why in div.skipped.values())
                shortfall = min(k - int(picks.size), n_dup)
        else:
            picks = order[:k]
        timings["diversify"] = time.perf_counter() - t

        t = time.perf_counter()
        explanations: list = [None] * picks.size
        if explain and bank is not None and picks.size:
            explanations = explain_hits(bank.scores(query), bank.scores(embs[picks]),
                                        bank.names, self.config.explain_top)
        timings["explain"] = time.perf_counter() - t
        return (picks, row_keys[picks], ranked, region_sims, region_ids, relaxed,
                explanations, skipped, shortfall)

    @staticmethod
    def _hits(c, r, region, records, timings, dup_threshold) -> SearchResult:
        ids, _, row_keys, _, global_scores, stale = c
        (picks, _, ranked, region_sims, region_ids, relaxed, explanations, skipped,
         shortfall) = r
        hits = []
        for n, i in enumerate(picks):
            stored = records.get(int(row_keys[i]))
            if stored is None:  # deleted between the two reads
                stale += 1
                continue
            has_region = not np.isnan(region_sims[i])
            hits.append(Hit(
                id=ids[i], row_key=int(row_keys[i]), score=float(ranked[i]),
                global_score=float(global_scores[i]),
                region_score=float(region_sims[i]) if has_region else None,
                record=stored.record,
                matched_region=region.name if region is not None and has_region else None,
                region_id=region_ids[i], explanation=explanations[n], relaxed=bool(relaxed[n])))
        return SearchResult(hits, timings, len(ids), skipped, stale, dup_threshold, shortfall)

    def _region_embeddings(
        self, ids: list[str], name: str, query: np.ndarray, regions: dict, chunks: dict
    ) -> tuple[np.ndarray, list[str | None]]:
        """Best-matching region embedding of each candidate (NaN row if it has none);
        ``regions``/``chunks``: parent id -> its region/chunk children (read for the batch)."""
        d = query.shape[0]
        owners, vecs, child_ids = [], [], []
        for i, pid in enumerate(ids):
            for child in regions.get(pid, ()):
                vec = _child_vector(child, chunks.get(pid, ()))
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


def _child_vector(child: ChildRow, chunks: Sequence[ChildRow]) -> np.ndarray | None:
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
