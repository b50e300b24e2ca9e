"""An HTTP/JSON gateway to ``medseek.v1.Retrieval``, and the browser viewer it serves.

Routes
------
``GET /``                    the viewer (``static/index.html``; its JS and CSS under ``/static/``)
``GET /healthz``             gRPC health of the retrieval server: 200 SERVING, else 503
``GET /v1/stats``            ``Stats``
``GET /v1/items/{id}``       ``Get`` of one item, with a PNG thumbnail (``?thumbnail=false``
                             leaves it out, ``?size=N`` sets its longest side)
``POST /v1/search``          ``Search``; JSON body as ``gateway_json.search_request`` says

Each call is translated to the gRPC API over one channel (``RetrievalClient``) and answered
with what the server said: the request's ``Authorization: Bearer <token>`` header is
forwarded as the ``authorization`` metadata the server's ``BearerTokenInterceptor`` checks
(the gateway keeps no tokens of its own and decides nothing about them), and a gRPC status
becomes an HTTP status with the body ``{"code": "INVALID_ARGUMENT", "message": ...}`` (the
server's message, which names the field at fault). The gateway's own checks answer the same
way: a malformed body or field 400 naming it, a body over ``max_body_bytes`` 413 decided from
its Content-Length before a byte of it is read.

Thumbnails: the store keeps no pixels (``thumbnails.py``); with ``root`` (the folder the
ids are paths in) an item shows its file, else a card drawn from its metadata.

HTTP parsing, body limits and the status map are in ``gateway_http.py``, JSON <-> proto in
``gateway_json.py``, thumbnails in ``thumbnails.py``. Request lines are logged with the
route, never the path: item ids sit in paths, and the
gateway logs no ids, pseudonyms, tokens or request content.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import gateway_json as gj
from .client import RetrievalClient
from .errors import CORRUPT_CONTENT_ERRORS
from .gateway_http import HTTP_STATUS, STATIC_TYPES, GatewayHandler, HttpError
from .thumbnails import Thumbnail, render_content, render_item
from .v1 import retrieval_pb2 as pb

log = logging.getLogger(__name__)
_MIB = 1024 * 1024
__all__ = ["Gateway", "GatewayConfig", "HTTP_STATUS", "HttpError", "create_gateway",
           "serve_gateway"]


@dataclass(frozen=True)


class GatewayConfig:
    """Where the gateway listens and what it talks to.

    Attributes
    ----------
    grpc_address : str
        ``host:port`` of the retrieval server.
    host, port : str, int
        HTTP listen address; loopback unless ``insecure_public`` (the gateway speaks plain
        HTTP, so tokens and images would cross the network in the clear: put a TLS proxy in
        front). Port 0 picks a free one.
    max_body_bytes : int
        Largest request body (base64 makes an upload 4/3 larger).
    root : Path, optional
        Folder the item ids are paths in, for thumbnails of stored items.
    grpc_timeout_s : float
        Deadline of each gRPC call.
    root_certificates : bytes, optional
        PEM roots: reach the server over TLS.
    """

    grpc_address: str
    host: str = "127.0.0.1"
    port: int = 0
    max_body_bytes: int = 64 * _MIB
    root: Path | None = None
    grpc_timeout_s: float = 60.0
    root_certificates: bytes | None = None
    insecure_public: bool = False

    def __post_init__(self) -> None:
        if not self.grpc_address or ":" not in self.grpc_address:
            raise ValueError(f"grpc_address must be host:port, got {self.grpc_address!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.grpc_timeout_s <= 0:
            raise ValueError(f"grpc_timeout_s must be > 0, got {self.grpc_timeout_s}")
        if self.root is not None and not Path(self.root).is_dir():
            raise ValueError(f"root must be a folder, got {self.root}")
        if not self.insecure_public and not _is_loopback(self.host):
            raise ValueError(f"host {self.host!r} is not loopback: the gateway speaks plain "
                             f"HTTP; serve it behind a TLS proxy and set insecure_public")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The viewer's files, read once from the installed package: name -> (bytes, type)."""
    folder = resources.files("medseek.serve") / "static"
    files = {}
    for entry in folder.iterdir():
        suffix = Path(entry.name).suffix
        if entry.is_file() and suffix in STATIC_TYPES:
            files[entry.name] = (entry.read_bytes(), STATIC_TYPES[suffix])
    return files


class Gateway:
    """The gateway's HTTP server and gRPC client; ``start()`` serves on a thread.

    ``with Gateway(GatewayConfig("127.0.0.1:50051")) as g: ... g.url``
    """

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.client = RetrievalClient(config.grpc_address,
                                      root_certificates=config.root_certificates,
                                      max_message_bytes=max(64 * _MIB, config.max_body_bytes))
        self.health = health_pb2_grpc.HealthStub(self.client.channel)
        self.static = _static_files()
        handler = type("BoundHandler", (GatewayHandler,), {"gateway": self})
        try:
            self.httpd = ThreadingHTTPServer((config.host, config.port), handler)
        except BaseException:
            self.client.close()
            raise
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    def start(self) -> Gateway:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="medseek-gateway",
                                        daemon=True)
        self._thread.start()
        log.info("medseek gateway on %s -> gRPC %s", self.url, self.config.grpc_address)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()
        self.client.close()

    def __enter__(self) -> Gateway:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the routes' work, on the handler's thread -----------------------------------

    def metadata(self, authorization: str | None) -> tuple:
        return (("authorization", authorization),) if authorization else ()

    def healthz(self) -> dict:
        try:
            resp = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5.0)
        except grpc.RpcError as exc:
            raise HttpError(503, "UNAVAILABLE",
                            f"retrieval server not reachable ({exc.code().name})") from None
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            raise HttpError(503, "UNAVAILABLE", f"retrieval server is {status}")
        return {"status": status}

    def stats(self, md: tuple) -> dict:
        resp = self.client.stub.Stats(pb.StatsRequest(), timeout=self.config.grpc_timeout_s,
                                      metadata=md)
        return gj.stats_json(resp)

    def get_items(self, ids: list[str], md: tuple) -> dict[str, pb.Item]:
        resp = self.client.stub.Get(pb.GetRequest(ids=ids), timeout=self.config.grpc_timeout_s,
                                    metadata=md)
        return {it.id: it for it in resp.items}

    def item(self, item_id: str, md: tuple, thumbnail: bool, size: int) -> dict:
        found = self.get_items([item_id], md).get(item_id)
        if found is None:  # the server answers NOT_FOUND itself; this guards an empty reply
            raise HttpError(404, "NOT_FOUND", f"ids: no item {item_id!r}")
        out = gj.item_json(found)
        if thumbnail:
            out["thumbnail"] = render_item(found, self.config.root, size).as_json()
        return out

    def search(self, body, md: tuple) -> dict:
        try:
            req, view = gj.search_request(body)
        except gj.BadField as exc:
            raise HttpError.bad(str(exc)) from None
        resp = self.client.stub.Search(req, timeout=self.config.grpc_timeout_s, metadata=md)
        out = gj.search_json(resp)
        regions = [h.region_id for h in resp.hits if h.region_id]
        children = self.get_items(regions, md) if regions else {}
        for hit, js in zip(resp.hits, out["hits"]):
            child = children.get(hit.region_id)
            shape = gj.item_json(child) if child is not None else None
            js["region"] = None if shape is None else {
                "name": shape["region"], "box": shape["box"], "z_range": shape["z_range"]}
            if view.thumbnails:
                js["thumbnail"] = render_item(hit.item, self.config.root,
                                              view.thumbnail_size).as_json()
        if view.preview:
            shown = self._preview(req, md, view.preview_size)
            out["query_preview"] = shown.as_json() if shown is not None else None
        return out

    def _preview(self, req: pb.SearchRequest, md: tuple, size: int) -> Thumbnail | None:
        """The query as the viewer shows it beside a hit: the upload (at the region's
        z-range), or the stored item; None for text, or content the server read but the
        renderer cannot (the search answered already)."""
        kind = req.WhichOneof("query")
        if kind == "item_id":
            item = self.get_items([req.item_id], md).get(req.item_id)
            return render_item(item, self.config.root, size) if item is not None else None
        if kind not in ("image", "volume"):
            return None
        z = None
        if req.HasField("region") and req.region.HasField("z_range"):
            z = (req.region.z_range.z_start, req.region.z_range.z_end)
        try:
            return render_content(getattr(req, kind), kind, size=size, z_range=z)
        except (ValueError, *CORRUPT_CONTENT_ERRORS):
            return None


def create_gateway(config: GatewayConfig) -> tuple[Gateway, int]:
    """Build and bind the gateway (not started); returns it and the bound port."""
    gateway = Gateway(config)
    return gateway, gateway.port


def serve_gateway(config: GatewayConfig, ready=None) -> None:
    """Serve until SIGTERM/SIGINT (the ``medseek gateway`` command)."""
    import signal

    gateway = Gateway(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with gateway:
        if ready is not None:
            ready(gateway)
        while not stop.wait(1.0):
            pass
