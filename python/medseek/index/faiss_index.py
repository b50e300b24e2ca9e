"""FAISS behind the ``Index`` contract: exact flat (default), IVF-PQ and HNSW.

Ids are int64 store row keys; ``add`` is an upsert (an id already present has its vector
replaced). How each kind stores ids, removes and filters:

======  ===============================  ===================  ===============================
kind    FAISS structure                  remove               ``allowed`` filter
======  ===============================  ===================  ===============================
flat    IndexIDMap2(IndexFlatIP)         native (compacts)    IDSelectorBatch in the search
ivfpq   IndexIVFPQ, ids stored natively  native               IDSelectorBatch in the search;
                                                              sets <= exact_filter_max probe
                                                              every list (exact over PQ codes)
hnsw    IndexHNSWFlat + position→id      tombstones, rebuild  IDSelectorBitmap in the search;
        table kept here                  past a dead fraction sets <= exact_filter_max are
                                                              scored exactly from the vectors
======  ===============================  ===================  ===============================

Filtering happens inside the FAISS search through ``SearchParameters(sel=...)`` (all three
CPU kinds support selectors in faiss 1.15), never by over-fetching. Small allowed sets are
searched exactly because graph (HNSW) and coarse-quantised (IVF) search under a tight
filter returns fewer hits than exist: FAISS's HNSW walks the graph and only *collects*
members, so a 3-id filter over 1000 vectors typically finds 0 or 1 of them.

Costs worth knowing: an upsert first removes the batch's ids, an O(n) scan for flat and
IVF (FAISS ``remove_ids``) and an ``np.isin`` over the position table for HNSW, so ingest
in batches; a small ``allowed`` set on IVF-PQ checks every stored id against the selector
(O(n) per query, no distance work for the rest).

GPU: when the faiss build has GPU support, ``faiss.get_num_gpus() > 0`` and
``use_gpu`` allows it, flat and IVF-PQ indexes keep a GPU replica for unfiltered searches
(filtered searches stay on the CPU master, whose selectors GPU indexes do not all honour).
The CPU index stays the master copy that is mutated and saved; the replica is re-made
lazily after a removal. This path cannot run on the CPU-only CI machine and is untested.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np

from ._files import write_npz_atomic
from ._gpu import GpuReplica, gpu_usable
from .base import check_ids, check_k, check_vectors, exact_search, finalize_results
from .faiss_config import _STRUCTURAL, FaissConfig, IndexFileError

__all__ = ["FaissConfig", "FaissIndex", "IndexFileError"]

log = logging.getLogger(__name__)
_FORMAT = 1  # version of the saved file layout


def _no_results(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    q = queries.shape[0]
    return np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64)


class FaissIndex:
    """A FAISS index of unit vectors under int64 ids (see the module docstring).

    Not safe for concurrent mutation; callers serialise ``add``/``remove`` against
    ``search`` (``Catalog`` does).

    Parameters
    ----------
    dim : int
        Vector dimension.
    config : FaissConfig
        Index kind and parameters.
    """

    def __init__(self, dim: int, config: FaissConfig = FaissConfig()) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if config.kind == "ivfpq" and dim % config.m:
            raise ValueError(f"config.m={config.m} must divide dim={dim} for IVF-PQ")
        self._dim = int(dim)
        self._config = config
        #: Free-form JSON-able data saved and loaded with the index (Catalog keeps seq here).
        self.metadata: dict = {}
        self._cpu = self._new_cpu_index()
        self._labels = np.empty(0, dtype=np.int64)  # hnsw: position -> id, -1 = tombstone
        self._dead = 0
        self._live_bitmap: np.ndarray | None = None  # hnsw: cached packbits(labels >= 0)
        # sorted ids and their storage positions (flat, hnsw), made on first use per change
        self._by_label: tuple[np.ndarray, np.ndarray] | None = None
        self._use_gpu = gpu_usable(config)
        self._gpu = GpuReplica(config.gpu_device)

    # -- construction ---------------------------------------------------------------------
    def _new_cpu_index(self) -> faiss.Index:
        c, d = self.config, self._dim
        if c.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        if c.kind == "ivfpq":
            quantizer = faiss.IndexFlatIP(d)
            # faiss's Python layer keeps ``quantizer`` alive as a referenced object
            return faiss.IndexIVFPQ(quantizer, d, c.nlist, c.m, c.nbits, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexHNSWFlat(d, c.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = c.ef_construction
        return index

    # -- properties -----------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def config(self) -> FaissConfig:
        return self._config

    @config.setter
    def config(self, config: FaissConfig) -> None:
        """Swap search-time settings (nprobe, ef_search, exact_filter_max, ...) in place."""
        if not config.same_structure(self._config):
            raise ValueError(
                f"config must keep the index structure {_STRUCTURAL}; build a new index instead"
            )
        self._config = config
        self._use_gpu = gpu_usable(config)
        self._gpu = GpuReplica(config.gpu_device)

    @property
    def is_trained(self) -> bool:
        return bool(self._cpu.is_trained)

    @property
    def scores_exact(self) -> bool:
        """True when ``search`` returns exact cosines (flat, and HNSW, which keeps the full
        vectors: only its recall is approximate); False for IVF-PQ, whose scores come from
        the PQ codes, so a caller holding the vectors should re-score its candidates."""
        return self.config.kind != "ivfpq"

    def __len__(self) -> int:
        return int(self._cpu.ntotal) - self._dead

    def ids(self) -> np.ndarray:
        """All ids present, sorted. int64 (n,)."""
        kind = self.config.kind
        if kind == "flat":
            out = faiss.vector_to_array(self._cpu.id_map)
        elif kind == "ivfpq":
            inv = self._cpu.invlists
            parts = [
                faiss.rev_swig_ptr(inv.get_ids(l), inv.list_size(l)).copy()
                for l in range(inv.nlist)
                if inv.list_size(l)
            ]
            out = np.concatenate(parts) if parts else np.empty(0, np.int64)
        else:
            out = self._labels[self._labels >= 0]
        return np.sort(out.astype(np.int64))

    # -- mutation -------------------------------------------------------------------------
    def train(self, vectors: np.ndarray) -> None:
        """Train IVF-PQ centroids and codebooks on ``vectors`` (float32 (n, dim), unit rows).

        ``n`` must be at least ``config.min_train``; FAISS advises ~39 per centroid.
        A no-op for flat and HNSW, which need no training.
        """
        x = check_vectors("vectors", vectors, self._dim, self.config.norm_tol)
        if self.config.kind != "ivfpq":
            return
        if x.shape[0] < self.config.min_train:
            raise ValueError(
                f"IVF-PQ with nlist={self.config.nlist}, nbits={self.config.nbits} needs at "
                f"least {self.config.min_train} training vectors, got {x.shape[0]}"
            )
        self._cpu.train(x)
        self._gpu.invalidate()

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace vectors.

        Parameters
        ----------
        ids : np.ndarray, int64, shape (n,)
            Distinct ids ``>= 0``; an id already present has its vector replaced (upsert).
        vectors : np.ndarray, float32, shape (n, dim)
            C-contiguous, finite, L2-normalised rows.

        An untrained IVF-PQ index is trained on this batch when it holds at least
        ``config.min_train`` vectors; otherwise ``ValueError`` (call ``train`` first).
        """
        check_ids("ids", ids)
        x = check_vectors("vectors", vectors, self._dim, self.config.norm_tol)
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"ids has {ids.shape[0]} rows but vectors has {x.shape[0]}")
        if ids.size == 0:
            return
        if not self._cpu.is_trained:
            if ids.size < self.config.min_train:
                raise ValueError(
                    f"IVF-PQ index is untrained and vectors holds only {ids.size} rows "
                    f"(< {self.config.min_train} needed): call train() first"
                )
            log.info("training IVF-PQ on the first batch of %d vectors", ids.size)
            self.train(x)
        self.remove(ids)  # upsert: drop old versions first
        self._by_label = None
        if self.config.kind == "hnsw":
            self._cpu.add(x)
            self._labels = np.concatenate([self._labels, ids])
            self._live_bitmap = self._by_label = None
        else:
            self._cpu.add_with_ids(x, ids)
            self._gpu.add(x, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids (absent ones are ignored). ``ids`` int64 (n,). Returns how many went."""
        ids = np.ascontiguousarray(check_ids("ids", ids, unique=False, contiguous=False))
        if ids.size == 0 or self._cpu.ntotal == 0:
            return 0
        if self.config.kind != "hnsw":
            n = int(self._cpu.remove_ids(faiss.IDSelectorBatch(ids)))
            if n:
                self._by_label = None  # remove_ids compacts: positions move
                self._gpu.invalidate()  # re-made lazily; GPU indexes cannot all remove
            return n
        hit = np.flatnonzero(np.isin(self._labels, ids))
        if hit.size:
            self._labels[hit] = -1
            self._dead += int(hit.size)
            self._live_bitmap = self._by_label = None
            if self._dead > self.config.hnsw_rebuild_fraction * self._labels.size:
                self._rebuild_hnsw()
        return int(hit.size)

    def _rebuild_hnsw(self) -> None:
        live = np.flatnonzero(self._labels >= 0)
        vectors = self._cpu.reconstruct_n(0, self._cpu.ntotal)[live]
        labels = self._labels[live]
        self._cpu = self._new_cpu_index()
        if live.size:
            self._cpu.add(np.ascontiguousarray(vectors))
        self._labels, self._dead, self._live_bitmap, self._by_label = labels, 0, None, None
        log.info("rebuilt HNSW index without tombstones (%d live vectors)", live.size)

    # -- stored vectors -------------------------------------------------------------------
    def stored_vectors(self, ids: np.ndarray) -> np.ndarray | None:
        """The vectors stored under ``ids``, bit for bit as added, or None.

        Flat and HNSW keep every vector as given (float32, in an ``IndexFlat`` storage), so
        a caller that would read the same vectors from the store (the search pipeline's
        candidates) can take them from memory instead; IVF-PQ keeps only PQ codes, whose
        reconstruction is approximate: None. None too when any id is absent (e.g. removed
        since a search returned it). Not safe against concurrent mutation (as ``search``).

        Parameters
        ----------
        ids : np.ndarray, int64, shape (n,)

        Returns
        -------
        np.ndarray, float32, shape (n, dim), a copy; or None
        """
        ids = check_ids("ids", ids, unique=False, contiguous=False)
        if self.config.kind == "ivfpq":
            return None
        if ids.size == 0:
            return np.empty((0, self._dim), np.float32)
        positions = self._positions(ids)
        if positions is None:
            return None
        storage = faiss.downcast_index(self._cpu.index if self.config.kind == "flat"
                                       else self._cpu.storage)
        # a view of FAISS's own (ntotal, dim) buffer, made anew each call: an add may move it
        xb = faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * self._dim)
        return xb.reshape(storage.ntotal, self._dim)[positions]  # fancy index: a copy

    def _positions(self, ids: np.ndarray) -> np.ndarray | None:
        """Storage positions of live ``ids`` (None if any is absent), through a sorted copy
        of the position -> id table, made once per change of the index (``add``/``remove``
        reset it: flat's ``remove_ids`` compacts the storage)."""
        if self._by_label is None:
            labels = (faiss.vector_to_array(self._cpu.id_map) if self.config.kind == "flat"
                      else self._labels)
            live = np.flatnonzero(labels >= 0)
            order = np.argsort(labels[live], kind="stable")
            self._by_label = (labels[live][order], live[order].astype(np.int64))
        labels, positions = self._by_label
        at = np.searchsorted(labels, ids)
        if (at >= labels.size).any() or (labels[np.minimum(at, labels.size - 1)] != ids).any():
            return None
        return positions[at]

    # -- search ---------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product (cosine for unit vectors).

        Parameters
        ----------
        queries : np.ndarray, float32, shape (q, dim)
            C-contiguous, L2-normalised rows.
        k : int
            Results per query.
        allowed : np.ndarray, int64, shape (a,), optional
            Only these ids may be returned (the store's metadata filter); applied inside
            the FAISS search. Ids not in the index are ignored.
        nprobe, ef_search : int, optional
            Override ``config.nprobe`` / ``config.ef_search`` for this call.

        Returns
        -------
        scores : np.ndarray, float32, shape (q, k)
            Descending; ``-inf`` where fewer than ``k`` results exist.
        ids : np.ndarray, int64, shape (q, k)
            ``-1`` where fewer than ``k`` results exist.
        """
        x = check_vectors("queries", queries, self._dim, self.config.norm_tol)
        k = check_k(k)
        nprobe = self.config.nprobe if nprobe is None else check_k(nprobe, "nprobe")
        ef = self.config.ef_search if ef_search is None else check_k(ef_search, "ef_search")
        if allowed is not None:
            allowed = np.unique(check_ids("allowed", allowed, unique=False, contiguous=False))
        if len(self) == 0 or x.shape[0] == 0 or (allowed is not None and allowed.size == 0):
            return _no_results(x, k)
        kind = self.config.kind
        if kind == "hnsw":
            return self._search_hnsw(x, k, allowed, max(ef, k))
        if allowed is None:
            if self._use_gpu:
                gpu = self._gpu.get(self._cpu)
                params = faiss.SearchParametersIVF(nprobe=nprobe) if kind == "ivfpq" else None
                return finalize_results(*gpu.search(x, k, params=params))
        sel = None if allowed is None else faiss.IDSelectorBatch(allowed)
        if kind == "flat":
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        else:
            if allowed is not None and allowed.size <= self.config.exact_filter_max:
                nprobe = self.config.nlist  # every list: exhaustive over the allowed codes
            params = faiss.SearchParametersIVF(sel=sel, nprobe=min(nprobe, self.config.nlist))
        scores, ids = self._cpu.search(x, k, params=params)
        return finalize_results(scores, ids)

    def _search_hnsw(self, x, k, allowed, ef):
        labels = self._labels
        if allowed is not None:
            positions = np.flatnonzero(np.isin(labels, allowed))  # live only: dead are -1
            if positions.size == 0:
                return _no_results(x, k)
            if positions.size <= self.config.exact_filter_max:
                vectors = self._cpu.reconstruct_batch(positions)
                return exact_search(x, vectors, labels[positions], k)
            mask = np.zeros(labels.size, dtype=bool)
            mask[positions] = True
            bitmap = np.packbits(mask, bitorder="little")
        elif self._dead:
            if self._live_bitmap is None:
                self._live_bitmap = np.packbits(labels >= 0, bitorder="little")
            bitmap = self._live_bitmap
        else:
            bitmap = None
        sel = None
        if bitmap is not None:
            sel = faiss.IDSelectorBitmap(labels.size, faiss.swig_ptr(bitmap))
        params = faiss.SearchParametersHNSW(sel=sel, efSearch=ef)
        # ``sel`` points into ``bitmap``; both stay referenced until the search returns
        scores, pos = self._cpu.search(x, k, params=params)
        ids = np.where(pos >= 0, labels[np.maximum(pos, 0)], -1)
        return finalize_results(scores, ids)

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the index, its config and ``metadata`` to one ``.npz`` file, atomically.

        A crash leaves either the old file or the new one (``write_npz_atomic``); zip CRCs
        let ``load`` detect later corruption.
        """
        path = Path(path)
        header = {"format": _FORMAT, "dim": self._dim, "config": asdict(self.config),
                  "metadata": self.metadata}
        write_npz_atomic(
            path,
            header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            faiss=faiss.serialize_index(self._cpu),
            labels=self._labels,
        )

    @classmethod
    def load(cls, path: str | Path, config: FaissConfig | None = None) -> FaissIndex:
        """Read an index written by ``save``.

        Parameters
        ----------
        path : str or Path
        config : FaissConfig, optional
            Search-time settings to use. Its structural fields (kind, nlist, m, nbits,
            hnsw_m, ef_construction) must match the file's. Default: the saved config.

        Raises
        ------
        IndexFileError
            The file is missing, truncated, corrupt, or built with another structure.
        """
        path = Path(path)
        try:
            with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
                header = json.loads(bytes(z["header"]).decode())
                blob = np.ascontiguousarray(z["faiss"])
                labels = np.ascontiguousarray(z["labels"], dtype=np.int64)
            saved = FaissConfig(**header["config"])
            dim = int(header["dim"])
            cpu = faiss.deserialize_index(blob)
        except FileNotFoundError as e:
            raise IndexFileError(f"no saved index at {path}") from e
        except (OSError, EOFError, KeyError, TypeError, ValueError, RuntimeError,
                zipfile.BadZipFile) as e:  # ValueError covers JSON and UTF-8 errors
            raise IndexFileError(f"unreadable index file {path}: {type(e).__name__}: {e}") from e
        if header.get("format") != _FORMAT:
            raise IndexFileError(f"index file {path} has format {header.get('format')}")
        if config is None:
            config = saved
        elif not config.same_structure(saved):
            raise IndexFileError(
                f"index file {path} was built as {saved.kind} with "
                f"{ {f: getattr(saved, f) for f in _STRUCTURAL} }, config asks for "
                f"{ {f: getattr(config, f) for f in _STRUCTURAL} }"
            )
        self = cls(dim, config)
        if cpu.d != dim or cpu.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexFileError(f"index file {path} holds d={cpu.d}, metric={cpu.metric_type}")
        if config.kind == "hnsw":
            if labels.size != cpu.ntotal:
                raise IndexFileError(
                    f"index file {path}: {labels.size} labels for {cpu.ntotal} vectors"
                )
            self._dead = int((labels < 0).sum())
        self._cpu, self._labels = cpu, labels
        self.metadata = dict(header.get("metadata", {}))
        return self
