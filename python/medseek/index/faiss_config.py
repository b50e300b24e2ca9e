"""Configuration of the ANN backends and the error raised for unusable saved indexes.

``FaissConfig`` selects one of the FAISS kinds ("flat", "ivfpq", "hnsw"); ``MilvusConfig``
(kind "milvus") selects the Milvus backend. ``make_index`` / ``load_index`` build or load
the index a config asks for, so a caller that holds either config needs no other switch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .base import NORM_TOL

if TYPE_CHECKING:  # annotations only: importing the backends imports faiss / pymilvus
    from .base import Index

KINDS = ("flat", "ivfpq", "hnsw")
#: Every index kind a config can name: the FAISS kinds and Milvus.
INDEX_KINDS = (*KINDS, "milvus")
GPU_MODES = ("auto", "never", "always")
# Fields that define the stored structure; the rest only steer searching.
_STRUCTURAL = ("kind", "nlist", "m", "nbits", "hnsw_m", "ef_construction")


class IndexFileError(ValueError):
    """A saved index file is missing, unreadable, corrupt or built with another layout."""


@dataclass(frozen=True)
class FaissConfig:
    """How a ``FaissIndex`` is built and searched.

    Attributes
    ----------
    kind : {"flat", "ivfpq", "hnsw"}
        Exact inner-product search, IVF with product quantisation, or an HNSW graph.
    nlist, m, nbits : int
        IVF-PQ: coarse lists, PQ sub-quantisers (must divide the dim), bits per code.
    nprobe : int
        IVF-PQ lists visited per query (default for ``search``).
    hnsw_m, ef_construction, ef_search : int
        HNSW graph degree, build-time and (default) search-time beam widths.
    exact_filter_max : int
        ``allowed`` sets of at most this many ids are searched exactly (ivfpq, hnsw).
    hnsw_rebuild_fraction : float
        HNSW is rebuilt without its tombstones once this fraction of slots is dead.
    use_gpu : {"auto", "never", "always"}
        "always" raises if no GPU is usable; HNSW always runs on the CPU.
    norm_tol : float
        Allowed ``| ||v|| - 1 |`` of vectors and queries.
    """

    kind: str = "flat"
    nlist: int = 1024
    m: int = 16
    nbits: int = 8
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 64
    exact_filter_max: int = 4096
    hnsw_rebuild_fraction: float = 0.25
    use_gpu: str = "auto"
    gpu_device: int = 0
    norm_tol: float = NORM_TOL

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.use_gpu not in GPU_MODES:
            raise ValueError(f"use_gpu must be one of {GPU_MODES}, got {self.use_gpu!r}")
        for name in ("nlist", "m", "nbits", "nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.exact_filter_max < 0:
            raise ValueError(f"exact_filter_max must be >= 0, got {self.exact_filter_max}")
        if not 0.0 < self.hnsw_rebuild_fraction <= 1.0:
            raise ValueError(
                f"hnsw_rebuild_fraction must be in (0, 1], got {self.hnsw_rebuild_fraction}"
            )

    @property
    def min_train(self) -> int:
        """Fewest vectors IVF-PQ can be trained on (k-means needs >= one per centroid)."""
        return max(self.nlist, 2**self.nbits)

    def same_structure(self, other: FaissConfig) -> bool:
        """True when an index built with ``other`` can serve this config."""
        return all(getattr(self, f) == getattr(other, f) for f in _STRUCTURAL)


# Milvus collection names: a letter or underscore, then letters, digits, underscores
_MILVUS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_URI_SCHEMES = ("http://", "https://", "tcp://", "unix:")
#: Milvus read consistency levels, strongest first
CONSISTENCY_LEVELS = ("Strong", "Session", "Bounded", "Eventually")


@dataclass(frozen=True)
class MilvusConfig:
    """How a ``MilvusIndex`` connects, builds and searches (see ``milvus_index.py``).

    Attributes
    ----------
    uri : str
        A local ``.db`` path (milvus-lite, in-process; tests and single machines) or a
        server URI (``http://host:19530``, ``https://...``, ``tcp://...``, ``unix:...``).
    token : str
        Server credentials (``user:password`` or an API key). Never written to disk.
    db_name : str
        Milvus database ("" = the server's default).
    collection_prefix : str
        Prepended to the medseek collection name to give the Milvus collection name, so
        several archives can share one server.
    index_type : str
        Milvus vector index: "FLAT" (exact; the default), or on a server "HNSW",
        "IVF_FLAT", "IVF_PQ", ... with their ``index_params``/``search_params``. The
        PQ and SQ kinds (IVF_PQ, IVF_SQ8, ...) score from compressed codes: their
        ``search`` scores are approximate (``MilvusIndex.scores_exact`` is False, and the
        search pipeline re-scores their candidates from the store's vectors).
    index_params, search_params : mapping
        Build-time parameters of ``index_type`` (e.g. ``{"M": 32, "efConstruction": 200}``)
        and per-search parameters (e.g. ``{"ef": 64}``).
    insert_batch : int
        Rows per upsert request.
    search_batch : int
        Queries per search request.
    max_k : int
        Largest ``k`` accepted (Milvus servers refuse a topk above 16384).
    timeout : float or None
        Seconds per request (None: the client's default).
    norm_tol : float
        Allowed ``| ||v|| - 1 |`` of vectors and queries.
    consistency_level : {"Bounded", "Strong", "Session", "Eventually"}
        Consistency of ``search`` (and the collection's default). Bounded (the default)
        may miss the writes of the last few seconds (the server's ``gracefulTime``, 5 s
        by default) and answers in milliseconds; Strong waits for every acknowledged write
        (~300 ms a search on a 2.3 standalone server). ``len``, ``ids`` and ``remove``
        always read Strong (see ``milvus_index.py``).
    index_wait_rows : int
        An ``add`` of at least this many rows waits for the index build to cover them
        (``MilvusIndex.wait_for_index``); ``save`` waits whenever rows were added since the
        last wait.
    index_timeout_s : float
        How long such a wait lasts before it gives up with a logged warning.
    max_value_length : int
        Largest modality / body part / view / label, in UTF-8 bytes (Milvus VARCHAR).
    max_labels : int
        Most labels per item (Milvus ARRAY capacity, at most 4096).
    """

    uri: str = "medseek-milvus.db"
    token: str = field(default="", repr=False)
    db_name: str = ""
    collection_prefix: str = "medseek_"
    index_type: str = "FLAT"
    index_params: Mapping = field(default_factory=dict)
    search_params: Mapping = field(default_factory=dict)
    insert_batch: int = 1000
    search_batch: int = 1024
    max_k: int = 16384
    timeout: float | None = None
    norm_tol: float = NORM_TOL
    consistency_level: str = "Bounded"
    index_wait_rows: int = 10_000
    index_timeout_s: float = 600.0
    max_value_length: int = 1024
    max_labels: int = 256

    #: The index kind, next to FAISS's "flat" / "ivfpq" / "hnsw".
    kind = "milvus"

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri:
            raise ValueError(f"uri must be a non-empty str, got {self.uri!r}")
        if not (self.is_local or self.uri.startswith(_URI_SCHEMES)):
            raise ValueError(f"uri must be a local path ending in .db (milvus-lite) or start "
                             f"with one of {_URI_SCHEMES}, got {self.uri!r}")
        if self.collection_prefix and not _MILVUS_NAME.fullmatch(self.collection_prefix):
            raise ValueError("collection_prefix must be letters, digits and underscores, not "
                             f"starting with a digit, got {self.collection_prefix!r}")
        if not isinstance(self.index_type, str) or not self.index_type:
            raise ValueError(f"index_type must be a non-empty str, got {self.index_type!r}")
        if self.consistency_level not in CONSISTENCY_LEVELS:
            raise ValueError(f"consistency_level must be one of {CONSISTENCY_LEVELS}, got "
                             f"{self.consistency_level!r}")
        if not 1 <= self.max_labels <= 4096:
            raise ValueError(f"max_labels must be in [1, 4096] (Milvus's ARRAY limit), got "
                             f"{self.max_labels!r}")
        if not 1 <= self.max_value_length <= 65535:
            raise ValueError(f"max_value_length must be in [1, 65535] (Milvus's VARCHAR "
                             f"limit), got {self.max_value_length!r}")
        if not self.index_timeout_s > 0:
            raise ValueError(f"index_timeout_s must be > 0, got {self.index_timeout_s!r}")
        for name in ("insert_batch", "search_batch", "max_k", "index_wait_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 or None, got {self.timeout!r}")
        object.__setattr__(self, "index_params", dict(self.index_params))
        object.__setattr__(self, "search_params", dict(self.search_params))

    @property
    def is_local(self) -> bool:
        """True for a milvus-lite ``.db`` path (the data lives in that directory)."""
        return self.uri.endswith(".db") and not self.uri.startswith(_URI_SCHEMES)

    def milvus_collection(self, collection: str) -> str:
        """The Milvus collection name of a medseek collection."""
        name = f"{self.collection_prefix}{collection}"
        if not _MILVUS_NAME.fullmatch(name):
            raise ValueError(f"collection {collection!r} gives the Milvus name {name!r}, which "
                             "must be letters, digits and underscores, not starting with a digit")
        return name


def make_index(dim: int, config: FaissConfig | MilvusConfig, collection: str = "default") -> Index:
    """A new, empty index of the kind ``config`` names.

    ``collection`` names the Milvus collection (``config.milvus_collection``); a Milvus
    collection of that name is dropped and created afresh, as a new FAISS index starts
    empty. FAISS ignores it.
    """
    if isinstance(config, MilvusConfig):
        from .milvus_index import MilvusIndex

        return MilvusIndex(dim, config, collection)
    if isinstance(config, FaissConfig):
        from .faiss_index import FaissIndex

        return FaissIndex(dim, config)
    raise TypeError(f"config must be a FaissConfig or MilvusConfig, got {type(config).__name__}")


def load_index(path: str | Path, config: FaissConfig | MilvusConfig) -> Index:
    """The index saved at ``path``, of the kind ``config`` names (``IndexFileError`` if the
    file holds another kind, is unreadable, or its Milvus collection is gone)."""
    if isinstance(config, MilvusConfig):
        from .milvus_index import MilvusIndex

        return MilvusIndex.load(path, config)
    if isinstance(config, FaissConfig):
        from .faiss_index import FaissIndex

        return FaissIndex.load(path, config)
    raise TypeError(f"config must be a FaissConfig or MilvusConfig, got {type(config).__name__}")
