"""SQLite schema of the store, versioned with ``PRAGMA user_version``.

``MIGRATIONS[v]`` upgrades a database at version ``v`` to ``v + 1``; version 0 is an empty
file. ``migrate`` runs the pending steps in one transaction, so a crash mid-migration
leaves the old version intact. To change the schema, append a function and bump nothing
else: ``SCHEMA_VERSION`` is ``len(MIGRATIONS)``.

Tables (version 1)
------------------
items       one row per live item; ``row_key`` (INTEGER PRIMARY KEY AUTOINCREMENT, so
            never reused) is the id in the ANN index; ``seq`` = seq of its last write.
embeddings  one float32 little-endian blob per (item, model tag); cascades with items.
changelog   every write: (seq, row_key, collection, op) with op 'upsert' or 'delete'.
            ``seq`` is AUTOINCREMENT, hence strictly increasing across deletes; it holds
            no metadata, so deleted items leave no PHI behind.
collections (name, model) -> dim of that model's embeddings, fixed by the first write.
meta        key/value; 'store_uuid' names this store so an index saved for another
            store is never caught up against this one; 'changelog_pruned_through' is the
            seq below which the changelog was pruned (older indexes must be rebuilt);
            other keys belong to the store's users (``Store.set_meta``), e.g.
            'report_ranker/<model>/<collection>' (``medseek.serve.report_ranker``).

Version 2: ``items.z_start``/``z_end`` are half-open, ``[z_start, z_end)`` (``z_end``
exclusive, as in training and the corpus manifests); version 1 stored the last slice.

Version 3: ``report_texts`` (row_key -> text): the report of an item that came with one
(``ItemRecord.report_text``), for ``Draft``; it cascades with its item.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from typing import Callable


def _v0_to_v1(con: sqlite3.Connection) -> None:
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.execute("INSERT INTO meta VALUES ('store_uuid', ?)", (uuid.uuid4().hex,))
    con.execute("INSERT INTO meta VALUES ('changelog_pruned_through', '0')")
    con.execute(
        "CREATE TABLE collections (name TEXT NOT NULL, model TEXT NOT NULL, "
        "dim INTEGER NOT NULL CHECK (dim > 0), PRIMARY KEY (name, model))"
    )
    con.execute(
        """CREATE TABLE items (
            row_key INTEGER PRIMARY KEY AUTOINCREMENT,
            item_id TEXT NOT NULL UNIQUE,
            collection TEXT NOT NULL,
            modality TEXT, body_part TEXT, view TEXT,
            labels TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(labels)),
            patient_pseudonym TEXT, study_pseudonym TEXT, source_document TEXT,
            parent_id TEXT,
            region TEXT, z_start INTEGER, z_end INTEGER,
            box TEXT CHECK (box IS NULL OR json_valid(box)),
            content_sha256 TEXT,
            created_at REAL NOT NULL, updated_at REAL NOT NULL,
            seq INTEGER NOT NULL)"""
    )
    for cols in ("collection, seq", "collection, modality", "collection, body_part",
                 "patient_pseudonym", "study_pseudonym", "parent_id",
                 "collection, content_sha256"):
        name = "items_" + cols.replace(", ", "_")
        con.execute(f"CREATE INDEX {name} ON items ({cols})")
    con.execute(
        """CREATE TABLE embeddings (
            row_key INTEGER NOT NULL REFERENCES items(row_key) ON DELETE CASCADE,
            model TEXT NOT NULL,
            dim INTEGER NOT NULL CHECK (dim > 0),
            vector BLOB NOT NULL CHECK (length(vector) = 4 * dim),
            PRIMARY KEY (row_key, model))"""
    )
    con.execute(
        """CREATE TABLE changelog (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            row_key INTEGER NOT NULL,
            collection TEXT NOT NULL,
            op TEXT NOT NULL CHECK (op IN ('upsert', 'delete')))"""
    )
    con.execute("CREATE INDEX changelog_collection_seq ON changelog (collection, seq)")


def _v1_to_v2(con: sqlite3.Connection) -> None:
    # z-ranges become half-open: the stored last slice becomes the first one past the range
    con.execute("UPDATE items SET z_end = z_end + 1 WHERE z_end IS NOT NULL")


def _v2_to_v3(con: sqlite3.Connection) -> None:
    # an item's report text (Draft composes from it), deleted with the item
    con.execute(
        """CREATE TABLE report_texts (
            row_key INTEGER PRIMARY KEY REFERENCES items(row_key) ON DELETE CASCADE,
            text TEXT NOT NULL)"""
    )


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v0_to_v1, _v1_to_v2, _v2_to_v3)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(con: sqlite3.Connection) -> int:
    """Bring ``con`` (autocommit mode) to ``SCHEMA_VERSION``; return the version found.

    Raises
    ------
    RuntimeError
        The file was written by a newer schema than this code knows.
    """
    con.execute("BEGIN IMMEDIATE")
    try:
        found = con.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise RuntimeError(
                f"store schema version {found} is newer than this medseek ({SCHEMA_VERSION})"
            )
        for version in range(found, SCHEMA_VERSION):
            MIGRATIONS[version](con)
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return found


def log_change(con: sqlite3.Connection, row_key: int, collection: str, op: str) -> int:
    """Append a write to the changelog; returns its seq."""
    return con.execute("INSERT INTO changelog (row_key, collection, op) VALUES (?, ?, ?)",
                       (row_key, collection, op)).lastrowid


class Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` on any exception, under the lock."""

    def __init__(self, con: sqlite3.Connection, lock: threading.RLock) -> None:
        self._con, self._lock = con, lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._con.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._con

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                try:
                    self._con.execute("COMMIT")
                except BaseException:  # e.g. disk full: undo, then report the failure
                    self._rollback()
                    raise
            else:
                self._rollback()
        finally:
            self._lock.release()

    def _rollback(self) -> None:
        # SQLite rolls back by itself after some errors; a second ROLLBACK would raise and
        # hide the original exception
        if self._con.in_transaction:
            self._con.execute("ROLLBACK")
