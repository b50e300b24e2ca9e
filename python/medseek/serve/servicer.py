"""``medseek.v1.Retrieval``: the gRPC adapter over the query and ingest services.

Each handler turns its request into a call of ``QueryService`` (Search, SearchStream,
Diagnose, Get, Stats; query_service.py) or ``IngestService`` (Ingest, Delete;
ingest_service.py), which share ``Encoding`` (encoding.py: the text, image and volume
lanes, each with its decode threads, encoder worker(s) and micro-batcher) and one index thread (store writes, catalog syncs, ANN searches). This
module adds what is gRPC's: each call's failure becomes a precise status
(``errors.classify``), an unexpected error is INTERNAL for that call (or that request of a
stream, that item of an Ingest) and the server keeps serving, latency is recorded per
status code, and SearchStream's flow control. Logs carry RPC names, status codes, error
ids and counts only: never ids, pseudonyms, text or pixels.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import NamedTuple

import grpc
from google.protobuf.message import DecodeError

from . import ingest as ing
from .encoding import Encoding, run_in
from .draft_service import DraftService
from .errors import Failure, OverBudget, Undecodable, classify, decoded, status_of
from .ingest_service import IngestService
from .reident import AuditLog, ReidentMap
from .query_service import DIAGNOSE_TEMPERATURE, QueryService, query_from_request
from .routed import input_geometry, volume_preprocessing
from .v1 import retrieval_pb2 as pb
from .v1 import retrieval_pb2_grpc as pb_grpc
from .wire import read_upload

log = logging.getLogger(__name__)
__all__ = ["DIAGNOSE_TEMPERATURE", "RetrievalService"]


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
        self.catalog, self.pipeline, self.metrics = catalog, pipeline, metrics
        self.unavailable = tuple(unavailable_errors)
        self.index_pool = _index_pool(config, encoder.dim)
        self.encoding = Encoding(config, encoder, store, metrics, report_ranker)
        self.reident = audit = None
        if config.pacs_mode == "clinical":  # the original UIDs, kept apart from the store
            self.reident, audit = ReidentMap(config.reident_path), AuditLog(config.audit_log)
        self.queries = QueryService(config, self.encoding, store, catalog, pipeline, metrics,
                                    self.index_pool, self.reident, audit)
        self.ingests = IngestService(config, self.encoding, store, catalog, metrics,
                                     self.index_pool, self.unavailable, self.reident)
        self.drafts = DraftService(config, self.encoding, store, pipeline, self.queries,
                                   self.index_pool)
        # queue depths are read when the metrics are scraped, not written on every call
        queue = metrics.queue
        queue.labels("encode").set_function(lambda: self.encoding.depth)
        for name, lane in self.encoding.lanes.items():
            queue.labels(f"encode_{name}").set_function(lambda lane=lane: lane.depth)
        queue.labels("search").set_function(lambda: self.search_batcher.depth)

    @property
    def encode_batcher(self):
        """The encode lanes together (``depth``: requests waiting in all of them)."""
        return self.encoding

    @property
    def search_batcher(self):
        return self.queries.batcher

    def start(self) -> None:
        self.encoding.start()
        self.search_batcher.start()

    async def close(self) -> None:
        await self.encoding.close()
        await self.queries.close()
        self.ingests.close()
        self.index_pool.shutdown(wait=True)
        if self.reident is not None:
            self.reident.close()

    # -- plumbing ---------------------------------------------------------------------
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
        """Latency of one call (or one request of a stream) by status."""
        self.metrics.rpc.labels(method, code.name).observe(time.perf_counter() - t0)

    def _request_ids(self, ids) -> list[str]:
        """The ids of a Get or Delete, costed before the index thread sees them: at most
        ``budget.max_ids`` as sent, then each once, in first-seen order."""
        limit = self.config.budget.max_ids
        if len(ids) > limit:
            raise OverBudget(f"ids: {len(ids)} ids exceeds RequestBudget.max_ids={limit}")
        return list(dict.fromkeys(ids))

    # -- reads ------------------------------------------------------------------------
    async def Search(self, request, context):
        return await self._guarded("Search", context,
                                   lambda: self._search(decoded(request), context))

    async def SearchUpload(self, request_iterator, context):
        """``Search`` with its upload in chunks (``serve.wire.read_upload``)."""
        async def work():
            slots = {kind: lane.upload_slots for kind, lane in self.encoding.lanes.items()}
            req = await read_upload(request_iterator, self.config.max_receive_message_bytes,
                                    slots)
            return await self._search(req, context)

        return await self._guarded("SearchUpload", context, work)

    async def _search(self, req, context) -> pb.SearchResponse:
        # authorised before any work; the origins are set after the audit line
        caller = (self.queries.reident_caller(context.invocation_metadata())
                  if req.reidentify else None)
        resp = await self.queries.search(query_from_request(req))
        if caller is not None:
            await self.queries.reidentify(resp, caller, "Search")
        return resp

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
                if req.reidentify:
                    raise ing.InvalidField("reidentify", "is answered by Search only, one "
                                                         "audited query at a time")
                resp = await self.queries.search(query_from_request(req))
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

    async def Diagnose(self, request, context):
        return await self._guarded("Diagnose", context,
                                   lambda: self.queries.diagnose(decoded(request)))

    async def Draft(self, request, context):
        return await self._guarded("Draft", context,
                                   lambda: self.drafts.draft(decoded(request)))

    async def Get(self, request, context):
        return await self._guarded("Get", context, lambda: run_in(
            self.index_pool, self.queries.get, self._request_ids(decoded(request).ids),
            request.with_embedding))

    async def Stats(self, request, context):
        return await self._guarded("Stats", context, lambda: run_in(
            self.index_pool, self.queries.stats, decoded(request)))

    # -- writes -----------------------------------------------------------------------
    async def Ingest(self, request_iterator, context):
        return await self._guarded("Ingest", context,
                                   lambda: self.ingests.ingest(request_iterator))

    async def Delete(self, request, context):
        return await self._guarded("Delete", context, lambda: run_in(
            self.index_pool, self.ingests.delete, self._request_ids(decoded(request).ids)))


def _index_pool(config, dim: int) -> ThreadPoolExecutor:
    """The index thread, with the server's FAISS settings (BLAS threshold, OpenMP threads)."""
    import faiss  # FAISS settings (medseek.index imported it already)

    if config.faiss_blas_min_batch is not None:  # process-wide
        faiss.cvar.distance_compute_blas_threshold = config.faiss_blas_min_batch * int(dim)
    # OpenMP's thread count is per calling thread: set it on the index thread itself
    omp = config.faiss_threads or max(1, (os.cpu_count() or 2) - 1)
    return ThreadPoolExecutor(1, thread_name_prefix="medseek-index",
                              initializer=faiss.omp_set_num_threads, initargs=(omp,))


class _StreamEnd(NamedTuple):
    """The reader of a SearchStream is done: the client closed it (``failure`` None), or
    it ended on a failure (an undecodable message)."""

    failure: Failure | None
