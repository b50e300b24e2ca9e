"""MilvusIndex against a REAL Milvus standalone server (the `milvus` package, 2.3.x).

The server binary listens on every interface, so it never runs in the host's network:
one subprocess, `unshare -n -- python this_file.py OUT`, gets a private network namespace
with only loopback up, starts the server there, runs the scenario below as a client in
the same namespace, stops the server (and restarts it once), and writes what it measured
to OUT. The tests then check those outputs; the subprocess itself asserts nothing.

Scenario (5,000 x 256 unit vectors, clustered like real embeddings; 40 queries):
1. a store of 5,000 items with metadata, its Catalog on Milvus FLAT (the catalog's save
   awaits the index build); top-10 by a Bounded search vs FAISS exact flat;
2. the same vectors in an IVF_PQ collection (the add awaits the build); raw top-10 and
   top-10 after re-scoring the top-100 exactly, as the search pipeline does;
3. metadata filters as Milvus expressions through ``SearchPipeline.ann`` vs FAISS flat
   searched with the store's ``filter_row_keys``;
4. 50 items deleted in the store, caught up, and searched for at once;
5. the server restarted: the catalog reloads and answers as before.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # ~2 min on 2 busy cores: two server starts, two index builds

N, DIM, N_QUERIES, K, K_PRIME = 5000, 256, 40, 10, 100
PQ = {"nlist": 64, "m": 16, "nbits": 8}  # coarse codes: 16 dims per byte
N_DELETE = 50
MODALITIES = ["CR", "DX", "MR", None, '" or 1==1', "back\\slash"]
LABELS = ["effusion", "nodule", "cardiomegaly", "it's", 'say "no"']


def _why_not_runnable() -> str | None:
    """Why the server cannot run here, or None."""
    for module in ("milvus", "pymilvus"):
        if importlib.util.find_spec(module) is None:
            return (f"the {module!r} package is not installed (pip install 'medseek[milvus]'; "
                    "the server comes from the 'milvus' package)")
    if shutil.which("unshare") is None:
        return "no `unshare` binary: the Milvus server must run in a private network namespace"
    probe = subprocess.run(["unshare", "-n", "--", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`unshare -n` is not permitted here ({probe.stderr.strip()}): needs root"
    return None


# -- the scenario, run inside the namespace --------------------------------------------------
def _loopback_up() -> None:
    """Bring up `lo` in this (new) network namespace: SIOCGIFFLAGS / SIOCSIFFLAGS |= IFF_UP."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s, 0x8913, req))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sh14x", b"lo", flags | 0x1))


def _data(seed: int = 0):
    """Clustered unit vectors, queries near stored ones, and item records."""
    from medseek.index.records import ItemRecord

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 64, N)] + 0.6 * rng.standard_normal((N, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(N, N_QUERIES, replace=False)] + 0.3 * rng.standard_normal(
        (N_QUERIES, DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    recs = [ItemRecord(f"item-{i}", "image", modality=MODALITIES[i % len(MODALITIES)],
                       body_part="chest" if i % 3 else "hand",
                       labels=tuple(rng.choice(LABELS, int(rng.integers(0, 3)), replace=False)),
                       patient_pseudonym=None if i % 9 == 0 else f"p-{i % 37}")
            for i in range(N)]
    return np.ascontiguousarray(x), np.ascontiguousarray(q), recs


def _filters():
    from medseek.search.query import SearchFilters

    return [SearchFilters(modality="CR"),
            SearchFilters(modality=['" or 1==1', "back\\slash"], body_part="chest"),
            SearchFilters(labels_any=["it's", 'say "no"']),
            SearchFilters(exclude_patients=[f"p-{i}" for i in range(20)], modality=["DX", "MR"])]


def _median_ms(fn, repeats: int = 15) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def _start(out: Path):
    """Start the server on ``out/milvus`` and wait until its gRPC proxy answers (the
    package's own wait only checks the HTTP health endpoint, which answers first)."""
    import socket

    from milvus import MilvusServer, MilvusServerConfig
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    class SamePorts(MilvusServerConfig):
        """The package probes each port with a plain bind, which fails while the previous
        run's connections sit in TIME_WAIT; the server itself binds with SO_REUSEADDR. A
        restarted server must keep its port: the index sidecar names the URI."""

        def try_bind_port(self, port):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
                return sock
            except OSError:
                sock.close()
                return None

    server = MilvusServer(SamePorts(data_dir=str(out / "milvus")))
    server.start()
    uri = f"http://127.0.0.1:{server.listen_port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            client = MilvusClient(uri=uri, timeout=10)
            client.list_collections()
            client.close()
            return server, uri
        except MilvusException:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(1)


def scenario(out: Path) -> None:
    """Run the scenario (module docstring) and write ``out/results.{npz,json}``."""
    import logging

    from medseek.index.catalog import Catalog, CatalogConfig
    from medseek.index.faiss_config import MilvusConfig
    from medseek.index.milvus_index import MilvusIndex
    from medseek.index.records import StoreConfig
    from medseek.index.store import Store
    from medseek.search.pipeline import SearchPipeline
    from medseek.search.query import QueryOptions, SearchConfig

    _loopback_up()
    logs: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logs.append(record.getMessage())
    logging.getLogger("medseek.index").addHandler(handler)
    logging.getLogger("medseek.index").setLevel(logging.INFO)
    res: dict = {}
    arrays: dict[str, np.ndarray] = {}
    x, q, recs = _data()
    t = time.monotonic()
    server, uri = _start(out)
    res["server_start_s"] = time.monotonic() - t
    try:
        flat = MilvusConfig(uri=uri, index_type="FLAT")
        store = Store(StoreConfig(out / "store.db"))
        store.upsert(recs, x)
        keys = store.filter_row_keys("image")  # row keys in insertion order (sorted)
        arrays["keys"] = keys
        cat_cfg = CatalogConfig(index_dir=out / "ix", faiss=flat)
        catalog = Catalog(store, cat_cfg)
        t = time.monotonic()
        res["catalog_open"] = catalog.open()
        res["flat_build_s"] = time.monotonic() - t
        index = catalog.index("image")
        res["flat_state"] = vars(index.index_state())
        res["flat_scores_exact"] = index.scores_exact
        res["flat_supports_filters"] = index.supports_filters
        res["collection_consistency"] = index._client.describe_collection(
            index.milvus_collection)["consistency_level_name"]
        arrays["flat_scores"], arrays["flat_ids"] = index.search(q, K)  # Bounded (default)
        res["bounded_ms"] = _median_ms(lambda: index.search(q[:1], K))
        res["strong_ms"] = _median_ms(lambda: index.search(q[:1], K, consistency_level="Strong"))

        # 2. IVF_PQ on the same vectors; the add of >= index_wait_rows rows awaits the build
        pq_cfg = MilvusConfig(uri=uri, index_type="IVF_PQ", index_params=PQ,
                              search_params={"nprobe": 16}, index_wait_rows=N)
        t = time.monotonic()
        with MilvusIndex(DIM, pq_cfg, "ivfpq") as pq:
            pq.add(keys, x)
            res["pq_add_s"] = time.monotonic() - t
            res["pq_state"] = vars(pq.index_state())
            res["pq_scores_exact"] = pq.scores_exact
            arrays["pq_scores"], arrays["pq_ids"] = pq.search(q, K_PRIME)

        # 3. filters: through the pipeline (Milvus expressions) and as store id lists
        pipeline = SearchPipeline(catalog, store, SearchConfig(k_prime=K_PRIME, k=K))
        for i, f in enumerate(_filters()):
            batch = pipeline.ann("image", q, options=QueryOptions(k=K, filters=f))
            arrays[f"filter{i}_ids"], arrays[f"filter{i}_scores"] = batch.keys, batch.scores
            arrays[f"filter{i}_allowed"] = store.filter_row_keys("image", **f.as_kwargs())

        # 4. delete in the store, catch up, and search for the deleted items at once
        gone = [recs[i].id for i in range(0, N, N // N_DELETE)][:N_DELETE]
        gone_keys = np.array([store.get([g])[g].row_key for g in gone], dtype=np.int64)
        arrays["gone_keys"] = gone_keys
        store.delete(gone)
        res["sync_removed"] = catalog.sync("image")[0].removed
        gone_q = np.ascontiguousarray(x[np.searchsorted(keys, gone_keys)])
        opts = QueryOptions(k=K, diversify=False, explain=False)
        results = pipeline.search("image", gone_q, options=opts)
        res["after_delete_hit_ids"] = [[h.id for h in r.hits] for r in results]
        res["after_delete_stale"] = [r.stale for r in results]
        _, arrays["after_delete_index_ids"] = index.search(gone_q, 1)  # Bounded, raw
        res["len_after_delete"] = len(index)
        arrays["ids_after_delete"] = index.ids()
        arrays["live_keys"] = store.filter_row_keys("image")
        arrays["before_restart_scores"], arrays["before_restart_ids"] = index.search(q, K)
        catalog.save()
        pipeline.close()
        index.close()

        # 5. restart the server on the same data; the catalog reloads its collection
        server.stop()
        t = time.monotonic()
        server, again_uri = _start(out)
        res["restart_s"] = time.monotonic() - t
        res["restart_uri_same"] = again_uri == uri
        again = Catalog(store, cat_cfg)
        res["reopen"] = again.open()
        reopened = again.index("image")
        res["len_after_restart"] = len(reopened)
        arrays["after_restart_scores"], arrays["after_restart_ids"] = reopened.search(q, K)
        reopened.close()
        store.close()
    finally:
        server.stop()
        res["logs"] = logs
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
        np.savez(out / "results.npz", **arrays)


# -- the tests ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    why = _why_not_runnable()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("milvus_server")
    t = time.monotonic()
    proc = subprocess.run(["unshare", "-n", "--", sys.executable, __file__, str(out)],
                          capture_output=True, text=True, timeout=420)
    wall = time.monotonic() - t
    assert proc.returncode == 0, f"scenario failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    res = json.loads((out / "results.json").read_text())
    res["wall_s"] = wall
    print(json.dumps({k: v for k, v in res.items() if k != "logs"}, indent=1))
    with np.load(out / "results.npz") as z:
        arrays = {name: z[name] for name in z.files}
    return res, arrays


def _exact(q: np.ndarray, x: np.ndarray, keys: np.ndarray, k: int, allowed=None):
    from medseek.index.faiss_config import FaissConfig
    from medseek.index.faiss_index import FaissIndex

    faiss = FaissIndex(DIM, FaissConfig(kind="flat"))
    faiss.add(keys, x)
    return faiss.search(q, k, allowed)


def _recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth)]))


def test_flat_equals_faiss_flat_with_bounded_search(run):
    res, a = run
    x, q, _ = _data()
    fs, fi = _exact(q, x, a["keys"], K)
    assert res["collection_consistency"] == "Bounded"
    assert res["flat_scores_exact"] and res["flat_supports_filters"]
    state = res["flat_state"]
    assert state["total_rows"] == N and state["state"] != "Failed"
    assert state["loaded_sealed_rows"] >= N
    assert any(f"FLAT index of Milvus collection medseek_image built over {N} rows" in m
               for m in res["logs"])
    assert _recall(a["flat_ids"], fi) == 1.0
    np.testing.assert_allclose(a["flat_scores"], fs, rtol=0, atol=1e-5)


def test_ivf_pq_is_awaited_and_reranked_exactly(run):
    res, a = run
    x, q, _ = _data()
    _, truth = _exact(q, x, a["keys"], K)
    assert not res["pq_scores_exact"]
    state = res["pq_state"]
    assert state["index_type"] == "IVF_PQ" and state["total_rows"] == N
    assert state["indexed_rows"] == N and state["loaded_sealed_rows"] >= N
    assert any(f"IVF_PQ index of Milvus collection medseek_ivfpq built over {N} rows" in m
               for m in res["logs"])
    ids = a["pq_ids"]  # (q, K') by PQ score
    raw = _recall(ids[:, :K], truth)
    # the PQ codes answered (not a growing segment, nor 2.3's interim IVF_FLAT index of a
    # sealed segment awaiting its index, both of which score exactly)
    row = {int(k): i for i, k in enumerate(a["keys"])}
    valid = ids >= 0
    exact_scores = np.einsum("qkd,qd->qk", x[[[row[int(c)] for c in r] for r in np.where(
        valid, ids, a["keys"][0])]], q)
    assert np.abs(a["pq_scores"][valid] - exact_scores[valid]).max() > 1e-3
    # the exact re-score the search pipeline applies when scores_exact is False
    reranked = []
    for qi in range(N_QUERIES):
        cand = ids[qi][ids[qi] >= 0]
        exact = x[[row[int(c)] for c in cand]] @ q[qi]
        reranked.append(cand[np.argsort(-exact, kind="stable")[:K]])
    rerank = _recall(np.array(reranked), truth)
    print(f"IVF_PQ recall@{K}: raw {raw:.3f}, after exact re-rank of top-{K_PRIME} {rerank:.3f}")
    assert raw < 1.0  # the built PQ index answered, not a brute-force growing segment
    # re-scoring the same candidates exactly must recover most of what the codes lose
    assert rerank >= 0.9 and rerank >= raw + 0.1


def test_filters_as_expressions_equal_the_store_filtered_faiss_path(run):
    _, a = run
    x, q, _ = _data()
    for i in range(len(_filters())):
        allowed = a[f"filter{i}_allowed"]
        assert 0 < allowed.size < N
        fs, fi = _exact(q, x, a["keys"], K_PRIME, allowed)
        np.testing.assert_array_equal(a[f"filter{i}_ids"], fi, err_msg=f"filter {i}")
        np.testing.assert_allclose(a[f"filter{i}_scores"], fs, rtol=0, atol=1e-5)


def test_delete_never_leaks_and_counts_are_exact(run):
    res, a = run
    gone = {f"item-{i}" for i in range(0, N, N // N_DELETE)}
    assert res["sync_removed"] == N_DELETE
    for hits in res["after_delete_hit_ids"]:
        assert hits and not gone & set(hits)
    assert res["len_after_delete"] == N - N_DELETE
    np.testing.assert_array_equal(a["ids_after_delete"], a["live_keys"])
    print("stale rows dropped by the pipeline right after the delete:",
          sum(res["after_delete_stale"]))


def test_reopen_after_server_restart(run):
    res, a = run
    assert res["restart_uri_same"]
    assert res["reopen"] == {"image": "loaded"}
    assert res["len_after_restart"] == N - N_DELETE
    np.testing.assert_array_equal(a["after_restart_ids"], a["before_restart_ids"])
    np.testing.assert_allclose(a["after_restart_scores"], a["before_restart_scores"],
                               rtol=0, atol=1e-6)


if __name__ == "__main__":  # the scenario, as run inside `unshare -n` by the fixture
    scenario(Path(sys.argv[1]))
