"""Milvus behind the ``Index`` contract, for archives that outgrow one machine.

One Milvus collection per medseek collection (``MilvusConfig.milvus_collection``), with
``row_key`` (INT64 primary key = the store's ``items.row_key``), ``vec`` (FLOAT_VECTOR,
indexed with the inner-product metric: cosine on the unit vectors the contract requires)
and the filterable metadata as scalar fields (``milvus_filters.py``).

How the contract maps onto Milvus:

- ``add(ids, vectors, metadata=None)`` is Milvus's ``upsert`` (an id already present is
  replaced). ``metadata`` gives each row's record (an ``ItemRecord`` or anything with its
  modality / body_part / view / labels / patient_pseudonym / study_pseudonym); the
  ``Catalog`` passes the store's records because ``takes_metadata`` is True. Rows added
  without it cannot be filtered by metadata: ``supports_filters`` turns False.
- ``remove`` asks which ids exist (so it can return how many went, as FAISS does; Milvus's
  own delete count counts the ids *asked for*), then deletes them.
- ``search(..., filters=...)`` turns medseek's metadata filters into a Milvus boolean
  expression over those fields, applied inside the search. ``search(..., allowed=ids)``
  (what FAISS gets, and what the pipeline sends an index without ``supports_filters``)
  is still the inline list ``row_key in [...]``: ~8 bytes per id, so keep it for short
  lists.
- ``len`` is ``count(*)``.

Consistency. ``search`` reads at ``config.consistency_level``, Bounded by default: it may
miss the writes of the last few seconds (the server's ``gracefulTime``) and answers in
milliseconds, where Strong waits ~300 ms per search for the newest timestamp. That is
safe for the service because the SQLite store, not the index, is the truth: the search
pipeline re-reads every candidate from the store and drops those no longer live, so a
row removed a moment ago and still found by a Bounded search never reaches a result; an
item added a moment ago may be missing from that one search. ``len``, ``ids`` and the
existence query of ``remove`` read Strong (exact counts; ``remove`` must see an id upserted
just before). A caller that needs read-your-writes in a search passes
``consistency_level="Strong"`` (or "Session") to ``search``.

Index builds. Milvus indexes sealed segments in the background; until a segment's index is
built and loaded it is searched by brute force, so results (and the recall of IVF_PQ)
change under the caller when the build finishes. ``wait_for_index`` flushes and waits
until the index covers every row: ``describe_index`` reporting all rows indexed, or the
query nodes serving sealed segments for every row (``IndexState.built`` says why both;
a 2.3 standalone server refreshes ``describe_index``'s counts only about once a minute, so
a wait takes up to a minute there), and for PQ/SQ kinds until a probe search shows the
codes answering (``_index_answers``). ``add`` of at least
``config.index_wait_rows`` rows and ``save`` after any add wait, with
``config.index_timeout_s`` and a logged report ("IVF_PQ index of ... built over N rows in
S s"); ``index_state`` says where the build stands.

Scores. FLAT, IVF_FLAT and HNSW score with the stored vectors (``scores_exact`` True);
PQ/SQ kinds score from compressed codes, so their ``search`` scores (and order) are
approximate: ``scores_exact`` is False and the search pipeline re-scores their candidates
exactly from the store. A direct caller of ``search`` on such an index should do the same
(ask for more than k, re-score with the vectors).

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
A sidecar of the format before the metadata fields (1) no longer loads, so the
``Catalog`` rebuilds such a collection from the store. Two processes must not point one
collection at different stores: the sidecar's ``store_uuid`` check in the ``Catalog``
guards the file, not the server.

milvus-lite (``uri`` = a local ``.db`` path) runs an in-process server over a data
directory locked to one process; a server URI serves many. ``pymilvus`` is imported
lazily (the ``milvus`` extra): without it, constructing an index raises ``ImportError``.
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import milvus_filters as mf
from ._files import write_npz_atomic
from .base import check_ids, check_k, check_vectors
from .faiss_config import CONSISTENCY_LEVELS, IndexFileError, MilvusConfig
from .milvus_build import IndexState, codes_answer, read_index_state

__all__ = ["IndexState", "MilvusConfig", "MilvusIndex"]

log = logging.getLogger(__name__)
_FORMAT = 2  # version of the sidecar layout (2: the collection has the metadata fields)
_KEY, _VEC = "row_key", "vec"
_ID_CHUNK = 16384  # ids per existence query in ``remove`` (a server's query limit)
#: index types that score with the stored float vectors (the rest score from codes)
EXACT_SCORE_TYPES = frozenset({"FLAT", "IVF_FLAT", "HNSW", "GPU_IVF_FLAT", "GPU_BRUTE_FORCE"})
_STRONG = "Strong"


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
        for name, kind, params in mf.schema_fields(config.max_value_length, config.max_labels):
            params = {k: getattr(DataType, v) if k == "element_type" else v
                      for k, v in params.items()}
            schema.add_field(name, getattr(DataType, kind), **params)
        index = client.prepare_index_params()
        index.add_index(field_name=_VEC, index_type=config.index_type, metric_type="IP",
                        params=dict(config.index_params))
        client.create_collection(self._name, schema=schema, index_params=index,
                                 consistency_level=config.consistency_level)
        state = self.index_state()
        if state.failed:
            raise RuntimeError(f"Milvus could not build a {config.index_type} index on "
                               f"{self._name}: {state.fail_reason}")
        log.info("created Milvus collection %s: %s index, %s consistency", self._name,
                 config.index_type, config.consistency_level)

    def _setup(self, dim: int, config: MilvusConfig, collection: str) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(config, MilvusConfig):
            raise TypeError(f"config must be a MilvusConfig, got {type(config).__name__}")
        if not isinstance(collection, str) or not collection:
            raise ValueError(f"collection must be a non-empty str, got {collection!r}")
        self._dim, self._config, self._collection = int(dim), config, collection
        self._name = config.milvus_collection(collection)
        self._unindexed = 0  # rows added since the last wait for the index build
        self._lists_segments = not config.is_local  # milvus-lite cannot list loaded segments
        self._meta_complete: bool | None = True  # every row has metadata (None: unknown)
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
            desc = client.describe_collection(name)
            dim = _collection_dim(desc, name)
            missing = {n for n, _, _ in mf.schema_fields(1, 1)} - {
                f.get("name") for f in desc.get("fields", ())}
            if missing:
                raise IndexFileError(f"Milvus collection {name} lacks the metadata fields "
                                     f"{sorted(missing)} (built by an older medseek)")
            metric = _metric(client, name)
            if metric != "IP":
                raise IndexFileError(f"Milvus collection {name} uses metric {metric}, not IP")
        except BaseException:
            client.close()
            raise
        client.close()
        self._setup(dim, config, collection)
        self._meta_complete = None  # counted on first use (``supports_filters``)
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

    #: ``add`` takes the rows' records (``metadata``): the ``Catalog`` passes them.
    takes_metadata = True

    @property
    def supports_filters(self) -> bool:
        """True when ``search`` can apply metadata ``filters`` itself: every row was added
        with its metadata. (The search pipeline asks, and otherwise sends ``allowed``.)"""
        if self._meta_complete is None:
            self._meta_complete = self._count(f"{mf.HAS_META} == false") == 0
        return self._meta_complete

    @property
    def scores_exact(self) -> bool:
        """True when ``search`` scores with the stored vectors (FLAT, IVF_FLAT, HNSW); False
        for the kinds that score from compressed codes (IVF_PQ, IVF_SQ8, ...), whose
        scores and order are approximate (module docstring)."""
        return self.config.index_type.upper() in EXACT_SCORE_TYPES

    def __len__(self) -> int:
        return self._count("")

    def _count(self, expr: str) -> int:
        """Rows matching ``expr``, read Strong (exact, deletes included)."""
        rows = self._client.query(self._name, filter=expr, output_fields=["count(*)"],
                                  consistency_level=_STRONG)
        return int(rows[0]["count(*)"])

    def index_state(self) -> IndexState:
        """Where the vector index's build stands (``IndexState``; module docstring)."""
        state, self._lists_segments = read_index_state(self._client, self._name, _VEC,
                                                       self._lists_segments)
        return state

    def wait_for_index(self, timeout: float | None = None) -> IndexState:
        """Flush, then wait until the index build covers every row; logs the outcome.

        Parameters
        ----------
        timeout : float, optional
            Seconds (default ``config.index_timeout_s``).

        Raises
        ------
        TimeoutError
            The build did not finish in time (the message gives the ``IndexState``).
        RuntimeError
            Milvus reports the build failed.
        """
        timeout = self.config.index_timeout_s if timeout is None else float(timeout)
        start = time.monotonic()
        self._client.flush(self._name)
        delay = 0.1
        while True:
            state = self.index_state()
            if state.failed:
                raise RuntimeError(f"Milvus {state.index_type} index build on {self._name} "
                                   f"failed: {state.fail_reason}")
            elapsed = time.monotonic() - start
            if state.built and self._index_answers():
                break
            if elapsed >= timeout:
                raise TimeoutError(f"Milvus {state.index_type} index on {self._name} not built "
                                   f"after {elapsed:.0f} s: {state}")
            time.sleep(min(delay, timeout - elapsed))
            delay = min(2 * delay, 1.0)
        self._unindexed = 0
        log.info("%s index of Milvus collection %s built over %d rows in %.1f s",
                 state.index_type, self._name, state.total_rows, elapsed)
        return state

    def _index_answers(self) -> bool:
        """``codes_answer`` where it can tell (a server, a PQ/SQ kind), else True."""
        kind = self.config.index_type.upper()
        if not self._lists_segments or not any(code in kind for code in ("PQ", "SQ")):
            return True  # milvus-lite, or no codes to show (unknown kinds: never wait on them)
        params = {"metric_type": "IP", "params": dict(self.config.search_params)}
        return codes_answer(self._client, self._name, _VEC, params)

    def _await_index(self, why: str) -> None:
        """``wait_for_index``, with a timeout logged instead of raised (the rows are in:
        until the build ends they are searched by brute force, only slower)."""
        try:
            self.wait_for_index()
        except TimeoutError as e:
            log.warning("%s: %s", why, e)

    def ids(self) -> np.ndarray:
        """All ids present, sorted. int64 (n,)."""
        it = self._client.query_iterator(self._name, batch_size=min(self.config.max_k, 16384),
                                         filter="", output_fields=[_KEY],
                                         consistency_level=_STRONG)
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
    def add(self, ids: np.ndarray, vectors: np.ndarray, metadata=None) -> None:
        """Insert or replace vectors, with their filterable metadata.

        Parameters
        ----------
        ids : np.ndarray, int64, shape (n,)
            Distinct ids ``>= 0``; an id already present is replaced (upsert).
        vectors : np.ndarray, float32, shape (n, dim)
            C-contiguous, finite, L2-normalised rows.
        metadata : sequence of n records, optional
            Each row's ``ItemRecord`` (or any object with its filter attributes; None for
            an item no longer live). Without it the rows cannot be filtered by metadata
            and ``supports_filters`` turns False.

        An add of at least ``config.index_wait_rows`` rows waits for the index build.
        """
        check_ids("ids", ids)
        x = check_vectors("vectors", vectors, self._dim, self.config.norm_tol)
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"ids has {ids.shape[0]} rows but vectors has {x.shape[0]}")
        cfg = self.config
        keys = ids.tolist()
        if metadata is None:
            fields = [{**mf.row_fields(None, k, 1, 1), mf.HAS_META: False} for k in keys]
        else:  # every row checked before the first is written
            records = mf.check_metadata(metadata, len(keys))
            fields = [mf.row_fields(r, k, cfg.max_value_length, cfg.max_labels)
                      for r, k in zip(records, keys)]
        step = cfg.insert_batch
        for s in range(0, len(keys), step):
            rows = [{_KEY: k, _VEC: v, **f}
                    for k, v, f in zip(keys[s:s + step], x[s:s + step], fields[s:s + step])]
            self._client.upsert(self._name, rows)
        if metadata is None and keys:
            self._meta_complete = False
        elif self._meta_complete is False and keys:
            self._meta_complete = None  # may have replaced the rows without: count again
        self._unindexed += len(keys)
        if len(keys) >= cfg.index_wait_rows:
            self._await_index(f"add of {len(keys)} rows to {self._name}")

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids (absent ones are ignored). ``ids`` int64 (n,). Returns how many went."""
        ids = np.unique(check_ids("ids", ids, unique=False, contiguous=False))
        gone = 0
        for s in range(0, ids.size, _ID_CHUNK):
            chunk = ids[s:s + _ID_CHUNK]
            present = [r[_KEY] for r in self._client.query(
                self._name, filter=_in_list(chunk), output_fields=[_KEY],
                consistency_level=_STRONG)]
            if present:
                self._client.delete(self._name, ids=present)
                gone += len(present)
        return gone

    # -- search ---------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, *,
        filters=None, consistency_level: str | None = None,
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
        filters : SearchFilters or mapping, optional
            Metadata filters (``Store.filter_row_keys``'s keywords), applied inside the
            search as an expression over the metadata fields (``milvus_filters.py``);
            needs ``supports_filters``. With ``allowed`` too, a row must pass both.
        consistency_level : str, optional
            This search's consistency (default ``config.consistency_level``).

        Returns
        -------
        scores : np.ndarray, float32, shape (q, k)
            Descending; ``-inf`` where fewer than ``k`` results exist. Exact cosines when
            ``scores_exact``; approximations from the codes for PQ/SQ index types.
        ids : np.ndarray, int64, shape (q, k)
            ``-1`` where fewer than ``k`` results exist.
        """
        x = check_vectors("queries", queries, self._dim, self.config.norm_tol)
        k = check_k(k)
        if k > self.config.max_k:
            raise ValueError(f"k must be <= {self.config.max_k} (config.max_k), got {k}")
        level = self.config.consistency_level if consistency_level is None else consistency_level
        if level not in CONSISTENCY_LEVELS:
            raise ValueError(f"consistency_level must be one of {CONSISTENCY_LEVELS}, got "
                             f"{level!r}")
        q = x.shape[0]
        out_s = np.full((q, k), -np.inf, dtype=np.float32)
        out_i = np.full((q, k), -1, dtype=np.int64)
        id_expr = ""
        if allowed is not None:
            allowed = np.unique(check_ids("allowed", allowed, unique=False, contiguous=False))
            if allowed.size == 0:
                return out_s, out_i
            id_expr = _in_list(allowed)
        meta_expr = ""
        if filters is not None:
            meta_expr = mf.filter_expression(filters)
            if meta_expr is None:  # an empty list of values: nothing can match
                return out_s, out_i
            if meta_expr and not self.supports_filters:
                raise ValueError(f"Milvus collection {self._name} holds rows added without "
                                 "metadata: filter it with allowed ids, or rebuild it from "
                                 "the store")
        if q == 0:
            return out_s, out_i
        expr = mf.combine(id_expr, meta_expr)
        params = {"metric_type": "IP", "params": dict(self.config.search_params)}
        step = self.config.search_batch
        for s in range(0, q, step):
            batch = self._client.search(self._name, data=list(x[s:s + step]), filter=expr,
                                        limit=k, anns_field=_VEC, output_fields=[_KEY],
                                        search_params=params, consistency_level=level)
            for j, hits in enumerate(batch):
                n = len(hits)
                out_i[s + j, :n] = [h[_KEY] for h in hits]
                out_s[s + j, :n] = [h["distance"] for h in hits]
        return out_s, out_i

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Flush the collection (and wait for the index build when rows were added since
        the last wait), then write the sidecar (module docstring) atomically."""
        if self._unindexed:
            self._await_index(f"save of {self._name}")  # flushes first
        else:
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
