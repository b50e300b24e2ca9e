"""Start the retrieval server: ``create_server`` (tests, embedding), ``serve`` (the command),
``ServerThread`` (an in-process server on its own event loop, for sync callers).

Start-up opens the store, loads each collection's saved index and catches it up from the
store's changelog (``Catalog.open``), so the index always agrees with what was committed,
even after a SIGKILL. Shutdown (``RetrievalServer.stop``) refuses new calls, lets in-flight
calls finish for up to ``grace_s``, drains the batchers, saves the indexes and closes the
store.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import traceback

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from medseek.index import Catalog, CatalogConfig, Store, StoreConfig
from medseek.search import ConceptBank, SearchPipeline
from medseek.text.lexicon import FINDINGS

from .auth import BearerTokenInterceptor
from .config import ServeConfig
from .errors import lenient
from .wire import search_deserializer
from .ingest import DEFAULT_COLLECTION
from .metrics import ServerMetrics
from .report_ranker import resolve_report_ranker
from .servicer import RetrievalService
from .v1 import retrieval_pb2

log = logging.getLogger(__name__)
SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["Retrieval"].full_name


def concept_bank(encoder) -> ConceptBank | None:
    """The concepts that explain a match (CEMRAG).

    The encoder's own calibrated finding bank when its model has a finding head (a
    finding is shown for an item when the head's logit beats the threshold fitted on a
    validation split); otherwise each finding of the lexicon against its negation, as
    paired prompts ("pleural effusion" / "no pleural effusion"). A plain prompt cosine has
    no zero point: it is positive for nearly every item, so every hit got the same
    concepts. None for an image-only encoder (``encodes_text`` False): no prompts to embed.
    """
    own = getattr(encoder, "concept_bank", None)
    bank = own() if callable(own) else None
    if bank is not None:
        return bank
    if not getattr(encoder, "encodes_text", True):
        return None
    names = tuple(f.name for f in FINDINGS)
    return ConceptBank.from_prompt_pairs(names, encoder.encode_texts(list(names)),
                                         encoder.encode_texts([f"no {n}" for n in names]))


def add_health(server: grpc.aio.Server, services: list[str]) -> health.aio.HealthServicer:
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


def add_retrieval(server: grpc.aio.Server, servicer) -> None:
    """Register ``servicer``'s methods, as the generated ``add_RetrievalServicer_to_server``
    does, but with lenient request deserializers (``errors.lenient``): a message that does
    not parse reaches the handler, which answers INVALID_ARGUMENT naming it, where gRPC
    would end the call with UNKNOWN (and a stream's reader with an exception)."""
    factories = {(False, False): grpc.unary_unary_rpc_method_handler,
                 (False, True): grpc.unary_stream_rpc_method_handler,
                 (True, False): grpc.stream_unary_rpc_method_handler,
                 (True, True): grpc.stream_stream_rpc_method_handler}
    service = retrieval_pb2.DESCRIPTOR.services_by_name["Retrieval"]
    handlers = {}
    for method in service.methods:
        request = getattr(retrieval_pb2, method.input_type.name)
        response = getattr(retrieval_pb2, method.output_type.name)
        factory = factories[(method.client_streaming, method.server_streaming)]
        # SearchRequest: large uploads are split out without a copy (serve.wire)
        read = (search_deserializer(request) if request is retrieval_pb2.SearchRequest
                else lenient(request))
        handlers[method.name] = factory(getattr(servicer, method.name),
                                        request_deserializer=read,
                                        response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def quiet_loop_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log what the event loop reports on its own (e.g. "Task exception was never
    retrieved") with the exception's type and traceback frames only: asyncio's default
    handler prints the exception's message and the task's repr, which may hold an item
    id, a pseudonym or request text."""

    def handler(loop, context) -> None:
        exc = context.get("exception")
        what = f" ({type(exc).__name__})" if exc is not None else ""
        frames = "".join(traceback.format_tb(exc.__traceback__)).rstrip() if exc else ""
        log.error("event loop: %s%s%s", context.get("message", "unhandled error"), what,
                  f" at\n{frames}" if frames else "")

    loop.set_exception_handler(handler)


def add_reflection(server: grpc.aio.Server, services: list[str]) -> None:
    reflection.enable_server_reflection([*services, reflection.SERVICE_NAME], server)


class RetrievalServer:
    """A built, bound server: ``await start()``, ``await stop()``, ``port``."""

    def __init__(self, grpc_server, service, health_servicer, port, metrics, config) -> None:
        self.grpc_server, self.service, self.health = grpc_server, service, health_servicer
        self.port, self.metrics, self.config = port, metrics, config
        self.metrics_port: int | None = None

    async def start(self) -> None:
        quiet_loop_errors(asyncio.get_running_loop())
        self.service.start()
        await self.grpc_server.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.config.metrics_port)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("medseek server listening on %s:%d", self.config.host, self.port)

    async def stop(self, grace: float | None = None) -> None:
        grace = self.config.grace_s if grace is None else grace
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc_server.stop(grace)  # in-flight calls finish within grace
        await self.service.close()
        svc = self.service
        svc.catalog.save()
        svc.pipeline.close()
        svc.store.close()
        self.metrics.close()
        log.info("medseek server stopped")

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def create_server(config: ServeConfig, encoder, *,
                  unavailable_errors: tuple = (ConnectionError, TimeoutError),
                  sentence_encoder=None) -> tuple[RetrievalServer, int]:
    """Build and bind the server (not started); call from inside the serving event loop.

    The report collection is ranked as ``config.report_ranker`` and the store say
    (``medseek.serve.report_ranker``); ``sentence_encoder`` (optional) is the MiniLM the
    hybrid ranker uses instead of loading its own. Every other collection holds
    ``encoder.dim`` embeddings.

    Returns
    -------
    (RetrievalServer, port) : the port actually bound (``config.port`` 0 picks one).
    """
    store = Store(StoreConfig(config.store_path, model=config.model))
    try:
        catalog = Catalog(store, CatalogConfig(config.index_dir, config.index,
                                               config.index_per_collection))
        opened = catalog.open()
        log.info("catalog opened: %d collections", len(opened))
        reports = resolve_report_ranker(store, config.report_ranker, encoder.dim,
                                        DEFAULT_COLLECTION["text"], sentence_encoder)
        dims = store.collections()
        dims.pop(reports.collection, None)  # checked by resolve_report_ranker
        if any(d != encoder.dim for d in dims.values()):
            raise ValueError(f"encoder.dim {encoder.dim} differs from the store's collection "
                             f"dims {dims}")
        own = {} if reports.encoder is None else {
            reports.collection: reports.encoder.concept_bank()}
        pipeline = SearchPipeline(catalog, store, config.search, concepts=concept_bank(encoder),
                                  collection_concepts=own)
    except BaseException:
        store.close()
        raise
    metrics = ServerMetrics()
    service = RetrievalService(config, encoder, store, catalog, pipeline, metrics,
                               unavailable_errors, report_ranker=reports)
    interceptors = [BearerTokenInterceptor(config.tokens)] if config.tokens else []
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        ("grpc.max_send_message_length", config.max_send_message_bytes),
        # a second server on a taken port fails, unless this is one of several workers
        ("grpc.so_reuseport", int(config.workers > 1)),
    ])
    add_retrieval(server, service)
    health_servicer = add_health(server, [SERVICE_NAME])
    add_reflection(server, [SERVICE_NAME, health.SERVICE_NAME])
    if config.tls_cert is not None:
        creds = grpc.ssl_server_credentials(
            [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
        port = server.add_secure_port(config.address, creds)
    else:
        port = server.add_insecure_port(config.address)
    if port == 0:
        raise RuntimeError(f"could not bind {config.address}")
    return RetrievalServer(server, service, health_servicer, port, metrics, config), port


#: Generation-0 threshold of Python's cyclic GC in a server process (CPython 3.11's: 700).
GC_THRESHOLD0 = 20_000


def tune_gc_for_serving() -> None:
    """Python's cyclic GC for a long-running server process, once start-up is done.

    Under load the default thresholds ran a full collection every 2–3 s, each walking the
    ~230,000 objects start-up leaves (models, concept banks, caches) for ~0.1 s with the
    GIL held: 0.14 ms of CPU per plain search, all of it re-checking objects that live as
    long as the process. So start-up's objects are collected once and frozen (``gc.freeze``:
    later collections skip them), and generation 0 is collected every ``GC_THRESHOLD0``
    net allocations instead of 700 (RESULTS, "Python's cyclic GC in the server"). Called by
    ``serve`` only: a server process owns its interpreter; ``ServerThread`` (tests, the
    demo) shares one and leaves it alone.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])


async def _serve(config: ServeConfig, encoder, ready=None) -> None:
    server, port = create_server(config, encoder)
    await server.start()
    tune_gc_for_serving()
    if ready is not None:
        ready(server, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def serve(config: ServeConfig, encoder, ready=None) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully. ``ready(server, port)`` is
    called once listening (e.g. to write a port file)."""
    asyncio.run(_serve(config, encoder, ready))


class ServerThread:
    """An in-process server on its own event loop thread (tests, ``medseek demo``).

    ``with ServerThread(config, encoder) as s: ... s.port`` ; ``stop()`` is graceful.
    """

    def __init__(self, config: ServeConfig, encoder, **kwargs) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: RetrievalServer | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, args=(config, encoder, kwargs),
                                        name="medseek-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _run(self, config, encoder, kwargs) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.server, self.port = self._loop.run_until_complete(
                self._start(config, encoder, kwargs))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the constructor
            self._error = exc
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _start(self, config, encoder, kwargs):
        server, port = create_server(config, encoder, **kwargs)
        await server.start()
        return server, port

    def stop(self, grace: float | None = None) -> None:
        if self.server is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop)
        fut.result()
        self.server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
