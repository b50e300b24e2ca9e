"""SIGKILL during a bulk ingest: after a restart every acknowledged item is present and
the index agrees with the store. The server runs as a real subprocess (``python -m
medseek.serve serve``) killed with SIGKILL while an Ingest call is in flight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")  # the [server] extra
pytest.importorskip("grpc_health")
from medseek.index import Catalog, CatalogConfig, Store, StoreConfig  # noqa: E402
from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.config import ServeConfig  # noqa: E402
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

FINDINGS = ("effusion", "cardiomegaly", "pneumothorax", "atelectasis", "nodule", "edema")


def report(i: int) -> str:
    return f"Case {i}: {FINDINGS[i % 6]} of grade {i % 7} in zone {i % 11}, follow-up {i}."


def _wait_for_port(path, proc, timeout=120.0) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists():
            return int(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        time.sleep(0.1)
    raise TimeoutError("server did not start")


@pytest.mark.slow
def test_sigkill_during_bulk_ingest_loses_no_acknowledged_item(tmp_path):
    store_path, index_dir, port_file = tmp_path / "s.db", tmp_path / "idx", tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "medseek.serve", "serve", "--store", str(store_path),
         "--index-dir", str(index_dir), "--port", "0", "--port-file", str(port_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    acked: list[str] = []
    failure: list[BaseException] = []
    try:
        port = _wait_for_port(port_file, proc)

        def bulk():
            with RetrievalClient(f"127.0.0.1:{port}") as c:
                for b in range(10_000):
                    items = [pb.IngestItem(id=f"r{b * 4 + j}", text=report(b * 4 + j))
                             for j in range(4)]
                    try:
                        resp = c.ingest(items, timeout=60)
                    except grpc.RpcError as exc:
                        failure.append(exc)
                        return
                    acked.extend(a.id for a in resp.acks)

        writer = threading.Thread(target=bulk)
        writer.start()
        t0 = time.monotonic()
        while len(acked) < 40 and time.monotonic() - t0 < 120 and writer.is_alive():
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        writer.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 40 and failure and failure[0].code() == grpc.StatusCode.UNAVAILABLE

    with Store(StoreConfig(store_path)) as store:  # the truth after the crash
        got = store.get(acked, with_embeddings=True)
        assert sorted(got) == sorted(acked)
        assert all(s.embedding is not None for s in got.values())
        catalog = Catalog(store, CatalogConfig(index_dir))
        catalog.open()
        indexed = np.sort(catalog.index("report").ids())
        assert np.array_equal(indexed, store.filter_row_keys("report"))

    cfg = ServeConfig(store_path=store_path, index_dir=index_dir, port=0, grace_s=1.0)
    with ServerThread(cfg, LocalTorchEncoder()) as s, \
            RetrievalClient(f"127.0.0.1:{s.port}") as c:
        assert {i.id for i in c.get(acked).items} == set(acked)
        stats = {x.name: x for x in c.stats().collections}["report"]
        assert stats.indexed == stats.items >= len(acked)
        probe = acked[len(acked) // 2]
        hit = c.search(pb.SearchRequest(text=report(int(probe[1:])), k=1)).hits[0]
        assert hit.id == probe
