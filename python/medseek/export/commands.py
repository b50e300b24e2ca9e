"""``medseek export`` and ``medseek triton start|stop|status``.

* ``medseek export --model cxr-demo [--checkpoint run/checkpoint.safetensors] --repo DIR
  [--model ct-demo --checkpoint ...] [--tensorrt]``: ONNX export (verified against
  torch), then the Triton repository's version folders; ``--tensorrt`` also builds
  ``model.plan`` engines (GPU hosts with the ``tensorrt`` package only).
* ``medseek triton start --repo DIR``: start tritonserver in the background, wait until
  every model is ready, record it in ``DIR/triton.pid``; ``status`` and ``stop`` read it.
"""

from __future__ import annotations

import argparse
import json
import sys


def _export(args: argparse.Namespace) -> int:
    from medseek.export.onnx import ExportConfig
    from medseek.export.repository import RepositoryConfig, write_repository
    from medseek.models.factory import create_model

    checkpoints = args.checkpoint or []
    if checkpoints and len(checkpoints) != len(args.model):
        print(f"medseek export: give one --checkpoint per --model ({len(args.model)}), "
              f"got {len(checkpoints)}", file=sys.stderr)
        return 2
    models = []
    for i, name in enumerate(args.model):
        model = create_model(name)
        if checkpoints:
            from medseek.train.checkpoint import load_model_weights

            load_model_weights(checkpoints[i], model)
        models.append(model.eval())
    cfg = RepositoryConfig(version=args.version, export=ExportConfig(opset=args.opset))
    written = write_repository(models, args.repo, cfg)
    for model, folder in sorted(written.items()):
        print(f"{model:<16} {folder}")
    if args.tensorrt:
        from medseek.export.tensorrt import TensorRTUnavailable, build_engines

        try:
            plans = build_engines(args.repo, version=args.version)
        except TensorRTUnavailable as exc:
            print(f"medseek export --tensorrt: {exc}", file=sys.stderr)
            return 3
        for model, plan in sorted(plans.items()):
            print(f"{model:<16} {plan}")
    return 0


def _server_config(args: argparse.Namespace):
    from medseek.serve.triton import TritonServerConfig

    return TritonServerConfig(repo_dir=args.repo, host=args.host, grpc_port=args.grpc_port,
                              http_port=args.http_port, metrics_port=args.metrics_port,
                              startup_timeout=args.timeout, model_config_name=args.config_name)


def _start(args: argparse.Namespace) -> int:
    from medseek.serve.triton import (TritonServer, TritonStartError, http_ready,
                                      read_pid_file, write_pid_file)

    info = read_pid_file(args.repo)
    if info is not None and http_ready(f"http://{info['host']}:{info['http_port']}"):
        print(f"tritonserver already running for {args.repo}: pid {info['pid']}, "
              f"gRPC {info['host']}:{info['grpc_port']}", file=sys.stderr)
        return 1
    try:
        server = TritonServer(_server_config(args)).start()
    except TritonStartError as exc:
        print(f"medseek triton start: {exc}", file=sys.stderr)
        return 1
    write_pid_file(server)
    print(json.dumps(server.describe()))
    server.process = None  # left running on purpose: `medseek triton stop` ends it
    return 0


def _stop(args: argparse.Namespace) -> int:
    from medseek.serve.triton import stop_from_pid_file

    info = stop_from_pid_file(args.repo, grace=args.grace)
    if info is None:
        print(f"no tritonserver recorded in {args.repo}/triton.pid", file=sys.stderr)
        return 1
    print(f"stopped tritonserver pid {info['pid']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from medseek.serve.triton import http_ready, process_alive, read_pid_file

    info = read_pid_file(args.repo)
    if info is None:
        print(json.dumps({"running": False, "repo_dir": args.repo}))
        return 1
    info["running"] = bool(info.get("pid")) and process_alive(int(info["pid"]))
    info["ready"] = info["running"] and http_ready(f"http://{info['host']}:{info['http_port']}")
    print(json.dumps(info))
    return 0 if info["ready"] else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` and ``triton start|stop|status`` to the ``medseek`` command."""
    ex = subparsers.add_parser("export", help="ONNX export (+ TensorRT) into a Triton model repository")
    ex.add_argument("--model", action="append", required=True,
                    help="model config name or JSON path; repeat for an image and a volume model")
    ex.add_argument("--checkpoint", action="append",
                    help="training checkpoint (safetensors) per --model; default: fresh weights")
    ex.add_argument("--repo", required=True, help="model repository folder (e.g. model_repository)")
    ex.add_argument("--version", type=int, default=1, help="version folder to fill")
    ex.add_argument("--opset", type=int, default=17)
    ex.add_argument("--tensorrt", action="store_true",
                    help="also build TensorRT engines (GPU host with the tensorrt package)")
    ex.set_defaults(func=_export)

    tr = subparsers.add_parser("triton", help="start, stop or inspect a tritonserver")
    tr_sub = tr.add_subparsers(dest="triton_command", metavar="SUBCOMMAND")
    for name, func, text in (("start", _start, "start in the background and wait until ready"),
                             ("stop", _stop, "stop the server recorded in REPO/triton.pid"),
                             ("status", _status, "print the recorded server and whether it is ready")):
        p = tr_sub.add_parser(name, help=text)
        p.add_argument("--repo", required=True, help="model repository folder")
        if name == "start":
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--grpc-port", "--port", dest="grpc_port", type=int, default=None,
                           help="gRPC port (default: a free one)")
            p.add_argument("--http-port", type=int, default=None)
            p.add_argument("--metrics-port", type=int, default=None)
            p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
            p.add_argument("--config-name", default=None,
                           help="model config variant, e.g. tensorrt (configs/tensorrt.pbtxt)")
        if name == "stop":
            p.add_argument("--grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")
        p.set_defaults(func=func)
