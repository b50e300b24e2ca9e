"""The client commands of ``medseek``: ``ingest``, ``query`` (and ``query --diagnose``) and
``stats``, each against a running server (``medseek.serve.commands`` registers them and
holds what they share: the address, token and error handling)."""

from __future__ import annotations

import sys
from pathlib import Path

from .commands import _client, _name, message_dict, print_json, reports_rpc_errors
from .ingest_sources import iter_items

@reports_rpc_errors
def cmd_ingest(args) -> int:
    """Ingest in calls of ``--batch-size`` items; each failed item is reported on stderr
    (its position in the source, id, status code and message) while the others are
    stored. Exit status 1 when any item failed. ``--json``: the totals and every item's
    ack (``index`` counted from the start of the source), no progress bar."""
    from tqdm import tqdm

    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    totals = {"inserted": 0, "updated": 0, "duplicates": 0, "failed": 0, "sent": 0}
    acks = [] if args.json else None
    with _client(args) as client, tqdm(desc="ingest", unit="item", disable=args.json) as bar:
        batch = []
        for item in iter_items(args.source, args.collection):
            batch.append(item)
            if len(batch) == args.batch_size:
                _send(client, batch, totals, bar, args.timeout, acks)
        _send(client, batch, totals, bar, args.timeout, acks)
    if args.json:
        print_json({"inserted": totals["inserted"], "updated": totals["updated"],
                    "duplicates": totals["duplicates"], "failed": totals["failed"],
                    "items": totals["sent"], "acks": acks})
    else:
        print(f"ingested: {totals['inserted']} inserted, {totals['updated']} updated, "
              f"{totals['duplicates']} duplicates, {totals['failed']} failed")
    return 1 if totals["failed"] else 0


def _send(client, batch, totals, bar, timeout, acks: list | None = None) -> None:
    """One Ingest call of ``batch`` (then emptied); ``acks``, when given, collects each
    ack as a dict with its index counted from the start of the source."""
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
        if acks is not None:
            acks.append({**message_dict(ack), "index": totals["sent"] + ack.index})
    totals["sent"] += len(batch)
    bar.update(len(batch))
    batch.clear()


def _read_query_file(args, flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SystemExit(f"{_name(args)}: cannot read {flag} {str(path)!r}: "
                         f"{exc.strerror}") from None


@reports_rpc_errors
def cmd_query(args) -> int:
    """Search (or ``--diagnose``) and print a ranked table, or with ``--json`` the whole
    response (``SearchResponse`` or ``DiagnoseResponse``) as one JSON document."""
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
        req.hypotheses.extend(_hypotheses(args))
        if args.margin_threshold is not None:
            req.margin_threshold = args.margin_threshold
    else:
        if args.hypothesis or args.margin_threshold is not None:
            raise SystemExit("medseek query: --hypothesis and --margin-threshold need --diagnose")
        if args.temperature is not None:
            raise SystemExit("medseek query: --temperature needs --diagnose")
        req = pb.SearchRequest(k=args.k, collection=args.collection, diversify=args.diversify,
                               filters=filters)
    if args.text is not None:
        req.text = args.text
    elif args.image is not None:
        req.image = _read_query_file(args, "--image", args.image)
    elif args.volume is not None:
        req.volume = _read_query_file(args, "--volume", args.volume)
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
            resp = client.diagnose(req, timeout=args.timeout)
            if args.json:
                print_json(message_dict(resp))
            else:
                print(format_diagnosis(resp))
                if resp.HasField("contrastive"):
                    from .contrastive_service import format_contrastive

                    print(format_contrastive(resp.contrastive))
            return 0
        resp = client.search(req, timeout=args.timeout)
    if args.json:
        print_json(message_dict(resp))
    else:
        print(format_table(resp))
    if args.png is not None:
        from .contact_sheet import write_contact_sheet

        query_image = req.image if args.image is not None else None
        write_contact_sheet(resp, args.png, root=args.root, query_image=query_image)
        # stdout holds only the JSON document under --json
        print(f"wrote {args.png}", file=sys.stderr if args.json else sys.stdout)
    return 0


@reports_rpc_errors
def cmd_stats(args) -> int:
    """The server's ``Stats``: a table of collections, or with ``--json`` the response."""
    with _client(args) as client:
        resp = client.stats(timeout=args.timeout)
    if args.json:
        print_json(message_dict(resp))
    else:
        print(format_stats(resp))
    return 0


def format_stats(resp) -> str:
    """One row per collection, then the model, the store's last sequence and the queues."""
    rows = [("collection", "items", "indexed", "dim", "applied_seq")]
    rows += [(c.name, str(c.items), str(c.indexed), str(c.dim), str(c.applied_seq))
             for c in resp.collections]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"model {resp.model or '-'}, last_seq {resp.last_seq}, queues: encode "
                 f"{resp.encode_queue_depth}, search {resp.search_queue_depth}")
    return "\n".join(lines)


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


def _hypotheses(args) -> list:
    from .contrastive_service import parse_hypothesis

    try:
        return [parse_hypothesis(h) for h in args.hypothesis]
    except ValueError as exc:
        raise SystemExit(f"medseek query: {exc}") from None


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
