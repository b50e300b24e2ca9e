"""The query pipeline: filter → ANN top-K' → region rerank → diversify → explain.

``SearchPipeline`` ties the pure stages (rerank.py, diversify.py, explain.py) to the
``Catalog`` (one ANN index per collection) and the ``Store`` (metadata, provenance,
embeddings; the truth):

1. *filter*: metadata filters become the ``allowed`` row keys of the ANN search
   (``Store.filter_row_keys``); nothing is over-fetched and filtered afterwards.
2. *ann*: exact or approximate top-K' by cosine in the collection's index.
3. *fetch*: the candidates' ids, provenance and embeddings (full records are read for
   the final hits only); row keys the index still holds but the store no longer does
   (deleted, not yet caught up) are dropped and counted as ``stale``. The ids and
   provenance come from the reader's ``RowCache`` (kept in step with the store's
   changelog, so no per-candidate store read once warm), the vectors from the index's
   exact copies (flat, HNSW) for rows it has caught up with, and the hits' records from
   the reader's record cache at the rows' seqs; otherwise (IVF-PQ, Milvus, a candidate
   written after the index's seq) from one store read.
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

Every per-call choice (k, filters, diversify, explain, the MMR weight, K') arrives as a
``QueryOptions`` argument (query.py); the pipeline's ``SearchConfig`` only gives their
defaults, so one pipeline serves every MMR weight and nothing is cached per option.
Stages hand each other named records (stages.py). A batch of queries runs in two steps,
which a server may put on different threads:
``ann`` (filter + ANN, once for the batch, under the index's lock) and ``finish`` (the
rest: once the caches are warm, a batch whose index holds exact vectors reads only the
changelog's last seq; otherwise at most ONE store read per batch for the candidates, one
for their region children (through the ``RowCache`` too) and one for the hits' records,
and when every candidate is a hit (K' = k, the plain search) the candidates' read brings
their records too). What does not depend on the query is done
once per batch: the candidates' provenance group codes, the region embedding each
candidate stands for (``RegionTable``). The explanations of all hits of a batch are
scored together (one concept scoring of the queries, one of the hits), so their cost
follows the hits explained. ``search`` is ``ann`` then ``finish``.

Per-stage wall times (seconds) come back in ``SearchResult.timings``; the filter, ANN,
store-read and explain stages of a batch run once, and each result reports the batch's
time for them.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from .diversify import calibrate_dup_threshold, diversify_checked, pairwise_cosine_quantile
from .explain import ConceptBank, explain_pairs
from .query import QueryOptions, RegionQuery, SearchConfig, SearchFilters
from .rerank import mix_region_scores, region_similarity
from .stages import (AnnBatch, CandidateTable, Hit, QueryCandidates, Ranking, RegionStage,
                     RegionTable, SearchResult, region_embeddings, resolve_region_vectors,
                     search_result)

if TYPE_CHECKING:  # annotations only: importing the catalog imports faiss
    from medseek.index.catalog import Catalog
    from medseek.index.store import Store

__all__ = ["AnnBatch", "Hit", "QueryOptions", "RegionQuery", "SearchConfig", "SearchFilters",
           "SearchPipeline", "SearchResult"]

STAGES = ("filter", "ann", "fetch", "rerank", "diversify", "explain", "total")


def _options(options: QueryOptions | None, **given) -> QueryOptions:
    """``options``, or the options spelled as keyword arguments (not both)."""
    if options is None:
        return QueryOptions(**{k: v for k, v in given.items() if v is not None})
    spelled = [k for k, v in given.items() if v is not None]
    if spelled:
        raise TypeError(f"give options or {', '.join(spelled)}, not both")
    return options


class SearchPipeline:
    """The query pipeline over a catalog and its store (module docstring).

    Parameters
    ----------
    catalog : Catalog
        Opened catalog of ``store``.
    store : Store
    config : SearchConfig
        Standing configuration; the defaults of every ``QueryOptions``.
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
        self.reader = store.reader()
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
        diversify: bool | None = None, explain: bool | None = None, *,
        options: QueryOptions | None = None,
    ) -> SearchResult | list[SearchResult]:
        """Search ``collection`` for the query embedding(s).

        Parameters
        ----------
        collection : str
        query_emb : np.ndarray, float32, shape (d,) or (q, d)
            L2-normalised query embedding(s) in the collection's space.
        k, filters, diversify, explain : optional
            Shorthand for the ``QueryOptions`` fields of those names (not with ``options``).
        region : RegionQuery, optional
            Enables the region rerank.
        options : QueryOptions, optional
            The per-call choices (default ``QueryOptions()``: the config's defaults,
            diversified and explained).

        Returns
        -------
        SearchResult for a (d,) query, list of SearchResult for (q, d).
        """
        options = _options(options, k=k, filters=filters, diversify=diversify, explain=explain)
        single = isinstance(query_emb, np.ndarray) and query_emb.ndim == 1
        queries = np.ascontiguousarray(query_emb[None, :] if single else query_emb)
        if region is not None and region.embedding.ndim == 2 and (
                single or region.embedding.shape[0] != queries.shape[0]):
            raise ValueError(f"region.embedding must have one row per query ({queries.shape[0]}), "
                             f"got shape {region.embedding.shape}")
        results = self.finish(self.ann(collection, queries, options=options), region)
        return results[0] if single else results

    def ann(self, collection: str, queries: np.ndarray, k: int | None = None,
            filters: SearchFilters | None = None, *,
            options: QueryOptions | None = None) -> AnnBatch:
        """The filter and ANN stages of ``search`` for a (q, d) batch: top-K' row keys.

        An index that applies metadata filters itself (``supports_filters``: Milvus, whose
        rows carry the metadata) gets ``filters``; any other (FAISS) gets the store's
        matching row keys as ``allowed``."""
        opts = _options(options, k=k, filters=filters).resolve(self.config)
        queries = np.ascontiguousarray(queries)
        filters = opts.filters
        t = time.perf_counter()
        native = not filters.is_empty() and getattr(self.catalog.index(collection),
                                                     "supports_filters", False)
        allowed = None if filters.is_empty() or native else self.store.filter_row_keys(
            collection, **filters.as_kwargs())
        t_filter = time.perf_counter() - t
        t = time.perf_counter()
        scores, keys = self.catalog.search(collection, queries, opts.k_prime, allowed,
                                           **({"filters": filters} if native else {}))  # (q, K')
        t_ann = time.perf_counter() - t
        return AnnBatch(collection, queries, opts, scores, keys,
                        {"filter": t_filter, "ann": t_ann})

    def finish(self, batch: AnnBatch, region: RegionQuery | None = None,
               diversify: bool | None = None, explain: bool | None = None) -> list[SearchResult]:
        """The stages after the ANN for every query of ``batch`` (see ``search``), with the
        batch's options; ``diversify``/``explain`` override them when given."""
        t_start = time.perf_counter()
        changed = {k: v for k, v in (("diversify", diversify), ("explain", explain))
                   if v is not None}
        opts = replace(batch.options, **changed) if changed else batch.options
        collection, queries = batch.collection, batch.queries
        n_q = queries.shape[0]
        if region is not None and region.embedding.ndim == 2 and region.embedding.shape[0] != n_q:
            raise ValueError(f"region.embedding must have one row per query ({n_q}), "
                             f"got shape {region.embedding.shape}")
        timings = [dict.fromkeys(STAGES, 0.0) for _ in range(n_q)]
        # fetch: the candidates of every query through the reader's row cache, their
        # vectors from the index where it holds them exactly (no store read once warm);
        # else one store read, which with K' <= k (every live candidate is a hit) brings
        # the records the hits need too
        t = time.perf_counter()
        valid = batch.keys >= 0
        records = None
        keys = np.unique(batch.keys[valid])  # sorted by row key
        # an index scoring from compressed codes (IVF-PQ, Milvus PQ/SQ) is re-scored exactly
        # from the store's vectors, which the candidates carry anyway
        rescore = not getattr(self.catalog.index(collection), "scores_exact", True)
        cands = None if rescore else self.reader.cached_candidates(
            keys, functools.partial(self.catalog.stored_vectors, collection))
        if cands is None and opts.k_prime <= opts.k:
            cands, records = self.reader.candidate_items(keys)
        elif cands is None:
            cands = self.reader.candidates(keys)
        table = CandidateTable.of(cands, collection, groups=opts.diversify)
        per_query = [table.query(batch.keys[qi][valid[qi]], batch.scores[qi][valid[qi]],
                                 queries[qi] if rescore else None)
                     for qi in range(n_q)]
        shared_fetch = time.perf_counter() - t
        # rerank: one read for the region (and chunk) children of every live candidate
        t = time.perf_counter()
        stages: list[RegionStage | None] = [None] * n_q
        if region is not None:
            parents = list(dict.fromkeys(i for c in per_query if c is not None for i in c.ids))
            colls = (self.config.region_collection, self.config.chunk_collection)
            resolved = self.reader.per_parent(("region_vectors", region.name, *colls), colls,
                                              parents, functools.partial(
                                                  self._region_vectors, region.name))
            e = region.embedding
            regions_table = RegionTable.of(region.name, table.cands.ids, resolved)
            stages = [RegionStage(region.name, e if e.ndim == 1 else e[qi], regions_table)
                      for qi in range(n_q)]
        shared_rerank = time.perf_counter() - t
        t = time.perf_counter()
        dup = self.dup_threshold(collection) if opts.diversify else None  # cached: cheap
        shared_diversify = time.perf_counter() - t
        ranked = [None if per_query[qi] is None else
                  self._rank(per_query[qi], opts, stages[qi], dup, timings[qi])
                  for qi in range(n_q)]
        t = time.perf_counter()
        bank = self.collection_concepts.get(collection, self.concepts)
        explanations = self._explain(per_query, ranked, queries, opts, bank)
        shared_explain = time.perf_counter() - t
        if records is None:  # the hits' full records: cached, or one read for the batch
            t = time.perf_counter()
            wanted = [c.batch_rows[r.picks] for c, r in zip(per_query, ranked) if r is not None]
            rows = np.unique(np.concatenate(wanted)) if wanted else np.empty(0, np.int64)
            if cands.seqs is not None:  # as of the candidates' read
                records = self.reader.records_at(cands.row_keys[rows], cands.seqs[rows])
            else:
                found = self.reader.items(cands.row_keys[rows])
                records = {it.row_key: it.record for it in found if it is not None}
            shared_fetch += time.perf_counter() - t
        results = []
        for qi in range(n_q):
            tm = timings[qi]
            tm.update(batch.timings)
            tm["fetch"] += shared_fetch
            tm["rerank"] += shared_rerank if region is not None else 0.0
            tm["diversify"] += shared_diversify
            tm["explain"] = shared_explain
            tm["total"] = batch.timings["filter"] + batch.timings["ann"] + (
                time.perf_counter() - t_start)
            if per_query[qi] is None:  # no live candidate: every valid key was stale
                results.append(SearchResult([], tm, 0, stale=int(valid[qi].sum()),
                                            dup_threshold=dup))
                continue
            results.append(search_result(per_query[qi], ranked[qi], explanations[qi], region,
                                         records, tm, dup))
        return results

    def _region_vectors(self, name: str, parents: list[str]) -> dict:
        """``resolve_region_vectors`` of ``parents``: their region children of ``name``
        and, for those with a z-range, the parent's chunks."""
        regions = self.reader.children(parents, self.config.region_collection, name,
                                       cached=True)
        with_z = [pid for pid, rows in regions.items() if any(r.z_range is not None
                                                              for r in rows)]
        chunks = (self.reader.children(with_z, self.config.chunk_collection, cached=True)
                  if with_z else {})
        return resolve_region_vectors(name, regions, chunks)

    def _explain(self, per_query: list[QueryCandidates | None], ranked: list[Ranking | None],
                 queries: np.ndarray, opts: QueryOptions, bank: ConceptBank | None) -> list:
        """Per query, the explanation of each of its hits (None each without ``opts.explain``
        or a bank): every hit of the batch is scored in one ``bank.scores`` call and
        explained in one ``explain_pairs`` call, each against its own query's scores."""
        out: list = [None if r is None else [None] * r.picks.size for r in ranked]
        owners = [qi for qi, r in enumerate(ranked) if r is not None and r.picks.size]
        if not opts.explain or bank is None or not owners:
            return out
        counts = [ranked[qi].picks.size for qi in owners]
        hit_scores = bank.scores(np.concatenate(
            [per_query[qi].embeddings[ranked[qi].picks] for qi in owners]))  # (H, C)
        query_scores = np.repeat(bank.scores(queries[owners]), counts, axis=0)  # (H, C)
        pairs = explain_pairs(query_scores, hit_scores, bank.names, self.config.explain_top)
        start = 0
        for qi, n in zip(owners, counts):
            out[qi] = pairs[start:start + n]
            start += n
        return out

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
        with self._dup_lock:  # finish runs on several threads
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
    def _rank(self, c: QueryCandidates, opts: QueryOptions, region: RegionStage | None,
              dup_threshold: float | None, timings: dict[str, float]) -> Ranking:
        """Rerank and diversify one query's candidates (``opts`` resolved)."""
        cfg, n = self.config, len(c.ids)
        t = time.perf_counter()
        ranked = c.global_scores
        region_sims = np.full(n, np.nan)
        region_ids: list[str | None] = [None] * n
        if region is not None:
            region_embs, region_ids = region_embeddings(c.batch_rows, region)
            region_sims = region_similarity(region.embedding, region_embs)
            ranked = mix_region_scores(region_sims, c.global_scores, cfg.rerank_alpha,
                                       cfg.missing_region_penalty)
        order = np.argsort(-ranked, kind="stable")  # ties keep the first-stage order
        timings["rerank"] = time.perf_counter() - t

        t = time.perf_counter()
        k = opts.k
        skipped: list[tuple[str, str]] = []
        relaxed = np.zeros(min(k, order.size), dtype=bool)
        shortfall = 0
        if opts.diversify:
            # checked already: unit vectors of the store or index, finite scores, the
            # options by QueryOptions
            div = diversify_checked(
                ranked[order], c.embeddings[order],
                {key: codes[order] for key, codes in c.groups.items()}, k, opts.mmr_lambda,
                cfg.caps, dup_threshold, relax_caps=cfg.relax_caps)
            picks, relaxed = order[div.selected], div.relaxed
            for j, why in sorted(div.skipped.items()):
                skipped.append((c.ids[order[j]], f"{why.reason} of {c.ids[order[why.by]]}"))
            if picks.size < k:
                n_dup = sum(why.reason == "near_duplicate" for why in div.skipped.values())
                shortfall = min(k - int(picks.size), n_dup)
        else:
            picks = order[:k]
        timings["diversify"] = time.perf_counter() - t
        return Ranking(picks, ranked, region_sims, region_ids, relaxed, skipped, shortfall)
