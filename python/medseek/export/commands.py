"""``medseek export`` and ``medseek triton start|stop|status``.

* ``medseek export --model cxr-demo [--checkpoint run/checkpoint.safetensors] --repo DIR
  [--model ct-demo --checkpoint ...] [--tensorrt]``: ONNX export (verified against
  torch), then the Triton repository's version folders; ``--tensorrt`` also builds
  ``model.plan`` engines (GPU hosts with the ``tensorrt`` package only).
* ``medseek export --from-hf DIR --out OUT``: the same for a local Hugging Face
  checkpoint (DINOv2, CLIP, SigLIP; :mod:`medseek.export.hf`).
* ``medseek triton start --repo DIR``: start tritonserver in the background, wait until
  every model is ready, record it in ``DIR/triton.pid``; ``status`` and ``stop`` read it.
  ``--repo A --repo B`` serves several exports (each with its own ``--name-prefix``) in
  one server: their models are linked into one repository folder (a name in two of them
  is refused), and the server is recorded in each ``triton.pid``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path


def _export(args: argparse.Namespace) -> int:
    from medseek.export.onnx import ExportConfig
    from medseek.export.repository import RepositoryConfig, write_repository
    from medseek.models.factory import create_model

    if args.from_hf is not None or not args.model:
        return _export_hf(args)
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
    try:
        cfg = RepositoryConfig(version=args.version, export=ExportConfig(opset=args.opset),
                               name_prefix=args.name_prefix)
    except ValueError as exc:
        print(f"medseek export: {exc}", file=sys.stderr)
        return 2
    written = write_repository(models, args.repo, cfg)
    for model, folder in sorted(written.items()):
        print(f"{model:<16} {folder}")
    return _build_plans(args) if args.tensorrt else 0


def _export_hf(args: argparse.Namespace) -> int:
    """``--from-hf DIR``: a local Hugging Face checkpoint (DINOv2, CLIP, SigLIP) into the
    repository ``--out`` (:func:`medseek.export.hf.export_hf`)."""
    if (args.from_hf is None) == (not args.model):
        print("medseek export: give --model (medseek's own towers) or --from-hf DIR (a local "
              "Hugging Face checkpoint), one of the two", file=sys.stderr)
        return 2
    if args.checkpoint:
        print("medseek export: --checkpoint goes with --model; --from-hf reads the weights "
              "in its folder", file=sys.stderr)
        return 2
    from medseek.export.hf import HFCheckpointError, HFExportConfig, export_hf
    from medseek.export.onnx import ExportConfig

    try:
        cfg = HFExportConfig(pooling=args.hf_pooling, version=args.version,
                             export=ExportConfig(opset=args.opset), name_prefix=args.name_prefix)
        written = export_hf(args.from_hf, args.repo, cfg)
    except (HFCheckpointError, ValueError) as exc:
        print(f"medseek export --from-hf: {exc}", file=sys.stderr)
        return 2
    for model, folder in sorted(written.items()):
        print(f"{model:<16} {folder}")
    return _build_plans(args) if args.tensorrt else 0


def _build_plans(args: argparse.Namespace) -> int:
    """``--tensorrt``: ``model.plan`` beside each exported encoder."""
    from medseek.export.tensorrt import TensorRTUnavailable, build_engines

    try:
        plans = build_engines(args.repo, version=args.version, name_prefix=args.name_prefix)
    except TensorRTUnavailable as exc:
        print(f"medseek export --tensorrt: {exc}", file=sys.stderr)
        return 3
    for model, plan in sorted(plans.items()):
        print(f"{model:<16} {plan}")
    return 0


def _server_config(args: argparse.Namespace, repo_dir: Path, work_dir: Path | None,
                   log_path: Path | None):
    from medseek.serve.triton import TritonServerConfig

    return TritonServerConfig(repo_dir=repo_dir, host=args.host, grpc_port=args.grpc_port,
                              http_port=args.http_port, metrics_port=args.metrics_port,
                              startup_timeout=args.timeout, model_config_name=args.config_name,
                              work_dir=work_dir, log_path=log_path)


def _start(args: argparse.Namespace) -> int:
    from medseek.serve.triton import (RepositoryMergeError, TritonServer, TritonStartError,
                                      http_ready, merge_repositories, read_pid_file,
                                      write_pid_file)

    repos = [Path(r) for r in args.repo]
    for repo in repos:
        info = read_pid_file(repo) if repo.is_dir() else None
        if info is not None and http_ready(f"http://{info['host']}:{info['http_port']}"):
            print(f"tritonserver already running for {repo}: pid {info['pid']}, "
                  f"gRPC {info['host']}:{info['grpc_port']}", file=sys.stderr)
            return 1
    work_dir = served = log_path = None
    if len(repos) > 1:  # one folder of links to every model; removed by `triton stop`
        work_dir = Path(tempfile.mkdtemp(prefix="medseek-triton-"))
        served, log_path = work_dir / "repository", repos[0] / "triton.log"
        try:
            merge_repositories(repos, served)
        except RepositoryMergeError as exc:
            shutil.rmtree(work_dir, ignore_errors=True)
            print(f"medseek triton start: {exc}", file=sys.stderr)
            return 2
    try:
        server = TritonServer(_server_config(args, served or repos[0], work_dir, log_path)).start()
    except (TritonStartError, ValueError) as exc:
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)
        print(f"medseek triton start: {exc}", file=sys.stderr)
        return 1
    write_pid_file(server, repos)
    print(json.dumps({**server.describe(), "repositories": [str(r.resolve()) for r in repos]}))
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
    ex.add_argument("--model", action="append",
                    help="model config name or JSON path; repeat for an image and a volume model")
    ex.add_argument("--checkpoint", action="append",
                    help="training checkpoint (safetensors) per --model; default: fresh weights")
    ex.add_argument("--repo", "--out", dest="repo", required=True, help="model repository folder (e.g. model_repository)")
    ex.add_argument("--version", type=int, default=1, help="version folder to fill")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset of the exported graphs")
    ex.add_argument("--tensorrt", action="store_true",
                    help="also build TensorRT engines (GPU host with the tensorrt package)")
    ex.add_argument("--name-prefix", default="",
                    help="put before every model name (e.g. wrist_ -> wrist_image_encoder), so "
                         "several exports can share one tritonserver; default: none")
    ex.add_argument("--from-hf", metavar="DIR", default=None,
                    help="instead of --model: a local Hugging Face checkpoint folder (config.json "
                         "+ safetensors + preprocessor_config.json, + tokenizer.json for "
                         "CLIP/SigLIP) of a Dinov2Model, CLIPModel or SiglipModel")
    ex.add_argument("--hf-pooling", choices=("cls", "cls_mean"), default="cls",
                    help="DINOv2 image embedding with --from-hf: the CLS token (default) or CLS "
                         "and the mean patch token concatenated")
    ex.set_defaults(func=_export, needs=("onnxruntime",))  # verify_graph runs the export

    tr = subparsers.add_parser("triton", help="start, stop or inspect a tritonserver")
    tr_sub = tr.add_subparsers(dest="triton_command", metavar="SUBCOMMAND")
    for name, func, text in (("start", _start, "start in the background and wait until ready"),
                             ("stop", _stop, "stop the server recorded in REPO/triton.pid"),
                             ("status", _status, "print the recorded server and whether it is ready")):
        p = tr_sub.add_parser(name, help=text)
        if name == "start":
            p.add_argument("--repo", "--repository", dest="repo", action="append", required=True,
                           help="model repository folder; repeat to serve several exports in "
                                "one server (their names must differ: export --name-prefix)")
        else:
            p.add_argument("--repo", "--repository", dest="repo", required=True,
                           help="model repository folder (any one a server was started with)")
        if name == "start":
            p.add_argument("--host", default="127.0.0.1", help="address tritonserver binds")
            p.add_argument("--grpc-port", "--port", dest="grpc_port", type=int, default=None,
                           help="gRPC port (default: a free one)")
            p.add_argument("--http-port", type=int, default=None,
                           help="HTTP port (default: a free one)")
            p.add_argument("--metrics-port", type=int, default=None,
                           help="metrics port (default: a free one)")
            p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
            p.add_argument("--config-name", default=None,
                           help="model config variant, e.g. tensorrt (configs/tensorrt.pbtxt)")
        if name == "stop":
            p.add_argument("--grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")
        p.set_defaults(func=func)
