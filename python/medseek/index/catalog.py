"""One ANN index per collection, derived from the store and caught up from its changelog.

On ``open`` each collection's saved index (``<index_dir>/<collection>.npz``) is loaded and
the store's changes after the seq saved with it are applied: deletes, then upserts of every
item written since. Replaying is idempotent (``add`` is an upsert, removing an absent id is
a no-op), so an index saved with an older seq than its content is harmless; one whose seq is
*ahead* of the store (the store was restored from a backup), saved for another store,
unreadable, corrupt, or built with another structure is thrown away and rebuilt from the
store with a logged warning. Losing every index file loses nothing.

IVF-PQ needs ``min_train`` vectors to train; a collection configured as IVF-PQ that holds
fewer is served by an exact flat index until it grows past that, then rebuilt as IVF-PQ
(trained on a seeded uniform sample of ``train_sample`` vectors).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

import numpy as np

from .faiss_config import load_index, make_index
from .faiss_index import FaissConfig, FaissIndex, IndexFileError
from .store import Store

log = logging.getLogger(__name__)


def _add(store: Store, index, keys: np.ndarray, vectors: np.ndarray) -> None:
    """``index.add``; an index that filters by metadata itself (``takes_metadata``, e.g.
    Milvus) also gets the rows' records, read from the store."""
    if getattr(index, "takes_metadata", False):
        with store.reader() as reader:
            found = reader.items(keys)
        index.add(keys, vectors, metadata=[None if it is None else it.record for it in found])
    else:
        index.add(keys, vectors)


@dataclass(frozen=True)
class CatalogConfig:
    """Where indexes are saved and how each collection's index is built.

    Attributes
    ----------
    index_dir : Path
        Directory of the saved indexes (created if missing).
    faiss : FaissConfig
        Index config of every collection not named in ``per_collection``.
    per_collection : mapping of str to FaissConfig
        Overrides, e.g. ``{"chunk": FaissConfig(kind="hnsw")}``.
    batch_size : int
        Embeddings read from the store per page.
    train_sample : int
        Most vectors IVF-PQ is trained on.
    """

    index_dir: Path
    faiss: FaissConfig = FaissConfig()
    per_collection: Mapping[str, FaissConfig] = field(default_factory=dict)
    batch_size: int = 4096
    train_sample: int = 100_000

    def __post_init__(self) -> None:
        object.__setattr__(self, "index_dir", Path(self.index_dir))
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for cfg in (self.faiss, *self.per_collection.values()):
            if cfg.kind == "ivfpq" and self.train_sample < cfg.min_train:
                raise ValueError(f"train_sample must be >= {cfg.min_train} (the IVF-PQ "
                                 f"min_train), got {self.train_sample}")

    def for_collection(self, name: str) -> FaissConfig:
        return self.per_collection.get(name, self.faiss)


@dataclass
class IndexedCollection:
    """A collection's index and the last store seq applied to it."""

    name: str
    index: FaissIndex
    applied_seq: int
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)


@dataclass(frozen=True)
class SyncReport:
    collection: str
    removed: int
    upserted: int
    applied_seq: int


class Catalog:
    """The per-collection indexes of a store.

    Parameters
    ----------
    store : Store
        The source of truth.
    config : CatalogConfig
    """

    def __init__(self, store: Store, config: CatalogConfig) -> None:
        self.store = store
        self.config = config
        self._collections: dict[str, IndexedCollection] = {}
        self._lock = threading.RLock()

    # -- start-up -------------------------------------------------------------------------
    def open(self) -> dict[str, str]:
        """Load or rebuild every collection's index and catch it up with the store.

        Returns
        -------
        dict
            collection -> "loaded" (saved index caught up) or "rebuilt: <reason>".
        """
        self.config.index_dir.mkdir(parents=True, exist_ok=True)
        outcome = {}
        with self._lock:
            for name, dim in self.store.collections().items():
                coll, reason = self._load(name, dim)
                if coll is None:
                    coll = self._build(name, dim)
                    outcome[name] = f"rebuilt: {reason}"
                else:
                    outcome[name] = "loaded"
                self._collections[name] = coll
                self._sync_one(coll)
                if outcome[name] != "loaded":
                    self._save_one(coll)  # the next start-up then loads instead of rebuilding
        return outcome

    def _path(self, name: str) -> Path:
        return self.config.index_dir / f"{name}.npz"

    def _effective_config(self, name: str) -> FaissConfig:
        cfg = self.config.for_collection(name)
        if cfg.kind == "ivfpq" and self.store.count(name) < cfg.min_train:
            return replace(cfg, kind="flat")  # too few vectors to train: exact meanwhile
        return cfg

    def _load(self, name: str, dim: int) -> tuple[IndexedCollection | None, str]:
        path = self._path(name)
        if not path.exists():
            log.info("no saved index for collection %s; building it from the store", name)
            return None, "no saved index"
        try:
            index = load_index(path, self._effective_config(name))
        except IndexFileError as e:
            reason = str(e)
        else:
            meta, last = index.metadata, self.store.last_seq()
            seq = meta.get("seq")
            if meta.get("store_uuid") != self.store.uuid or meta.get("collection") != name:
                reason = "saved for another store or collection"
            elif index.dim != dim:
                reason = f"saved with dim {index.dim}, the store holds dim {dim}"
            elif not isinstance(seq, int) or seq > last:
                reason = f"saved at seq {seq}, ahead of the store's last seq {last}"
            elif seq < self.store.changelog_floor():
                reason = f"saved at seq {seq}, before the pruned changelog's start"
            else:
                return IndexedCollection(name, index, seq), ""
        log.warning("saved index of collection %s is unusable (%s); rebuilding from the store",
                    name, reason)
        return None, reason

    def _build(self, name: str, dim: int) -> IndexedCollection:
        cfg = self._effective_config(name)
        upto = self.store.last_seq()
        index = make_index(dim, cfg, name)
        if cfg.kind == "ivfpq":
            # a uniform sample of train_sample rows (seeded: rebuilds are repeatable), picked
            # by position in row-key order so only the sample is kept in memory
            total = self.store.count(name)
            rng = np.random.default_rng(0)
            take = np.sort(rng.choice(total, min(total, self.config.train_sample), replace=False))
            parts, offset = [], 0
            for _, vectors in self.store.iter_embeddings(name, None, upto, self.config.batch_size):
                mine = take[(take >= offset) & (take < offset + vectors.shape[0])] - offset
                parts.append(vectors[mine])
                offset += vectors.shape[0]
            sample = np.concatenate(parts)
            index.train(np.ascontiguousarray(sample))
        for keys, vectors in self.store.iter_embeddings(name, None, upto, self.config.batch_size):
            _add(self.store, index, keys, vectors)
        log.info("built %s index of collection %s: %d vectors", cfg.kind, name, len(index))
        return IndexedCollection(name, index, upto)

    # -- catch-up -------------------------------------------------------------------------
    def sync(self, collection: str | None = None) -> list[SyncReport]:
        """Apply the store's changes since each index's seq (new collections are built)."""
        with self._lock:
            dims = self.store.collections()
            names = [collection] if collection is not None else sorted(dims)
            reports = []
            for name in names:
                if name not in dims:
                    raise ValueError(f"collection {name!r} has no items in the store")
                if name not in self._collections:
                    self._collections[name] = self._build(name, dims[name])
                reports.append(self._sync_one(self._collections[name]))
        return reports

    def _sync_one(self, coll: IndexedCollection) -> SyncReport:
        with coll.lock:
            upto, since = self.store.last_seq(), coll.applied_seq
            removed = upserted = 0
            if upto > since:
                gone = self.store.removed_row_keys(coll.name, since, upto)
                removed = coll.index.remove(gone)
                for keys, vectors in self.store.iter_embeddings(
                        coll.name, since, upto, self.config.batch_size):
                    _add(self.store, coll.index, keys, vectors)
                    upserted += keys.size
                coll.applied_seq = upto
            if (coll.index.config.kind == "flat"
                    and self.config.for_collection(coll.name).kind == "ivfpq"
                    and self._effective_config(coll.name).kind == "ivfpq"):
                log.info("collection %s reached the IVF-PQ training size; rebuilding", coll.name)
                built = self._build(coll.name, coll.index.dim)
                coll.index, coll.applied_seq = built.index, built.applied_seq
        return SyncReport(coll.name, removed, upserted, coll.applied_seq)

    # -- use ------------------------------------------------------------------------------
    def index(self, collection: str) -> FaissIndex:
        return self._get(collection).index

    def applied_seq(self, collection: str) -> int:
        return self._get(collection).applied_seq

    def _get(self, collection: str) -> IndexedCollection:
        try:
            return self._collections[collection]
        except KeyError:
            raise ValueError(
                f"collection {collection!r} has no index (known: {sorted(self._collections)})"
            ) from None

    def search(self, collection: str, queries: np.ndarray, k: int,
               allowed: np.ndarray | None = None, **params) -> tuple[np.ndarray, np.ndarray]:
        """``FaissIndex.search`` on ``collection``'s index, under its lock."""
        coll = self._get(collection)
        with coll.lock:
            return coll.index.search(queries, k, allowed, **params)

    def stored_vectors(self, collection: str, keys: np.ndarray
                       ) -> tuple[np.ndarray | None, int]:
        """The vectors ``collection``'s index holds under ``keys`` and the store seq it has
        applied, read together under its lock.

        A row whose store ``seq`` is at most that applied seq has its current embedding in
        the index (every write of an embedding gives the row a new seq, and the index has
        applied every write up to it), so a caller may use the index's copy for it instead
        of reading the store; a row written since must be read from the store.

        Returns
        -------
        (np.ndarray float32 (n, dim) or None, int)
            None when the index does not keep exact vectors (IVF-PQ, Milvus) or lacks one of
            ``keys`` (removed since it was searched).
        """
        coll = self._get(collection)
        with coll.lock:
            read = getattr(coll.index, "stored_vectors", None)
            return (None if read is None else read(keys)), coll.applied_seq

    def save(self) -> None:
        """Save every index with the seq it has applied (atomic per file)."""
        with self._lock:
            for coll in self._collections.values():
                self._save_one(coll)

    def _save_one(self, coll: IndexedCollection) -> None:
        with coll.lock:
            coll.index.metadata = {"seq": coll.applied_seq, "store_uuid": self.store.uuid,
                                   "collection": coll.name}
            coll.index.save(self._path(coll.name))
