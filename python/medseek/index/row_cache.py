"""``RowCache``: what ranking needs of each row (and the children of each parent), in
memory, kept in step with the changelog.

A search with a region rerank or diversification ranks K' = 200 candidates per query, and
the candidates of a micro-batch hardly overlap, so reading their ids, collections and
provenance from SQLite costs ~2.5 µs a row (~0.5 ms a query) on every search. The cache
keeps those fields by row key, in arrays indexed by the row key itself (row keys are
small, dense and never reused), with the provenance pseudonyms as int group codes, which
is all the provenance caps compare.

Staying right without a store read per row: every write of a row (upsert, move to another
collection, delete) appends its row key to the store's changelog with a new seq, in the
same transaction. Before each use the cache reads the store's last seq (one tiny statement)
and, when writes happened since the seq it reflects, drops every row key the changelog
lists after that seq; a dropped or never-seen row is read again on its next use. If the
changelog was pruned past that seq, or the store's seq went back (a restored backup), the
whole cache is dropped. So a row the cache returns is the row as of some commit no older
than the last seq read before the call: an acknowledged write is seen by every search
that starts after it, as with a direct read. Rows without an embedding of the store's
model are not cached (the store read drops them, as ``StoreReader.candidates`` does).

Children (region crops, chunks) of a parent are cached by (collection, region name) too,
for the region rerank, which reads those of every candidate. The changelog names the
child's row, not its parent, so any write in a children's collection drops every cached
child of that collection. What a rerank computes from a parent's children (the region
embeddings they stand for) is kept per parent the same way (``per_parent``).

Memory: ~40 bytes a row plus the ids (at 1M rows, ~100 MB). Not for pseudonym lookups:
the cache holds pseudonyms only to hand them back with the row, never logs them. The code
table of the pseudonyms only grows while the reader lives: a deleted patient's pseudonym
string stays in this process's memory (never in a result) until the cache is cleared or
the reader closed, as records stay in the ``RecordCache`` until evicted.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable

import numpy as np

__all__ = ["CachedRows", "RowCache", "rows_with_vectors"]

#: the store's last seq and the seq its changelog was pruned through, in one snapshot
_SEQS_SQL = ("SELECT (SELECT seq FROM sqlite_sequence WHERE name = 'changelog'), "
             "(SELECT value FROM meta WHERE key = 'changelog_pruned_through')")
#: row keys and collections written in a seq window (parameters: since, until)
_CHANGED_SQL = "SELECT DISTINCT row_key, collection FROM changelog WHERE seq > ? AND seq <= ?"
#: parents whose children one cache keeps at most (a full cache is emptied)
CHILDREN_CACHE_SIZE = 500_000
#: the cached fields of rows with an embedding of the model (parameters: model, keys)
_ROWS_SQL = ("SELECT i.row_key, i.seq, i.item_id, i.collection, i.patient_pseudonym, "
             "i.study_pseudonym, i.source_document FROM items i "
             "JOIN embeddings e ON e.row_key = i.row_key AND e.model = ? "
             "WHERE i.row_key IN (SELECT value FROM json_each(?))")
#: provenance keys, in the order of ``_ROWS_SQL``'s pseudonym columns
GROUP_KEYS = ("patient", "study", "document")


class _Codes:
    """Distinct values -> int codes; code -1 is None. ``values[code]`` gives the value back
    (an object array one slot longer than the codes used, so ``values[-1]`` is None)."""

    def __init__(self) -> None:
        self.code: dict = {None: -1}
        self.values = np.full(16, None, dtype=object)

    def encode(self, value: str | None) -> int:
        got = self.code.get(value)
        if got is None:
            got = self.code[value] = len(self.code) - 1
            if got + 1 >= self.values.size:  # keep the last slot None
                grown = np.full(2 * self.values.size, None, dtype=object)
                grown[:self.values.size] = self.values
                self.values = grown
            self.values[got] = value
        return got


class CachedRows:
    """Rows read through a ``RowCache``, in the asked order (absent keys left out).

    Attributes
    ----------
    row_keys, seqs : np.ndarray, int64, shape (n,)
    positions : np.ndarray, int64, shape (n,)
        Index of each in the keys asked for.
    ids, collections : list of str, length n
    provenance : dict of str to list of (str or None)
    groups : dict of str to np.ndarray, int64, shape (n,)
        Group code of each provenance value (-1: None): within one call, equal values have
        equal codes (codes are not kept across calls: a cleared cache codes anew).
    """

    def __init__(self, cache: RowCache, keys: np.ndarray, positions: np.ndarray) -> None:
        self.row_keys, self.positions = keys, positions
        self.seqs = cache._seq[keys]
        self.ids = cache._ids[keys].tolist()
        self.collections = cache._collections.values[cache._coll[keys]].tolist()
        self.groups = {k: cache._group[k][keys].astype(np.int64) for k in GROUP_KEYS}
        self.provenance = {k: cache._codes[k].values[self.groups[k]].tolist()
                           for k in GROUP_KEYS}


class RowCache:
    """Ids, collections, provenance and seq of store rows by row key (module docstring).

    Thread-safe: one lock around catching up, filling and reading.

    Parameters
    ----------
    model : str
        The store's model: rows without its embedding are not cached.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self.seq: int | None = None  # the store seq the cache reflects; None: nothing yet
        self.reads = 0  # rows read from the store (misses)
        self._lock = threading.Lock()
        self._clear()

    def clear(self) -> None:
        """Forget every row and child (the next use reads them again)."""
        with self._lock:
            self._clear()
            self.seq = None

    def _clear(self) -> None:
        self._children: dict[tuple[str, str | None], dict[str, tuple]] = {}
        #: per_parent's values: key -> (the collections whose writes drop it, pid -> value)
        self._derived: dict[object, tuple[frozenset, dict[str, object]]] = {}
        n = 1024
        self._present = np.zeros(n, dtype=bool)
        self._seq = np.zeros(n, dtype=np.int64)
        self._ids = np.full(n, None, dtype=object)
        self._coll = np.full(n, -1, dtype=np.int32)
        self._group = {k: np.full(n, -1, dtype=np.int32) for k in GROUP_KEYS}
        self._collections = _Codes()
        self._codes = {k: _Codes() for k in GROUP_KEYS}

    def __len__(self) -> int:
        return int(self._present.sum())

    def rows(self, con: sqlite3.Connection, row_keys: np.ndarray) -> CachedRows:
        """The rows of ``row_keys`` (int64 (n,), distinct) that are live with an embedding
        of the model, as of the store's last commit, read through the cache on ``con``
        (a connection to the store, e.g. a reader's read-only one)."""
        keys = np.asarray(row_keys, dtype=np.int64)
        with self._lock:
            self._catch_up(con)
            need = keys[~self._cached(keys)]
            if need.size:
                self._fill(con, need)
            at = np.flatnonzero(self._cached(keys))
            return CachedRows(self, keys[at], at.astype(np.int64))

    def children(self, con: sqlite3.Connection, parent_ids: list[str], collection: str,
                 region: str | None, read: Callable[[list[str]], dict[str, list]]
                 ) -> dict[str, tuple[tuple, ...]]:
        """``StoreReader.children`` through the cache: the children of ``parent_ids`` in
        ``collection`` (with ``region``), as of the store's last commit, each as the plain
        tuple of its fields (``tuple(ChildRow)``); parents not cached are read with
        ``read`` (``parent ids -> parent id -> children``), and a parent without children
        is cached as such. Cleared for a collection by any write in it (``_catch_up``)."""
        with self._lock:
            self._catch_up(con)
            known = self._children.setdefault((collection, region), {})
            need = [pid for pid in dict.fromkeys(parent_ids) if pid not in known]
            if need:
                if len(known) + len(need) > CHILDREN_CACHE_SIZE:
                    known.clear()
                got = read(need)
                for pid in need:
                    # plain tuples of str, int, None and arrays: the cyclic GC stops
                    # tracking them, so a big cache does not slow every collection
                    known[pid] = tuple(tuple(child) for child in got.get(pid, ()))
            out = {}
            for pid in parent_ids:
                kids = known.get(pid)
                if kids:
                    out[pid] = kids
            return out

    def per_parent(self, con: sqlite3.Connection, key, collections: tuple[str, ...],
                   parent_ids: list[str], compute: Callable[[list[str]], dict[str, object]]
                   ) -> dict[str, object]:
        """Values derived from the children of each parent in ``collections`` (e.g. the
        region embeddings a parent's region and chunk children stand for), kept under
        ``key`` like the children themselves: dropped by any write in one of
        ``collections``. Parents not kept are given to ``compute`` (parent ids -> parent
        id -> value, parents without a value absent), outside the lock, so it may read
        children through this cache. Returns parent id -> value for ``parent_ids``."""
        with self._lock:
            self._catch_up(con)
            entry = self._derived.setdefault(key, (frozenset(collections), {}))
            known = entry[1]
            need = [pid for pid in dict.fromkeys(parent_ids) if pid not in known]
            out = {pid: known[pid] for pid in parent_ids if known.get(pid) is not None}
        if not need:
            return out
        got = compute(need)
        out.update((pid, value) for pid, value in got.items() if value is not None)
        with self._lock:
            # kept only while no write dropped the entry meanwhile (a later catch-up
            # would drop it anyway); a parent without a value is kept as None
            if self._derived.get(key) is entry:
                if len(known) + len(need) > CHILDREN_CACHE_SIZE:
                    known.clear()
                known.update((pid, got.get(pid)) for pid in need)
        return out

    def _cached(self, keys: np.ndarray) -> np.ndarray:
        inside = (keys >= 0) & (keys < self._present.size)
        out = np.zeros(keys.size, dtype=bool)
        out[inside] = self._present[keys[inside]]
        return out

    def _catch_up(self, con: sqlite3.Connection) -> None:
        """Drop the rows written since ``self.seq`` (all of them when the changelog no
        longer reaches back to it, or the store's seq went back)."""
        last, floor = con.execute(_SEQS_SQL).fetchone()
        last, floor = int(last or 0), int(floor or 0)
        if self.seq is not None and last != self.seq:
            if last < self.seq or floor > self.seq:
                self._clear()
            else:
                rows = con.execute(_CHANGED_SQL, (self.seq, last)).fetchall()
                changed = np.fromiter((r[0] for r in rows), np.int64, len(rows))
                changed = changed[changed < self._present.size]
                self._present[changed] = False
                self._ids[changed] = None  # a deleted row's id is not kept
                # a write in a children's collection may add, move or drop a child of any
                # parent: that collection's cached children go
                touched = {r[1] for r in rows}
                for key in [key for key in self._children if key[0] in touched]:
                    del self._children[key]
                for key in [k for k, (colls, _) in self._derived.items() if colls & touched]:
                    del self._derived[key]
        self.seq = last

    def _fill(self, con: sqlite3.Connection, keys: np.ndarray) -> None:
        rows = con.execute(_ROWS_SQL, (self.model, json.dumps(keys.tolist()))).fetchall()
        self.reads += len(rows)
        if not rows:
            return
        top = max(r[0] for r in rows)
        if top >= self._present.size:
            self._grow(top + 1)
        coll, codes = self._collections, self._codes
        for row_key, seq, item_id, collection, *pseudonyms in rows:
            self._seq[row_key] = seq
            self._ids[row_key] = item_id
            self._coll[row_key] = coll.encode(collection)
            for k, value in zip(GROUP_KEYS, pseudonyms):
                self._group[k][row_key] = codes[k].encode(value)
            self._present[row_key] = True

    def _grow(self, n: int) -> None:
        size = max(n, 2 * self._present.size)

        def grown(a: np.ndarray, fill) -> np.ndarray:
            out = np.full(size, fill, dtype=a.dtype)
            out[:a.size] = a
            return out

        self._present, self._seq = grown(self._present, False), grown(self._seq, 0)
        self._ids, self._coll = grown(self._ids, None), grown(self._coll, -1)
        self._group = {k: grown(v, -1) for k, v in self._group.items()}


def rows_with_vectors(cached: CachedRows,
                      index_vectors: Callable[[np.ndarray], tuple[np.ndarray | None, int]]
                      ) -> np.ndarray | None:
    """The index's copies of ``cached``'s vectors, or None when the index lacks an exact
    copy of one, or one row was written after the seq the index has applied (its copy may
    be older than the store's)."""
    vectors, applied_seq = index_vectors(cached.row_keys)
    if vectors is None or (cached.seqs > applied_seq).any():
        return None
    return vectors
