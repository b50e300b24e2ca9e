"""Encode lanes (issue 13): text, image and volume work each have their own decode threads,
encoder worker and bounded queue, so heavy work held in the encoder neither delays a light
text query nor, once its lane is full, gets it refused. A real gRPC server, a real
in-process encoder whose image and volume towers wait at a gate (nothing races a clock)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading

import pytest

grpc = pytest.importorskip("grpc")  # the [server] extra

from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.config import (BatchConfig, EncodeLane, EncodeLanes, ServeConfig,  # noqa: E402
                                  config_from_dict)
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

from test_serve_api import nifti_bytes, png_bytes  # noqa: E402

CALL_TIMEOUT = 60.0  # generous: a text query must finish, however slow the machine


class GatedHeavyEncoder:
    """A real encoder whose image and volume towers wait at a gate while it is closed."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a heavy batch waits at the closed gate

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _wait(self) -> None:
        if not self.gate.is_set():
            self.entered.set()
            self.gate.wait()

    def encode_images(self, images):
        self._wait()
        return self._inner.encode_images(images)

    def encode_volumes(self, volumes):
        self._wait()
        return self._inner.encode_volumes(volumes)

    def encode_volume_chunks(self, volumes):
        self._wait()
        return self._inner.encode_volume_chunks(volumes)


@pytest.fixture(scope="module")
def gated():
    return GatedHeavyEncoder(LocalTorchEncoder(seed=0))


@pytest.fixture(scope="module")
def server(tmp_path_factory, gated):
    d = tmp_path_factory.mktemp("lanes")
    cfg = ServeConfig(store_path=d / "store.db", index_dir=d / "index", port=0, grace_s=2.0,
                      encode_batch=BatchConfig(max_wait_ms=0.0),
                      encode_lanes=EncodeLanes(image=EncodeLane(max_queue=1),
                                               volume=EncodeLane(max_queue=1)))
    with ServerThread(cfg, gated) as s:
        with RetrievalClient(f"127.0.0.1:{s.port}") as c:
            c.ingest([pb.IngestItem(id="r-1", text="Large left pleural effusion."),
                      pb.IngestItem(id="img-1", image=png_bytes("circle")),
                      pb.IngestItem(id="vol-1", volume=nifti_bytes(1))])
        yield s


@pytest.fixture
def client(server):
    with RetrievalClient(f"127.0.0.1:{server.port}") as c:
        yield c


def _wait_until(cond, what: str) -> None:
    """Poll ``cond`` (state the test itself set up, not a timing race)."""
    for _ in range(12000):
        if cond():
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"never: {what}")


def _text_search(client):
    return client.search(pb.SearchRequest(text="pleural effusion", k=1), timeout=CALL_TIMEOUT)


@pytest.mark.parametrize("heavy", ["volume", "image"])
def test_text_search_completes_while_heavy_lane_is_held(server, client, gated, heavy):
    content = ({"volume": nifti_bytes(2)} if heavy == "volume"
               else {"image": png_bytes("stripes")})
    lane = server.server.service.encoding.lanes[heavy]
    with cf.ThreadPoolExecutor(2) as pool:
        gated.entered.clear()
        gated.gate.clear()
        try:
            held = pool.submit(client.search, pb.SearchRequest(k=1, **content),
                               timeout=CALL_TIMEOUT * 4)
            assert gated.entered.wait(timeout=120), f"the {heavy} query never reached the encoder"
            assert _text_search(client).hits[0].id == "r-1"  # not behind the held batch
            assert not held.done()
        finally:
            gated.gate.set()  # also on a failure, or the pool would wait forever
        assert held.result().hits
    assert lane.depth == 0


def test_full_volume_lane_is_resource_exhausted_and_text_still_works(server, client, gated):
    lanes = server.server.service.encoding.lanes
    with cf.ThreadPoolExecutor(2) as pool:
        gated.entered.clear()
        gated.gate.clear()
        try:
            held = pool.submit(client.search, pb.SearchRequest(volume=nifti_bytes(3), k=1),
                               timeout=CALL_TIMEOUT * 4)
            assert gated.entered.wait(timeout=120), "the volume query never reached the encoder"
            queued = pool.submit(client.search, pb.SearchRequest(volume=nifti_bytes(4), k=1),
                                 timeout=CALL_TIMEOUT * 4)
            _wait_until(lambda: lanes["volume"].depth == 1 or queued.done(),
                        "the second volume query waits in the volume lane")
            assert not queued.done(), queued.exception()
            with pytest.raises(grpc.RpcError) as err:  # the lane's queue (1) is full
                client.search(pb.SearchRequest(volume=nifti_bytes(5), k=1),
                              timeout=CALL_TIMEOUT)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "volume lane" in err.value.details()
            # the other lanes neither wait nor refuse
            assert _text_search(client).hits[0].id == "r-1"
            assert lanes["text"].depth == 0
        finally:
            gated.gate.set()
        assert held.result().hits and queued.result().hits
    assert client.search(pb.SearchRequest(volume=nifti_bytes(5), k=1),
                         timeout=CALL_TIMEOUT).hits


def test_lanes_are_configured_from_a_table(tmp_path):
    cfg = config_from_dict({"store_path": "s.db", "index_dir": "i",
                            "encode_lanes": {"volume": {"workers": 2, "max_queue": 4}}},
                           tmp_path)
    assert cfg.encode_lanes.volume == EncodeLane(workers=2, max_queue=4)
    assert cfg.encode_lanes.text == EncodeLane()
    with pytest.raises(ValueError, match="workers must be >= 1"):
        EncodeLanes(text={"workers": 0})


def test_lane_byte_budget_counts_uploads_until_decoded():
    """``EncodeLane.max_queued_bytes``: uploads waiting to be decoded count by their size;
    one over the budget is refused naming it, an empty lane takes any one upload, and the
    bytes are given back once decoded (also when decoding fails)."""
    import asyncio

    from medseek.serve.batcher import QueueFull
    from medseek.serve.encoding import Lane

    release = threading.Event()

    def slow(x):
        release.wait(60)
        if x == "bad":
            raise ValueError("corrupt")
        return x

    async def main():
        lane = Lane("volume", EncodeLane(decode_threads=1, max_queued_bytes=100),
                    BatchConfig(), lambda kind, rows: rows, lambda *a: None)
        try:
            first = asyncio.ensure_future(lane.decode(slow, "a", nbytes=150))  # empty: taken
            await asyncio.sleep(0)
            assert lane.queued_bytes == 150
            with pytest.raises(QueueFull, match="max_queued_bytes=100"):
                await lane.decode(slow, "b", nbytes=1)
            release.set()
            assert await first == "a"
            assert lane.queued_bytes == 0
            release.clear()
            second = asyncio.ensure_future(lane.decode(slow, "bad", nbytes=60))
            third = asyncio.ensure_future(lane.decode(slow, "c", nbytes=40))  # 100: fits
            await asyncio.sleep(0)
            assert lane.queued_bytes == 100
            with pytest.raises(QueueFull, match="volume lane holds 100 upload bytes"):
                await lane.decode(slow, "d", nbytes=1)
            release.set()
            with pytest.raises(ValueError, match="corrupt"):
                await second
            assert await third == "c"
            assert lane.queued_bytes == 0 and lane.depth == 0
        finally:
            release.set()
            await lane.close()

    asyncio.run(main())


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_lane_threads_run_at_its_nice_and_on_its_cpus():
    """``EncodeLane.nice`` and ``cpus`` hold for the lane's decode and encoder threads (and
    nothing else: the calling thread keeps its CPUs); CPUs this process may not use are
    dropped, and a list of none of them leaves the process's."""
    import asyncio

    from medseek.serve.encoding import Lane

    mine = os.sched_getaffinity(0)
    first = min(mine)

    def placement(_=None):
        tid = threading.get_native_id()
        return os.getpriority(os.PRIO_PROCESS, tid), os.sched_getaffinity(0)

    async def main(spec):
        lane = Lane("image", spec, BatchConfig(), lambda kind, rows: [placement() for _ in rows],
                    lambda *a: None)
        lane.batcher.start()
        try:
            return await lane.decode(placement), await lane.encode("image", None)
        finally:
            await lane.close()

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    decoded, encoded = asyncio.run(main(EncodeLane(nice=5, cpus=(first, 10_000))))
    want = (min(base + 5, 19), {first})
    assert decoded == want and encoded == want
    assert os.sched_getaffinity(0) == mine
    decoded, _ = asyncio.run(main(EncodeLane(cpus=(10_000,))))
    assert decoded[1] == mine
    with pytest.raises(ValueError, match="cpus must be"):
        EncodeLane(cpus=())
