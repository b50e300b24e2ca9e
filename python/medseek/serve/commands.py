"""``medseek serve``, ``medseek ingest``, ``medseek query`` and ``medseek stats``
(registered by ``register``; the client commands' handlers are in ``client_commands.py``,
what ``ingest`` reads in ``ingest_sources.py``).

Heavy imports (torch, grpc) happen inside the handlers, never at ``medseek --help`` time.
The client commands take ``--json`` (one JSON document of the responses' fields on
stdout), read ``MEDSEEK_ADDRESS`` / ``MEDSEEK_TOKEN_FILE`` / ``MEDSEEK_TOKEN`` when their
flags are not given, and report a failed call as one line with its status code.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path

from .gateway_command import add_http_args, register_gateway, start_for_serve



def register(subparsers) -> None:
    from .client_commands import cmd_ingest, cmd_query, cmd_stats

    p = subparsers.add_parser("serve", help="run the gRPC retrieval server",
                              epilog=SERVE_EPILOG)
    p.add_argument("--config", type=Path,
                   help="serve config (.json or .toml) (default: $MEDSEEK_CONFIG, else none: "
                        "give --store and --index-dir)")
    p.add_argument("--store", type=Path, help="SQLite store path (overrides the config)")
    p.add_argument("--index-dir", type=Path, help="saved index folder (overrides the config)")
    p.add_argument("--host", help="listen host (default: $MEDSEEK_HOST, else the config's, else "
                                  "127.0.0.1); another host needs tokens or TLS in --config, "
                                  "or --insecure-public")
    p.add_argument("--insecure-public", action="store_true", default=None,
                   help="allow a non-loopback --host with neither tokens nor TLS (anyone "
                        "who reaches the port can read and erase the archive)")
    p.add_argument("--auto-regions", action="store_true", default=None,
                   help="find the named regions of wrist and frontal chest images ingested "
                        "without boxes, and of region queries without a box, with the shipped "
                        "localisers (ServeConfig.auto_regions; trained on phantoms)")
    p.add_argument("--port", type=int, help="listen port, 0 picks a free one (default: "
                                            "$MEDSEEK_PORT, else the config's, else 50051)")
    p.add_argument("--metrics-port", type=int,
                   help="Prometheus port on 127.0.0.1 (default: the config's, else none)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--encoder", choices=("local", "onnx", "triton"), default="local",
                   help="local: in-process torch towers (untrained vision; tests, CPU demos); "
                        "onnx: ONNX Runtime on --model-repo; triton: Triton at --triton-url")
    p.add_argument("--model-repo", type=Path, help="exported model repository (onnx)")
    p.add_argument("--onnx-threads", type=int, default=1,
                   help="ONNX Runtime threads per session (onnx; 0: one per core). 1 runs each "
                        "batch on its encode lane's own thread, at that lane's priority; the "
                        "lanes' workers give the parallelism")
    p.add_argument("--triton-url", help="host:port of Triton's gRPC endpoint (images)")
    p.add_argument("--spec", type=Path, help="spec.json of the model served at --triton-url")
    p.add_argument("--volume-triton-url", help="Triton serving the volume model, if separate")
    p.add_argument("--volume-spec", type=Path, help="spec.json of the volume model")
    p.add_argument("--triton-model-prefix", default=None,
                   help="name prefix of the models at --triton-url (export --name-prefix); "
                        "default: the one --spec records")
    p.add_argument("--volume-triton-model-prefix", default=None,
                   help="name prefix of the volume model's models; default: the one "
                        "--volume-spec records")
    p.add_argument("--report-ranker", choices=("hybrid", "joint"),
                   help="report collection: hybrid (MiniLM + laterality-aware finding concepts, "
                        "in process) or joint (the encoder's text tower); default: what the "
                        "store holds, hybrid for a new store")
    p.add_argument("--workers", type=int, default=None,
                   help="server processes sharing the port and the store, each with its own "
                        "index caught up from the store (default: the config's, else 1)")
    p.add_argument("--upload-workers", type=int, default=None,
                   help="server processes, at lower priority on --upload-port, that take "
                        "image and volume searches (uploads) off the process answering text "
                        "and item queries; Stats advertises them to clients (default: the "
                        "config's, else 0: none)")
    p.add_argument("--upload-port", type=int, default=None,
                   help="port of the upload workers, 0 picks a free one (default: the "
                        "config's, else 0)")
    p.add_argument("--index", choices=("flat", "hnsw", "ivfpq"), default=None,
                   help="FAISS index kind of every collection, with that kind's default "
                        "settings (default: the config's [index] table, else flat); "
                        "Milvus and tuned settings: an [index] table in --config")
    add_http_args(p)
    p.set_defaults(func=cmd_serve, needs=SERVER_MODULES, default_log_level="info")

    p = subparsers.add_parser("ingest", help="bulk ingest a folder or a JSONL manifest",
                              epilog=CLIENT_EPILOG)
    p.add_argument("source", type=Path, help="folder of images/volumes/.txt reports, or .jsonl")
    _client_args(p)
    p.add_argument("--batch-size", type=int, default=32, help="items per Ingest call")
    p.add_argument("--collection", default="",
                   help="collection of every item (a manifest line's own wins)")
    p.set_defaults(func=cmd_ingest, needs=CLIENT_MODULES)

    p = subparsers.add_parser("query", help="search and print a ranked table",
                              epilog=CLIENT_EPILOG)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="query by report text")
    q.add_argument("--image", type=Path, help="query by an image file (PNG, JPEG, DICOM)")
    q.add_argument("--volume", type=Path, help="query by a volume file (NIfTI, zipped DICOM)")
    q.add_argument("--item-id", help="query by an item already stored (left out of the hits)")
    _client_args(p)
    p.add_argument("-k", type=int, default=10, help="hits to return")
    p.add_argument("--collection", default="", help="search this collection only (default: all)")
    p.add_argument("--modality", action="append", default=[],
                   help="keep hits of this modality (repeat for any of several)")
    p.add_argument("--body-part", action="append", default=[],
                   help="keep hits of this body part (repeat for any of several)")
    p.add_argument("--view", action="append", default=[],
                   help="keep hits of this view, e.g. PA (repeat for any of several)")
    p.add_argument("--label", action="append", default=[],
                   help="keep hits carrying any of these labels (repeatable)")
    p.add_argument("--region", help="region name for the second-stage rerank")
    p.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                   help="the --region's box in the query image, in pixels")
    p.add_argument("--diversify", action="store_true",
                   help="diversify the hits (MMR, near-duplicate and provenance caps)")
    p.add_argument("--mmr-lambda", type=float,
                   help="--diversify: relevance weight of MMR in [0, 1] (default: the "
                        "server's)")
    p.add_argument("--diagnose", action="store_true",
                   help="retrieval-based diagnosis: print the label probabilities voted by "
                        "the k nearest neighbours (no diversification)")
    p.add_argument("--temperature", type=float,
                   help="--diagnose vote: weight softmax(score / T) (server default 0.1)")
    p.add_argument("--hypothesis", action="append", default=[], metavar="NAME=LABEL,...",
                   help="--diagnose: a competing answer and the labels that support it "
                        "(NAME alone: none of the others' labels); two or more give a "
                        "contrastive decision that may abstain")
    p.add_argument("--margin-threshold", type=float,
                   help="--hypothesis: abstain below this margin (default: the stored "
                        "calibration)")
    p.add_argument("--png", type=Path, help="write a contact sheet of the hits here")
    p.add_argument("--root", type=Path, help="folder the hits' ids are paths in (for --png)")
    p.set_defaults(func=cmd_query, needs=CLIENT_MODULES)

    p = subparsers.add_parser("stats", help="print the server's collections and queues",
                              epilog=CLIENT_EPILOG)
    _client_args(p)
    p.set_defaults(func=cmd_stats, needs=CLIENT_MODULES)

    register_gateway(subparsers)


# What the handlers import: ``medseek.cli.dispatch`` imports these first and names the
# install extra of one that is missing.
CLIENT_MODULES = ("grpc", "google.protobuf")
SERVER_MODULES = CLIENT_MODULES + ("grpc_health", "grpc_reflection")
DEFAULT_ADDRESS = "127.0.0.1:50051"
CLIENT_EPILOG = """\
environment (a flag given on the command line overrides its variable):
  MEDSEEK_ADDRESS     --server (host:port)
  MEDSEEK_TOKEN_FILE  --token-file
  MEDSEEK_TOKEN       the bearer token itself, used when no token file is given
  MEDSEEK_LOG_LEVEL   medseek --log-level"""
SERVE_EPILOG = """\
environment (a flag overrides its variable; both override the config file):
  MEDSEEK_CONFIG      --config
  MEDSEEK_HOST        --host
  MEDSEEK_PORT        --port
  MEDSEEK_LOG_LEVEL   medseek --log-level (serve's default: info)"""


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", "--address", dest="server",
                   help=f"host:port of the medseek server (default: $MEDSEEK_ADDRESS, else "
                        f"{DEFAULT_ADDRESS})")
    p.add_argument("--token-file", type=Path,
                   help="file holding the bearer token (default: $MEDSEEK_TOKEN_FILE, else "
                        "the token in $MEDSEEK_TOKEN, else none)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per call")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (the responses' fields) instead of tables "
                        "and progress bars")


def client_settings(args, environ=os.environ) -> tuple[str, str | None]:
    """``(address, token)`` of a client command: a flag, else its ``MEDSEEK_*`` variable,
    else the default (the loopback port 50051, no token)."""
    address = args.server or environ.get("MEDSEEK_ADDRESS") or DEFAULT_ADDRESS
    token_file = args.token_file or (Path(environ["MEDSEEK_TOKEN_FILE"])
                                     if environ.get("MEDSEEK_TOKEN_FILE") else None)
    if token_file is None:
        return address, environ.get("MEDSEEK_TOKEN") or None
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise SystemExit(f"{_name(args)}: cannot read the token file {str(token_file)!r}: "
                         f"{exc.strerror}") from None
    if not token:
        raise SystemExit(f"{_name(args)}: the token file {str(token_file)!r} is empty")
    return address, token


def _client(args):
    from .client import RetrievalClient

    address, token = client_settings(args)
    return RetrievalClient(address, token=token)


def _name(args) -> str:
    """``medseek query``: the command as the user ran it, for error lines."""
    return getattr(args, "command_name", None) or f"medseek {args.command}"


def reports_rpc_errors(handler):
    """A client command whose call failed prints one line, ``medseek query: UNAVAILABLE:
    failed to connect ...``, and exits 1; ``--log-level debug`` also logs the traceback."""

    @functools.wraps(handler)
    def run(args) -> int:
        import grpc

        try:
            return handler(args)
        except grpc.RpcError as exc:
            logging.getLogger(__name__).debug("%s failed", _name(args), exc_info=True)
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            status = code.name if code is not None else "UNKNOWN"
            print(f"{_name(args)}: {status}: {' '.join(str(details or '').split())}",
                  file=sys.stderr)
            return 1

    return run


def print_json(document) -> None:
    """One JSON document on stdout."""
    print(json.dumps(document, indent=2, sort_keys=False))


def message_dict(message) -> dict:
    """A response as a dict: field names as in the .proto, zero values included."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


def limit_blas_threads():
    """One BLAS thread for the server process, unless ``OPENBLAS_NUM_THREADS`` is set.

    numpy's OpenBLAS threads spin (sched_yield) after every small matrix product of the
    search threads (rerank, diversify, explain): about half the server's CPU, measured
    (benchmarks/test_search.py). OpenBLAS reads the variable once, when it is loaded: it
    covers the BLAS libraries loaded from now on, and threadpoolctl (installed with
    scikit-learn) limits those loaded already (``medseek`` has imported numpy by the time
    its handler runs). FAISS's own OpenBLAS is an OpenMP build that follows the OpenMP
    thread count of the calling thread (``ServeConfig.faiss_threads``), not this limit.

    Returns
    -------
    The threadpoolctl limiter (``restore_original_limits()`` undoes it), or None when the
    user set ``OPENBLAS_NUM_THREADS``.
    """
    import os

    if "OPENBLAS_NUM_THREADS" in os.environ:
        return None
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def serve_settings(args, environ=os.environ) -> tuple[Path | None, str | None, int | None]:
    """``(config, host, port)`` of ``medseek serve``: each flag, else its ``MEDSEEK_*``
    variable, else None (the config file's value, else the built-in default)."""
    config = args.config or (Path(environ["MEDSEEK_CONFIG"])
                             if environ.get("MEDSEEK_CONFIG") else None)
    host = args.host if args.host is not None else (environ.get("MEDSEEK_HOST") or None)
    port = args.port
    if port is None and environ.get("MEDSEEK_PORT"):
        try:
            port = int(environ["MEDSEEK_PORT"])
        except ValueError:
            raise SystemExit(f"{_name(args)}: MEDSEEK_PORT must be a port number, got "
                             f"{environ['MEDSEEK_PORT']!r}") from None
    return config, host, port


def cmd_serve(args) -> int:
    limit_blas_threads()  # before the server loads more BLAS libraries

    from .config import ServeConfig, load_config
    from .server import serve

    config, host, port = serve_settings(args)
    from medseek.index.faiss_config import FaissConfig

    overrides = dict(store_path=args.store, index_dir=args.index_dir, host=host,
                     port=port, metrics_port=args.metrics_port,
                     report_ranker=args.report_ranker, insecure_public=args.insecure_public,
                     workers=args.workers, auto_regions=args.auto_regions,
                     upload_workers=args.upload_workers, upload_port=args.upload_port,
                     index=None if args.index is None else FaissConfig(kind=args.index))
    try:
        if config is not None:
            cfg = load_config(config, **overrides)
        else:
            if args.store is None or args.index_dir is None:
                raise SystemExit("medseek serve: give --config, or --store and --index-dir")
            cfg = ServeConfig(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:  # a bad or unsafe configuration: say so, no traceback
        raise SystemExit(f"medseek serve: {exc}") from None
    gateway = None

    def ready(server, port):
        nonlocal gateway
        uploads_at = (f"; uploads: {cfg.upload_workers} process(es) on port "
                      f"{cfg.upload_port}" if cfg.upload_workers else "")
        print(f"medseek serving on {cfg.host}:{port}{uploads_at}", flush=True)
        gateway = start_for_serve(args, cfg, port)  # --http-port: HTTP/JSON + viewer
        if args.port_file is not None:
            tmp = args.port_file.with_suffix(".tmp")
            tmp.write_text(str(port))
            tmp.replace(args.port_file)

    from .workers import start_upload_workers

    factory = functools.partial(encoder_from_args, args)
    uploads = None
    try:
        if cfg.upload_workers:  # first: they may create the store (one process at a time)
            cfg, uploads = start_upload_workers(cfg, factory)
        if cfg.workers > 1:
            serve_workers(cfg, factory, ready)
        else:
            serve(cfg, factory(), ready)
    finally:
        if gateway is not None:
            gateway.stop()
        if uploads is not None:
            uploads.stop()
    return 0


def serve_workers(cfg, encoder_factory, ready) -> None:
    """``--workers N``: the worker processes, watched until SIGTERM or SIGINT."""
    import signal

    from .workers import WorkerPool

    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    pool = WorkerPool(cfg, encoder_factory)
    pool.start()
    try:
        ready(None, pool.port)
        pool.watch(lambda: bool(stop))
    finally:
        pool.stop()


def encoder_from_args(args):
    """The encoder ``medseek serve`` was asked for (see ``--encoder``)."""
    if args.encoder == "local":
        from .local_encoder import LocalTorchEncoder

        return LocalTorchEncoder()
    from .routed import RoutedEncoder

    if args.encoder == "onnx":
        from medseek.encoders import OnnxRuntimeEncoder

        if args.model_repo is None:
            raise SystemExit("medseek serve: --encoder onnx needs --model-repo")
        from medseek.encoders.onnxrt import OnnxRuntimeConfig

        repo, cfg = Path(args.model_repo), OnnxRuntimeConfig(intra_op_threads=args.onnx_threads)
        if not all((repo / name).is_dir() for name in ("image_encoder", "volume_encoder")):
            return OnnxRuntimeEncoder(repo, cfg=cfg)
        # a repository of an image and a volume model (export.write_repository): both
        # served, texts by the image model's text tower as write_repository exported it
        images = OnnxRuntimeEncoder(repo, "image", cfg=cfg)
        return RoutedEncoder(images=images, volumes=OnnxRuntimeEncoder(repo, "volume", cfg=cfg),
                             texts=images)
    from medseek.encoders import EncoderSpec, TritonEncoder, TritonEncoderConfig
    from medseek.encoders.triton_client import spec_model_prefix

    if args.triton_url is None or args.spec is None:
        raise SystemExit("medseek serve: --encoder triton needs --triton-url and --spec")
    prefix = args.triton_model_prefix
    prefix = spec_model_prefix(args.spec) if prefix is None else prefix
    main = TritonEncoder(TritonEncoderConfig(args.triton_url, model_prefix=prefix),
                         EncoderSpec.load(args.spec))
    if args.volume_triton_url is None:
        return main
    if args.volume_spec is None:
        raise SystemExit("medseek serve: --volume-triton-url needs --volume-spec")
    prefix = args.volume_triton_model_prefix
    prefix = spec_model_prefix(args.volume_spec) if prefix is None else prefix
    volumes = TritonEncoder(TritonEncoderConfig(args.volume_triton_url, model_prefix=prefix),
                            EncoderSpec.load(args.volume_spec))
    return RoutedEncoder(images=main, volumes=volumes, texts=main)


def main(argv: list[str] | None = None) -> int:
    """``python -m medseek.serve``: these commands alone, run as ``medseek`` runs them."""
    from medseek.cli import Parser, add_log_level, dispatch

    parser = Parser(prog="python -m medseek.serve")
    add_log_level(parser)
    register(parser.add_subparsers(dest="command", required=True))
    return dispatch(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
