"""``StoreReader``: the store's reads for searching, by row key and by parent.

An ANN index answers with row keys, and region reranking needs the region (and chunk)
children of the candidates. ``Store.reader()`` hands out a ``StoreReader`` that reads the
same SQLite file through its *own read-only connections* (``mode=ro``), with the store's
SQL (``medseek.index.sql``); the store's own connection and lock are not touched, so
searches never wait behind a write. In WAL mode a reader sees the last committed state
and never blocks the writer, so an acknowledged delete is visible here at once: a row key
the index still holds but the store no longer does comes back as None, and the pipeline
drops it.

Each thread that reads gets its own read-only connection (opened on its first read), so
the server's search threads read concurrently; SQLite releases the GIL while it steps.

Building an ``ItemRecord`` from its row (JSON labels, validation) costs more than reading
the row, so ``candidate_items`` and ``items`` keep the records they built in a bounded LRU
keyed by ``(row_key, seq)``. That key needs no invalidation: every write of an item's columns
gives it a new ``seq`` in the same transaction (``Store.upsert``), a row key is never
reused, and a deleted row is simply not read again, so a cached record is the row as it
was at that seq, for good.

A search reads its candidates through the reader's ``RowCache`` instead
(``cached_candidates``; row_cache.py: ids, collections, provenance and seq by row key,
and children by parent, kept in step with the store's changelog), takes their vectors from
the ANN index's exact copies, and the hits' records from the record cache at the seqs of
that read (``records_at``), so once warm a batch reads nothing from the store but the
changelog's last seq. Where the index keeps no exact copies (IVF-PQ, Milvus) it reads the
store: ``candidate_items`` for a plain batch, ``candidates`` and ``items`` otherwise.
"""

from __future__ import annotations

import collections
import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from . import sql
from .records import ITEM_FIELDS, ItemRecord, StoredItem, record_from_row, str_list
from .row_cache import RowCache, rows_with_vectors

if TYPE_CHECKING:
    from .store import Store

__all__ = ["Candidates", "ChildRow", "RecordCache", "StoreReader"]

#: records kept by a reader's ``RecordCache`` (a few MB)
RECORD_CACHE_SIZE = 8192
#: columns of ``candidate_items``' one read: the record, then row_key, seq, vector
_CANDIDATE_ITEM_SQL = (f"SELECT {', '.join('i.' + c for c in ITEM_FIELDS)}, i.row_key, i.seq, "
                       "e.vector FROM items i JOIN embeddings e ON e.row_key = i.row_key "
                       "AND e.model = ? WHERE i.row_key IN (SELECT value FROM json_each(?))")
_N_FIELDS = len(ITEM_FIELDS)
#: columns of ``candidates``: row_key, id, collection, provenance, vector
_CANDIDATE_SQL = ("SELECT i.row_key, i.item_id, i.collection, i.patient_pseudonym, "
                  "i.study_pseudonym, i.source_document, e.vector FROM items i "
                  "JOIN embeddings e ON e.row_key = i.row_key AND e.model = ? "
                  "WHERE i.row_key IN (SELECT value FROM json_each(?))")
#: ``Catalog.stored_vectors`` bound to a collection: row keys -> (vectors or None, seq)
IndexVectors = Callable[[np.ndarray], tuple["np.ndarray | None", int]]


@dataclass(frozen=True)
class Candidates:
    """The fields ranking needs of ANN candidates (full records are built for hits only).

    Attributes
    ----------
    row_keys : np.ndarray, int64, shape (n,)
        Live candidates that have an embedding of the store's model, in the asked order.
    positions : np.ndarray, int64, shape (n,)
        Index of each in the ``row_keys`` asked for.
    ids, collections : list of str, length n
    provenance : dict of str to list of (str or None)
        "patient", "study", "document" pseudonyms (never logged).
    embeddings : np.ndarray, float32, shape (n, d)
    groups : dict of str to np.ndarray, int64, shape (n,), or None
        The provenance as group codes (``diversify.group_codes``), when the read had them
        (through the ``RowCache``); None otherwise.
    seqs : np.ndarray, int64, shape (n,), or None
        Each row's seq as of the read, when it went through the ``RowCache`` (``records_at``
        takes the hits' records at exactly these seqs); None otherwise.
    """

    row_keys: np.ndarray
    positions: np.ndarray
    ids: list[str]
    collections: list[str]
    provenance: dict[str, list[str | None]] = field(repr=False)
    embeddings: np.ndarray = field(repr=False)
    groups: dict[str, np.ndarray] | None = field(default=None, repr=False)
    seqs: np.ndarray | None = field(default=None, repr=False)


class ChildRow(NamedTuple):
    """A chunk or region child: its id, parent, region name, z-range and embedding.

    A named tuple (immutable): ``RowCache`` keeps children as plain tuples of these
    fields, which the cyclic GC need not track."""

    id: str
    parent_id: str
    region: str | None
    z_range: tuple[int, int] | None
    embedding: np.ndarray | None = None

    def __repr__(self) -> str:
        return (f"ChildRow(id={self.id!r}, parent_id={self.parent_id!r}, "
                f"region={self.region!r}, z_range={self.z_range!r})")


class RecordCache:
    """A bounded, thread-safe LRU of ``ItemRecord`` by ``(row_key, seq)`` (module
    docstring: why that key never goes stale).

    Parameters
    ----------
    maxsize : int
        Records kept; the least recently used go first. 0 keeps none.
    """

    def __init__(self, maxsize: int = RECORD_CACHE_SIZE) -> None:
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0, got {maxsize}")
        self.maxsize = maxsize
        self.hits = self.misses = 0
        self._records: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def get_many(self, keys: list[tuple[int, int]]) -> list[ItemRecord | None]:
        """The cached record of each key (None where there is none)."""
        with self._lock:
            got = [self._records.get(k) for k in keys]
            for k, rec in zip(keys, got):
                if rec is not None:
                    self._records.move_to_end(k)
            n_hit = sum(rec is not None for rec in got)
            self.hits += n_hit
            self.misses += len(keys) - n_hit
        return got

    def put_many(self, items: list[tuple[tuple[int, int], ItemRecord]]) -> None:
        if not self.maxsize:
            return
        with self._lock:
            self._records.update(items)
            while len(self._records) > self.maxsize:
                self._records.popitem(last=False)


def _candidates(found: list[tuple[int, tuple]], embeddings: np.ndarray) -> Candidates:
    """``Candidates`` of ``(position asked, row of _CANDIDATE_SQL)`` pairs and their
    (n, d) embeddings."""
    cols = list(zip(*(r for _, r in found))) if found else [()] * 6
    return Candidates(
        row_keys=np.array(cols[0], dtype=np.int64),
        positions=np.array([pos for pos, _ in found], dtype=np.int64),
        ids=list(cols[1]), collections=list(cols[2]),
        provenance={"patient": list(cols[3]), "study": list(cols[4]),
                    "document": list(cols[5])},
        embeddings=embeddings)


def _check_keys(row_keys: object) -> np.ndarray:
    keys = np.asarray(row_keys)
    if keys.dtype.kind not in "iu" or keys.ndim != 1:
        raise TypeError(f"row_keys must be a 1-D int array, got {keys.dtype} {keys.shape}")
    return keys


class StoreReader:
    """Read-only views of a ``Store`` by row key and by parent.

    Parameters
    ----------
    store : Store
        Its ``config.path`` is opened read-only; its ``config.model`` picks the embeddings.
    record_cache : int
        Size of the ``RecordCache`` of ``candidate_items`` (0: none).
    """

    def __init__(self, store: Store, record_cache: int = RECORD_CACHE_SIZE) -> None:
        self.model = store.config.model
        self.records = RecordCache(record_cache)
        self.row_cache = RowCache(self.model)
        self._uri = f"{store.config.path.resolve().as_uri()}?mode=ro"
        self._timeout = store.config.busy_timeout_s
        self._local = threading.local()
        self._cons: list[sqlite3.Connection] = []
        self._lock = threading.Lock()  # guards _cons and _closed, not the reads
        self._closed = False
        self._con_here()  # fail now, not on the first search, if the file cannot be opened

    def _con_here(self) -> sqlite3.Connection:
        """This thread's read-only connection (opened on its first use)."""
        con = getattr(self._local, "con", None)
        if con is None:
            with self._lock:
                if self._closed:
                    raise sqlite3.ProgrammingError("Cannot operate on a closed StoreReader.")
                con = sqlite3.connect(self._uri, uri=True, check_same_thread=False,
                                      timeout=self._timeout)
                self._cons.append(con)
            self._local.con = con
        return con

    def _execute(self, sql: str, args: tuple) -> list[tuple]:
        return self._con_here().execute(sql, args).fetchall()

    def close(self) -> None:
        """Close every thread's connection; reads afterwards raise ProgrammingError."""
        with self._lock:
            self._closed = True
            for con in self._cons:
                con.close()
            self._cons.clear()
        self.row_cache.clear()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _items(self, where: str, args: tuple, with_embeddings: bool) -> list[StoredItem]:
        """The matching rows as ``StoredItem``, their records from ``self.records`` where
        the row's (row_key, seq) is cached (module docstring), else built and cached."""
        model = (self.model,) if with_embeddings else ()
        rows = self._execute(sql.select_items(where, with_embeddings), model + args)
        cache_keys = [(r[_N_FIELDS], r[_N_FIELDS + 1]) for r in rows]  # (row_key, seq)
        records = self.records.get_many(cache_keys)
        new = []
        for j, row in enumerate(rows):
            if records[j] is None:
                records[j] = record_from_row(row[:_N_FIELDS])
                new.append((cache_keys[j], records[j]))
        self.records.put_many(new)
        return [sql.stored_item(row, record) for row, record in zip(rows, records)]

    def items(
        self, row_keys: np.ndarray, *, with_embeddings: bool = False
    ) -> list[StoredItem | None]:
        """Items by row key, aligned with ``row_keys``; None for keys no longer live.

        Parameters
        ----------
        row_keys : np.ndarray, int64, shape (n,)
        with_embeddings : bool
            Also read each item's embedding of the store's model (None if it has none).

        Returns
        -------
        list of (StoredItem or None), length n
        """
        keys = _check_keys(row_keys)
        found = self._items("row_key IN (SELECT value FROM json_each(?))",
                            (json.dumps(keys.tolist()),), with_embeddings)
        by_key = {it.row_key: it for it in found}
        return [by_key.get(int(k)) for k in keys]

    def by_ids(self, ids: Sequence[str], *, with_embeddings: bool = False
               ) -> dict[str, StoredItem]:
        """Items by client id, as ``Store.get`` reads them; unknown ids are absent."""
        ids = str_list("ids", ids) or []
        found = self._items("item_id IN (SELECT value FROM json_each(?))",
                            (json.dumps(ids),), with_embeddings)
        return {it.record.id: it for it in found}

    def vectors_by_ids(self, ids: Sequence[str]) -> dict[str, tuple[str, np.ndarray]]:
        """Each stored item's collection and embedding of the store's model, by client id;
        unknown ids and items without such an embedding are absent (no full records:
        what an ``item_id`` query needs of its item, read for a whole micro-batch)."""
        ids = str_list("ids", ids) or []
        rows = self._execute(
            "SELECT i.item_id, i.collection, e.vector FROM items i JOIN embeddings e "
            "ON e.row_key = i.row_key AND e.model = ? "
            "WHERE i.item_id IN (SELECT value FROM json_each(?))",
            (self.model, json.dumps(ids)))
        return {item_id: (coll, np.frombuffer(blob, dtype="<f4").astype(np.float32))
                for item_id, coll, blob in rows}

    def candidates(self, row_keys: np.ndarray,
                   index_vectors: IndexVectors | None = None) -> Candidates:
        """What ranking needs of ANN candidates, without building full records.

        Parameters
        ----------
        row_keys : np.ndarray, int, shape (n,)
        index_vectors : callable, optional
            ``keys -> (vectors or None, applied_seq)`` of the ANN index the keys came from
            (``Catalog.stored_vectors``). Given, nothing is read from the store per
            candidate: the ids, collections and provenance come from ``self.row_cache``
            (kept in step with the changelog; row_cache.py) and the vectors are the index's
            exact copies, which equal the store's for rows written at or before
            ``applied_seq``. When the index has no exact copy of every candidate, or one was
            written after ``applied_seq``, everything is read from the store as without it.

        Returns
        -------
        Candidates
            The live ones that hold an embedding of the store's model, in the given order.
        """
        keys = _check_keys(row_keys)
        if index_vectors is not None:
            got = self.cached_candidates(keys, index_vectors)
            if got is not None:
                return got
        rows = self._execute(_CANDIDATE_SQL, (self.model, json.dumps(keys.tolist())))
        by_key = {r[0]: r for r in rows}
        found = [(pos, by_key[k]) for pos, k in enumerate(keys.tolist()) if k in by_key]
        dims = {len(r[-1]) for _, r in found}
        if len(dims) > 1:
            raise ValueError(f"row_keys mix embeddings of several dims {sorted(dims)}")
        d = dims.pop() // 4 if dims else 0
        embs = np.frombuffer(b"".join(r[-1] for _, r in found), dtype="<f4")
        return _candidates(found, embs.astype(np.float32).reshape(len(found), d))

    def cached_candidates(self, row_keys: np.ndarray, index_vectors: IndexVectors
                          ) -> Candidates | None:
        """``candidates`` through ``self.row_cache`` with the vectors from the index (its
        seqs set, for ``records_at``); None when the index cannot give them all
        (``candidates``' docstring). Once the rows are cached this reads nothing from the
        store but the changelog's last seq."""
        cached = self.row_cache.rows(self._con_here(), _check_keys(row_keys))
        vectors = rows_with_vectors(cached, index_vectors)
        if vectors is None:
            return None
        return Candidates(cached.row_keys, cached.positions, cached.ids, cached.collections,
                          cached.provenance, np.asarray(vectors, dtype=np.float32),
                          cached.groups, cached.seqs)

    def records_at(self, row_keys: np.ndarray, seqs: np.ndarray) -> dict[int, ItemRecord]:
        """The records of rows as they were at ``seqs`` (e.g. the hits of candidates read
        through ``cached_candidates``), by row key: from ``self.records`` where that
        ``(row_key, seq)`` is cached, the others in one store read (a row rewritten since
        comes back as it is now; a row deleted since is absent)."""
        keys = _check_keys(row_keys).tolist()
        recs = self.records.get_many(list(zip(keys, np.asarray(seqs).tolist())))
        out = {k: r for k, r in zip(keys, recs) if r is not None}
        missing = [k for k, r in zip(keys, recs) if r is None]
        if missing:
            for it in self.items(np.array(missing, dtype=np.int64)):
                if it is not None:
                    out[it.row_key] = it.record
        return out

    def candidate_items(self, row_keys: np.ndarray) -> tuple[Candidates, dict[int, ItemRecord]]:
        """``candidates`` and the same rows' records, in ONE read.

        For a batch whose every candidate will be a hit (K' = k: the plain search), whose
        records are wanted anyway: one statement instead of the candidates' read and then
        the hits' read. Records come from ``self.records`` when the row's seq is the one
        cached (module docstring).

        Returns
        -------
        (Candidates, dict of int to ItemRecord)
            The candidates as ``candidates`` gives them, and each one's record by row key.
        """
        keys = _check_keys(row_keys)
        rows = self._execute(_CANDIDATE_ITEM_SQL, (self.model, json.dumps(keys.tolist())))
        by_key = {r[_N_FIELDS]: r for r in rows}
        found = [(pos, by_key[k]) for pos, k in enumerate(keys.tolist()) if k in by_key]
        dims = {len(r[-1]) for _, r in found}
        if len(dims) > 1:
            raise ValueError(f"row_keys mix embeddings of several dims {sorted(dims)}")
        d = dims.pop() // 4 if dims else 0
        cache_keys = [(r[_N_FIELDS], r[_N_FIELDS + 1]) for _, r in found]
        recs = self.records.get_many(cache_keys)
        new = []
        for j, (_, row) in enumerate(found):
            if recs[j] is None:
                recs[j] = record_from_row(row[:_N_FIELDS])
                new.append((cache_keys[j], recs[j]))
        self.records.put_many(new)
        embs = np.frombuffer(b"".join(r[-1] for _, r in found), dtype="<f4")
        cands = Candidates(
            row_keys=np.array([k for k, _ in cache_keys], dtype=np.int64),
            positions=np.array([pos for pos, _ in found], dtype=np.int64),
            ids=[r.id for r in recs], collections=[r.collection for r in recs],
            provenance={"patient": [r.patient_pseudonym for r in recs],
                        "study": [r.study_pseudonym for r in recs],
                        "document": [r.source_document for r in recs]},
            embeddings=embs.astype(np.float32).reshape(len(found), d))
        return cands, {k: rec for (k, _), rec in zip(cache_keys, recs)}

    def per_parent(self, key, collections: tuple[str, ...], parent_ids: Sequence[str],
                   compute) -> dict:
        """``RowCache.per_parent`` on this reader's connection: values computed from the
        children (in ``collections``) of each parent, kept until a write in one of them."""
        return self.row_cache.per_parent(self._con_here(), key, tuple(collections),
                                         list(parent_ids), compute)

    def children(
        self, parent_ids: Sequence[str], collection: str, region: str | None = None, *,
        cached: bool = False,
    ) -> dict[str, list[ChildRow]]:
        """Children (chunks, regions) of the given parents in ``collection``.

        Parameters
        ----------
        parent_ids : sequence of str
            Item ids of the parents.
        collection : str
            The children's collection, e.g. "region" or "chunk".
        region : str, optional
            Keep only children with this region name.
        cached : bool
            Through ``self.row_cache`` (kept in step with the changelog; row_cache.py):
            what the search pipeline reads for every candidate of every query.

        Returns
        -------
        dict of str to list of ChildRow
            Parent id -> its children ordered by row key; parents without any are absent.
        """
        if isinstance(parent_ids, str):
            raise TypeError("parent_ids must be a sequence of str, got a str")
        if cached:
            got = self.row_cache.children(self._con_here(), list(parent_ids), collection,
                                          region, lambda need: self.children(need, collection,
                                                                             region))
            return {pid: [ChildRow._make(kid) for kid in kids] for pid, kids in got.items()}
        # unary + keeps SQLite off the (collection, seq) index: the parent_id index is the
        # selective one (a scan of every row of the collection otherwise)
        where = "i.parent_id IN (SELECT value FROM json_each(?)) AND +i.collection = ?"
        args: tuple = (self.model, json.dumps(list(parent_ids)), collection)
        if region is not None:
            where += " AND i.region = ?"
            args += (region,)
        rows = self._execute(
            "SELECT i.item_id, i.parent_id, i.region, i.z_start, i.z_end, e.vector "
            "FROM items i LEFT JOIN embeddings e ON e.row_key = i.row_key AND e.model = ? "
            f"WHERE {where} ORDER BY i.row_key", args)
        out: dict[str, list[ChildRow]] = {}
        for item_id, parent, name, z0, z1, blob in rows:
            emb = None if blob is None else np.frombuffer(blob, dtype="<f4").astype(np.float32)
            z = None if z0 is None else (int(z0), int(z1))
            out.setdefault(parent, []).append(ChildRow(item_id, parent, name, z, emb))
        return out
