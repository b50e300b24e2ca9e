"""The GPU replica of a CPU FAISS index, for unfiltered flat/IVF-PQ searches.

Untested in CI: the machines here have faiss-cpu and no GPU. The code only runs when the
faiss build has GPU support and ``faiss.get_num_gpus() > 0``.
"""

from __future__ import annotations

import faiss
import numpy as np

from .faiss_config import FaissConfig


def gpu_usable(config: FaissConfig) -> bool:
    """Whether ``config`` asks for, and this faiss build can give, a GPU replica.

    Raises ``RuntimeError`` when ``use_gpu="always"`` cannot be honoured. HNSW has no GPU
    implementation in FAISS and always stays on the CPU.
    """
    has = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if config.use_gpu == "always" and not (has and config.kind != "hnsw"):
        raise RuntimeError(
            f"use_gpu='always' but kind={config.kind!r} cannot run on a GPU here "
            f"(faiss GPUs visible: {faiss.get_num_gpus()})"
        )
    return config.use_gpu != "never" and has and config.kind != "hnsw"


class GpuReplica:
    """A lazily made GPU copy of a CPU index; the CPU index stays the master."""

    def __init__(self, device: int) -> None:
        self._device = device
        self._res = None
        self._index = None

    def get(self, cpu_index: faiss.Index) -> faiss.Index:
        """The replica, copied from ``cpu_index`` if stale."""
        if self._index is None:
            if self._res is None:
                self._res = faiss.StandardGpuResources()
            self._index = faiss.index_cpu_to_gpu(self._res, self._device, cpu_index)
        return self._index

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Mirror an add, so ingest does not force a full re-copy."""
        if self._index is not None:
            self._index.add_with_ids(vectors, ids)

    def invalidate(self) -> None:
        """Drop the replica (after a removal or training); re-made on the next search."""
        self._index = None
