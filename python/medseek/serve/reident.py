"""Clinical mode: the re-identification map and its audit log, kept on the server only.

In ``pacs_mode = "clinical"`` the server still de-identifies every DICOM upload (the store
rows, which research exports, hold pseudonyms only), and beside the store it keeps, per
stored item id, the original Study, Series and SOP Instance UIDs read from the upload's
headers (:class:`ReidentMap`: its own SQLite file, mode 0600). A ``Search`` that asks for
``reidentify`` gets them on its hits, with the PACS viewer URL, only when its bearer token
is one of ``ServeConfig.reident_tokens``; each such answer is first written to
:class:`AuditLog` (JSON lines, append-only, mode 0600: who by token name, when, which
studies and items). If the audit line cannot be written, no UID is returned.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import threading
import time
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from medseek.io import ReadLimits
from medseek.io.dicom import quiet_validation
from medseek.io.sources import is_dicom, is_zip

from .ingest import InvalidField

_UID_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


@dataclass(frozen=True)
class Origin:
    """Where a stored item lives in the PACS (original, identifying UIDs)."""

    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]


def _private_file(path: Path) -> None:
    """Create ``path`` (and its folder) readable by the owner only, before anything is
    written to it; an existing file is narrowed to 0600 as well."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


def _header_uids(data: bytes, field: str) -> tuple[str, str, str]:
    """(study, series, SOP instance) UIDs of one DICOM file, headers only."""
    try:
        with quiet_validation():  # a malformed UID must not be quoted in a warning
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                                 specific_tags=list(_UID_TAGS))
            uids = tuple(str(ds.get(tag) or "").strip() for tag in _UID_TAGS)
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        raise InvalidField(field, f"cannot read its DICOM header ({type(exc).__name__})") from None
    missing = [tag for tag, uid in zip(_UID_TAGS, uids) if not uid]
    if missing:
        raise InvalidField(field, f"DICOM header lacks {', '.join(missing)}")
    return uids  # type: ignore[return-value]


def origin_of_upload(data: bytes, field: str, limits: ReadLimits) -> Origin | None:
    """The PACS origin of an uploaded image or volume: a DICOM file, or a zip of one DICOM
    series (members bounded by ``limits`` as the volume reader bounds them). None for
    content that is not DICOM (PNG, NIfTI: nothing to re-identify)."""
    if is_dicom(data):
        study, series, sop = _header_uids(data, field)
        return Origin(study, series, (sop,))
    if not is_zip(data):
        return None
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = [m for m in z.infolist() if not m.is_dir()]
        if len(members) > limits.max_zip_members:
            raise InvalidField(field, f"{len(members)} zip members exceed "
                                      f"ReadLimits.max_zip_members={limits.max_zip_members}")
        found = []
        for m in members:
            if m.file_size > limits.max_file_bytes:
                raise InvalidField(field, f"zip member {len(found)} is over "
                                          f"ReadLimits.max_file_bytes={limits.max_file_bytes}")
            with z.open(m) as f:
                head = f.read(132)
            if len(head) == 132 and head[128:132] == b"DICM":
                found.append(_header_uids(z.read(m), field))
    if not found:
        return None
    studies, series = {s for s, _, _ in found}, {s for _, s, _ in found}
    if len(studies) != 1 or len(series) != 1:
        raise InvalidField(field, f"a volume must be one DICOM series, got {len(series)} "
                                  f"series of {len(studies)} studies")
    return Origin(found[0][0], found[0][1], tuple(sorted({s for _, _, s in found})))


class ReidentMap:
    """Item id -> original UIDs, in a SQLite file of its own (mode 0600). Thread-safe: one
    connection behind a lock (writes come from the index thread, reads from queries)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _private_file(self.path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS origin (item_id TEXT PRIMARY KEY, "
                         "study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, "
                         "sop_uids TEXT NOT NULL)")
        for suffix in ("-wal", "-shm"):  # the WAL files hold the same rows
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                os.chmod(side, 0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record(self, origins: dict[str, Origin]) -> None:
        """Upsert the origins of committed items (one transaction)."""
        if not origins:
            return
        rows = [(i, o.study_uid, o.series_uid, json.dumps(list(o.sop_uids)))
                for i, o in origins.items()]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT INTO origin VALUES (?, ?, ?, ?) ON CONFLICT"
                                     "(item_id) DO UPDATE SET study_uid = excluded.study_uid, "
                                     "series_uid = excluded.series_uid, "
                                     "sop_uids = excluded.sop_uids", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def forget(self, ids: list[str]) -> None:
        """Drop the origins of deleted items (or of items re-uploaded without DICOM)."""
        if not ids:
            return
        with self._lock:
            self._db.executemany("DELETE FROM origin WHERE item_id = ?", [(i,) for i in ids])

    def lookup(self, ids: list[str]) -> dict[str, Origin]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(f"SELECT item_id, study_uid, series_uid, sop_uids FROM "
                                    f"origin WHERE item_id IN ({marks})", list(ids)).fetchall()
        return {i: Origin(s, r, tuple(json.loads(p))) for i, s, r, p in rows}


class AuditLog:
    """Append-only JSON lines, one per re-identifying answer (mode 0600). Each line is one
    ``write`` on an ``O_APPEND`` descriptor, then ``fsync``: concurrent writers never
    interleave, and an answer is returned only after its line is on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _private_file(self.path)
        self._lock = threading.Lock()

    def write(self, caller: str, rpc: str, request_id: str, studies: list[str],
              items: list[str]) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "unix_time": round(time.time(), 3), "caller": caller, "rpc": rpc,
                           "request_id": request_id, "studies": studies, "items": items},
                          separators=(",", ":")) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)


def viewer_url(template: str, origin: Origin) -> str:
    """``template`` with ``{study_uid}``, ``{series_uid}`` and ``{sop_uid}`` (the first
    instance) filled in, each URL-quoted."""
    q = lambda v: urllib.parse.quote(v, safe="")  # noqa: E731
    return template.format(study_uid=q(origin.study_uid), series_uid=q(origin.series_uid),
                           sop_uid=q(origin.sop_uids[0] if origin.sop_uids else ""))


def check_viewer_template(template: str) -> None:
    """Refuse a viewer URL template that is not http(s), lacks ``{study_uid}``, or names
    a placeholder other than the three of :func:`viewer_url`."""
    if not isinstance(template, str) or not template.startswith(("http://", "https://")):
        raise ValueError(f"pacs_viewer_url must be an http(s) URL template, got {template!r}")
    if "{study_uid}" not in template:
        raise ValueError(f"pacs_viewer_url must contain {{study_uid}}, got {template!r}")
    try:
        viewer_url(template, Origin("1", "1", ("1",)))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"pacs_viewer_url may use only {{study_uid}}, {{series_uid}} and "
                         f"{{sop_uid}}, got {template!r} ({type(exc).__name__}: {exc})") from None
