"""Configuration of ``FaissIndex`` and the error raised for unusable saved indexes."""

from __future__ import annotations

from dataclasses import dataclass

from .base import NORM_TOL

KINDS = ("flat", "ivfpq", "hnsw")
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
