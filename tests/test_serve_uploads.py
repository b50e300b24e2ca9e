"""``medseek serve --upload-workers N``: heavy uploads go to worker processes of their own
(a second port, lower priority) so they hold neither the event loop nor the GIL of the
process answering light queries. A real ``medseek serve`` subprocess: Stats advertises the
port, ``RetrievalClient`` sends large uploads there and gets the answer the main port
gives, writes made through the main port are found there, the workers run at the
configured priority, and a killed one is restarted while uploads fall back to the main
port."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")  # the [server] extra
from PIL import Image  # noqa: E402

from medseek.serve.client import UPLOAD_CHUNK_BYTES, RetrievalClient  # noqa: E402
from medseek.serve.config import ServeConfig  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402
from medseek.serve.v1 import retrieval_pb2_grpc as pb_grpc  # noqa: E402


def noise_png(seed: int, side: int = 1100) -> bytes:
    """A grey PNG of noise: incompressible, so over the 1 MiB upload threshold."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def spawned_children(pid: int) -> list[int]:
    """The multiprocessing children of ``pid`` (the upload workers)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == pid and b"spawn_main" in cmd:
            out.append(int(entry.name))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uploads")
    port_file = tmp / "port"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from medseek.cli import main; sys.exit(main())",
         "serve", "--store", str(tmp / "s.db"), "--index-dir", str(tmp / "idx"),
         "--port", "0", "--port-file", str(port_file), "--upload-workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not port_file.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "medseek serve --upload-workers 1 did not start"
            time.sleep(0.2)
        yield proc, int(port_file.read_text())
    finally:
        children = spawned_children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "uploads: 1 process(es) on port" in out
        # no upload worker outlives the server
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{c}").exists() and b"spawn_main" in
                  Path(f"/proc/{c}/cmdline").read_bytes() for c in children):
            assert time.monotonic() < deadline, "an upload worker outlived medseek serve"
            time.sleep(0.2)


def test_stats_advertises_the_upload_port_and_the_client_uses_it(server):
    proc, port = server
    with RetrievalClient(f"127.0.0.1:{port}") as c:
        upload_port = c.stats().upload_port
        assert upload_port not in (0, port)
        assert c.upload_address() == f"127.0.0.1:{upload_port}"
        # the upload workers advertise none: they are the place uploads go
        with RetrievalClient(f"127.0.0.1:{upload_port}") as u:
            assert u.stats().upload_port == 0
    workers = spawned_children(proc.pid)
    assert len(workers) == 1
    # 19 steps below the server's priority, capped at 19 (the runner may itself be niced)
    assert os.getpriority(os.PRIO_PROCESS, workers[0]) == min(
        19, os.getpriority(os.PRIO_PROCESS, proc.pid) + 19)


def test_uploads_answered_by_the_workers_equal_the_main_ports_answers(server):
    _, port = server
    images = [noise_png(i) for i in range(3)]
    assert all(len(b) > UPLOAD_CHUNK_BYTES for b in images)
    with RetrievalClient(f"127.0.0.1:{port}") as main:  # written through the main port
        main.ingest([pb.IngestItem(id=f"img-{i}", image=b) for i, b in enumerate(images)])
        upload_port = main.stats().upload_port
        routed = main.search(pb.SearchRequest(image=images[1], k=3))
        assert main._upload_stub is not main.stub  # it went to the upload port
    with RetrievalClient(f"127.0.0.1:{port}", uploads=None) as here:
        direct = here.search(pb.SearchRequest(image=images[1], k=3))
    assert [h.id for h in routed.hits] == [h.id for h in direct.hits]
    assert routed.hits[0].id == "img-1"  # the worker caught up with the main port's write
    np.testing.assert_allclose([h.score for h in routed.hits], [h.score for h in direct.hits],
                               atol=1e-5)
    # the worker serves the whole API on its port (a plain Search too)
    with grpc.insecure_channel(f"127.0.0.1:{upload_port}") as ch:
        hits = pb_grpc.RetrievalStub(ch).Search(pb.SearchRequest(item_id="img-2", k=2)).hits
        assert hits and hits[0].id != "img-2"


def test_image_diagnoses_go_to_the_upload_workers_with_the_same_answer(server):
    _, port = server
    images = [noise_png(20 + i, side=300) for i in range(4)]  # under 1 MiB: unary calls
    with RetrievalClient(f"127.0.0.1:{port}") as c:
        c.ingest([pb.IngestItem(id=f"dx-{i}", image=b, labels=["fracture"] if i % 2 else [])
                  for i, b in enumerate(images)])
        routed = c.diagnose(pb.DiagnoseRequest(image=images[1], k=3))
        assert c._upload_stub is not c.stub
    with RetrievalClient(f"127.0.0.1:{port}", uploads=None) as here:
        direct = here.diagnose(pb.DiagnoseRequest(image=images[1], k=3))
    assert [n.id for n in routed.neighbours] == [n.id for n in direct.neighbours]
    assert routed.neighbours[0].id == "dx-1" and routed.probabilities
    assert [(p.label, round(p.probability, 5)) for p in routed.probabilities] == [
        (p.label, round(p.probability, 5)) for p in direct.probabilities]


def test_a_killed_upload_worker_is_restarted_and_uploads_are_answered_meanwhile(server):
    proc, port = server
    image = noise_png(7)
    with RetrievalClient(f"127.0.0.1:{port}") as c:
        c.ingest([pb.IngestItem(id="img-7", image=image)])
        upload_port = c.stats().upload_port
        victim = spawned_children(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{victim}/cmdline").exists() and \
                Path(f"/proc/{victim}/cmdline").read_bytes():  # empty once a zombie
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # the port is closed until the restart: the client falls back to the main port
        assert c.search(pb.SearchRequest(image=image, k=1)).hits[0].id == "img-7"
    deadline = time.monotonic() + 240
    while True:
        workers = [w for w in spawned_children(proc.pid) if w != victim]
        if workers:
            try:
                with RetrievalClient(f"127.0.0.1:{upload_port}") as u:
                    u.stats(timeout=5)
                break
            except grpc.RpcError:
                pass
        assert time.monotonic() < deadline, "the killed upload worker was not restarted"
        time.sleep(0.5)
    with RetrievalClient(f"127.0.0.1:{upload_port}", uploads=None) as u:
        assert u.search(pb.SearchRequest(image=image, k=1)).hits[0].id == "img-7"


def test_a_client_whose_upload_address_is_down_uploads_to_the_main_port(server):
    _, port = server
    image = noise_png(11)
    with RetrievalClient(f"127.0.0.1:{port}", uploads="127.0.0.1:1") as c:
        c.ingest([pb.IngestItem(id="img-11", image=image)])
        assert c.upload_address() == "127.0.0.1:1"
        assert c.search(pb.SearchRequest(image=image, k=1)).hits[0].id == "img-11"


@pytest.mark.parametrize("field,value", [("upload_workers", -1), ("upload_workers", True),
                                         ("upload_nice", 20), ("upload_port", 70000)])
def test_upload_settings_are_checked(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field} must be an int in"):
        ServeConfig(store_path=tmp_path / "s.db", index_dir=tmp_path / "i", **{field: value})
