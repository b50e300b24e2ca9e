"""``medseek gateway`` and ``medseek serve --http-port``: the HTTP/JSON gateway and viewer.

Only argparse at import time; the gateway (grpc, Pillow) is imported by the handlers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

GATEWAY_MODULES = ("grpc", "google.protobuf", "grpc_health")
_MIB = 1024 * 1024


def _common(p: argparse.ArgumentParser, prefix: str) -> None:
    p.add_argument(f"--{prefix}root", type=Path, dest="http_root", metavar="DIR",
                   help="folder the item ids are paths in (ids made by `medseek ingest` of a "
                        "folder): thumbnails show the files; without it, metadata cards")
    p.add_argument(f"--{prefix}max-body-mb", type=float, default=64.0, dest="http_max_body_mb",
                   metavar="MIB",
                   help="largest request body in MiB, base64 uploads included (default 64)")


def add_http_args(p: argparse.ArgumentParser) -> None:
    """``medseek serve``'s flags that start the gateway beside the gRPC server."""
    p.add_argument("--http-port", type=int,
                   help="also serve the HTTP/JSON gateway and browser viewer on "
                        "127.0.0.1:<port> (0 picks one); default: no HTTP")
    _common(p, "http-")


def register_gateway(subparsers) -> None:
    p = subparsers.add_parser(
        "gateway", help="HTTP/JSON gateway and browser viewer of a running gRPC server",
        description="Serve POST /v1/search, GET /v1/items/{id}, GET /v1/stats, GET /healthz "
                    "and the viewer at / in front of a medseek gRPC server. Bearer tokens are "
                    "passed through to the server, which checks them.")
    p.add_argument("--grpc", default="127.0.0.1:50051",
                   help="host:port of the medseek gRPC server (default 127.0.0.1:50051)")
    p.add_argument("--host", default="127.0.0.1",
                   help="HTTP listen host (default 127.0.0.1); another host needs "
                        "--insecure-public (plain HTTP: put a TLS proxy in front)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port, 0 picks one (default 8080)")
    p.add_argument("--insecure-public", action="store_true",
                   help="allow a non-loopback --host although the gateway speaks plain HTTP")
    p.add_argument("--tls-roots", type=Path, metavar="PEM",
                   help="PEM root certificates: reach the gRPC server over TLS")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per gRPC call")
    p.add_argument("--port-file", type=Path, help="write the bound HTTP port here once listening")
    _common(p, "")
    p.set_defaults(func=cmd_gateway, needs=GATEWAY_MODULES, default_log_level="info")


def _config(args, grpc_address: str, host: str, port: int, roots: bytes | None = None,
            insecure_public: bool = False):
    from .gateway import GatewayConfig

    try:
        return GatewayConfig(grpc_address, host=host, port=port,
                             max_body_bytes=int(args.http_max_body_mb * _MIB),
                             root=args.http_root, grpc_timeout_s=getattr(args, "timeout", 60.0),
                             root_certificates=roots, insecure_public=insecure_public)
    except ValueError as exc:  # a bad or unsafe setting: say so, no traceback
        raise SystemExit(f"medseek gateway: {exc}") from None


def _write_port(path: Path | None, port: int) -> None:
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(path)


def cmd_gateway(args) -> int:
    from .gateway import serve_gateway

    roots = args.tls_roots.read_bytes() if args.tls_roots is not None else None
    cfg = _config(args, args.grpc, args.host, args.port, roots, args.insecure_public)

    def ready(gateway) -> None:
        print(f"medseek gateway on {gateway.url} (viewer at /) -> gRPC {cfg.grpc_address}",
              flush=True)
        _write_port(args.port_file, gateway.port)

    serve_gateway(cfg, ready)
    return 0


def local_address(host: str, port: int) -> str:
    """How a process on the same machine reaches a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return f"127.0.0.1:{port}"
    if host == "::":
        return f"[::1]:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_for_serve(args, serve_config, grpc_port: int):
    """The gateway of ``medseek serve --http-port``, started (None without the flag)."""
    if getattr(args, "http_port", None) is None:
        return None
    from .gateway import Gateway

    tls = serve_config.tls_cert
    cfg = _config(args, local_address(serve_config.host, grpc_port), "127.0.0.1",
                  args.http_port, tls.read_bytes() if tls is not None else None)
    gateway = Gateway(cfg).start()
    print(f"medseek gateway on {gateway.url} (viewer at /)", flush=True)
    return gateway
