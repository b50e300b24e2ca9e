"""``medseek serve``, ``medseek ingest`` and ``medseek query`` (registered by ``register``).

Heavy imports (torch, grpc) happen inside the handlers, never at ``medseek --help`` time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".dcm")
VOLUME_EXT = (".nii", ".nii.gz", ".zip")
TEXT_EXT = (".txt",)


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the gRPC retrieval server")
    p.add_argument("--config", type=Path, help="serve config (.json or .toml)")
    p.add_argument("--store", type=Path, help="SQLite store path (overrides the config)")
    p.add_argument("--index-dir", type=Path, help="saved index folder (overrides the config)")
    p.add_argument("--host", help="listen host (default 127.0.0.1); another host needs "
                                  "tokens or TLS in --config, or --insecure-public")
    p.add_argument("--insecure-public", action="store_true", default=None,
                   help="allow a non-loopback --host with neither tokens nor TLS (anyone "
                        "who reaches the port can read and erase the archive)")
    p.add_argument("--port", type=int, help="listen port (0 picks a free one)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port on 127.0.0.1")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--encoder", choices=("local", "onnx", "triton"), default="local",
                   help="local: in-process torch towers (untrained vision; tests, CPU demos); "
                        "onnx: ONNX Runtime on --model-repo; triton: Triton at --triton-url")
    p.add_argument("--model-repo", type=Path, help="exported model repository (onnx)")
    p.add_argument("--triton-url", help="host:port of Triton's gRPC endpoint (images)")
    p.add_argument("--spec", type=Path, help="spec.json of the model served at --triton-url")
    p.add_argument("--volume-triton-url", help="Triton serving the volume model, if separate")
    p.add_argument("--volume-spec", type=Path, help="spec.json of the volume model")
    p.add_argument("--report-ranker", choices=("hybrid", "joint"),
                   help="report collection: hybrid (MiniLM + laterality-aware finding concepts, "
                        "in process) or joint (the encoder's text tower); default: what the "
                        "store holds, hybrid for a new store")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("ingest", help="bulk ingest a folder or a JSONL manifest")
    p.add_argument("source", type=Path, help="folder of images/volumes/.txt reports, or .jsonl")
    _client_args(p)
    p.add_argument("--batch-size", type=int, default=32, help="items per Ingest call")
    p.add_argument("--collection", default="", help="collection for every item")
    p.set_defaults(func=cmd_ingest)

    p = subparsers.add_parser("query", help="search and print a ranked table")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text")
    q.add_argument("--image", type=Path)
    q.add_argument("--volume", type=Path)
    q.add_argument("--item-id")
    _client_args(p)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--collection", default="")
    p.add_argument("--modality", action="append", default=[])
    p.add_argument("--body-part", action="append", default=[])
    p.add_argument("--view", action="append", default=[])
    p.add_argument("--label", action="append", default=[], help="labels_any filter")
    p.add_argument("--region", help="region name for the second-stage rerank")
    p.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"))
    p.add_argument("--diversify", action="store_true")
    p.add_argument("--mmr-lambda", type=float)
    p.add_argument("--diagnose", action="store_true",
                   help="retrieval-based diagnosis: print the label probabilities voted by "
                        "the k nearest neighbours (no diversification)")
    p.add_argument("--temperature", type=float,
                   help="--diagnose vote: weight softmax(score / T) (server default 0.1)")
    p.add_argument("--png", type=Path, help="write a contact sheet of the hits here")
    p.add_argument("--root", type=Path, help="folder the hits' ids are paths in (for --png)")
    p.set_defaults(func=cmd_query)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="127.0.0.1:50051", help="host:port")
    p.add_argument("--token-file", type=Path, help="file holding the bearer token")
    p.add_argument("--timeout", type=float, default=300.0)


def _client(args):
    from .client import RetrievalClient

    token = args.token_file.read_text().strip() if args.token_file else None
    return RetrievalClient(args.server, token=token)


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


def cmd_serve(args) -> int:
    import logging

    limit_blas_threads()  # before the server loads more BLAS libraries

    from .config import ServeConfig, load_config
    from .server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = dict(store_path=args.store, index_dir=args.index_dir, host=args.host,
                     port=args.port, metrics_port=args.metrics_port,
                     report_ranker=args.report_ranker, insecure_public=args.insecure_public)
    try:
        if args.config is not None:
            cfg = load_config(args.config, **overrides)
        else:
            if args.store is None or args.index_dir is None:
                raise SystemExit("medseek serve: give --config, or --store and --index-dir")
            cfg = ServeConfig(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:  # a bad or unsafe configuration: say so, no traceback
        raise SystemExit(f"medseek serve: {exc}") from None
    encoder = encoder_from_args(args)

    def ready(server, port):
        print(f"medseek serving on {cfg.host}:{port}", flush=True)
        if args.port_file is not None:
            tmp = args.port_file.with_suffix(".tmp")
            tmp.write_text(str(port))
            tmp.replace(args.port_file)

    serve(cfg, encoder, ready)
    return 0


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
        return OnnxRuntimeEncoder(args.model_repo)
    from medseek.encoders import EncoderSpec, TritonEncoder, TritonEncoderConfig

    if args.triton_url is None or args.spec is None:
        raise SystemExit("medseek serve: --encoder triton needs --triton-url and --spec")
    main = TritonEncoder(TritonEncoderConfig(args.triton_url), EncoderSpec.load(args.spec))
    if args.volume_triton_url is None:
        return main
    if args.volume_spec is None:
        raise SystemExit("medseek serve: --volume-triton-url needs --volume-spec")
    volumes = TritonEncoder(TritonEncoderConfig(args.volume_triton_url),
                            EncoderSpec.load(args.volume_spec))
    return RoutedEncoder(images=main, volumes=volumes, texts=main)


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(IMAGE_EXT):
        return "image"
    if name.endswith(VOLUME_EXT):
        return "volume"
    if name.endswith(TEXT_EXT):
        return "text"
    return None


def iter_items(source: Path, collection: str = ""):
    """IngestItems of a folder (id = relative path) or a JSONL manifest, one per line:
    ``{"id", "path" | "text", "collection", "modality", "body_part", "view", "labels",
    "patient_pseudonym", "study_pseudonym", "source_document", "regions"}``; ``regions``
    is a list of ``{"name", "box": [x0, y0, x1, y1]}`` (images) or
    ``{"name", "z_range": [z0, z1]}`` (a volume's organs: slices ``[z0, z1)``, ``z1``
    exclusive, as in the corpus manifests)."""
    from .v1 import retrieval_pb2 as pb

    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            kind = _kind_of(path)
            if kind is None:
                continue
            data = path.read_text() if kind == "text" else path.read_bytes()
            yield pb.IngestItem(id=path.relative_to(source).as_posix(), collection=collection,
                                **{kind: data})
        return
    for n, line in enumerate(source.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        meta = {k: row[k] for k in ("modality", "body_part", "view", "labels",
                                    "patient_pseudonym", "study_pseudonym", "source_document")
                if row.get(k) is not None}
        if "text" in row:
            content = {"text": row["text"]}
        elif "path" in row:
            path = source.parent / row["path"]
            kind = _kind_of(path)
            if kind is None:
                raise ValueError(f"{source}:{n + 1}: path {row['path']!r} has no known extension")
            content = {kind: path.read_text() if kind == "text" else path.read_bytes()}
        else:
            raise ValueError(f"{source}:{n + 1}: each line needs 'text' or 'path'")
        regions = [_region(pb, r, f"{source}:{n + 1}") for r in row.get("regions") or ()]
        yield pb.IngestItem(id=str(row["id"]), collection=row.get("collection", collection),
                            regions=regions, **content, **meta)


def _region(pb, raw: dict, where: str):
    """A manifest region: {"name", "box": [x0, y0, x1, y1]} or {"name", "z_range": [z0, z1]}."""
    if not isinstance(raw, dict) or not raw.get("name") or ("box" in raw) == ("z_range" in raw):
        raise ValueError(f"{where}: each region needs a name and one of box or z_range, "
                         f"got {raw!r}")
    if "box" in raw:
        if len(raw["box"]) != 4:
            raise ValueError(f"{where}: region box must be [x0, y0, x1, y1], got {raw['box']!r}")
        return pb.Region(name=raw["name"], box=pb.Box(**dict(zip(("x0", "y0", "x1", "y1"),
                                                                 raw["box"]))))
    z = raw["z_range"]
    if len(z) != 2 or not all(isinstance(v, int) and v >= 0 for v in z):
        raise ValueError(f"{where}: region z_range must be [z0, z1] slice ints >= 0 "
                         f"(z1 exclusive), got {z!r}")
    return pb.Region(name=raw["name"], z_range=pb.ZRange(z_start=z[0], z_end=z[1]))


def cmd_ingest(args) -> int:
    """Ingest in calls of ``--batch-size`` items; each failed item is reported on stderr
    (its position in the source, id, status code and message) while the others are
    stored. Exit status 1 when any item failed."""
    from tqdm import tqdm

    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    totals = {"inserted": 0, "updated": 0, "duplicates": 0, "failed": 0, "sent": 0}
    with _client(args) as client, tqdm(desc="ingest", unit="item") as bar:
        batch = []
        for item in iter_items(args.source, args.collection):
            batch.append(item)
            if len(batch) == args.batch_size:
                _send(client, batch, totals, bar, args.timeout)
        _send(client, batch, totals, bar, args.timeout)
    print(f"ingested: {totals['inserted']} inserted, {totals['updated']} updated, "
          f"{totals['duplicates']} duplicates, {totals['failed']} failed")
    return 1 if totals["failed"] else 0


def _send(client, batch, totals, bar, timeout) -> None:
    from .client import describe_failure

    if not batch:
        return
    resp = client.ingest(list(batch), timeout=timeout, check=False)
    for key in ("inserted", "updated", "duplicates", "failed"):
        totals[key] += getattr(resp, key)
    for ack in resp.acks:
        if ack.HasField("error"):  # the item's number in the source and id, then why
            item_id = batch[ack.index].id if ack.index < len(batch) else ack.id
            bar.write(f"failed: item {totals['sent'] + ack.index} {item_id!r}: "
                      f"{describe_failure(ack)}", file=sys.stderr)
    totals["sent"] += len(batch)
    bar.update(len(batch))
    batch.clear()


def cmd_query(args) -> int:
    from .v1 import retrieval_pb2 as pb

    filters = pb.Filters(modality=args.modality, body_part=args.body_part, view=args.view,
                         labels_any=args.label)
    if args.diagnose:
        if args.diversify or args.mmr_lambda is not None or args.png is not None:
            raise SystemExit("medseek query: --diagnose takes no --diversify, --mmr-lambda "
                             "or --png")
        req = pb.DiagnoseRequest(k=args.k, collection=args.collection, filters=filters)
        if args.temperature is not None:
            req.temperature = args.temperature
    else:
        if args.temperature is not None:
            raise SystemExit("medseek query: --temperature needs --diagnose")
        req = pb.SearchRequest(k=args.k, collection=args.collection, diversify=args.diversify,
                               filters=filters)
    if args.text is not None:
        req.text = args.text
    elif args.image is not None:
        req.image = args.image.read_bytes()
    elif args.volume is not None:
        req.volume = args.volume.read_bytes()
    else:
        req.item_id = args.item_id
    if args.mmr_lambda is not None:
        req.mmr_lambda = args.mmr_lambda
    if args.region:
        req.region.name = args.region
        if args.box:
            req.region.box.CopyFrom(pb.Box(x0=args.box[0], y0=args.box[1], x1=args.box[2],
                                           y1=args.box[3]))
    with _client(args) as client:
        if args.diagnose:
            print(format_diagnosis(client.diagnose(req, timeout=args.timeout)))
            return 0
        resp = client.search(req, timeout=args.timeout)
    print(format_table(resp))
    if args.png is not None:
        from .contact_sheet import write_contact_sheet

        query_image = args.image.read_bytes() if args.image is not None else None
        write_contact_sheet(resp, args.png, root=args.root, query_image=query_image)
        print(f"wrote {args.png}")
    return 0


def format_table(resp) -> str:
    rows = [("#", "id", "score", "collection", "modality", "labels", "region", "concepts")]
    for n, h in enumerate(resp.hits, 1):
        rows.append((str(n), h.id, f"{h.score:.4f}", h.item.collection, h.item.modality,
                     ",".join(h.item.labels), h.matched_region,
                     ", ".join(c.name for c in h.concepts)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    total = resp.timings_ms.get("total", 0.0)
    lines.append(f"{len(resp.hits)} hits of {resp.candidates} candidates, "
                 f"search {total:.1f} ms")
    return "\n".join(lines)


def format_diagnosis(resp) -> str:
    """Label probabilities, then the neighbours that voted with their vote weights."""
    rows = [("label", "probability")]
    rows += [(p.label, f"{p.probability:.4f}") for p in resp.probabilities]
    rows.append(("(no label)", f"{resp.no_label_probability:.4f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a.ljust(width)}  {b}" for a, b in rows]
    lines.append(f"voted by {len(resp.neighbours)} neighbours, weight softmax(score / "
                 f"{resp.temperature:g}):")
    for h, w in zip(resp.neighbours, resp.weights):
        lines.append(f"  {h.id}  score {h.score:.4f}  weight {w:.4f}  "
                     f"labels {','.join(h.item.labels) or '-'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medseek.serve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
