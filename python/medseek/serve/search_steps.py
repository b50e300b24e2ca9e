"""The two steps of a search micro-batch, as ``QueryService`` hands them to its batcher.

``run_batch`` runs on the index thread: the stored embeddings (and region children) of
the batch's ``item_id`` queries in one store read, then filter + ANN once per collection
searched (items of several collections share a batch when the queries name none).
``finish`` runs on a search thread while the next batch's ANN runs: store reads, rerank,
diversify, explain (``SearchPipeline.finish``), then each request's response message, so
the event loop only hands requests and answers to gRPC. A request whose item is unknown,
or lacks the region asked for, is answered with its own error; the others of its batch
go on.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from medseek.search import InvalidQuery, QueryOptions, RegionQuery
from medseek.search.stages import AnnBatch

from . import ingest as ing
from .errors import NotFound
from .messages import ItemMessages
from .v1 import retrieval_pb2 as pb

__all__ = ["BatchQuery", "Prepared", "SearchSteps"]


class BatchQuery(NamedTuple):
    """One request in the search batcher: an embedding made already (``vec``, with the
    region's embedding for a rerank), or a stored item's id, read in the batch step; and
    what its answer needs (the search thread builds the response message)."""

    vec: np.ndarray | None
    region_emb: np.ndarray | None
    item_id: str | None
    k: int  # hits answered
    exclude: str | None  # the stored query item, left out of its own hits
    request_id: str


class _Group(NamedTuple):
    """Requests of a micro-batch searched in one collection: their positions in the
    batch, the ANN output (None: nothing stored there yet) and their region embeddings."""

    positions: list[int]
    ann: AnnBatch | None
    region_embs: list


class Prepared(NamedTuple):
    """What the index thread hands the search thread: per-request errors (an unknown
    item id) and the searched groups."""

    size: int
    errors: dict
    groups: list[_Group]


class SearchSteps:
    """``run_batch`` and ``finish`` of the search batcher (module docstring).

    Parameters
    ----------
    config : ServeConfig
    store, catalog, pipeline : Store, Catalog (opened), SearchPipeline
    metrics : ServerMetrics
    """

    def __init__(self, config, store, catalog, pipeline, metrics) -> None:
        self.config, self.store, self.catalog = config, store, catalog
        self.pipeline, self.metrics = pipeline, metrics
        self.reader = store.reader()  # item lookups, on the index thread (own connection)
        self._seen_seq = 0  # shares_store: the store seq this index has caught up to
        self._stage_children: dict = {}  # stage name -> its child of metrics.stage
        self._items = ItemMessages()  # the hits' Item messages, built once per row version

    def close(self) -> None:
        self.reader.close()

    def stored_queries(self, item_ids: list[str], region_name: str | None) -> list:
        """Per id: its stored embedding, collection and region embedding of ``region_name``
        (None without one), or the error to answer (NOT_FOUND; INVALID_ARGUMENT for a
        missing region). One store read for the ids, one for their region children, on
        this thread's own read-only connection."""
        got = self.reader.vectors_by_ids(list(dict.fromkeys(item_ids)))
        kids = {}
        if region_name:
            kids = self.reader.children(list(got), self.config.search.region_collection,
                                        region_name)
        out: list = []
        for item_id in item_ids:
            item = got.get(item_id)
            if item is None:  # unknown, or stored without an embedding
                out.append(NotFound(f"item_id: no stored item {item_id!r}"))
                continue
            region_emb = None
            if region_name:
                usable = [r.embedding for r in kids.get(item_id, ()) if r.embedding is not None]
                if not usable:
                    out.append(ing.InvalidField("region.name", f"item {item_id!r} has no "
                                                               f"region {region_name!r}"))
                    continue
                region_emb = usable[0]
            out.append((item[1], item[0], region_emb))
        return out

    def run_batch(self, key, payloads: list[BatchQuery]) -> Prepared:
        """On the index thread: the item ids' stored embeddings, then filter + ANN of a
        micro-batch, one ANN per collection searched; ``finish`` does the rest on
        a search thread while the next micro-batch's ANN runs."""
        collection, options, region_name = key
        if self.config.shares_store:
            self.catch_up()
        errors: dict[int, Exception] = {}
        ready: dict[int, tuple[BatchQuery, str]] = {  # position -> (query, its collection)
            i: (p, collection) for i, p in enumerate(payloads) if p.item_id is None}
        asked = [i for i, p in enumerate(payloads) if p.item_id is not None]
        if asked:
            stored = self.stored_queries([payloads[i].item_id for i in asked], region_name)
            for i, got in zip(asked, stored):
                if isinstance(got, Exception):
                    errors[i] = got
                else:  # a collection the query names wins over the stored item's own
                    ready[i] = (payloads[i]._replace(vec=got[0], region_emb=got[2]),
                                collection or got[1])
        by_collection: dict[str, list[int]] = {}
        for i in sorted(ready):
            by_collection.setdefault(ready[i][1], []).append(i)
        groups = []
        for coll, positions in by_collection.items():
            try:
                ann = self._ann(coll, options, [ready[i][0].vec for i in positions])
            except Exception as exc:  # noqa: BLE001 - the answer of this group's requests
                errors.update(dict.fromkeys(positions, exc))
                continue
            groups.append(_Group(positions, ann, [ready[i][0].region_emb for i in positions]))
        return Prepared(len(payloads), errors, groups)

    def _ann(self, collection: str, options: QueryOptions, vecs: list[np.ndarray]):
        """Filter + ANN of ``vecs`` in ``collection``; None when it holds nothing yet."""
        try:
            self.catalog.index(collection)
        except ValueError:
            return None  # nothing stored in this collection yet
        queries = np.stack(vecs).astype(np.float32)
        try:
            return self.pipeline.ann(collection, queries, options=options)
        except InvalidQuery:
            raise
        except ValueError as exc:
            raise ing.InvalidField("query", str(exc)) from None

    def catch_up(self) -> None:
        """On the index thread, one of several processes (``ServeConfig.shares_store``):
        apply what the others wrote to the store since this process's index last looked (one ``last_seq`` read when
        nothing changed), so a write acknowledged anywhere is found by this search."""
        last = self.store.last_seq()
        if last > self._seen_seq:
            self.catalog.sync()  # new collections are built, the others caught up
            self._seen_seq = last

    def finish(self, key, payloads: list[BatchQuery], prepared: Prepared) -> list:
        """On a search thread: store reads, rerank, diversify, explain of a micro-batch,
        group by group; each request's response message, or the error it is answered
        with.

        The index only holds rows whose store write was committed (the catalog syncs
        after each commit, on the index thread), and the candidates and hits are read from
        the last committed state, so a row deleted before these reads is dropped (counted
        as stale), never returned."""
        results: list = [None] * prepared.size
        for i, exc in prepared.errors.items():
            results[i] = exc
        region_name = key[2]
        for group in prepared.groups:
            got: list = [None] * len(group.positions)  # None: nothing stored there yet
            if group.ann is not None:
                region = None
                if region_name is not None:
                    region = RegionQuery(region_name, np.stack(group.region_embs))
                try:
                    got = self.pipeline.finish(group.ann, region)
                except ValueError as exc:
                    got = [ing.InvalidField("query", str(exc))] * len(group.positions)
            for i, res in zip(group.positions, got):
                p = payloads[i]
                results[i] = res if isinstance(res, Exception) else self.response(
                    res, p.k, p.exclude, p.request_id)
        return results

    def response(self, result, k: int, exclude: str | None,
                  request_id: str) -> pb.SearchResponse:
        """The answer of one search (on a search thread: protobuf work off the event
        loop); ``result`` None: the collection holds nothing yet."""
        hits = [h for h in result.hits if h.id != exclude][:k] if result is not None else []
        resp = pb.SearchResponse(request_id=request_id,
                                 candidates=result.candidates if result is not None else 0)
        if result is not None and result.dup_threshold is not None:
            resp.dup_threshold = result.dup_threshold
            resp.near_duplicate_shortfall = result.near_duplicate_shortfall
            resp.notice = result.notice or ""
        items = self._items
        for h in hits:
            hit = resp.hits.add(id=h.id, score=h.score, global_score=h.global_score,
                                matched_region=h.matched_region or "",
                                region_id=h.region_id or "", item=items.get(h.record))
            if h.region_score is not None:
                hit.region_score = h.region_score
            for c in h.explanation or ():
                hit.concepts.add(name=c.concept, query_score=c.query_score,
                                 hit_score=c.hit_score, contribution=c.contribution)
        if result is not None:
            resp.timings_ms.update({stage: s * 1e3 for stage, s in result.timings.items()})
            for stage, seconds in result.timings.items():
                self._stage_metric(stage).observe(seconds)
        return resp

    def _stage_metric(self, stage: str):
        """The stage histogram's child of ``stage`` (``labels`` looked up once per stage,
        not once per query)."""
        child = self._stage_children.get(stage)
        if child is None:
            child = self._stage_children[stage] = self.metrics.stage.labels(stage)
        return child
