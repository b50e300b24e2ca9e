"""``medseek pacs sync``: pull studies from a PACS over DICOMweb into the retrieval server.

One pass lists the PACS's studies (QIDO-RS, optionally ``--since`` a study date), and for
each study not seen before, or whose instance count changed since, retrieves its series
(WADO-RS), groups their instances into items (``medseek.io.dicom_groups``: a CT/MR stack
is one volume, a radiograph one image) and streams them to the server's ``Ingest``. The
server de-identifies them as it reads them (``ServeConfig.deid``); in clinical mode it
also keeps their original UIDs apart (``medseek.serve.reident``). ``--poll N`` repeats the
pass every N seconds, so new studies are picked up as they arrive.

What was seen is kept in a local state file (mode 0600), keyed by
``HMAC-SHA256(state key, Study Instance UID)``, never by the UID text; the key is made at
random when the file is created and lives in it. Item ids are
``medseek.io.dicom_groups.item_id`` (a hash of the UIDs), so a study synced from the PACS
and the same study ingested from a folder are one item. Output and errors name studies
by the first 12 hex digits of that keyed hash, never by a UID or a header value.

A study is marked seen once every item of it is committed, or failed for a reason that
a retry cannot change (its content: INVALID_ARGUMENT, RESOURCE_EXHAUSTED, or a file over
a read limit); anything else (the PACS or the server unreachable, an internal error) is
retried on the next pass.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sys
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

STATE_FORMAT = "medseek-pacs-sync/1"
#: status codes of an item whose content is at fault: a retry would fail the same way
_PERMANENT = {3, 8}  # INVALID_ARGUMENT, RESOURCE_EXHAUSTED


def register(subparsers) -> None:
    p = subparsers.add_parser("pacs", help="pull studies from a PACS (DICOMweb)")
    actions = p.add_subparsers(dest="pacs_action", metavar="ACTION", required=True)
    s = actions.add_parser(
        "sync", help="ingest the PACS's new studies through the server (de-identified "
                     "there); --poll keeps doing it")
    s.add_argument("--dicomweb", required=True, metavar="URL",
                   help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    s.add_argument("--since", type=parse_since, metavar="DATE",
                   help="only studies with a Study Date on or after DATE (YYYY-MM-DD)")
    s.add_argument("--state", type=Path, default=Path("medseek-pacs-state.json"),
                   help="state file of the studies seen (created mode 0600)")
    s.add_argument("--poll", type=float, metavar="SECONDS",
                   help="sync again every SECONDS until interrupted (default: one pass)")
    s.add_argument("--dicomweb-user", help="PACS user (HTTP basic authentication)")
    s.add_argument("--dicomweb-password-file", type=Path,
                   help="file holding the PACS password (never on the command line)")
    s.add_argument("--dicomweb-token-file", type=Path,
                   help="file holding a bearer token for the PACS")
    s.add_argument("--dicomweb-timeout", type=float, default=120.0,
                   help="seconds per DICOMweb request")
    s.add_argument("--collection", default="", help="collection for every item "
                                                    "(default: image / volume)")
    s.add_argument("--server", help="host:port of the medseek server (default: "
                                    "$MEDSEEK_ADDRESS, else 127.0.0.1:50051)")
    s.add_argument("--token-file", type=Path,
                   help="file holding the server's bearer token (default: "
                        "$MEDSEEK_TOKEN_FILE, else the token in $MEDSEEK_TOKEN, else none)")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds per Ingest call")
    s.set_defaults(func=cmd_pacs_sync)


def parse_since(text: str) -> date:
    """``YYYY-MM-DD`` or ``YYYYMMDD`` -> date (argparse type)."""
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            pass
    import argparse

    raise argparse.ArgumentTypeError(f"--since must be a date YYYY-MM-DD, got {text!r}")


# -- state ------------------------------------------------------------------------------------

@dataclass
class SyncState:
    """What a sync has seen of one PACS: keyed hash of each Study Instance UID -> the
    instance count it had when it was ingested.

    Attributes
    ----------
    path : Path
    source : str
        The DICOMweb URL the state belongs to (a state is never reused for another PACS:
        it would skip that PACS's studies).
    key : bytes
        HMAC key of the study hashes (random, 32 bytes, made with the file).
    studies : dict of str -> int or None
    """

    path: Path
    source: str
    key: bytes = field(repr=False)
    studies: dict[str, int | None] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path, source: str) -> SyncState:
        """Load ``path``, or start a new state (with a new key) when it does not exist."""
        path = Path(path)
        if not path.exists():
            return cls(path, source, secrets.token_bytes(32))
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != STATE_FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, expected {STATE_FORMAT!r}")
            state = cls(path, raw["source"], bytes.fromhex(raw["key"]),
                        {str(k): v for k, v in raw["studies"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: not a medseek pacs sync state file ({exc})") from None
        if state.source != source:
            raise ValueError(f"{path}: the state belongs to {state.source!r}, not {source!r}; "
                             f"give each PACS its own --state file")
        if len(state.key) < 16:
            raise ValueError(f"{path}: key must be at least 16 bytes, got {len(state.key)}")
        return state

    def study_key(self, study_uid: str) -> str:
        """32 hex digits of ``HMAC-SHA256(key, "study" || 0x00 || uid)``."""
        msg = b"study\x00" + study_uid.encode("ascii")
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()[:32]

    def save(self) -> None:
        """Write atomically (a temporary file, mode 0600, renamed over the old one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": STATE_FORMAT, "source": self.source, "key": self.key.hex(),
                       "studies": self.studies}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


# -- one pass ---------------------------------------------------------------------------------

@dataclass
class SyncReport:
    """Counts of one pass; ``problems`` are lines naming a study by its short hash."""

    studies_listed: int = 0
    studies_synced: int = 0
    studies_retry: int = 0
    items_sent: int = 0
    inserted: int = 0
    updated: int = 0
    duplicates: int = 0
    failed: int = 0
    files_skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"pacs sync: studies: {self.studies_listed} listed, {self.studies_synced} "
                f"synced, {self.studies_retry} left for the next pass; items: "
                f"{self.items_sent} sent, {self.inserted} inserted, {self.updated} updated, "
                f"{self.duplicates} duplicates, {self.failed} failed; "
                f"{self.files_skipped} files skipped")


def sync_once(pacs, client, state: SyncState, *, since: date | None = None,
              collection: str = "", timeout: float = 600.0) -> SyncReport:
    """One pass (module docstring): every new or changed study of ``pacs``
    (``DicomWebClient``) ingested through ``client`` (``RetrievalClient``); ``state`` is
    saved after each study, so an interrupted pass loses nothing done.

    A failure of the whole Ingest call (the server unreachable, a refused token) is
    raised as the ``grpc.RpcError`` it is, after saving what was done.
    """
    report = SyncReport()
    for study in pacs.studies(since=since):
        report.studies_listed += 1
        key = state.study_key(study.study_uid)
        if key in state.studies and study.instances is not None \
                and state.studies[key] == study.instances:
            continue  # seen, unchanged
        if _sync_study(pacs, client, study, key[:12], report, collection, timeout):
            state.studies[key] = study.instances
            state.save()
            report.studies_synced += 1
        else:
            report.studies_retry += 1
    return report


def _sync_study(pacs, client, study, short: str, report: SyncReport, collection: str,
                timeout: float) -> bool:
    """Ingest one study's series; True when nothing of it needs a retry."""
    from medseek.io import LimitExceededError
    from medseek.io.dicom_groups import group_dicom
    from medseek.io.dicomweb import DicomWebError

    from .v1 import retrieval_pb2 as pb

    done = True
    try:
        series = pacs.series(study.study_uid)
    except DicomWebError as exc:
        report.problems.append(f"study {short}: cannot list its series ({exc}); retried "
                               "next pass")
        return False
    for j, ser in enumerate(series):
        where = f"study {short} series {j}"
        try:
            files = pacs.retrieve_series(study.study_uid, ser.series_uid)
        except LimitExceededError as exc:  # the series will not shrink: not retried
            report.problems.append(f"{where}: skipped, over a read limit ({_no_path(exc)})")
            continue
        except DicomWebError as exc:
            report.problems.append(f"{where}: cannot retrieve it ({_no_path(exc)}); retried "
                                   "next pass")
            done = False
            continue
        grouping = group_dicom([(f"series{j}/{k:05d}.dcm", data)
                                for k, data in enumerate(files)], limits=pacs.limits)
        del files
        report.files_skipped += len(grouping.skipped) + len(grouping.others)
        for skip in grouping.skipped:
            report.problems.append(f"{where}: skipped {skip.name}: {skip.reason}")
        items = []
        for item in grouping.items:
            try:
                items.append(pb.IngestItem(id=item.item_id, collection=collection,
                                           **{item.kind: item.payload()}))
            except LimitExceededError as exc:
                report.problems.append(f"{where}: skipped item {item.item_id}: {exc}")
        if not items:
            continue
        resp = client.ingest(items, timeout=timeout, check=False)
        report.items_sent += len(items)
        report.inserted += resp.inserted
        report.updated += resp.updated
        report.duplicates += resp.duplicates
        report.failed += resp.failed
        for ack in resp.acks:
            if ack.HasField("error") and ack.status == "failed":
                permanent = ack.error.code in _PERMANENT
                done &= permanent
                from .client import describe_failure

                report.problems.append(
                    f"{where}: item {items[ack.index].id} failed: {describe_failure(ack)}"
                    f"{'' if permanent else '; retried next pass'}")
    return done


def _no_path(exc: Exception) -> str:
    """A DICOMweb error's message (it names the request path, which holds UIDs) without
    the path: the study is already named by its short hash."""
    text = str(exc)
    head, sep, rest = text.partition(": ")
    return rest if sep and head.startswith("GET /") else text


# -- the command ------------------------------------------------------------------------------

def pacs_client(args):
    """The ``DicomWebClient`` of the command's ``--dicomweb*`` arguments."""
    from medseek.io.dicomweb import DicomWebClient

    password = token = None
    if (args.dicomweb_user is None) != (args.dicomweb_password_file is None):
        raise SystemExit("medseek pacs sync: --dicomweb-user and --dicomweb-password-file "
                         "go together")
    if args.dicomweb_password_file is not None:
        password = args.dicomweb_password_file.read_text().strip()
    if args.dicomweb_token_file is not None:
        token = args.dicomweb_token_file.read_text().strip()
    try:
        return DicomWebClient(args.dicomweb, user=args.dicomweb_user, password=password,
                              bearer_token=token, timeout=args.dicomweb_timeout)
    except ValueError as exc:
        raise SystemExit(f"medseek pacs sync: {exc}") from None


def cmd_pacs_sync(args) -> int:
    """One pass, or one every ``--poll`` seconds until SIGINT/SIGTERM; exit status 1 when
    the last pass left studies for a retry or an item failed."""
    import signal
    import threading

    import grpc

    from medseek.io.dicomweb import DicomWebError

    from .client import RetrievalClient

    if args.poll is not None and not args.poll > 0:
        raise SystemExit(f"medseek pacs sync: --poll must be > 0 seconds, got {args.poll}")
    pacs = pacs_client(args)
    try:
        state = SyncState.open(args.state, pacs.base_url)
    except ValueError as exc:
        raise SystemExit(f"medseek pacs sync: {exc}") from None
    stop = threading.Event()
    if args.poll is not None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    from .commands import client_settings

    address, token = client_settings(args)
    status = 0
    with RetrievalClient(address, token=token) as client:
        while True:
            try:
                report = sync_once(pacs, client, state, since=args.since,
                                   collection=args.collection, timeout=args.timeout)
            except DicomWebError as exc:
                print(f"medseek pacs sync: DICOMweb: {_no_path(exc)}", file=sys.stderr)
                status = 1
            except grpc.RpcError as exc:
                print(f"medseek pacs sync: the Ingest call failed: "
                      f"{exc.code().name}: {exc.details()}", file=sys.stderr)
                status = 1
            else:
                for line in report.problems:
                    print(line, file=sys.stderr)
                print(report.summary(), flush=True)
                status = 1 if (report.studies_retry or report.failed) else 0
            if args.poll is None or stop.wait(args.poll):
                return status
