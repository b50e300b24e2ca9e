"""``medseek draft``: a grounded report draft for an image, from a running server.

Prints each sentence with its source (the retrieved report's item id, or the concept /
normal template it came from) and the concepts behind it, then the sentences the image's
concepts contradicted and why; ``--json`` prints the whole ``DraftResponse``. Also the
demo step (:func:`demo_step`) that shows a draft of a stored image.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .commands import (CLIENT_EPILOG, CLIENT_MODULES, _client, _client_args, message_dict,
                       print_json, reports_rpc_errors)

__all__ = ["demo_step", "format_draft", "register"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "draft", epilog=CLIENT_EPILOG,
        help="draft a report for an image from its nearest stored cases' reports, checked "
             "against the image's finding concepts (CEMRAG)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", type=Path, help="PNG, JPEG or DICOM file to draft a report for")
    query.add_argument("--item-id", help="a stored image's id (left out of its own neighbours)")
    p.add_argument("-k", type=int, default=0,
                   help="retrieved reports to compose from (0: the server's draft.k)")
    p.add_argument("--collection", default="",
                   help="collection searched for neighbours (empty: image)")
    p.add_argument("--exclude-patient", action="append", default=[], metavar="PSEUDONYM",
                   help="leave this patient's items out of the neighbours (repeatable)")
    _client_args(p)
    p.set_defaults(func=cmd_draft, needs=CLIENT_MODULES)


def format_draft(resp) -> str:
    """A draft as text: numbered sentences with source and concepts, then dropped ones."""
    lines = [f"draft ({resp.generator}, {len(resp.neighbours)} neighbours):"]
    for n, s in enumerate(resp.sentences, start=1):
        source = s.source_id or s.kind
        concepts = ", ".join(
            f"{c.concept} {c.stance}" + (f" {c.score:+.2f}" if c.HasField("score") else "")
            for c in s.support)
        lines.append(f"{n:3d}. {s.text}")
        lines.append(f"     [{source}]" + (f" {concepts}" if concepts else "")
                     + (f"  (flagged: {s.note})" if s.note else ""))
    if resp.dropped:
        lines.append("dropped (contradicted by the image's concepts):")
        lines += [f"   - {d.text} [{d.source_id}]: {d.reason}" for d in resp.dropped]
    present = [f"{c.name} {c.score:+.2f}" + (f" {c.laterality}" if c.laterality else "")
               for c in resp.concepts if c.score > 0]
    lines.append("image concepts present: " + (", ".join(present) or "none"))
    return "\n".join(lines)


@reports_rpc_errors
def cmd_draft(args: argparse.Namespace) -> int:
    from .v1 import retrieval_pb2 as pb

    if args.k < 0:
        raise SystemExit(f"medseek draft: -k must be >= 0, got {args.k}")
    req = pb.DraftRequest(k=args.k, collection=args.collection)
    if args.image is not None:
        try:
            req.image = args.image.read_bytes()
        except OSError as exc:
            raise SystemExit(f"medseek draft: cannot read --image {str(args.image)!r}: "
                             f"{exc.strerror}") from None
    else:
        req.item_id = args.item_id
    if args.exclude_patient:
        req.filters.exclude_patients.extend(args.exclude_patient)
    with _client(args) as client:
        resp = client.draft(req, timeout=args.timeout)
    if args.json:
        print_json(message_dict(resp))
    else:
        print(format_draft(resp))
    return 0


def demo_step(client, out_dir: Path, log, item_id: str | None = None,
              image: bytes | None = None, name: str = "") -> dict:
    """The demo's draft step: a draft of one image, a stored one (``item_id``) or a new
    one (``image``, e.g. a held-out radiograph, shown as ``name``), written to
    ``out_dir/draft.txt`` and ``draft.json``.

    Returns ``{"item_id", "sentences", "dropped", "grounded"}`` (``grounded``: every
    sentence names a source report, or is a concept or normal template)."""
    from .v1 import retrieval_pb2 as pb

    if (item_id is None) == (image is None):
        raise ValueError("demo_step needs one of item_id (a stored image) or image (bytes)")
    request = (pb.DraftRequest(item_id=item_id, request_id="demo-draft") if image is None
               else pb.DraftRequest(image=image, request_id="demo-draft"))
    item_id = item_id or name or "the query image"
    resp = client.draft(request)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = format_draft(resp)
    (out_dir / "draft.txt").write_text(text + "\n")
    (out_dir / "draft.json").write_text(json.dumps(message_dict(resp), indent=2) + "\n")
    log(f"draft of {item_id}:\n{text}")
    grounded = all(bool(s.source_id) or s.kind in ("concept", "normal")
                   for s in resp.sentences)
    return {"item_id": item_id, "sentences": len(resp.sentences),
            "dropped": len(resp.dropped), "grounded": grounded}
