"""Milvus behind the ``Index`` contract, for archives that outgrow one machine.

One Milvus collection per medseek collection (``MilvusConfig.milvus_collection``), with
two fields: ``row_key`` (INT64 primary key = the store's ``items.row_key``) and ``vec``
(FLOAT_VECTOR), indexed with the inner-product metric (cosine on the unit vectors the
contract requires). Reads are strongly consistent: a search sees every acknowledged write.

How the contract maps onto Milvus:

- ``add`` is Milvus's ``upsert`` (an id already present has its vector replaced).
- ``remove`` asks which ids exist (so it can return how many went, as FAISS does; Milvus's
  own delete count counts the ids *asked for*), then deletes them.
- ``search(..., allowed=ids)`` is the boolean filter expression ``row_key in [...]``,
  applied inside the Milvus search (nothing is over-fetched). The medseek metadata
  filters (modality, body part, view, labels, patient/study exclusions) are resolved by
  the SQLite store into those row keys, exactly as for FAISS, so the store stays the one
  place that knows metadata. The id list travels inline in the request (milvus-lite does
  not parse expression templates): ~8 bytes per allowed id, so a filter that keeps a
  large share of a big archive makes a large request (gRPC limits apply).
- ``len`` is ``count(*)`` under strong consistency (exact, deletes included).

Persistence differs from FAISS, and ``save``/``load`` say how. The vectors live in Milvus
(a milvus-lite directory, or the server), not in the saved file: ``save(path)`` flushes
the collection and then writes, atomically, a small ``.npz`` *sidecar* holding the format,
dim, collection, connection settings (never the token) and ``metadata`` (the ``Catalog``
keeps its applied store seq there). ``load(path)`` reattaches to the collection the sidecar
names. Because the flush comes before the sidecar, the collection holds at least every
write up to the sidecar's seq; it may also hold later ones (Milvus persists continuously),
which the ``Catalog``'s catch-up replays idempotently (upserts and deletes of absent ids
are no-ops). Constructing a ``MilvusIndex`` drops and recreates its collection (a new
index starts empty, as a FAISS one does), so a rebuild from the store is a real rebuild.
Two processes must not point one collection at different stores: the sidecar's
``store_uuid`` check in the ``Catalog`` guards the file, not the server.

milvus-lite (``uri`` = a local ``.db`` path) runs an in-process gRPC server over a data
directory locked to one process; a server URI serves many. ``pymilvus`` is imported
lazily (the ``milvus`` extra): without it, constructing an index raises ``ImportError``.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ._files import write_npz_atomic
from .base import check_ids, check_k, check_vectors
from .faiss_config import IndexFileError, MilvusConfig

__all__ = ["MilvusConfig", "MilvusIndex"]

log = logging.getLogger(__name__)
_FORMAT = 1  # version of the sidecar layout
_KEY, _VEC = "row_key", "vec"
_ID_CHUNK = 16384  # ids per existence query in ``remove`` (a server's query limit)


def _client(config: MilvusConfig):
    """A ``MilvusClient`` for ``config`` (milvus-lite needs the .db's folder to exist)."""
    try:
        from pymilvus import MilvusClient
    except ImportError as e:  # the optional dependency is missing
        raise ImportError("MilvusIndex needs pymilvus (and milvus-lite for a local .db): "
                          "pip install 'medseek[milvus]'") from e
    if config.is_local:
        Path(config.uri).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"uri": config.uri, "token": config.token, "db_name": config.db_name}
    if config.timeout is not None:
        kwargs["timeout"] = config.timeout
    return MilvusClient(**kwargs)


def _in_list(ids: np.ndarray) -> str:
    """The boolean expression ``row_key in [...]`` for int64 ``ids``."""
    return f"{_KEY} in [{','.join(map(str, ids.tolist()))}]"


class MilvusIndex:
    """A Milvus collection of unit vectors under int64 ids (see the module docstring).

    Parameters
    ----------
    dim : int
        Vector dimension.
    config : MilvusConfig
        Where Milvus is and how the collection is indexed and searched.
    collection : str
        The medseek collection; the Milvus collection is ``config.milvus_collection(it)``
        and is dropped and created afresh.
    """

    def __init__(self, dim: int, config: MilvusConfig = MilvusConfig(),
                 collection: str = "default") -> None:
        self._setup(dim, config, collection)
        client = self._client
        if client.has_collection(self._name):
            log.info("dropping Milvus collection %s to build it afresh", self._name)
            client.drop_collection(self._name)
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(_KEY, DataType.INT64, is_primary=True)
        schema.add_field(_VEC, DataType.FLOAT_VECTOR, dim=self._dim)
        index = client.prepare_index_params()
        index.add_index(field_name=_VEC, index_type=config.index_type, metric_type="IP",
                        params=dict(config.index_params))
        client.create_collection(self._name, schema=schema, index_params=index,
                                 consistency_level="Strong")

    def _setup(self, dim: int, config: MilvusConfig, collection: str) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(config, MilvusConfig):
            raise TypeError(f"config must be a MilvusConfig, got {type(config).__name__}")
        if not isinstance(collection, str) or not collection:
            raise ValueError(f"collection must be a non-empty str, got {collection!r}")
        self._dim, self._config, self._collection = int(dim), config, collection
        self._name = config.milvus_collection(collection)
        #: Free-form JSON-able data saved and loaded with the index (Catalog keeps seq here).
        self.metadata: dict = {}
        self._client = _client(config)

    @classmethod
    def attach(cls, config: MilvusConfig, collection: str) -> MilvusIndex:
        """The existing Milvus collection of ``collection``, as it is (nothing dropped).

        Raises ``IndexFileError`` when it does not exist or is not an IP float-vector
        collection of this layout.
        """
        self = cls.__new__(cls)
        name = config.milvus_collection(collection)
        client = _client(config)
        try:
            if not client.has_collection(name):
                raise IndexFileError(f"Milvus collection {name} does not exist at {config.uri}")
            dim = _collection_dim(client.describe_collection(name), name)
            metric = _metric(client, name)
            if metric != "IP":
                raise IndexFileError(f"Milvus collection {name} uses metric {metric}, not IP")
        except BaseException:
            client.close()
            raise
        client.close()
        self._setup(dim, config, collection)
        self._client.load_collection(self._name)  # a no-op when already loaded
        return self

    # -- properties -----------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def config(self) -> MilvusConfig:
        return self._config

    @property
    def collection(self) -> str:
        """The medseek collection."""
        return self._collection

    @property
    def milvus_collection(self) -> str:
        """The Milvus collection name."""
        return self._name

    def __len__(self) -> int:
        rows = self._client.query(self._name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def ids(self) -> np.ndarray:
        """All ids present, sorted. int64 (n,)."""
        it = self._client.query_iterator(self._name, batch_size=min(self.config.max_k, 16384),
                                         filter="", output_fields=[_KEY])
        parts = []
        try:
            while batch := it.next():
                parts.append(np.fromiter((r[_KEY] for r in batch), np.int64, len(batch)))
        finally:
            it.close()
        return np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)

    def close(self) -> None:
        """Close the client connection (a local milvus-lite server keeps running)."""
        self._client.close()

    def __enter__(self) -> MilvusIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- mutation -------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace vectors.

        Parameters
        ----------
        ids : np.ndarray, int64, shape (n,)
            Distinct ids ``>= 0``; an id already present has its vector replaced (upsert).
        vectors : np.ndarray, float32, shape (n, dim)
            C-contiguous, finite, L2-normalised rows.
        """
        check_ids("ids", ids)
        x = check_vectors("vectors", vectors, self._dim, self.config.norm_tol)
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"ids has {ids.shape[0]} rows but vectors has {x.shape[0]}")
        step = self.config.insert_batch
        for s in range(0, ids.size, step):
            keys, vecs = ids[s:s + step].tolist(), x[s:s + step]
            rows = [{_KEY: int(i), _VEC: v} for i, v in zip(keys, vecs)]
            self._client.upsert(self._name, rows)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids (absent ones are ignored). ``ids`` int64 (n,). Returns how many went."""
        ids = np.unique(check_ids("ids", ids, unique=False, contiguous=False))
        gone = 0
        for s in range(0, ids.size, _ID_CHUNK):
            chunk = ids[s:s + _ID_CHUNK]
            present = [r[_KEY] for r in self._client.query(
                self._name, filter=_in_list(chunk), output_fields=[_KEY])]
            if present:
                self._client.delete(self._name, ids=present)
                gone += len(present)
        return gone

    # -- search ---------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product (cosine for unit vectors).

        Parameters
        ----------
        queries : np.ndarray, float32, shape (q, dim)
            C-contiguous, L2-normalised rows.
        k : int
            Results per query, at most ``config.max_k``.
        allowed : np.ndarray, int64, shape (a,), optional
            Only these ids may be returned; applied inside the Milvus search as the filter
            ``row_key in [...]``. Ids not in the index are ignored.

        Returns
        -------
        scores : np.ndarray, float32, shape (q, k)
            Descending; ``-inf`` where fewer than ``k`` results exist.
        ids : np.ndarray, int64, shape (q, k)
            ``-1`` where fewer than ``k`` results exist.
        """
        x = check_vectors("queries", queries, self._dim, self.config.norm_tol)
        k = check_k(k)
        if k > self.config.max_k:
            raise ValueError(f"k must be <= {self.config.max_k} (config.max_k), got {k}")
        expr = ""
        if allowed is not None:
            allowed = np.unique(check_ids("allowed", allowed, unique=False, contiguous=False))
            expr = _in_list(allowed)
        q = x.shape[0]
        out_s = np.full((q, k), -np.inf, dtype=np.float32)
        out_i = np.full((q, k), -1, dtype=np.int64)
        if q == 0 or (allowed is not None and allowed.size == 0):
            return out_s, out_i
        params = {"metric_type": "IP", "params": dict(self.config.search_params)}
        step = self.config.search_batch
        for s in range(0, q, step):
            batch = self._client.search(self._name, data=list(x[s:s + step]), filter=expr,
                                        limit=k, anns_field=_VEC, output_fields=[_KEY],
                                        search_params=params)
            for j, hits in enumerate(batch):
                n = len(hits)
                out_i[s + j, :n] = [h[_KEY] for h in hits]
                out_s[s + j, :n] = [h["distance"] for h in hits]
        return out_s, out_i

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Flush the collection, then write the sidecar (module docstring) atomically."""
        self._client.flush(self._name)
        config = {k: v for k, v in asdict(self.config).items() if k != "token"}
        header = {"format": _FORMAT, "backend": "milvus", "dim": self._dim,
                  "collection": self._collection, "milvus_collection": self._name,
                  "config": config, "metadata": self.metadata}
        write_npz_atomic(Path(path),
                         header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))

    @classmethod
    def load(cls, path: str | Path, config: MilvusConfig | None = None) -> MilvusIndex:
        """Reattach to the collection a sidecar written by ``save`` names.

        Parameters
        ----------
        path : str or Path
        config : MilvusConfig, optional
            Connection and search settings (give one to pass a token). Its ``uri``,
            ``db_name`` and ``collection_prefix`` must match the sidecar's: the data lives
            there. Default: the saved settings, without a token.

        Raises
        ------
        IndexFileError
            The sidecar is missing, unreadable or not a Milvus sidecar, the settings point
            elsewhere, or the collection is gone or has another dim or metric.
        """
        path = Path(path)
        try:
            with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
                header = json.loads(bytes(z["header"]).decode())
            if header.get("backend") != "milvus":
                raise IndexFileError(f"index file {path} is not a Milvus sidecar "
                                     f"(backend {header.get('backend')!r})")
            saved = MilvusConfig(**header["config"])
            dim, collection = int(header["dim"]), str(header["collection"])
        except FileNotFoundError as e:
            raise IndexFileError(f"no saved index at {path}") from e
        except (OSError, EOFError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as e:
            if isinstance(e, IndexFileError):
                raise
            raise IndexFileError(f"unreadable index file {path}: {type(e).__name__}: {e}") from e
        if header.get("format") != _FORMAT:
            raise IndexFileError(f"index file {path} has format {header.get('format')}")
        if config is None:
            config = saved
        for name in ("uri", "db_name", "collection_prefix"):
            if getattr(config, name) != getattr(saved, name):
                raise IndexFileError(f"index file {path} was saved with {name}="
                                     f"{getattr(saved, name)!r}, config asks for "
                                     f"{getattr(config, name)!r}")
        self = cls.attach(config, collection)
        if self.dim != dim:
            self.close()
            raise IndexFileError(f"index file {path} says dim {dim}, Milvus collection "
                                 f"{self.milvus_collection} holds dim {self.dim}")
        self.metadata = dict(header.get("metadata", {}))
        return self


def _collection_dim(desc: dict, name: str) -> int:
    for f in desc.get("fields", ()):
        if f.get("name") == _VEC:
            return int(f.get("params", {})["dim"])
    raise IndexFileError(f"Milvus collection {name} has no {_VEC!r} vector field")


def _metric(client, name: str) -> str | None:
    for index_name in client.list_indexes(name, field_name=_VEC):
        return client.describe_index(name, index_name).get("metric_type")
    return None
