"""The SQLite store: items, their provenance and embeddings; the source of truth.

Durability: WAL journal with ``synchronous=FULL``. Each ``upsert``/``delete`` is one
transaction, and it returns only after COMMIT, which under FULL fsyncs the WAL; so a
write the caller saw return (an *acknowledged* ingest) survives a process kill and a
power loss. ``synchronous=NORMAL`` would survive a process kill but could lose the last
commits on power loss, which an acknowledged ingest must not.

Every write appends to ``changelog`` with a strictly increasing ``seq``; an ANN index
remembers the last seq it applied and catches up with ``removed_row_keys`` and
``iter_embeddings`` over ``(applied_seq, last_seq()]`` (see catalog.py).

Thread safety: one connection guarded by a lock, so a ``Store`` may be shared between
threads; several processes may open the same file (SQLite serialises writers).
Nothing here logs metadata values: patient and study pseudonyms never reach a log.

Privacy on disk: a store the ``Store`` creates is readable by its owner only (the file
0600, and SQLite gives its ``-wal`` and ``-shm`` files the file's mode; a folder it has
to create, 0700). An existing file keeps the mode it has.

Ids are looked up by bound parameters, never through a JSON array: SQLite's JSON
functions cut a string at a NUL, so such an id could never be found again to be erased.
New ids must be printable (``upsert`` refuses control characters).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from . import sql
from ._files import create_private
from .reader import StoreReader
from .records import (ItemRecord, StoreConfig, StoredItem, UpsertResult, check_upsert_batch,
                      row_values, str_list)
from .schema import SCHEMA_VERSION, Transaction, log_change, migrate

log = logging.getLogger(__name__)


class Store:
    """The SQLite item store (see the module docstring).

    Parameters
    ----------
    config : StoreConfig
        Path, embedding model tag, collections and dedup policy.
    """

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._lock = threading.RLock()
        create_private(Path(config.path))
        self._con = sqlite3.connect(
            config.path, isolation_level=None, check_same_thread=False,
            timeout=config.busy_timeout_s,
        )
        try:
            mode = self._con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise RuntimeError(f"could not put {config.path} in WAL mode (got {mode!r})")
            self._con.execute("PRAGMA synchronous=FULL")
            self._con.execute("PRAGMA foreign_keys=ON")
            found = migrate(self._con)
        except BaseException:
            self._con.close()
            raise
        if found != SCHEMA_VERSION:
            log.info("store schema migrated from version %d to %d", found, SCHEMA_VERSION)
        #: Random id of this store, so an index saved for another store is never reused.
        self.uuid: str = self._meta("store_uuid")

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pragma(self, name: str) -> object:
        """Read a PRAGMA (e.g. ``journal_mode``), for checks and diagnostics."""
        if not name.isidentifier():
            raise ValueError(f"name must be a PRAGMA name, got {name!r}")
        with self._lock:
            return self._con.execute(f"PRAGMA {name}").fetchone()[0]

    def backup(self, path: str | Path) -> None:
        """Write a consistent copy of the store to ``path`` (SQLite online backup)."""
        dst = sqlite3.connect(path)
        try:
            with self._lock:
                self._con.backup(dst)
        finally:
            dst.close()

    def _write(self):
        return Transaction(self._con, self._lock)

    # -- writes ---------------------------------------------------------------------------
    def upsert(self, items: Sequence[ItemRecord], embeddings: np.ndarray) -> list[UpsertResult]:
        """Insert or replace items and their embeddings in ONE transaction.

        Parameters
        ----------
        items : sequence of ItemRecord, length n
            Distinct ids. An existing id is updated in place (same ``row_key``); a
            record whose ``content_sha256`` matches another live item of a dedup
            collection is not written and comes back as "duplicate".
        embeddings : np.ndarray, float32, shape (n, dim)
            L2-normalised rows, one per item, stored under ``config.model``. ``dim`` must
            equal the dim each collection of the batch already holds for that model. An
            updated item keeps its vectors of *other* models only when its
            ``content_sha256`` is unchanged and not None (else they described old content).

        Returns
        -------
        list of UpsertResult, one per item, in order.

        Raises
        ------
        ValueError, TypeError
            On any invalid record or embedding; then nothing of the batch is written.
        """
        check_upsert_batch(items, embeddings, self.config.collections)
        dim = embeddings.shape[1]
        blobs = embeddings.astype("<f4", copy=False)
        results = []
        with self._write() as con:
            now = time.time()
            for i, r in enumerate(items):
                results.append(self._upsert_one(con, i, r, dim, blobs[i].tobytes(), now))
        log.debug("upserted %d items (%d duplicates)", len(items),
                 sum(r.status == "duplicate" for r in results))
        return results

    def _upsert_one(
        self, con: sqlite3.Connection, i: int, r: ItemRecord, dim: int, blob: bytes, now: float
    ) -> UpsertResult:
        model = self.config.model
        row = con.execute("SELECT dim FROM collections WHERE name = ? AND model = ?",
                          (r.collection, model)).fetchone()
        if row is None:
            con.execute("INSERT INTO collections VALUES (?, ?, ?)", (r.collection, model, dim))
        elif row[0] != dim:
            raise ValueError(f"embeddings has dim {dim} but collection {r.collection!r} "
                             f"(items[{i}]) holds dim {row[0]}")
        if r.content_sha256 is not None and r.collection in self.config.dedup_collections:
            dup = con.execute(
                "SELECT item_id, row_key FROM items WHERE collection = ? AND content_sha256 = ? "
                "AND item_id != ? ORDER BY row_key LIMIT 1",
                (r.collection, r.content_sha256, r.id)).fetchone()
            if dup is not None:
                return UpsertResult(r.id, "duplicate", dup[1], duplicate_of=dup[0])
        find = "SELECT row_key, collection FROM items WHERE item_id = ?"
        if r.parent_id is not None and con.execute(find, (r.parent_id,)).fetchone() is None:
            raise ValueError(f"items[{i}].parent_id refers to an item that is not in the store")
        old = con.execute(find, (r.id,)).fetchone()
        if old is not None:
            # other models' vectors stay valid only for provably unchanged content
            same = con.execute("SELECT content_sha256 = ? FROM items WHERE row_key = ?",
                               (r.content_sha256, old[0])).fetchone()[0]
            if not same:
                con.execute("DELETE FROM embeddings WHERE row_key = ? AND model != ?",
                            (old[0], model))
        if old is None:
            row_key = con.execute(sql.INSERT_ITEM, row_values(r) + (now, now)).lastrowid
        else:
            row_key, old_collection = old
            if old_collection != r.collection:  # the old collection's index must drop it
                log_change(con, row_key, old_collection, "delete")
            con.execute(sql.UPDATE_ITEM, row_values(r)[1:] + (now, row_key))
        seq = log_change(con, row_key, r.collection, "upsert")
        con.execute("UPDATE items SET seq = ? WHERE row_key = ?", (seq, row_key))
        con.execute("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?)",
                    (row_key, model, dim, blob))
        if r.report_text is None:  # an upsert replaces the item: an old report goes too
            con.execute("DELETE FROM report_texts WHERE row_key = ?", (row_key,))
        else:
            con.execute("INSERT OR REPLACE INTO report_texts VALUES (?, ?)",
                        (row_key, r.report_text))
        return UpsertResult(r.id, "inserted" if old is None else "updated", row_key)

    def delete(self, ids: Sequence[str]) -> list[str]:
        """Hard-delete items, and recursively the chunks/regions whose parent they are.

        Metadata and embeddings are removed (nothing of a deleted patient remains but an
        anonymous row key in the changelog). Unknown ids are ignored.

        Returns
        -------
        list of str
            Ids actually deleted, children included, sorted.
        """
        ids = str_list("ids", ids) or []
        rows = []
        with self._write() as con:
            for part in sql.parts(ids):
                found = con.execute(
                    f"""WITH RECURSIVE doomed(row_key, item_id, collection) AS (
                           SELECT row_key, item_id, collection FROM items
                           WHERE item_id IN ({sql.marks(len(part))})
                           UNION
                           SELECT i.row_key, i.item_id, i.collection FROM items i
                           JOIN doomed d ON i.parent_id = d.item_id)
                       SELECT row_key, item_id, collection FROM doomed ORDER BY row_key""",
                    part).fetchall()
                for row_key, _, collection in found:
                    log_change(con, row_key, collection, "delete")
                    con.execute("DELETE FROM items WHERE row_key = ?", (row_key,))
                rows += found
        log.debug("deleted %d items", len(rows))
        return sorted(r[1] for r in rows)

    # -- reads ----------------------------------------------------------------------------
    def get(self, ids: Sequence[str], *, with_embeddings: bool = False) -> dict[str, StoredItem]:
        """Items by id; unknown ids are absent from the result."""
        ids = str_list("ids", ids) or []
        rows = []
        model = (self.config.model,) if with_embeddings else ()
        with self._lock:
            for part in sql.parts(list(dict.fromkeys(ids))):
                rows += self._con.execute(
                    sql.select_items(f"item_id IN ({sql.marks(len(part))})", with_embeddings),
                    (*model, *part)).fetchall()
        items = (sql.stored_item(row) for row in rows)
        return {it.record.id: it for it in items}

    def report_texts(self, ids: Sequence[str]) -> dict[str, str]:
        """The stored report text of each of ``ids`` that has one (``ItemRecord.report_text``)."""
        ids = str_list("ids", ids) or []
        out: dict[str, str] = {}
        with self._lock:
            for part in sql.parts(list(dict.fromkeys(ids))):
                out.update(self._con.execute(
                    f"SELECT i.item_id, t.text FROM items i JOIN report_texts t "
                    f"ON t.row_key = i.row_key WHERE i.item_id IN ({sql.marks(len(part))})",
                    part).fetchall())
        return out

    def reader(self) -> StoreReader:
        """A ``StoreReader`` of this store: reads by row key and by parent through its own
        read-only connections (one per thread), for the search pipeline and the server.
        The caller closes it."""
        return StoreReader(self)

    def last_seq(self) -> int:
        """The seq of the latest committed write (0 for an empty store)."""
        with self._lock:
            row = self._con.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'changelog'").fetchone()
        return 0 if row is None else int(row[0])

    def _meta(self, key: str) -> str:
        with self._lock:
            return self._con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    def changelog_floor(self) -> int:
        """Seq through which the changelog was pruned: catch-up from below it is impossible."""
        return int(self._meta("changelog_pruned_through"))

    def prune_changelog(self, through_seq: int) -> int:
        """Drop changelog rows with ``seq <= through_seq`` (at most ``last_seq()``).

        Indexes saved before ``through_seq`` are then rebuilt instead of caught up. Returns
        the number of rows dropped.
        """
        through = min(int(through_seq), self.last_seq())
        with self._write() as con:
            n = con.execute("DELETE FROM changelog WHERE seq <= ?", (through,)).rowcount
            con.execute("UPDATE meta SET value = max(CAST(value AS INTEGER), ?) "
                        "WHERE key = 'changelog_pruned_through'", (through,))
        return n

    #: meta keys the store itself maintains; ``set_meta`` refuses them
    RESERVED_META = frozenset({"store_uuid", "changelog_pruned_through"})

    def get_meta(self, key: str) -> str | None:
        """A value written by ``set_meta`` (or the store's own meta), None when unset."""
        with self._lock:
            row = self._con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        """Record ``key = value`` in the store's meta table (one committed transaction),
        e.g. which embedding a collection holds; the store never reads it."""
        if not isinstance(key, str) or not key or key in self.RESERVED_META:
            raise ValueError(f"key must be a non-empty str other than "
                             f"{sorted(self.RESERVED_META)}, got {key!r}")
        if not isinstance(value, str):
            raise TypeError(f"value must be str, got {type(value).__name__}")
        with self._write() as con:
            con.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                        "SET value = excluded.value", (key, value))

    def collections(self) -> dict[str, int]:
        """Collections that hold (or held) embeddings of ``config.model``: name -> dim."""
        with self._lock:
            return dict(self._con.execute(
                "SELECT name, dim FROM collections WHERE model = ? ORDER BY name",
                (self.config.model,)))

    def count(self, collection: str) -> int:
        with self._lock:
            return self._con.execute(
                "SELECT count(*) FROM items WHERE collection = ?", (collection,)).fetchone()[0]

    def has_labels(self, collection: str) -> bool:
        """Whether any live item of ``collection`` carries at least one label."""
        with self._lock:
            return bool(self._con.execute(
                "SELECT EXISTS (SELECT 1 FROM items WHERE collection = ? AND labels != '[]')",
                (collection,)).fetchone()[0])

    def iter_embeddings(
        self, collection: str, since_seq: int | None = None, until_seq: int | None = None,
        batch_size: int = 4096,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Embeddings of live items whose last write has ``since_seq < seq <= until_seq``.

        Pages by row key, one short read per page (no transaction is held open between
        pages). An item rewritten during iteration gets a seq past ``until_seq`` and is
        left to the next catch-up, which is why callers pass the ``until_seq`` they read
        from ``last_seq()`` before starting.

        Yields
        ------
        row_keys : np.ndarray, int64, shape (b,)
        vectors : np.ndarray, float32, shape (b, dim)
        """
        since = -1 if since_seq is None else int(since_seq)
        until = self.last_seq() if until_seq is None else int(until_seq)
        dim = self.collections().get(collection)
        if dim is None:
            return
        # The matching row keys first (one read through the (collection, seq) index), then
        # the vectors page by page by explicit key. Paging with "row_key > last" against
        # that index instead re-reads and sorts the whole window for every page: quadratic,
        # half an hour for a 1M-item build.
        with self._lock:
            candidates = np.fromiter(
                (r[0] for r in self._con.execute(
                    "SELECT row_key FROM items WHERE collection = ? AND seq > ? AND seq <= ?",
                    (collection, since, until))), dtype=np.int64)
        candidates.sort()
        for start in range(0, len(candidates), batch_size):
            page = json.dumps(candidates[start:start + batch_size].tolist())
            with self._lock:  # seq re-checked: a row rewritten since is left to the next catch-up
                rows = self._con.execute(sql.EMBEDDINGS_PAGE, (
                    self.config.model, page, collection, since, until)).fetchall()
            if not rows:
                continue
            keys = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4")
            yield keys, vectors.astype(np.float32).reshape(len(rows), dim)

    def removed_row_keys(self, collection: str, since_seq: int, until_seq: int) -> np.ndarray:
        """Row keys an index of ``collection`` must drop after the writes in ``(since, until]``.

        Those deleted or moved out of ``collection``, and those rewritten without a vector
        of ``config.model`` (an update by another model that changed the content).

        Returns
        -------
        np.ndarray, int64, shape (r,), sorted
        """
        window = (collection, int(since_seq), int(until_seq))
        with self._lock:
            rows = self._con.execute(sql.REMOVED_ROW_KEYS,
                                     window + window + (self.config.model,)).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def filter_row_keys(
        self, collection: str, modality: str | Sequence[str] | None = None,
        body_part: str | Sequence[str] | None = None, view: str | Sequence[str] | None = None,
        labels_any: Sequence[str] | None = None, exclude_patients: Sequence[str] | None = None,
        exclude_studies: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Row keys of live items of ``collection`` that pass every given filter.

        ``modality``/``body_part``/``view`` match any of the given values; ``labels_any``
        keeps items carrying at least one of the labels; ``exclude_*`` drop items of those
        patients/studies (items with no pseudonym are kept). The result is the ``allowed``
        argument of ``Index.search``.

        Returns
        -------
        np.ndarray, int64, shape (a,), sorted
        """
        where, args = sql.filter_where(collection, modality, body_part, view, labels_any,
                                       exclude_patients, exclude_studies)
        with self._lock:
            rows = self._con.execute(
                f"SELECT row_key FROM items WHERE {where} ORDER BY row_key", args).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def stats(self) -> dict:
        """Counts per collection, embedding count, last seq, schema version and file sizes."""
        with self._lock:
            per = dict(self._con.execute(
                "SELECT collection, count(*) FROM items GROUP BY collection ORDER BY collection"))
            n_emb = self._con.execute("SELECT count(*) FROM embeddings").fetchone()[0]
        path = Path(self.config.path)
        files = {p.name: p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists()}
        return {"items": per, "embeddings": n_emb, "dims": self.collections(),
                "last_seq": self.last_seq(), "schema_version": SCHEMA_VERSION,
                "model": self.config.model, "file_bytes": files}
