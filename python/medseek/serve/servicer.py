"""``medseek.v1.Retrieval`` handlers over the store, the catalog, the pipeline and an encoder.

Work leaves the event loop for three thread pools: decoding (pixels, de-identification),
the encoder (one thread, fed by the encode micro-batcher) and the index (one thread: store
writes, catalog syncs and searches, fed by the search micro-batcher). Every handler maps
failures to a precise status (``errors.classify``); an unexpected error is INTERNAL for that
call (or that request of a stream, that item of an Ingest) and the server keeps serving.
Logs carry RPC names, status codes, error ids and counts only: never ids, pseudonyms, text
or pixels.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import NamedTuple

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from medseek.search import RegionQuery, SearchFilters
from medseek.search.diagnose import diagnose, vote_weights
from medseek.search.rerank import organ_embedding

from . import ingest as ing
from . import regions as rp
from .batcher import MicroBatcher
from .errors import (FailedPrecondition, Failure, NotFound, OverBudget, Undecodable, classify,
                     decoded, decoding, status_of)
from .messages import item_message
from .routed import input_geometry, volume_preprocessing
from .v1 import retrieval_pb2 as pb
from .v1 import retrieval_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
MAX_K = 1000
#: default softmax temperature of the Diagnose vote (a cosine 0.1 higher weighs e times more)
DIAGNOSE_TEMPERATURE = 0.1


class RetrievalService(pb_grpc.RetrievalServicer):
    """The servicer (module docstring). Call ``start`` in the serving loop, ``close`` after.

    Parameters
    ----------
    config : ServeConfig
    encoder : Encoder
        ``dim``, ``encode_texts``, ``encode_images``, ``encode_volumes``.
    store, catalog, pipeline : Store, Catalog (opened), SearchPipeline
    metrics : ServerMetrics
    unavailable_errors : tuple of exception types
        Errors of the encoder that mean its backend is down (-> UNAVAILABLE).
    report_ranker : ReportRanker, optional
        The report collection's ranker (``medseek.serve.report_ranker``); with a hybrid
        one, text bound for that collection is embedded by its encoder, not ``encoder``.
    """

    def __init__(self, config, encoder, store, catalog, pipeline, metrics,
                 unavailable_errors: tuple = (ConnectionError, TimeoutError),
                 report_ranker=None) -> None:
        size, multiple = input_geometry(encoder)
        config = replace(config, preprocess=replace(
            config.preprocess, image_size=size or config.preprocess.image_size,
            volume_multiple=multiple or config.preprocess.volume_multiple,
            **volume_preprocessing(encoder)))
        self.config, self.encoder, self.store = config, encoder, store
        # image regions: the model's region pathway when it has one, else crop + global
        # tower; the store records which one embedded its region children (serve.regions)
        self.region_pathway = rp.pathway_of(encoder)
        self._pathway_key = rp.meta_key(config.model, config.search.region_collection)
        self._stored_pathway = store.get_meta(self._pathway_key)
        self.catalog, self.pipeline, self.metrics = catalog, pipeline, metrics
        self.unavailable = tuple(unavailable_errors)
        self.report_ranker = report_ranker
        self._decode_pool = ThreadPoolExecutor(2, thread_name_prefix="medseek-decode")
        self._encode_pool = ThreadPoolExecutor(1, thread_name_prefix="medseek-encode")
        import os

        import faiss  # FAISS settings (medseek.index imported it already)

        if config.faiss_blas_min_batch is not None:  # process-wide
            faiss.cvar.distance_compute_blas_threshold = (config.faiss_blas_min_batch
                                                          * int(encoder.dim))
        # OpenMP's thread count is per calling thread: set it on the index thread itself
        omp = config.faiss_threads or max(1, (os.cpu_count() or 2) - 1)
        self._index_pool = ThreadPoolExecutor(1, thread_name_prefix="medseek-index",
                                              initializer=faiss.omp_set_num_threads,
                                              initargs=(omp,))
        # after the ANN: store reads, rerank, diversify, explain (own SQLite connections)
        self._search_pool = ThreadPoolExecutor(config.search_threads,
                                               thread_name_prefix="medseek-search")
        self._pipelines = {(config.search.lam, config.search.k_prime): pipeline}
        # items of one Ingest call in flight at once: a batch, and at most half the queue
        b = config.encode_batch
        self._ingest_batch = max(1, min(b.max_batch, b.max_queue // 2))
        self.encode_batcher = MicroBatcher("encode", self._encode_batch, config.encode_batch,
                                           self._encode_pool, metrics.on_batch)
        self.search_batcher = MicroBatcher(
            "search", self._search_batch, config.search_batch, self._index_pool,
            metrics.on_batch, finish=self._search_finish, finish_executor=self._search_pool,
            max_finishing=config.search_threads + 1)
        self._update_index_gauges()

    def start(self) -> None:
        self.encode_batcher.start()
        self.search_batcher.start()

    async def close(self) -> None:
        await self.encode_batcher.close()
        await self.search_batcher.close()
        for pool in (self._decode_pool, self._encode_pool, self._index_pool,
                     self._search_pool):
            pool.shutdown(wait=True)

    # -- plumbing ---------------------------------------------------------------------
    async def _in(self, pool, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def _guarded(self, method: str, context, work):
        """Run ``work()``; map its failure to a status; record latency per code."""
        t0, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            return await work()
        except (asyncio.CancelledError, grpc.aio.AbortError):
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - each mapped to a status; never fatal
            code, message = status_of(exc, self.unavailable, method)  # INTERNAL: logged
            await context.abort(code, message)
        finally:
            self._observe(method, code, t0)

    def _observe(self, method: str, code: grpc.StatusCode, t0: float) -> None:
        """Latency of one call (or one request of a stream) by status; queue depths."""
        self.metrics.rpc.labels(method, code.name).observe(time.perf_counter() - t0)
        self.metrics.queue.labels("encode").set(self.encode_batcher.depth)
        self.metrics.queue.labels("search").set(self.search_batcher.depth)

    def _update_index_gauges(self) -> None:
        for name in self.store.collections():
            try:
                self.metrics.index_size.labels(name).set(len(self.catalog.index(name)))
            except ValueError:
                pass

    # -- encoding -----------------------------------------------------------------------
    def _encode_batch(self, kind: str, payloads: list) -> list:
        """``payloads``: [(field, content)] of one kind -> [(dim,) or exception].

        A ``ValueError`` of the encoder rejects that content (INVALID_ARGUMENT); anything
        else it raises, a ``TypeError`` included, is a bug of the encoder (INTERNAL).
        """
        try:
            return self._encode_rows(kind, payloads)
        except ValueError:
            if len(payloads) == 1:
                raise ing.InvalidField(payloads[0][0], "rejected by the encoder") from None
        out = []  # one bad input must not fail its batch-mates: retry one by one
        for p in payloads:
            try:
                out.append(self._encode_rows(kind, [p])[0])
            except ValueError:
                out.append(ing.InvalidField(p[0], "rejected by the encoder"))
            except Exception as exc:  # noqa: BLE001 - this input's failure, not its mates'
                out.append(exc)
        return out

    def _encode_rows(self, kind: str, payloads: list) -> list:
        t0 = time.perf_counter()
        items = [c for _, c in payloads]
        if kind == "volume_chunks":  # [VolumeChunks]: volume and chunk embeddings of one pass
            encs = list(self.encoder.encode_volume_chunks(items))
            self.metrics.stage.labels("encode").observe(time.perf_counter() - t0)
            return [e if np.isfinite(e.volume).all() and np.isfinite(e.chunks).all()
                    else ing.InvalidField(field, "the encoder produced a NaN embedding")
                    for (field, _), e in zip(payloads, encs)]
        if kind == "image_regions":  # [(image (1, H, W), boxes (R, 4))]: one pass each
            encs = rp.encode_region_rows(self.encoder, [c[0] for c in items],
                                         [c[1] for c in items])
            self.metrics.stage.labels("encode").observe(time.perf_counter() - t0)
            return [e if np.isfinite(e[0]).all() and np.isfinite(e[1]).all()
                    else ing.InvalidField(field, "the encoder produced a NaN embedding")
                    for (field, _), e in zip(payloads, encs)]
        if kind == "report_text":  # the hybrid report ranker, in process
            embs = self.report_ranker.encoder.encode_texts(items)
        elif kind == "text":
            embs = self.encoder.encode_texts(items)
        elif kind == "image":
            embs = self.encoder.encode_images(np.stack(items).astype(np.float32))
        else:
            embs = self.encoder.encode_volumes(items)
        embs = np.asarray(embs, dtype=np.float32)
        self.metrics.stage.labels("encode").observe(time.perf_counter() - t0)
        out = []
        for (field, _), row in zip(payloads, embs):
            if not np.isfinite(row).all():
                out.append(ing.InvalidField(field, "the encoder produced a NaN embedding"))
            else:
                out.append(row)
        return out

    def _route(self, kind: str, collection: str, field: str) -> str:
        """The encoder route of ``kind`` content bound for ``collection``: text of a
        hybrid report collection goes to the report ranker ("report_text"); nothing but
        text (or a stored report's item_id) can enter or query that collection."""
        r = self.report_ranker
        if r is None or r.encoder is None or collection != r.collection:
            return kind
        if kind != "text":
            raise ing.InvalidField(field, f"collection {collection!r} holds hybrid report "
                                          f"embeddings (dim {r.dim}, report_ranker 'hybrid'): "
                                          f"only text can be stored in or query it, not {kind}")
        return "report_text"

    async def _encode(self, kind: str, field: str, content) -> np.ndarray:
        return await self.encode_batcher.submit(kind, (field, content))

    async def _decode(self, kind: str, value, field: str) -> ing.Decoded:
        t0 = time.perf_counter()
        c = self.config
        dec = await self._in(self._decode_pool, _decode_content, kind, value, field,
                             c.preprocess, c.limits, c.deid, c.budget)
        self.metrics.stage.labels("decode").observe(time.perf_counter() - t0)
        return dec

    # -- Search -------------------------------------------------------------------------
    async def Search(self, request, context):
        return await self._guarded("Search", context, lambda: self._search(decoded(request)))

    async def SearchStream(self, request_iterator, context):
        """Answer each request of the stream as it is done (its ``request_id`` echoed).

        At most ``config.stream_window`` requests are held (read and not yet answered): the
        reader takes a slot before it reads the next message, and an answer gives its slot
        back once gRPC has taken it, so a client that streams faster than it is answered
        (or reads slower) is held back by gRPC's flow control, not buffered here. A request
        that fails is answered with its ``error`` and the stream goes on. A message that
        does not parse has no request_id to answer under: the stream ends with
        INVALID_ARGUMENT naming its position, after the answers of the requests before it.
        """
        slots = asyncio.Semaphore(self.config.stream_window)
        done: asyncio.Queue = asyncio.Queue()  # answers (one per held slot), then the end
        tasks: set[asyncio.Task] = set()
        held = 0  # read and not yet answered

        async def answer(req) -> None:
            t0, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                resp = await self._search(req)
            except Exception as exc:  # noqa: BLE001 - this request's error; the stream goes on
                failure = classify(exc, self.unavailable, "SearchStream")
                code = failure.code
                resp = pb.SearchResponse(request_id=req.request_id, error=failure.proto())
            self._observe("SearchStream", code, t0)
            done.put_nowait(resp)

        async def read() -> None:
            nonlocal held
            end, n, it = None, 0, aiter(request_iterator)
            try:
                while True:
                    await slots.acquire()
                    try:
                        req = await anext(it)
                    except StopAsyncIteration:
                        break
                    if isinstance(req, Undecodable):
                        end = classify(req.error(f"requests[{n}]"))
                        break
                    held += 1
                    self.metrics.stream_in_flight.inc()
                    task = asyncio.ensure_future(answer(req))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    n += 1
            except DecodeError:  # a stream read without the lenient deserializer
                end = classify(ing.InvalidField(f"requests[{n}]", "does not parse as "
                                                "medseek.v1.SearchRequest"))
            except Exception as exc:  # noqa: BLE001 - the stream ends with its status, not a hang
                end = classify(exc, self.unavailable, "SearchStream")
            finally:
                done.put_nowait(_StreamEnd(end))

        reader = asyncio.ensure_future(read())
        try:
            end = None
            while end is None or held:
                item = await done.get()
                if isinstance(item, _StreamEnd):
                    end = item
                    continue
                yield item
                held -= 1
                self.metrics.stream_in_flight.dec()
                slots.release()
            if end.failure is not None:
                await context.abort(end.failure.code, end.failure.message)
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            self.metrics.stream_in_flight.dec(held)

    async def _search(self, request) -> pb.SearchResponse:
        kind = request.WhichOneof("query")
        if kind is None:
            raise ing.InvalidField("query", "one of text, image, volume or item_id is required")
        k = request.k or self.config.search.k
        if not 1 <= k <= MAX_K:
            raise ing.InvalidField("k", f"must be in [1, {MAX_K}], got {k}")
        lam = self.config.search.lam
        if request.HasField("mmr_lambda"):
            lam = float(request.mmr_lambda)
            if not (math.isfinite(lam) and 0.0 <= lam <= 1.0):
                raise ing.InvalidField("mmr_lambda", f"must be in [0, 1], got {lam}")
        region_name = request.region.name if request.HasField("region") else ""
        if request.HasField("region") and not region_name:
            raise ing.InvalidField("region.name", "must be non-empty")
        collection, region_emb, exclude = request.collection, None, None
        if kind == "item_id":
            query, stored_coll, region_emb = await self._in(
                self._search_pool, self._stored_query, request.item_id, region_name)
            collection, exclude = collection or stored_coll, request.item_id
        else:
            if region_name and kind == "volume":
                self._check_organ_region(request.region)  # before the work of decoding
            dec = await self._decode(kind, getattr(request, kind), kind)
            collection = collection or ing.DEFAULT_COLLECTION[kind]
            route = self._route(kind, collection, kind)
            if region_name and kind == "volume":
                query, region_emb = await self._volume_organ_query(dec, request.region)
            elif region_name:
                if kind != "image" or not request.region.HasField("box"):
                    raise ing.InvalidField("region.box", "a region rerank needs an image query "
                                                         "with a box, a volume query with a "
                                                         "z_range, or an item_id query")
                query, region_emb = await self._image_region_query(dec, request.region.box)
            else:
                query = await self._encode(route, kind, dec.payload)
        if collection not in self.store.config.collections:
            raise ing.InvalidField("collection", f"must be one of "
                                   f"{self.store.config.collections}, got {collection!r}")
        f = request.filters
        filters = SearchFilters(**{name: tuple(getattr(f, name)) or None for name in (
            "modality", "body_part", "view", "labels_any", "exclude_patients",
            "exclude_studies")})
        key = (collection, k + (exclude is not None), filters, region_name or None,
               request.diversify, lam)
        result = await self.search_batcher.submit(key, (query, region_emb))
        hits = [h for h in result.hits if h.id != exclude][:k] if result is not None else []
        resp = pb.SearchResponse(request_id=request.request_id,
                                 candidates=result.candidates if result is not None else 0)
        if result is not None and result.dup_threshold is not None:
            resp.dup_threshold = result.dup_threshold
            resp.near_duplicate_shortfall = result.near_duplicate_shortfall
            resp.notice = result.notice or ""
        for h in hits:
            hit = resp.hits.add(id=h.id, score=h.score, global_score=h.global_score,
                                matched_region=h.matched_region or "",
                                region_id=h.region_id or "")
            if h.region_score is not None:
                hit.region_score = h.region_score
            hit.item.CopyFrom(item_message(h.record))
            for c in h.explanation or ():
                hit.concepts.add(name=c.concept, query_score=c.query_score,
                                 hit_score=c.hit_score, contribution=c.contribution)
        for stage, seconds in (result.timings.items() if result is not None else ()):
            resp.timings_ms[stage] = seconds * 1e3
            self.metrics.stage.labels(stage).observe(seconds)
        return resp

    async def _encode_chunked(self, dec: ing.Decoded, field: str):
        """One encoder pass over a decoded volume: its embeddings (``enc.volume``,
        ``enc.chunks``) and each chunk's z-range in slices of the volume as uploaded."""
        enc = await self._encode("volume_chunks", field, dec.payload)
        return enc, ing.source_z_ranges(enc.z_range, dec.z_scale, dec.source_depth,
                                        dec.payload.shape[0])

    async def _image_region_query(self, dec: ing.Decoded, box):
        """Query and region embeddings of an image query with ``region.box``, by this
        server's region pathway (:mod:`medseek.serve.regions`): the region head over the
        box mapped to model-input pixels (one pass), or the box's crop through the global
        tower."""
        rp.check_pathway(self._stored_pathway, self.region_pathway, "region.box",
                         self._pathway_key)
        if self.region_pathway == rp.REGION_HEAD:
            mbox = ing.model_box(dec.pixels.shape, box, "region.box", self.config.preprocess)
            query, regions = await self._encode("image_regions", "region.box",
                                                (dec.payload, mbox[None]))
            return query, regions[0]
        crop = ing.crop(dec.pixels, box, "region.box", self.config.preprocess)
        return tuple(await asyncio.gather(self._encode("image", "image", dec.payload),
                                          self._encode("image", "region.box", crop)))

    def _check_organ_region(self, region) -> tuple[int, int]:
        """A volume query's organ: its z-range (slices as uploaded), checked for shape."""
        if region.HasField("box"):
            raise ing.InvalidField("region.box", "a volume query's region is an organ: give "
                                                 "a z_range (its slices), not a box")
        if not region.HasField("z_range"):
            raise ing.InvalidField("region.z_range", "a volume query's region needs a z_range "
                                                     "(the organ's slices, first..last)")
        if not hasattr(self.encoder, "encode_volume_chunks"):
            raise ing.InvalidField("region", "an organ rerank needs chunk embeddings, which "
                                             "this server's encoder does not give")
        z0, z1 = int(region.z_range.z_start), int(region.z_range.z_end)
        if z0 > z1:
            raise ing.InvalidField("region.z_range", f"z_start {z0} is after z_end {z1}")
        return z0, z1

    async def _volume_organ_query(self, dec: ing.Decoded, region):
        """Query and organ embeddings of a volume query with ``region.z_range``: one encoder
        pass gives the volume and chunk embeddings; the organ pools the chunks covering
        its slices, weighted by overlap, as a volume ingest stores it (``_prepare_volume``)."""
        z0, z1 = self._check_organ_region(region)
        if z1 >= dec.source_depth:
            raise ing.InvalidField("region.z_range", f"z_end {z1} is past the volume's last "
                                                     f"slice {dec.source_depth - 1}")
        enc, z = await self._encode_chunked(dec, "volume")
        organ = organ_embedding(enc.chunks, z, (z0, z1))
        if organ is None:
            raise ing.InvalidField("region.z_range", "the chunks covering it have no usable "
                                                     "embedding")
        return enc.volume, organ

    def _stored_query(self, item_id: str, region_name: str):
        # the pipeline's read-only connection of this thread: no wait on the index thread
        got = self.pipeline.reader.by_ids([item_id], with_embeddings=True).get(item_id)
        if got is None or got.embedding is None:
            raise NotFound(f"item_id: no stored item {item_id!r}")
        region_emb = None
        if region_name:
            rows = self.pipeline.reader.children(
                [item_id], self.config.search.region_collection, region_name).get(item_id, ())
            usable = [r.embedding for r in rows if r.embedding is not None]
            if not usable:
                raise ing.InvalidField("region.name", f"item {item_id!r} has no region "
                                                      f"{region_name!r}")
            region_emb = usable[0]
        return got.embedding, got.record.collection, region_emb

    def _search_batch(self, key, payloads: list):
        """On the index thread: filter + ANN of a micro-batch; ``_search_finish`` does the
        rest on a search thread while the next micro-batch's ANN runs."""
        collection, k, filters, region_name, diversify, lam = key
        try:
            self.catalog.index(collection)
        except ValueError:
            return None  # nothing stored in this collection yet
        # without rerank or diversification the top k are final: fetching K' is wasted work
        k_prime = self.config.search.k_prime if region_name or diversify else k
        pipeline = self._pipelines.get((lam, k_prime))
        if pipeline is None:  # same reader and catalog; another MMR weight or K'
            base = self.pipeline.config
            pipeline = copy.copy(self.pipeline)
            pipeline.config = replace(base, lam=lam, k_prime=k_prime, k=min(base.k, k_prime))
            self._pipelines[(lam, k_prime)] = pipeline
        queries = np.stack([q for q, _ in payloads]).astype(np.float32)
        try:
            return pipeline, pipeline.ann(collection, queries, k, filters)
        except ValueError as exc:
            raise ing.InvalidField("query", str(exc)) from None

    def _search_finish(self, key, payloads: list, found) -> list:
        """On a search thread: store reads, rerank, diversify, explain of a micro-batch.

        Consistency is as before the split: the index only holds rows whose store write
        was committed (the catalog syncs after each commit, on the index thread), and the
        candidates and hits are read from the last committed state, so a row deleted
        before these reads is dropped (counted as stale), never returned."""
        if found is None:
            return [None] * len(payloads)
        pipeline, batch = found
        region_name, diversify = key[3], key[4]
        region = None
        if region_name is not None:
            region = RegionQuery(region_name, np.stack([r for _, r in payloads]))
        try:
            return pipeline.finish(batch, region, diversify)
        except ValueError as exc:
            raise ing.InvalidField("query", str(exc)) from None

    # -- writes -------------------------------------------------------------------------
    async def Ingest(self, request_iterator, context):
        return await self._guarded("Ingest", context, lambda: self._ingest(request_iterator))

    async def _ingest(self, request_iterator) -> pb.IngestResponse:
        """Items are decoded and encoded concurrently (their encodes share micro-batches),
        committed ``max_batch`` at a time, and acknowledged only after each commit.

        Every item gets an ack, in stream order: committed, or failed with its own error
        (bad content, a message that does not parse, an encoder or store failure); a
        failed item fails nothing else, so nothing committed goes without its ack."""
        resp, pending, n = pb.IngestResponse(), [], 0
        try:
            try:
                async for item in request_iterator:
                    if isinstance(item, Undecodable):
                        pending.append((n, "", _failed(item.error(f"items[{n}]"))))
                    else:
                        if item.id and any(i == item.id for _, i, _ in pending):
                            await self._flush(pending, resp)  # a repeat: commit the first one
                        task = asyncio.ensure_future(self._prepare(item, n))
                        pending.append((n, item.id, task))
                    n += 1
                    if len(pending) >= self._ingest_batch:
                        await self._flush(pending, resp)
            except DecodeError:  # a stream read without the lenient deserializer ends here
                pending.append((n, "", _failed(ing.InvalidField(
                    f"items[{n}]", "does not parse as medseek.v1.IngestItem; the items after "
                                   "it were not read"))))
            await self._flush(pending, resp)
        finally:
            for _, _, task in pending:  # a cancellation: drop the rest
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved, so asyncio does not log it
                task.cancel()
        return resp

    async def _prepare(self, item, i: int):
        """Decode and encode one item: (record, embedding, [(child record, embedding)])."""
        kind = item.WhichOneof("content")
        ing.check_item_id(item.id, f"items[{i}].id")  # printable, bounded, not reserved
        if kind is None:
            raise ing.InvalidField(f"items[{i}].content", "one of text, image, volume is required")
        field = f"items[{i}].{kind}"
        dec = await self._decode(kind, getattr(item, kind), field)
        collection = item.collection or ing.DEFAULT_COLLECTION[kind]
        route = self._route(kind, collection, field)
        record = ing.build_record(item, collection, dec, f"items[{i}]")
        names = [r.name for r in item.regions]
        for j, name in enumerate(names):
            if name in names[:j]:
                raise ing.InvalidField(f"items[{i}].regions[{j}].name", f"repeats {name!r}")
        if kind == "volume":
            return await self._prepare_volume(item, i, dec, record)
        children, inputs = [], []  # inputs: model-input boxes, or crops (serve.regions)
        head = self.region_pathway == rp.REGION_HEAD
        for j, region in enumerate(item.regions):
            rfield = f"items[{i}].regions[{j}]"
            if kind != "image":
                raise ing.InvalidField(rfield, "regions need an image or a volume item")
            if not region.name or not region.HasField("box") or region.HasField("z_range"):
                raise ing.InvalidField(rfield, "an image's regions need a name and a box "
                                               "(a z_range is for a volume's organs)")
            rp.check_pathway(self._stored_pathway, self.region_pathway, f"items[{i}].regions",
                             self._pathway_key)
            children.append(ing.region_record(record, region, self.config.search.region_collection,
                                              rfield))
            if head:
                inputs.append(ing.model_box(dec.pixels.shape, region.box, f"{rfield}.box",
                                            self.config.preprocess))
            else:
                inputs.append(ing.crop(dec.pixels, region.box, f"{rfield}.box",
                                       self.config.preprocess))
        if head and children:  # the image and its regions in one pass of the region graph
            emb, embs = await self._encode("image_regions", field, (dec.payload, np.stack(inputs)))
            return record, emb, list(zip(children, embs))
        embs = await asyncio.gather(self._encode(route, field, dec.payload),
                                    *(self._encode("image", f"items[{i}].regions[{j}]", c)
                                      for j, c in enumerate(inputs)))
        return record, embs[0], list(zip(children, embs[1:]))

    async def _prepare_volume(self, item, i: int, dec: ing.Decoded, record):
        """A volume with its chunks and organs as children: each chunk's embedding, and for
        each organ the overlap-weighted mean of the chunks covering its z-range (what the
        pipeline's region rerank pools for a volume)."""
        field, search = f"items[{i}].volume", self.config.search
        organs = [ing.organ_record(record, region, search.region_collection,
                                   f"items[{i}].regions[{j}]", dec.source_depth)
                  for j, region in enumerate(item.regions)]
        if not hasattr(self.encoder, "encode_volume_chunks"):
            if organs:
                raise ing.InvalidField(f"items[{i}].regions", "organ regions need chunk "
                                       "embeddings, which this server's encoder does not give")
            return record, await self._encode("volume", field, dec.payload), []
        enc, z = await self._encode_chunked(dec, field)
        children = [(ing.chunk_record(record, n, zr, search.chunk_collection, field), emb)
                    for n, (zr, emb) in enumerate(zip(z, enc.chunks))]
        for j, organ in enumerate(organs):
            vec = organ_embedding(enc.chunks, z, organ.z_range)
            if vec is None:
                raise ing.InvalidField(f"items[{i}].regions[{j}].z_range",
                                       "the chunks covering it have no usable embedding")
            children.append((organ, vec))
        return record, enc.volume, children

    async def _flush(self, pending: list, resp: pb.IngestResponse) -> None:
        """Commit the prepared items of ``pending`` [(index, id, task)]; ack every one."""
        if not pending:
            return
        entries = list(pending)
        prepared = await asyncio.gather(*(task for _, _, task in entries),
                                        return_exceptions=True)
        pending.clear()
        ready = [p for p in prepared if not isinstance(p, BaseException)]
        outcomes = iter(())
        if ready:
            t0 = time.perf_counter()
            outcomes = iter(await self._in(self._index_pool, self._commit, ready))
            self.metrics.stage.labels("store_commit").observe(time.perf_counter() - t0)
        for (index, item_id, _), p in zip(entries, prepared):  # after the commit: the acks
            ack = resp.acks.add(index=index, id=_ack_id(item_id))
            if isinstance(p, BaseException):  # refused before the store
                result, parts_error = p, None
            else:
                result, parts_error = next(outcomes)
                if isinstance(result, BaseException):
                    result = _store_fault(result, f"items[{index}]")
            if isinstance(result, BaseException):
                ack.status = "failed"
                ack.error.CopyFrom(classify(result, self.unavailable, "Ingest").proto())
                resp.failed += 1
                continue
            ack.status, ack.duplicate_of = result.status, result.duplicate_of or ""
            resp.inserted += result.status == "inserted"
            resp.updated += result.status == "updated"
            resp.duplicates += result.status == "duplicate"
            if parts_error is not None:
                ack.error.CopyFrom(classify(_store_fault(
                    parts_error, f"items[{index}]", "the item was stored, its chunks and "
                                                    "regions were not"),
                    self.unavailable, "Ingest").proto())

    def _commit(self, batch: list) -> list:
        """On the index thread: store prepared items [(record, embedding, children)].

        Returns, per item, ``(UpsertResult or exception, exception or None)``: the item's
        result (or why nothing of it was stored), and why its children were not stored.
        The items commit together; when that fails, one by one, so that only the bad one
        fails. The children of the written items commit after them."""
        results = self._upsert_by_dim([b[0] for b in batch], [b[1] for b in batch])
        written = {r.id for r in results if not isinstance(r, BaseException)
                   and r.status != "duplicate"}
        families = [(rec.id, cs) for rec, _, cs in batch if rec.id in written and cs]
        parts_errors: dict[str, BaseException] = {}
        if families:
            try:
                self._store_children([c for _, cs in families for c in cs])
            except Exception:  # noqa: BLE001 - found out family by family
                for parent, kids in families:
                    try:
                        self._store_children(kids)
                    except Exception as exc:  # noqa: BLE001 - this item's, acked with it
                        parts_errors[parent] = exc
        kept = {c.id for parent, cs in families if parent not in parts_errors for c, _ in cs}
        try:  # the items are committed: whatever fails now must not cost their acks
            self._drop_stale_children([r.id for r in results if not isinstance(r, BaseException)
                                       and r.status == "updated"], kept)
            self.catalog.sync()
            self._update_index_gauges()
        except Exception as exc:  # noqa: BLE001 - INTERNAL, logged; the next sync catches up
            classify(exc, self.unavailable, "Ingest")
        return [(r, None if isinstance(r, BaseException) else parts_errors.get(r.id))
                for r in results]

    def _store_children(self, kids: list) -> None:
        """Upsert [(child record, embedding)] (one transaction), recording the store's region
        pathway first when they include image regions."""
        if self._stored_pathway is None and any(c.box is not None for c, _ in kids):
            # before the children: a crash in between leaves a mark and no children
            self.store.set_meta(self._pathway_key, self.region_pathway)
            self._stored_pathway = self.region_pathway
        self.store.upsert([c for c, _ in kids], np.stack([e for _, e in kids]))

    def _upsert_by_dim(self, records: list, embs: list) -> list:
        """``store.upsert`` of items whose embeddings may differ in dim (hybrid reports
        beside images): one upsert per dim, results (an ``UpsertResult``, or the exception
        that refused the item) in the order of ``records``. Each upsert commits on its own
        (all or nothing); a refused one is retried item by item. All are acknowledged
        after the last."""
        results: list = [None] * len(records)
        for dim in sorted({int(e.shape[0]) for e in embs}):
            rows = [i for i, e in enumerate(embs) if e.shape[0] == dim]
            try:
                got = self.store.upsert([records[i] for i in rows],
                                        np.stack([embs[i] for i in rows]))
            except Exception as exc:  # noqa: BLE001 - whose fault it is, is found one by one
                got = [exc] if len(rows) == 1 else [self._upsert_one(records[i], embs[i])
                                                    for i in rows]
            for i, r in zip(rows, got):
                results[i] = r
        return results

    def _upsert_one(self, record, emb: np.ndarray):
        try:
            return self.store.upsert([record], emb[None])[0]
        except Exception as exc:  # noqa: BLE001 - this item's failure, acked with it
            return exc

    def _drop_stale_children(self, parents: list[str], kept: set[str]) -> None:
        """An updated item keeps only the chunks and regions of its new version."""
        if not parents:
            return
        search, stale = self.config.search, []
        for collection in (search.chunk_collection, search.region_collection):
            for rows in self.pipeline.reader.children(parents, collection).values():
                stale += [r.id for r in rows if r.id not in kept]
        if stale:
            self.store.delete(stale)

    async def Delete(self, request, context):
        return await self._guarded("Delete", context, lambda: self._in(
            self._index_pool, self._delete, self._request_ids(decoded(request).ids)))

    def _request_ids(self, ids) -> list[str]:
        """The ids of a Get or Delete, costed before the index thread sees them: at most
        ``budget.max_ids`` as sent, then each once, in first-seen order."""
        limit = self.config.budget.max_ids
        if len(ids) > limit:
            raise OverBudget(f"ids: {len(ids)} ids exceeds RequestBudget.max_ids={limit}")
        return list(dict.fromkeys(ids))

    def _delete(self, ids: list[str]) -> pb.DeleteResponse:
        if not ids:
            raise ing.InvalidField("ids", "at least one id is required")
        missing = sorted(set(ids) - set(self.store.get(ids)))
        if missing:
            raise NotFound(f"ids: no stored items {missing[:5]}")
        deleted = self.store.delete(ids)
        self.catalog.sync()
        self._update_index_gauges()
        return pb.DeleteResponse(deleted=deleted)

    # -- reads --------------------------------------------------------------------------
    async def Get(self, request, context):
        return await self._guarded("Get", context, lambda: self._in(
            self._index_pool, self._get, self._request_ids(decoded(request).ids),
            request.with_embedding))

    def _get(self, ids: list[str], with_embedding: bool) -> pb.GetResponse:
        if not ids:
            raise ing.InvalidField("ids", "at least one id is required")
        got = self.store.get(ids, with_embeddings=with_embedding)
        missing = [i for i in ids if i not in got]
        if missing:
            raise NotFound(f"ids: no stored items {missing[:5]}")
        return pb.GetResponse(items=[item_message(got[i].record, got[i].embedding) for i in ids])

    # -- diagnosis ----------------------------------------------------------------------
    async def Diagnose(self, request, context):
        return await self._guarded("Diagnose", context,
                                   lambda: self._diagnose(decoded(request)))

    async def _diagnose(self, request) -> pb.DiagnoseResponse:
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
        found = await self._search(query)
        collection = (request.collection or ing.DEFAULT_COLLECTION.get(kind)
                      or (found.hits[0].item.collection if found.hits else None))
        if collection is None:  # an item_id query whose collection holds nothing else
            collection = await self._in(self._index_pool, self._collection_of, request.item_id)
        if not found.hits:
            narrowed = " that pass the filters" if request.HasField("filters") else ""
            besides = " besides item_id" if kind == "item_id" else ""
            raise FailedPrecondition(f"collection: {collection!r} holds no items{narrowed}"
                                     f"{besides} to vote")
        labels = [tuple(h.item.labels) for h in found.hits]
        if not any(labels) and not await self._in(self._index_pool, self.store.has_labels,
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
        return resp

    def _collection_of(self, item_id: str) -> str:
        got = self.store.get([item_id]).get(item_id)
        if got is None:
            raise NotFound(f"item_id: no stored item {item_id!r}")
        return got.record.collection

    async def Stats(self, request, context):
        return await self._guarded("Stats", context, lambda: self._in(
            self._index_pool, self._stats, decoded(request)))

    def _stats(self, request=None) -> pb.StatsResponse:
        s = self.store.stats()
        resp = pb.StatsResponse(last_seq=s["last_seq"], model=s["model"],
                                encode_queue_depth=self.encode_batcher.depth,
                                search_queue_depth=self.search_batcher.depth)
        for name, dim in s["dims"].items():
            try:
                indexed, applied = len(self.catalog.index(name)), self.catalog.applied_seq(name)
            except ValueError:
                indexed, applied = 0, 0
            resp.collections.add(name=name, items=s["items"].get(name, 0), indexed=indexed,
                                 dim=dim, applied_seq=applied)
        return resp


def _failed(exc: BaseException) -> asyncio.Future:
    """A finished future that failed with ``exc`` (an item that failed before any work)."""
    fut = asyncio.get_running_loop().create_future()
    fut.set_exception(exc)
    return fut


def _ack_id(item_id: str) -> str:
    """The id an ack echoes: the client's own, unless it is no valid id (its index says
    which item it was)."""
    try:
        ing.check_item_id(item_id, "id")
    except ing.InvalidField:
        return ""
    return item_id


def _store_fault(exc: BaseException, field: str, what: str = "the store refused it"
                 ) -> BaseException:
    """A store's ``ValueError`` on a record names what was wrong with the item (a client
    fault); anything else, a ``TypeError`` included, stays what it is (INTERNAL)."""
    if isinstance(exc, ValueError) and not isinstance(exc, ing.InvalidField):
        return ing.InvalidField(field, f"{what}: {exc}")
    return exc


class _StreamEnd(NamedTuple):
    """The reader of a SearchStream is done: the client closed it (``failure`` None), or
    it ended on a failure (an undecodable message)."""

    failure: Failure | None


def _decode_content(kind: str, value, field: str, *args) -> ing.Decoded:
    """``ing.decode_content``; corrupt compressed content is ``field``'s fault."""
    with decoding(field):
        return ing.decode_content(kind, value, field, *args)
