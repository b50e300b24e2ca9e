"""The read side of the service: Search, Diagnose, Get and Stats.

A ``SearchRequest`` becomes a typed ``SearchQuery`` (``query_from_request``; a bad field
raises ``InvalidQuery`` naming it), its content is decoded and embedded (``Encoding``),
and the embedding is searched with the query's ``QueryOptions`` by the micro-batched
pipeline: the ANN of a micro-batch on the index thread, the rest (store reads, rerank,
diversify, explain) on a search thread while the next micro-batch's ANN runs. Requests
with equal collection, options and region name share a micro-batch; nothing is cached per
option. An ``item_id`` query goes to the batcher as its id: the batch step reads the
stored embeddings of all its item ids at once (``search_steps``), so a stored-item query
costs no thread hop of its own, and the search thread builds each response message.
z-ranges are half-open ``[z_start, z_end)`` (``medseek.search.query``).
In clinical mode a Search asking ``reidentify`` is authorised (``reident_caller``) before
any work, and its hits get their PACS origin after an audit line is written
(``reidentify``; ``medseek.serve.reident``).
"""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from medseek.search import Box, QueryOptions, RegionSpec, SearchFilters, SearchQuery
from medseek.search.diagnose import diagnose, vote_weights
from medseek.search.query import check_k, check_kind
from medseek.search.rerank import organ_embedding

from . import ingest as ing
from . import item_records
from . import regions as rp
from .auto_regions import AutoRegions, locate_query_region
from .batcher import MicroBatcher
from .encoding import Encoding, run_in
from .auth import caller_name
from .contrastive_service import contrastive_diagnosis
from .errors import FailedPrecondition, NotFound, PermissionDenied
from .messages import item_message
from .search_steps import BatchQuery, SearchSteps
from .reident import viewer_url
from .v1 import retrieval_pb2 as pb

#: default softmax temperature of the Diagnose vote (a cosine 0.1 higher weighs e times more)
DIAGNOSE_TEMPERATURE = 0.1
_FILTERS = ("modality", "body_part", "view", "labels_any", "exclude_patients",
            "exclude_studies")
_NO_FILTERS = SearchFilters()

def query_from_request(request) -> SearchQuery:
    """The typed query of a ``SearchRequest`` (or a ``DiagnoseRequest``'s query fields).

    ``k`` 0 and an unset ``mmr_lambda`` take the server's defaults. The region's box is
    kept for image and volume queries, its z-range for volume queries only (an item_id
    query's region is its stored region child of that name: box and z-range ignored).
    """
    kind = request.WhichOneof("query")
    check_kind(kind)
    check_k(request.k or None)
    filters = _NO_FILTERS  # most queries have none: no message walk, no new object
    if request.HasField("filters"):
        f = request.filters
        filters = SearchFilters(**{n: tuple(getattr(f, n)) or None for n in _FILTERS})
    options = QueryOptions(
        k=request.k or None, diversify=request.diversify,
        mmr_lambda=request.mmr_lambda if request.HasField("mmr_lambda") else None,
        filters=filters)
    region = None
    if request.HasField("region"):
        r = request.region
        box = Box(r.box.x0, r.box.y0, r.box.x1, r.box.y1) if (
            r.HasField("box") and kind in ("image", "volume")) else None
        z = (int(r.z_range.z_start), int(r.z_range.z_end)) if (
            r.HasField("z_range") and kind == "volume") else None
        region = RegionSpec(r.name, box, z)
    return SearchQuery(kind, getattr(request, kind), request.collection or None, options,
                       region, request.request_id)


class QueryService:
    """Search, Diagnose, Get and Stats over the store, the catalog and the pipeline.

    Parameters
    ----------
    config : ServeConfig
    encoding : Encoding
    store, catalog, pipeline : Store, Catalog (opened), SearchPipeline
    metrics : ServerMetrics
    index_pool : ThreadPoolExecutor
        The index thread (ANN searches, store writes, catalog syncs).
    reident, audit : ReidentMap, AuditLog, optional
        Clinical mode: the original UIDs of stored items, and the log of who saw them.
    """

    def __init__(self, config, encoding: Encoding, store, catalog, pipeline, metrics,
                 index_pool: ThreadPoolExecutor, reident=None, audit=None) -> None:
        self.config, self.encoding, self.store = config, encoding, store
        self.reident, self.audit = reident, audit
        self.catalog, self.pipeline, self.metrics = catalog, pipeline, metrics
        self.index_pool = index_pool
        self.auto_regions = AutoRegions() if getattr(config, "auto_regions", False) else None
        self.steps = SearchSteps(config, store, catalog, pipeline, metrics)
        # after the ANN: store reads, rerank, diversify, explain (own SQLite connections)
        self.search_pool = ThreadPoolExecutor(config.search_threads,
                                              thread_name_prefix="medseek-search")
        self.batcher = MicroBatcher(
            "search", self.steps.run_batch, config.search_batch, index_pool,
            metrics.on_batch, finish=self.steps.finish, finish_executor=self.search_pool,
            max_finishing=config.search_threads + 1)

    async def close(self) -> None:
        await self.batcher.close()
        self.search_pool.shutdown(wait=True)
        self.steps.close()

    # -- Search ---------------------------------------------------------------------------
    async def search(self, query: SearchQuery) -> pb.SearchResponse:
        k = query.options.k or self.config.search.k
        kind, region = query.kind, query.region
        collection, item_id = query.collection, None
        if kind == "item_id":  # its embedding is read in the batch step (SearchSteps)
            vec = region_emb = None
            item_id = query.content
        else:
            if region is not None and kind == "volume":
                self._check_organ_region(region)  # before the work of decoding
            dec = await self.encoding.decode(kind, query.content, kind)
            collection = collection or ing.DEFAULT_COLLECTION[kind]
            route = self.encoding.route(kind, collection, kind)
            if region is not None and kind == "volume":
                vec, region_emb = await self._volume_organ_query(dec, region)
            elif region is not None:
                if kind == "image":  # a name without a box: the localiser's (auto_regions)
                    region = await locate_query_region(self.auto_regions, dec.pixels, region)
                if kind != "image" or region.box is None:
                    raise ing.InvalidField("region.box", "a region rerank needs an image query "
                                                         "with a box, a volume query with a "
                                                         "z_range, or an item_id query")
                vec, region_emb = await self._image_region_query(dec, region.box)
            else:
                vec = await self.encoding.encode(route, kind, dec.payload)
                region_emb = None
        if collection is not None and collection not in self.store.config.collections:
            raise ing.InvalidField("collection", f"must be one of "
                                   f"{self.store.config.collections}, got {collection!r}")
        wanted = k + (item_id is not None)  # the item itself is dropped from its own hits
        # without rerank or diversification the top k are final: fetching K' is wasted work
        k_prime = None if region is not None or query.options.diversify else wanted
        options = replace(query.options, k=wanted, k_prime=k_prime)
        key = (collection, options, region.name if region else None)
        return await self.batcher.submit(key, BatchQuery(
            vec, region_emb, item_id, k, item_id, query.request_id))

    async def search_embedding(self, vec: np.ndarray, collection: str, options: QueryOptions,
                               exclude: str | None, request_id: str) -> pb.SearchResponse:
        """The plain top ``options.k`` of an embedding already made (Draft needs the query
        vector itself too), ``exclude`` (a stored query item) left out."""
        k = options.k or self.config.search.k
        wanted = k + (exclude is not None)
        options = replace(options, k=wanted, k_prime=wanted, diversify=False)
        return await self.batcher.submit((collection, options, None), BatchQuery(
            vec, None, None, k, exclude, request_id))

    def stored_embedding(self, item_id: str) -> tuple[np.ndarray, str]:
        """A stored item's embedding and collection (NOT_FOUND when it has none)."""
        got = self.steps.stored_queries([item_id], None)[0]
        if isinstance(got, Exception):
            raise got
        return got[0], got[1]

    # -- clinical re-identification -------------------------------------------------------
    def reident_caller(self, metadata) -> str:
        """The name of the caller allowed to re-identify, checked before a search runs:
        FAILED_PRECONDITION in research mode, PERMISSION_DENIED for a token without the
        role (the caller's name is not known then; nothing is logged)."""
        if self.config.pacs_mode != "clinical" or self.reident is None:
            raise FailedPrecondition("reidentify: the server is in pacs_mode 'research': it "
                                     "keeps no original UIDs")
        name = caller_name(metadata, self.config.reident_tokens)
        if name is None:
            raise PermissionDenied("reidentify: this caller's token has no re-identification "
                                   "role (ServeConfig.reident_tokens)")
        return name

    async def reidentify(self, resp: pb.SearchResponse, caller: str, rpc: str) -> None:
        """Set each hit's ``origin`` (a region or chunk hit: its parent's), after the
        audit line naming ``caller`` and the studies shown is on disk."""
        def work() -> None:
            keys = {h.id: h.item.parent_id or h.id for h in resp.hits}
            found = self.reident.lookup(sorted(set(keys.values())))
            shown = [(h, found[keys[h.id]]) for h in resp.hits if keys[h.id] in found]
            self.audit.write(caller, rpc, resp.request_id,
                             sorted({o.study_uid for _, o in shown}), [h.id for h, _ in shown])
            for hit, o in shown:  # only once the audit line is written
                hit.origin.CopyFrom(pb.PacsOrigin(
                    study_instance_uid=o.study_uid, series_instance_uid=o.series_uid,
                    sop_instance_uids=list(o.sop_uids),
                    viewer_url=viewer_url(self.config.pacs_viewer_url, o)))

        await asyncio.to_thread(work)

    async def _image_region_query(self, dec: ing.Decoded, box: Box):
        """Query and region embeddings of an image query with ``region.box``, by this
        server's region pathway (:mod:`medseek.serve.regions`): the region head over the
        box mapped to model-input pixels (one pass), or the box's crop through the global
        tower."""
        enc = self.encoding
        enc.check_pathway("region.box")
        if enc.region_pathway == rp.REGION_HEAD:
            mbox = ing.model_box(dec.pixels.shape, box, "region.box", self.config.preprocess)
            query, regions = await enc.encode("image_regions", "region.box",
                                              (dec.payload, mbox[None]))
            return query, regions[0]
        crop = ing.crop(dec.pixels, box, "region.box", self.config.preprocess)
        return tuple(await asyncio.gather(enc.encode("image", "image", dec.payload),
                                          enc.encode("image", "region.box", crop)))

    def _check_organ_region(self, region: RegionSpec) -> tuple[int, int]:
        """A volume query's organ: its half-open z-range (slices as uploaded)."""
        if region.box is not None:
            raise ing.InvalidField("region.box", "a volume query's region is an organ: give "
                                                 "a z_range (its slices), not a box")
        if region.z_range is None:
            raise ing.InvalidField("region.z_range", "a volume query's region needs a z_range "
                                                     "(the organ's slices [z_start, z_end))")
        if not self.encoding.chunked:
            raise ing.InvalidField("region", "an organ rerank needs chunk embeddings, which "
                                             "this server's encoder does not give")
        return region.z_range

    async def _volume_organ_query(self, dec: ing.Decoded, region: RegionSpec):
        """Query and organ embeddings of a volume query with ``region.z_range``: one encoder
        pass gives the volume and chunk embeddings; the organ pools the chunks covering
        its slices, weighted by overlap, as a volume ingest stores it."""
        z0, z1 = self._check_organ_region(region)
        item_records.check_z_end(z1, dec.source_depth, "region.z_range")
        enc, z = await self.encoding.encode_chunked(dec, "volume")
        organ = organ_embedding(enc.chunks, z, (z0, z1))
        if organ is None:
            raise ing.InvalidField("region.z_range", "the chunks covering it have no usable "
                                                     "embedding")
        return enc.volume, organ

    # -- Diagnose -------------------------------------------------------------------------
    async def diagnose(self, request) -> pb.DiagnoseResponse:
        """The plain (or region-reranked) top k of the Search path vote their labels
        (``medseek.search.diagnose``), each with weight ``softmax(score / temperature)``."""
        temperature = DIAGNOSE_TEMPERATURE
        if request.HasField("temperature"):
            temperature = float(request.temperature)
            if not (math.isfinite(temperature) and temperature > 0):
                raise ing.InvalidField("temperature", f"must be finite and > 0, got {temperature}")
        kind = request.WhichOneof("query")
        query = pb.SearchRequest(collection=request.collection, k=request.k, diversify=False,
                                 request_id=request.request_id)
        if kind is not None:
            setattr(query, kind, getattr(request, kind))
        for name in ("filters", "region"):
            if request.HasField(name):
                getattr(query, name).CopyFrom(getattr(request, name))
        found = await self.search(query_from_request(query))
        collection = (request.collection or ing.DEFAULT_COLLECTION.get(kind)
                      or (found.hits[0].item.collection if found.hits else None))
        if collection is None:  # an item_id query whose collection holds nothing else
            collection = await run_in(self.index_pool, self._collection_of, request.item_id)
        if not found.hits:
            narrowed = " that pass the filters" if request.HasField("filters") else ""
            besides = " besides item_id" if kind == "item_id" else ""
            raise FailedPrecondition(f"collection: {collection!r} holds no items{narrowed}"
                                     f"{besides} to vote")
        labels = [tuple(h.item.labels) for h in found.hits]
        if not any(labels) and not await run_in(self.index_pool, self.store.has_labels,
                                                collection):
            raise FailedPrecondition(f"collection: {collection!r} holds no labelled items; "
                                     "a diagnosis votes the neighbours' labels")
        scores = np.array([h.score for h in found.hits], dtype=np.float64)
        n = scores.size
        probs = diagnose(scores, labels, n, weighted=True, temperature=temperature)
        weights = vote_weights(scores, n, weighted=True, temperature=temperature)
        resp = pb.DiagnoseResponse(
            request_id=request.request_id, temperature=temperature, weights=weights.tolist(),
            no_label_probability=float(sum(w for w, lab in zip(weights, labels) if not lab)))
        for label, p in sorted(probs.items(), key=lambda kv: (-kv[1], kv[0])):
            resp.probabilities.add(label=label, probability=p)
        resp.neighbours.extend(found.hits)
        for stage, ms in found.timings_ms.items():
            resp.timings_ms[stage] = ms
        if request.hypotheses:  # contrastive evidence sets and a decision that may abstain
            resp.contrastive.CopyFrom(await contrastive_diagnosis(self, request, collection))
        return resp

    def _collection_of(self, item_id: str) -> str:
        got = self.store.get([item_id]).get(item_id)
        if got is None:
            raise NotFound(f"item_id: no stored item {item_id!r}")
        return got.record.collection

    # -- Get, Stats (on the index thread) -------------------------------------------------
    def get(self, ids: list[str], with_embedding: bool) -> pb.GetResponse:
        if not ids:
            raise ing.InvalidField("ids", "at least one id is required")
        got = self.store.get(ids, with_embeddings=with_embedding)
        missing = [i for i in ids if i not in got]
        if missing:
            raise NotFound(f"ids: no stored items {missing[:5]}")
        return pb.GetResponse(items=[item_message(got[i].record, got[i].embedding) for i in ids])

    def stats(self, request=None) -> pb.StatsResponse:
        s = self.store.stats()
        resp = pb.StatsResponse(last_seq=s["last_seq"], model=s["model"],
                                encode_queue_depth=self.encoding.depth,
                                search_queue_depth=self.batcher.depth,
                                upload_port=self.config.upload_port
                                if self.config.upload_workers else 0)
        for name, dim in s["dims"].items():
            try:
                indexed, applied = len(self.catalog.index(name)), self.catalog.applied_seq(name)
            except ValueError:
                indexed, applied = 0, 0
            resp.collections.add(name=name, items=s["items"].get(name, 0), indexed=indexed,
                                 dim=dim, applied_seq=applied)
        return resp
