"""Recall@10 against exact search, and queries per second, of each index kind the server
can be configured with (``ServeConfig.index``), at N x 256.

The vectors are the search benchmark's (``test_search.chunk_vectors``: clustered, N / 50
centres), built in chunks; the queries are 1,000 held-out vectors from the same clusters.
Each kind is a ``medseek.index.FaissIndex`` with the service's settings, searched in
batches of 32 (the server's micro-batch) for K' = 200 candidates, which the service then
reads from the store; the "+ exact re-score" rows re-score those 200 candidates with
the stored vectors and keep the top 10, as ``SearchPipeline`` does for an index whose
``scores_exact`` is False. qps counts the index search only (and the re-score where it
applies), on this process's FAISS threads.

    python benchmarks/index_kinds.py --n 1000000 --out runs/index_kinds.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_search import DIM, chunk_vectors, unit  # noqa: E402

K, K_PRIME, BATCH, N_QUERIES = 10, 200, 32, 1000


def vectors(n: int) -> np.ndarray:
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, 10_000):
        stop = min(n, start + 10_000)
        out[start:stop] = chunk_vectors(n, start, stop)[0]
    return out


def queries(n: int) -> np.ndarray:
    centres = unit(np.random.default_rng(12345).standard_normal((max(1, n // 50), DIM)))
    rng = np.random.default_rng(2026)
    noise = rng.standard_normal((N_QUERIES, DIM)) / np.sqrt(DIM)
    return unit(centres[rng.integers(0, centres.shape[0], N_QUERIES)] + 0.5 * noise)


def exact_top(base: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids (rows of ``base``) by inner product, a block of queries at a time."""
    out = np.empty((q.shape[0], k), np.int64)
    for s in range(0, q.shape[0], 100):
        sims = q[s:s + 100] @ base.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1)
        out[s:s + 100] = np.take_along_axis(part, order, 1)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / t.size for f, t in zip(found, truth)]))


def run_kind(name: str, cfg, base: np.ndarray, q: np.ndarray, truth: np.ndarray) -> list[dict]:
    from medseek.index.faiss_index import FaissIndex

    ids = np.arange(base.shape[0], dtype=np.int64)
    t = time.perf_counter()
    index = FaissIndex(DIM, cfg)
    if cfg.kind == "ivfpq":
        take = min(base.shape[0], 100_000)  # the catalog trains on up to train_sample
        sample = base[np.random.default_rng(0).choice(base.shape[0], take, replace=False)]
        index.train(np.ascontiguousarray(sample))
    for s in range(0, base.shape[0], 50_000):
        index.add(ids[s:s + 50_000], base[s:s + 50_000])
    build_s = time.perf_counter() - t
    rows = []
    for rescore in ([False, True] if not index.scores_exact else [False]):
        found = np.empty((q.shape[0], K), np.int64)
        t = time.perf_counter()
        for s in range(0, q.shape[0], BATCH):
            qb = q[s:s + BATCH]
            scores, keys = index.search(qb, K_PRIME)
            if rescore:  # the pipeline's exact re-score of the K' candidates
                exact = np.einsum("qkd,qd->qk", base[keys], qb)
                keys = np.take_along_axis(keys, np.argsort(-exact, axis=1), 1)
            found[s:s + BATCH] = keys[:, :K]
        wall = time.perf_counter() - t
        rows.append({"kind": name + (" + exact re-score" if rescore else ""),
                     "recall@10": recall(found, truth), "qps": q.shape[0] / wall,
                     "build_s": build_s})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    import faiss

    from medseek.index.faiss_config import FaissConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    ap.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads")
    ap.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree")
    ap.add_argument("--ef-construction", type=int, default=200, help="HNSW build beam width")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    t = time.perf_counter()
    base, q = vectors(args.n), queries(args.n)
    truth = exact_top(base, q, K)
    print(f"data + exact truth: {time.perf_counter() - t:.0f} s", flush=True)
    kinds = {"flat": FaissConfig(use_gpu="never"),
             f"hnsw (M {args.hnsw_m}, efC {args.ef_construction}, ef 64)": FaissConfig(
                 kind="hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                 use_gpu="never"),
             "ivfpq (nlist 1024, m 16, nprobe 16)": FaissConfig(kind="ivfpq", use_gpu="never")}
    rows = []
    for name, cfg in kinds.items():
        rows += run_kind(name, cfg, base, q, truth)
    result = {"n": args.n, "dim": DIM, "k": K, "k_prime": K_PRIME, "batch": BATCH,
              "threads": args.threads, "machine": f"{platform.node()} {os.cpu_count()} cores",
              "load": os.getloadavg()[0], "rows": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
