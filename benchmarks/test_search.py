"""The gRPC retrieval service under load, against raw FAISS batched search in the same run.

A store of N images of dim 256 (every 4th with one ``distal_radius`` region child) and
its exact flat FAISS indexes (the default kind) are built once through the ``Store`` API
(bulk ``upsert`` of 10,000 items per transaction; ~10 min for 1M on the shared 2-core
VM) and cached under ``runs/bench_search/n<N>/`` (git-ignored), so reruns start in
seconds. The server runs in its own process (``python benchmarks/test_search.py serve``:
``medseek.serve.server.serve`` with the default ``ServeConfig`` and a hash encoder of dim
256, which only encodes the start-up concept prompts; ``OPENBLAS_NUM_THREADS=1``, see
``ServerProcess``) and is queried through the real ``medseek.v1.Retrieval/Search`` API
with ``item_id`` queries: the query vector is the item's stored embedding, so no encoder
runs per query; explanations (14 concepts) run as in production. Server settings can be
overridden with ``MEDSEEK_BENCH_SERVER='{"faiss_threads": 2, "search_batch": {"linger": 0}}'``.
The ``1m-hnsw`` case serves the image collection from an HNSW index instead (``KINDS``;
built once from the flat one, ~5 min for 1M on a quiet 2-core VM) and times raw FAISS on
the same index: the issue's "gRPC at 32 clients against raw FAISS with HNSW at 1M".

Before the rounds, every query id is searched once in every mode by 32 clients (the
reader's row and record caches warm, as in a long-running server). Each round runs, one
after the other (interleaved, so machine load hits both alike):

* ``faiss b=1`` / ``faiss b=32``: raw ``FaissIndex.search`` (the saved index, loaded in
  this process) of batches of 1 and ``max_batch`` (32) queries, k = what the server asks
  FAISS for (k + 1 = 11: the query item itself is dropped; K' = 200 with a region rerank
  or diversification), with the server's FAISS settings (threads, BLAS threshold);
* ``grpc c=1`` / ``grpc c=32``: 1 and 32 concurrent clients (one channel each), each
  sending its next ``Search`` when the last one answered (closed loop), k = 10, after one
  untimed request per client (so the micro-batching has settled);
* ``+region``, ``+diversify``, ``+region+diversify`` at 32 clients: the two-stage region
  rerank (``region.name``) and MMR diversification, separately and together, against
  ``faiss b=32`` at K' = 200;
* ``stream 4x8``: the same plain searches as ``grpc c=32``, 32 in flight too, but on 4
  ``SearchStream`` calls with 8 requests in flight on each (pipelined on one call, answered
  as they finish): what a client at scale saves of gRPC's per-call cost.

Reported per row (median over rounds): qps, p50 and p99 latency (over every request of
every round), p99/p50, the throughput ratio to raw FAISS at the same batch size and K,
CPU ms per query (server process utime+stime, or this process for raw FAISS; less moved
by other jobs on the cores than wall time), the mean micro-batch size the server formed,
and ``uptime``'s load average at the start of each round; then the ``grpc c=32`` row's
server CPU per query by thread (the server names its OS threads, ``name_os_threads``);
peak RSS of the server and of this process come last.

Regression gate (``benchmarks/compare.py``): the whole measurement runs once inside
``benchmark.pedantic`` and records ``extra_info["ratio"]`` = the ``grpc c=32`` row's
throughput over raw FAISS ``b=32`` (median of the per-round ratios), every service row's
ratio in ``ratios``. ``MEDSEEK_BENCH_REPEAT`` does not apply.

    pytest benchmarks/test_search.py -p no:cacheprovider -s -k 20k   # seconds (cached)
    pytest benchmarks/test_search.py -p no:cacheprovider -s -k "1m and not hnsw"  # builds ~1M
    pytest benchmarks/test_search.py -p no:cacheprovider -s -k 1m-hnsw  # + HNSW (~5 min)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bench_gate import record_ratio

DIM, K, K_PRIME, MAX_BATCH, REGION_EVERY, CHUNK = 256, 10, 200, 32, 4, 10_000
SIZES = {"20k": 20_000, "1m": 1_000_000}
ROUNDS = {"20k": 3, "1m": 3}
#: The image collection's index for a ``<size>-<kind>`` parameter (``serve``'s ``[index]``
#: table; regions stay exact). HNSW at M 16 / efConstruction 64: recall@10 0.979 at 1M
#: (RESULTS "Index kinds"), a third of the build time of the serve default (M 32 / 200).
KINDS = {"flat": {"kind": "flat"},
         "hnsw": {"kind": "hnsw", "hnsw_m": 16, "ef_construction": 64, "ef_search": 64}}
REGION = "distal_radius"
CACHE = Path(__file__).resolve().parents[1] / "runs" / "bench_search"
_FORMAT = 1  # bump when the generated store changes


# -- data -------------------------------------------------------------------------------
def unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=-1, keepdims=True), dtype=np.float32)


def chunk_vectors(n: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of images [start, stop) and of their region crops; clustered (n / 50
    centres) so that neighbours share a cluster; deterministic per chunk."""
    centres = unit(np.random.default_rng(12345).standard_normal((max(1, n // 50), DIM)))
    rng = np.random.default_rng([7, start])
    which = rng.integers(0, centres.shape[0], stop - start)
    noise = rng.standard_normal((2, stop - start, DIM)) / np.sqrt(DIM)
    images = unit(centres[which] + 0.5 * noise[0])
    regions = unit(images + 0.3 * noise[1])
    return images, regions


def image_id(i: int) -> str:
    return f"img-{i:07d}"


def build_store(n: int) -> Path:
    """The cached store + saved indexes for ``n`` images (built on first use)."""
    from medseek.index.catalog import Catalog, CatalogConfig
    from medseek.index.records import ItemRecord, StoreConfig
    from medseek.index.store import Store

    root = CACHE / f"n{n}"
    marker = root / "done.json"
    want = {"format": _FORMAT, "n": n, "dim": DIM, "region_every": REGION_EVERY}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return root
    root.mkdir(parents=True, exist_ok=True)
    for p in (root / "index").glob("*.npz"):
        p.unlink()
    t0 = time.perf_counter()
    store = Store(StoreConfig(root / "store.db"))
    try:
        # an interrupted build goes on: upserts of the items already there are updates
        done = store.count("image") == n and store.count("region") == n // REGION_EVERY
        for start in range(0, 0 if done else n, CHUNK):
            stop = min(n, start + CHUNK)
            images, regions = chunk_vectors(n, start, stop)
            recs = [ItemRecord(
                id=image_id(i), collection="image", modality="CR", body_part="wrist",
                view=("PA", "LAT")[i % 2], labels=(("fracture",) if i % 3 == 0 else ()),
                patient_pseudonym=f"P{i // 4}", study_pseudonym=f"S{i // 2}",
                source_document=f"D{i // 8}") for i in range(start, stop)]
            store.upsert(recs, images)
            kids = [i for i in range(start, stop) if i % REGION_EVERY == 0]
            store.upsert([ItemRecord(id=f"reg-{i:07d}", collection="region", modality="CR",
                                     body_part="wrist", parent_id=image_id(i), region=REGION,
                                     box=(10.0, 10.0, 40.0, 40.0)) for i in kids],
                         regions[np.asarray(kids) - start])
            if start // CHUNK % 10 == 0:
                print(f"  store: {stop}/{n} images, {time.perf_counter() - t0:.0f} s",
                      flush=True)
        save_indexes(store, root / "index")
        Catalog(store, CatalogConfig(root / "index")).open()  # loads them: "loaded"
    finally:
        store.close()
    marker.write_text(json.dumps(want))
    print(f"  built store + indexes of {n} images in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return root


def index_dir(root: Path, kind: str) -> Path:
    """Where the saved indexes of ``kind`` are (``build_kind`` writes them)."""
    return root / ("index" if kind == "flat" else f"index-{kind}")


def build_kind(root: Path, kind: str) -> Path:
    """The saved indexes the server and raw FAISS use for ``kind``: the flat ones
    ``build_store`` wrote, or (first use) the image collection rebuilt as ``KINDS[kind]``
    beside a copy of the flat region index."""
    from medseek.index.faiss_index import FaissIndex
    from medseek.serve.config import index_config

    out = index_dir(root, kind)
    if kind == "flat":
        return out
    marker = out / "done.json"
    if marker.exists() and json.loads(marker.read_text()) == KINDS[kind]:
        return out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    flat = FaissIndex.load(root / "index" / "image.npz")
    index = FaissIndex(DIM, index_config(KINDS[kind]))
    keys = flat.ids()
    for start in range(0, keys.size, 50_000):
        part = keys[start:start + 50_000]
        index.add(part, flat.stored_vectors(part))
        print(f"  {kind}: {start + part.size}/{keys.size}, {time.perf_counter() - t0:.0f} s",
              flush=True)
    index.metadata = flat.metadata
    index.save(out / "image.npz")
    (out / "region.npz").write_bytes((root / "index" / "region.npz").read_bytes())
    marker.write_text(json.dumps(KINDS[kind]))
    return out


def save_indexes(store, index_dir: Path) -> None:
    """Flat indexes of every collection, saved as ``Catalog`` saves them.

    ``Catalog.open`` would build them itself, but ``Store.iter_embeddings`` pages a full
    build through the (collection, seq) index: every page reads and sorts every row of
    the collection, quadratic at 1M rows (hours). One pass in row-key order here instead.
    """
    import sqlite3

    from medseek.index.faiss_index import FaissIndex

    index_dir.mkdir(parents=True, exist_ok=True)
    seq = store.last_seq()
    con = sqlite3.connect(f"{store.config.path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        for name, dim in store.collections().items():
            index = FaissIndex(dim)
            cur = con.execute(
                "SELECT i.row_key, e.vector FROM items i JOIN embeddings e ON e.row_key = "
                "i.row_key AND e.model = ? WHERE +i.collection = ? AND +i.seq <= ? "
                "ORDER BY i.row_key", (store.config.model, name, seq))
            while rows := cur.fetchmany(50_000):
                keys = np.fromiter((r[0] for r in rows), np.int64, len(rows))
                vectors = np.frombuffer(b"".join(r[1] for r in rows), "<f4").reshape(-1, dim)
                index.add(keys, np.ascontiguousarray(vectors, dtype=np.float32))
            index.metadata = {"seq": seq, "store_uuid": store.uuid, "collection": name}
            index.save(index_dir / f"{name}.npz")
    finally:
        con.close()


# -- the server process -----------------------------------------------------------------
class HashEncoder:
    """Texts -> seeded unit vectors of dim 256 (keyed by the text's SHA-256). The server
    encodes its concept prompts with it at start-up; ``item_id`` queries never encode."""

    def __init__(self, dim: int = DIM) -> None:
        self.dim = dim

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little") for t in texts]
        return unit(np.stack([np.random.default_rng(s).standard_normal(self.dim)
                              for s in seeds]))

    def encode_images(self, images):
        raise ValueError("the benchmark encoder encodes texts only")

    def encode_volumes(self, volumes):
        raise ValueError("the benchmark encoder encodes texts only")


def server_config(root: Path, kind: str = "flat", **overrides):
    from medseek.index.faiss_index import FaissConfig
    from medseek.serve.config import BatchConfig, ServeConfig, index_config

    overrides = dict(overrides)
    if isinstance(overrides.get("search_batch"), dict):  # e.g. {"linger": 0}
        overrides["search_batch"] = BatchConfig(**overrides["search_batch"])
    cfg = ServeConfig(store_path=root / "store.db", index_dir=index_dir(root, kind), port=0,
                      metrics_port=0, grace_s=5.0, index=index_config(KINDS[kind]),
                      index_per_collection={"region": FaissConfig()}, **overrides)
    assert cfg.search_batch.max_batch == MAX_BATCH, "raw FAISS batches are sized MAX_BATCH"
    return cfg


def name_os_threads() -> None:
    """Give each Python thread started from now on its name at the OS level too (Linux
    ``prctl(PR_SET_NAME)``, 15 bytes), and this one "main-loop", so that per-thread CPU
    (``ServerProcess.thread_cpu_s``, ``top -H``) says which thread spent it."""
    import ctypes
    import threading

    try:
        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError):  # not Linux: leave the names
        return
    start = threading.Thread._bootstrap_inner

    def named(thread):
        prctl(15, thread.name[:15].encode(), 0, 0, 0)
        return start(thread)

    threading.Thread._bootstrap_inner = named
    prctl(15, b"main-loop", 0, 0, 0)


def _serve(root: Path, port_file: Path, kind: str, overrides: dict) -> None:
    from medseek.serve.server import serve

    name_os_threads()

    def ready(server, port):
        port_file.write_text(json.dumps({"port": port, "metrics": server.metrics_port}))

    serve(server_config(root, kind, **overrides), HashEncoder(), ready)


def stat_cpu_s(stat: str) -> float:
    """utime + stime in seconds of a ``/proc/.../stat`` line (fields after the name)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """``python benchmarks/test_search.py serve ...`` with its port, CPU time and peak RSS."""

    def __init__(self, root: Path, kind: str, overrides: dict) -> None:
        self.port_file = root / "port.json"
        self.port_file.unlink(missing_ok=True)
        # numpy's OpenBLAS threads spin (sched_yield) after each small matrix product of
        # the search threads: half the server's CPU when they may; FAISS has its own BLAS
        env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS",
                                                                    "1")}
        self.proc = subprocess.Popen([sys.executable, __file__, "serve", str(root),
                                      str(self.port_file), kind, json.dumps(overrides)], env=env)
        deadline = time.monotonic() + 900
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the server did not start (exit {self.proc.returncode})")
            time.sleep(0.2)
        time.sleep(0.1)
        info = json.loads(self.port_file.read_text())
        self.port, self.metrics_port = info["port"], info["metrics"]

    def cpu_s(self) -> float:
        return stat_cpu_s(Path(f"/proc/{self.proc.pid}/stat").read_text())

    def thread_cpu_s(self) -> dict[str, float]:
        """CPU seconds of the process's live threads, summed by OS thread name (the server
        names them, ``name_os_threads``: main-loop, medseek-search_0, medseek-index_0, and
        gRPC's own C threads)."""
        out: dict[str, float] = {}
        task = Path(f"/proc/{self.proc.pid}/task")
        for tid in task.iterdir():
            try:
                stat = (tid / "stat").read_text()
            except FileNotFoundError:  # the thread ended
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            out[name] = out.get(name, 0.0) + stat_cpu_s(stat)
        return out

    def rss_mb(self, field: str = "VmHWM") -> float:
        """Peak (VmHWM) or current (VmRSS) resident memory of the server process."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def batches(self) -> tuple[float, float]:
        """(sum, count) of the search micro-batch sizes so far (Prometheus metrics)."""
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                      timeout=10).read().decode()
        got = {}
        for line in text.splitlines():
            for what in ("sum", "count"):
                if line.startswith(f'medseek_batch_size_{what}{{batcher="search"}}'):
                    got[what] = float(line.split()[-1])
        return got.get("sum", 0.0), got.get("count", 0.0)

    def stop(self) -> None:
        # SIGKILL: the benchmark only reads, so there is nothing to save, and a graceful
        # stop would rewrite the 1 GB index file of the 1M store for nothing
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


# -- load -------------------------------------------------------------------------------
#: (name, clients, region, diversify): the service rows, in the order each round runs them
MODES = [("grpc c=1", 1, False, False), ("grpc c=32", 32, False, False),
         ("+region c=32", 32, True, False), ("+diversify c=32", 32, False, True),
         ("+region+diversify c=32", 32, True, True)]
WORK = {"20k": {"c1": 60, "per_client": 8, "raw_batches": 8},
        "1m": {"c1": 8, "per_client": 4, "raw_batches": 4}}


def query_ids(n: int, count: int) -> list[int]:
    """Images that have a region child (so a region rerank has a query region)."""
    rng = np.random.default_rng(99)
    return sorted(int(i) * REGION_EVERY for i in rng.choice(n // REGION_EVERY, count,
                                                             replace=False))


def query_vectors(n: int, ids: list[int]) -> np.ndarray:
    out = np.empty((len(ids), DIM), np.float32)
    for start in sorted({i // CHUNK * CHUNK for i in ids}):
        images = chunk_vectors(n, start, min(n, start + CHUNK))[0]
        for j, i in enumerate(ids):
            if start <= i < start + CHUNK:
                out[j] = images[i - start]
    return out


async def grpc_round(stubs, ids: list[int], clients: int, per_client: int, region: bool,
                     diversify: bool, offset: int) -> tuple[list[float], float]:
    from medseek.serve.v1 import retrieval_pb2 as pb

    lat: list[float] = []

    async def client(ci: int) -> None:
        for j in range(per_client):
            i = ids[(offset + ci * per_client + j) % len(ids)]
            req = pb.SearchRequest(item_id=image_id(i), k=K, diversify=diversify)
            if region:
                req.region.name = REGION
            t = time.perf_counter()
            resp = await stubs[ci].Search(req, timeout=600)
            lat.append(time.perf_counter() - t)
            assert len(resp.hits) == K and all(h.id != image_id(i) for h in resp.hits)
            assert not region or any(h.matched_region == REGION for h in resp.hits)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(ci) for ci in range(clients)))
    return lat, time.perf_counter() - t0


async def stream_round(stubs, ids: list[int], inflight: int, per_stream: int,
                       offset: int) -> tuple[list[float], float]:
    """One ``SearchStream`` per stub, each keeping ``inflight`` plain searches (k = K) in
    flight until ``per_stream`` are answered; latencies from send to answer."""
    from medseek.serve.v1 import retrieval_pb2 as pb

    lat: list[float] = []

    async def one(si: int) -> None:
        slots, sent = asyncio.Semaphore(inflight), {}

        async def requests():
            for j in range(per_stream):
                await slots.acquire()
                i = ids[(offset + si * per_stream + j) % len(ids)]
                sent[f"{si}-{j}"] = time.perf_counter()
                yield pb.SearchRequest(item_id=image_id(i), k=K, request_id=f"{si}-{j}")

        async for resp in stubs[si].SearchStream(requests(), timeout=600):
            lat.append(time.perf_counter() - sent.pop(resp.request_id))
            assert not resp.HasField("error") and len(resp.hits) == K, resp.error
            slots.release()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(si) for si in range(len(stubs))))
    return lat, time.perf_counter() - t0


def raw_round(index, queries: np.ndarray, batch: int, n_batches: int, k: int,
              offset: int) -> tuple[list[float], float, float]:
    lat = []
    c0, t0 = time.process_time(), time.perf_counter()
    for b in range(n_batches):
        rows = (offset + b * batch + np.arange(batch)) % queries.shape[0]
        q = np.ascontiguousarray(queries[rows])
        t = time.perf_counter()
        index.search(q, k)
        lat.append(time.perf_counter() - t)
    return lat, time.perf_counter() - t0, time.process_time() - c0


def run_benchmark(size: str, overrides: dict | None = None) -> dict:
    """Build or load the store, start the server, run the interleaved rounds; the rows.
    ``size`` is a key of ``SIZES``, optionally with ``-<kind>`` of ``KINDS`` (flat when
    none): the image collection's index, on the server and in the raw FAISS rows."""
    import faiss
    import grpc

    from medseek.index.faiss_index import FaissIndex
    from medseek.serve.v1 import retrieval_pb2 as pb
    from medseek.serve.v1 import retrieval_pb2_grpc as pb_grpc

    size, _, kind = size.partition("-")
    kind = kind or "flat"
    n, work = SIZES[size], WORK[size]
    overrides = dict(overrides or {})
    root = build_store(n)
    index = FaissIndex.load(build_kind(root, kind) / "image.npz")
    cfg = server_config(root, kind, **overrides)
    # raw FAISS runs with the server's FAISS settings (see RetrievalService.__init__)
    faiss.omp_set_num_threads(cfg.faiss_threads or max(1, (os.cpu_count() or 2) - 1))
    if cfg.faiss_blas_min_batch is not None:
        faiss.cvar.distance_compute_blas_threshold = cfg.faiss_blas_min_batch * DIM
    ids = query_ids(n, 512)
    queries = query_vectors(n, ids)
    rows: dict[str, dict] = {}

    def add(name, lat, wall, count, cpu, batch_mean, load, base=None):
        r = rows.setdefault(name, {"lat": [], "qps": [], "cpu": [], "batch": [], "load": [],
                                   "ratio": [], "base": base, "threads": []})
        r["lat"] += lat
        r["qps"].append(count / wall)
        r["cpu"].append(cpu / count)
        r["batch"].append(batch_mean)
        r["load"].append(load)

    server = ServerProcess(root, kind, overrides)
    try:
        async def main():
            chans = [grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") for _ in range(32)]
            stubs = [pb_grpc.RetrievalStub(c) for c in chans]
            # warm-up: every query id once in every mode (connections, page cache, the
            # reader's row and record caches), so the rounds measure a server in steady state
            for region in (False, True):
                for diversify in (False, True):
                    await grpc_round(stubs, ids, len(chans), -(-len(ids) // len(chans)),
                                     region, diversify, 0)
            for rnd in range(ROUNDS[size]):
                load = os.getloadavg()[0]
                off = rnd * 997
                for k, tag in ((K + 1, ""), (K_PRIME, " K'")):
                    for b, reps in ((1, work["c1"]), (MAX_BATCH, work["raw_batches"])):
                        if tag and b == 1:
                            continue
                        lat, wall, cpu = raw_round(index, queries, b, reps, k, off)
                        add(f"faiss b={b}{tag}", lat, wall, b * reps, cpu, b, load)
                for name, clients, region, diversify in MODES:
                    per = work["c1"] if clients == 1 else work["per_client"]
                    # untimed: one request per client, so the timed ones see steady batching
                    await grpc_round(stubs, ids, clients, 1, region, diversify, off + 500)
                    b0, c0, t0 = server.batches(), server.cpu_s(), server.thread_cpu_s()
                    lat, wall = await grpc_round(stubs, ids, clients, per, region, diversify,
                                                 off)
                    cpu, b1, t1 = server.cpu_s() - c0, server.batches(), server.thread_cpu_s()
                    mean_b = (b1[0] - b0[0]) / max(1.0, b1[1] - b0[1])
                    base = ("faiss b=1" if clients == 1 else
                            "faiss b=32 K'" if region or diversify else "faiss b=32")
                    add(name, lat, wall, clients * per, cpu, mean_b, load, base)
                    rows[name]["threads"].append({t: (v - t0.get(t, 0.0)) / (clients * per)
                                                  for t, v in t1.items()})
                    rows[name]["ratio"].append(rows[name]["qps"][-1] / rows[base]["qps"][-1])
                streams, inflight, per = 4, 8, 8 * work["per_client"]
                await stream_round(stubs[:streams], ids, inflight, inflight, off + 500)
                b0, c0 = server.batches(), server.cpu_s()
                lat, wall = await stream_round(stubs[:streams], ids, inflight, per, off)
                cpu, b1 = server.cpu_s() - c0, server.batches()
                name = f"stream {streams}x{inflight}"
                add(name, lat, wall, streams * per, cpu,
                    (b1[0] - b0[0]) / max(1.0, b1[1] - b0[1]), load, "faiss b=32")
                rows[name]["ratio"].append(rows[name]["qps"][-1] / rows["faiss b=32"]["qps"][-1])
            for c in chans:
                await c.close()

        asyncio.run(main())
        server_rss = server.rss_mb(), server.rss_mb("VmRSS")
    finally:
        server.stop()
    own_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    table = {name: {
        "qps": statistics.median(r["qps"]),
        "p50_ms": 1e3 * float(np.percentile(r["lat"], 50)),
        "p99_ms": 1e3 * float(np.percentile(r["lat"], 99)),
        "ratio": statistics.median(r["ratio"]) if r["ratio"] else None,
        "base": r["base"], "cpu_ms": 1e3 * statistics.median(r["cpu"]),
        "batch": statistics.mean(r["batch"]), "load": r["load"], "n": len(r["lat"]),
        "threads_ms": {t: 1e3 * statistics.median(d.get(t, 0.0) for d in r["threads"])
                       for t in {t for d in r["threads"] for t in d}},
    } for name, r in rows.items()}
    return {"size": size, "kind": kind, "n": n, "rows": table, "server_peak_rss_mb": server_rss[0],
            "server_rss_mb": server_rss[1],
            "bench_peak_rss_mb": own_rss, "overrides": overrides,
            "faiss_threads": faiss.omp_get_max_threads(),
            "blas_threshold": int(faiss.cvar.distance_compute_blas_threshold)}


def format_table(res: dict) -> str:
    lines = [f"### {res['n']:,} images x {DIM} ({KINDS[res['kind']]}), server settings "
             f"{res['overrides'] or '{}'}"
             f" (FAISS threads {res['faiss_threads']}, BLAS threshold {res['blas_threshold']})",
             "", "| mode | qps | p50 ms | p99 ms | p99/p50 | qps / raw FAISS | CPU ms/query "
             "| mean batch | load (per round) |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in res["rows"].items():
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x ({r['base']})"
        lines.append(
            f"| {name} | {r['qps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['p99_ms'] / r['p50_ms']:.2f} | {ratio} | {r['cpu_ms']:.1f} | {r['batch']:.1f} | "
            f"{' / '.join(f'{v:.1f}' for v in r['load'])} |")
    r1, r32 = res["rows"]["grpc c=1"], res["rows"]["grpc c=32"]
    busy = sorted(((v, t) for t, v in r32["threads_ms"].items() if v >= 0.005), reverse=True)
    lines.append("\ngrpc c=32, server CPU ms per query by thread: "
                 + ", ".join(f"{t} {v:.2f}" for v, t in busy))
    tail = max(r["p99_ms"] / r["p50_ms"] for r in (r1, r32))
    # issue 14: >= 0.5x raw FAISS at 32 clients (flat at 20k, HNSW at 1M); issue 7: p99/p50
    lines.append(f"\ntargets: c=32 at {r32['ratio']:.2f}x raw FAISS (>= 0.5: "
                 f"{'met' if r32['ratio'] >= 0.5 else 'NOT met'}); worst p99/p50 {tail:.2f} "
                 f"(<= 3: {'met' if tail <= 3 else 'NOT met'})")
    lines.append(f"peak RSS: server {res['server_peak_rss_mb']:.0f} MB (at the end "
                 f"{res['server_rss_mb']:.0f} MB), benchmark process (raw FAISS index, clients) "
                 f"{res['bench_peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


@pytest.mark.parametrize("size", [pytest.param("20k"), pytest.param("1m", marks=pytest.mark.slow),
                                  pytest.param("1m-hnsw", marks=pytest.mark.slow)])
def test_search_service(benchmark, size):
    overrides = json.loads(os.environ.get("MEDSEEK_BENCH_SERVER", "{}"))
    res = benchmark.pedantic(run_benchmark, args=(size, overrides), rounds=1, iterations=1)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / f"results_{size}.json").write_text(json.dumps(res, indent=1))
    print("\n" + format_table(res))
    for name in ("grpc c=1", "grpc c=32"):  # every request answered with k hits
        assert res["rows"][name]["n"] > 0
    record_ratio(benchmark, res["rows"]["grpc c=32"]["ratio"],
                 "raw FAISS b=32 (qps, median of per-round ratios)",
                 ratios={name: r["ratio"] for name, r in res["rows"].items() if r["ratio"]},
                 overrides=overrides)


if __name__ == "__main__" and sys.argv[1:2] == ["build"]:
    build_store(int(sys.argv[2]))
elif __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    _serve(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))
