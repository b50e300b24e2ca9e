"""``--workers N``: several real server processes on one port over one SQLite store, each
catching its own FAISS index up from the store. Writes acknowledged by one worker are
found by searches that land on the other; a worker that dies is restarted."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")  # the [server] extra
from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.config import BatchConfig, ServeConfig  # noqa: E402
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402
from medseek.serve.workers import WorkerPool  # noqa: E402

TEXTS = ["left pleural effusion", "right pneumothorax", "no acute disease",
         "cardiomegaly with pulmonary edema", "fracture of the distal radius"]


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def search_from_fresh_channels(port: int, n_channels: int, text: str) -> list[list[str]]:
    """One search per new channel: each channel is a new connection, which the kernel
    gives to either worker."""
    out = []
    for _ in range(n_channels):
        with RetrievalClient(f"127.0.0.1:{port}") as c:
            out.append([h.id for h in c.search(pb.SearchRequest(text=text, k=5)).hits])
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("workers")
    cfg = ServeConfig(store_path=tmp_path / "store.db", index_dir=tmp_path / "index", port=0,
                      grace_s=1.0, workers=2, encode_batch=BatchConfig(max_wait_ms=5.0))
    with WorkerPool(cfg, functools.partial(LocalTorchEncoder, seed=0)) as p:
        yield p


def test_a_write_on_one_worker_is_found_by_searches_on_every_worker(pool):
    assert len(set(pool.pids())) == 2 and pool.port > 0
    before = {pid: cpu_ticks(pid) for pid in pool.pids()}
    with RetrievalClient(f"127.0.0.1:{pool.port}") as c:  # one connection: one worker
        assert c.ingest([pb.IngestItem(id=f"r{i}", text=t)
                         for i, t in enumerate(TEXTS)]).inserted == 5
    found = search_from_fresh_channels(pool.port, 40, "cardiomegaly with pulmonary edema")
    # every search, whichever worker took it, sees the five acknowledged reports
    assert all(len(ids) == 5 and ids[0] == "r3" for ids in found)
    used = {pid: cpu_ticks(pid) - t for pid, t in before.items()}
    assert all(ticks > 0 for ticks in used.values()), f"a worker served nothing: {used}"
    # a delete on one worker is gone from the other's answers too
    with RetrievalClient(f"127.0.0.1:{pool.port}") as c:
        assert list(c.delete(["r3"]).deleted) == ["r3"]
    found = search_from_fresh_channels(pool.port, 20, "cardiomegaly with pulmonary edema")
    assert all("r3" not in ids and len(ids) == 4 for ids in found)


def test_a_worker_that_dies_is_restarted(pool):
    with RetrievalClient(f"127.0.0.1:{pool.port}") as c:
        c.delete([h.id for h in c.search(pb.SearchRequest(text=TEXTS[0], k=10)).hits])
        c.ingest([pb.IngestItem(id="r0", text=TEXTS[0])])
    stop = threading.Event()
    watcher = threading.Thread(target=pool.watch, args=(stop.is_set, 0.1), daemon=True)
    watcher.start()
    try:
        victim = pool.pids()[1]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while victim in pool.pids() or len(pool.pids()) != 2:
            assert time.monotonic() < deadline, "the dead worker was not restarted"
            time.sleep(0.2)
        found = search_from_fresh_channels(pool.port, 10, TEXTS[0])
        assert all(ids == ["r0"] for ids in found)
    finally:
        stop.set()
        watcher.join(30)


def test_workers_must_be_a_positive_int(tmp_path):
    with pytest.raises(ValueError, match="workers must be an int >= 1, got 0"):
        ServeConfig(store_path=tmp_path / "s.db", index_dir=tmp_path / "i", workers=0)
    with pytest.raises(ValueError, match="workers >= 2"):
        WorkerPool(ServeConfig(store_path=tmp_path / "s.db", index_dir=tmp_path / "i"),
                   LocalTorchEncoder)


def test_medseek_serve_workers_from_the_command_line(tmp_path):
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from medseek.cli import main; sys.exit(main())",
         "serve", "--store", str(tmp_path / "s.db"), "--index-dir", str(tmp_path / "idx"),
         "--port", "0", "--port-file", str(port_file), "--workers", "2", "--index", "hnsw"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not port_file.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "medseek serve --workers 2 did not start"
            time.sleep(0.2)
        port = int(port_file.read_text())
        with RetrievalClient(f"127.0.0.1:{port}") as c:
            c.ingest([pb.IngestItem(id=f"r{i}", text=t) for i, t in enumerate(TEXTS)])
        assert all(ids[0] == "r1" for ids in
                   search_from_fresh_channels(port, 10, "right pneumothorax"))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "2 workers serving" in out or "medseek serving on" in out
