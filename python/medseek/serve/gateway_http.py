"""HTTP plumbing of the gateway (``gateway.py``): routing, bounded JSON bodies, errors.

``GatewayHandler`` parses and answers; the work of each route is ``Gateway``'s. An error is
an ``HttpError`` (HTTP status, gRPC-style code name, message) answered as
``{"code": ..., "message": ...}``; a gRPC failure becomes one by ``HTTP_STATUS``.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlsplit

import grpc

from .thumbnails import check_size

log = logging.getLogger("medseek.serve.gateway")
_MIB = 1024 * 1024

#: gRPC status -> HTTP status (as Google's HTTP/JSON transcoding maps them)
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
#: the viewer loads only its own files and draws data: thumbnails; nothing inline runs
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class HttpError(Exception):
    """An answer other than 200: HTTP status, gRPC-style code name, message."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}

    @classmethod
    def bad(cls, message: str) -> HttpError:
        return cls(400, "INVALID_ARGUMENT", message)

    @classmethod
    def of_rpc(cls, exc: grpc.RpcError) -> HttpError:
        code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
        details = exc.details() if callable(getattr(exc, "details", None)) else ""
        headers = {"WWW-Authenticate": "Bearer"} if code == grpc.StatusCode.UNAUTHENTICATED else {}
        return cls(HTTP_STATUS.get(code, 500), code.name, details or code.name.lower(), headers)


class GatewayHandler(BaseHTTPRequestHandler):
    """One HTTP exchange: route, call the gateway, answer JSON (or a static file)."""

    gateway = None  # the Gateway, set on the subclass bound to one
    protocol_version = "HTTP/1.1"
    server_version = "medseek-gateway"
    sys_version = ""
    route = "-"

    # --- answers ---------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        self._send(status, body, "application/json", headers)

    def _error(self, err: HttpError) -> None:
        self._json(err.status, {"code": err.code, "message": err.message}, err.headers)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base's name
        """Never the path (it holds item ids) nor headers: method, route and status."""

    def log_request(self, code="-", size="-") -> None:
        log.info("%s %s -> %s", self.command, self.route, code)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """The base class's own errors (malformed request line, too-long headers) as JSON."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._json(code, {"code": "INVALID_ARGUMENT" if code < 500 else "INTERNAL",
                          "message": message or phrase})

    # --- routing ---------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_HEAD(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def _dispatch(self, route) -> None:
        try:
            route(urlsplit(self.path))
        except HttpError as err:
            self._error(err)
        except grpc.RpcError as exc:
            self._error(HttpError.of_rpc(exc))
        except Exception as exc:  # noqa: BLE001 - one failed request never stops the gateway
            log.error("%s %s: internal error (%s)", self.command, self.route, type(exc).__name__)
            self._error(HttpError(500, "INTERNAL", "internal error in the gateway; it is logged"))

    def _md(self) -> tuple:
        return self.gateway.metadata(self.headers.get("Authorization"))

    def _get(self, url) -> None:
        path = url.path
        if path in ("/", "/index.html"):
            self.route = "/"
            return self._static("index.html")
        if path.startswith("/static/"):
            self.route = "/static"
            return self._static(path[len("/static/"):])
        if path == "/healthz":
            self.route = path
            return self._json(200, self.gateway.healthz())
        if path == "/v1/stats":
            self.route = path
            return self._json(200, self.gateway.stats(self._md()))
        if path.startswith("/v1/items/") and len(path) > len("/v1/items/"):
            self.route = "/v1/items/{id}"
            item_id = unquote(path[len("/v1/items/"):], errors="strict")
            thumbnail, size = self._thumbnail_query(url.query)
            return self._json(200, self.gateway.item(item_id, self._md(), thumbnail, size))
        self.route = "?"
        raise HttpError(404, "NOT_FOUND", "no such route (see GET /, /healthz, /v1/stats, "
                                          "/v1/items/{id}, POST /v1/search)")

    def _thumbnail_query(self, query: str) -> tuple[bool, int]:
        params = parse_qs(query, keep_blank_values=True)
        flag = params.get("thumbnail", ["true"])[-1].lower()
        if flag not in ("true", "false", "1", "0"):
            raise HttpError.bad(f"thumbnail: must be true or false, got {flag!r}")
        raw = params.get("size", ["160"])[-1]
        try:
            size = check_size(int(raw) if raw.isdigit() else raw)
        except ValueError as exc:
            raise HttpError.bad(str(exc)) from None
        return flag in ("true", "1"), size

    def _static(self, name: str) -> None:
        found = self.gateway.static.get(name)
        if found is None:
            raise HttpError(404, "NOT_FOUND", "no such file")
        body, content_type = found
        self._send(200, body, content_type, {"Content-Security-Policy": CSP,
                                             "Referrer-Policy": "no-referrer"})

    def _post(self, url) -> None:
        if url.path != "/v1/search":
            self.route = "?"
            raise HttpError(404, "NOT_FOUND", "no such route (POST /v1/search)")
        self.route = url.path
        body = self._read_json()
        self._json(200, self.gateway.search(body, self._md()))

    def _read_json(self):
        """The request's JSON body; its size is checked from Content-Length first."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HttpError(411, "INVALID_ARGUMENT",
                            "body: send a Content-Length (chunked bodies are not accepted)")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None or not raw_length.strip().isdigit():
            self.close_connection = True
            raise HttpError(411, "INVALID_ARGUMENT",
                            f"body: Content-Length must be a byte count, got {raw_length!r}")
        length = int(raw_length)
        limit = self.gateway.config.max_body_bytes
        if length > limit:
            self._refuse_body(length)
            raise HttpError(413, "RESOURCE_EXHAUSTED",
                            f"body: {length} bytes is over the gateway's limit of {limit} "
                            f"bytes (uploads are base64, 4/3 of the file)")
        ctype = self.headers.get("Content-Type", "application/json").split(";")[0].strip()
        if ctype.lower() != "application/json":
            self._refuse_body(length)
            raise HttpError(415, "INVALID_ARGUMENT",
                            f"body: Content-Type must be application/json, got {ctype!r}")
        data = self.rfile.read(length)
        if len(data) < length:
            self.close_connection = True
            raise HttpError.bad(f"body: ended after {len(data)} of {length} bytes")
        try:
            return json.loads(data)
        except UnicodeDecodeError:
            raise HttpError.bad("body: not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise HttpError.bad(f"body: not valid JSON ({exc.msg} at line {exc.lineno} "
                                f"column {exc.colno})") from None

    def _refuse_body(self, length: int) -> None:
        """The body stays unread, so the connection cannot carry another request. A small
        one is drained first so that closing the socket does not reset it before the client
        has read the answer (the kernel sends RST when unread data is discarded)."""
        self.close_connection = True
        if length <= 4 * _MIB:
            self.connection.settimeout(2.0)
            try:
                left = length
                while left > 0:
                    chunk = self.rfile.read(min(left, 64 * 1024))
                    if not chunk:
                        break
                    left -= len(chunk)
            except OSError:
                pass
