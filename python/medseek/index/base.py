"""The ``Index`` contract shared by every ANN backend, and its argument validation.

Every backend (FAISS here, Milvus later) stores L2-normalised float32 vectors under int64
ids and scores by inner product, which for unit vectors is the cosine similarity. Ids are
the store's row keys (``items.row_key``), so they are always ``>= 0``; ``-1`` is reserved
for "no result".

Normalisation policy: vectors and queries must already be L2-normalised (the ``Encoder``
contract promises it). A vector whose norm is off by more than ``norm_tol`` is rejected
with ``ValueError`` rather than normalised here, because a wrong norm means an upstream
bug (a raw, un-normalised encoder output, a corrupted blob) that silent normalisation
would hide, and the scores of such vectors are not cosines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

#: Default tolerance on ``| ||v|| - 1 |``. float32 unit vectors of dim ≤ 4096 are within
#: ~1e-6 of 1; 1e-3 accepts vectors normalised in float16 and rejects anything raw.
NORM_TOL = 1e-3


@runtime_checkable
class Index(Protocol):
    """An ANN index of unit vectors under int64 ids, searched by inner product.

    ``load`` is a classmethod: ``index = FaissIndex.load(path)``.
    ``add`` has upsert semantics: adding an id already present replaces its vector.
    """

    @property
    def dim(self) -> int: ...

    @property
    def scores_exact(self) -> bool:
        """True when ``search``'s scores are exact inner products; False when they come
        from compressed codes (PQ, SQ), which a caller holding the vectors re-scores."""
        ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> int: ...

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def save(self, path: str | Path) -> None: ...

    @classmethod
    def load(cls, path: str | Path) -> Index: ...

    def __len__(self) -> int: ...


def check_ids(
    name: str, ids: object, *, unique: bool = True, contiguous: bool = True
) -> np.ndarray:
    """Validate a 1-D int64 id array.

    Parameters
    ----------
    name : str
        Argument name used in error messages.
    ids : np.ndarray, int64, shape (n,)
        Ids, all ``>= 0``; with ``unique`` no id may repeat; with ``contiguous`` the
        array must be C-contiguous (it is handed to FAISS as is).

    Returns
    -------
    np.ndarray
        ``ids`` itself (no copy).
    """
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"{name} must be a numpy int64 array, got {type(ids).__name__}")
    if ids.dtype != np.int64:
        raise TypeError(f"{name} must have dtype int64, got {ids.dtype}")
    if ids.ndim != 1:
        raise ValueError(f"{name} must be 1-D (n,), got shape {ids.shape}")
    if contiguous and not ids.flags.c_contiguous:
        raise TypeError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if ids.size and ids.min() < 0:
        raise ValueError(f"{name} must be >= 0 (-1 means 'no result'), got {int(ids.min())}")
    if unique and ids.size:
        sorted_ids = np.sort(ids)
        dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
        if dup.size:
            raise ValueError(f"{name} contains duplicate id {int(dup[0])}")
    return ids


def check_vectors(name: str, x: object, dim: int, norm_tol: float = NORM_TOL) -> np.ndarray:
    """Validate a (n, dim) float32 C-contiguous array of finite unit vectors.

    Raises ``TypeError`` for a wrong type/dtype/layout (nothing is cast) and ``ValueError``
    for a wrong shape, NaN/inf, or a norm off by more than ``norm_tol``.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy float32 array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, {dim}), got shape {x.shape}")
    n, d = x.shape
    if d != dim:
        raise ValueError(f"{name} must have {dim} columns (the index dim), got {d}")
    if not x.flags.c_contiguous:
        raise TypeError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if n == 0:
        return x
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{name} row {row} contains NaN or inf")
    norms = np.linalg.norm(x, axis=1)
    bad = np.abs(norms - 1.0) > norm_tol
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} must be L2-normalised: row {row} has norm {float(norms[row]):.6g}"
        )
    return x


def check_k(k: object, name: str = "k") -> int:
    """Validate a positive int such as the result count ``k`` (or ``nprobe``)."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")
    return int(k)


def finalize_results(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Turn FAISS's padding (label -1, score -FLT_MAX) into the contract's -1 / -inf."""
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    scores[ids < 0] = -np.inf
    return scores, ids


def exact_search(
    queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k, the reference every index is tested against.

    Parameters
    ----------
    queries : np.ndarray, float32, shape (q, d)
    vectors : np.ndarray, float32, shape (n, d)
    ids : np.ndarray, int64, shape (n,)
    k : int

    Returns
    -------
    scores : np.ndarray, float32, shape (q, k)
        Descending; ``-inf`` where fewer than ``k`` vectors exist.
    ids : np.ndarray, int64, shape (q, k)
        ``-1`` where fewer than ``k`` vectors exist. Ties break by smaller id.
    """
    q = queries.shape[0]
    out_s = np.full((q, k), -np.inf, dtype=np.float32)
    out_i = np.full((q, k), -1, dtype=np.int64)
    if ids.size == 0 or q == 0:
        return out_s, out_i
    sims = queries @ vectors.T  # (q, n) float32
    kk = min(k, ids.size)
    # lexsort by (id ascending) within (score descending) for a deterministic order
    order = np.lexsort((np.broadcast_to(ids, sims.shape), -sims), axis=1)[:, :kk]
    out_s[:, :kk] = np.take_along_axis(sims, order, axis=1)
    out_i[:, :kk] = ids[order]
    return out_s, out_i
