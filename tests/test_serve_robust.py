"""Bad input, overload and oversize messages: the right status codes, the server still
serving, nothing stored lost. Real server on port 0, real encoder, real SQLite and FAISS."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")  # the [server] extra
pytest.importorskip("grpc_health")
from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.codegen import stale_files  # noqa: E402
from medseek.serve.config import BatchConfig, ServeConfig  # noqa: E402
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

from test_serve_api import GatedTextEncoder, nifti_bytes, png_bytes  # noqa: E402

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def encoder():
    return LocalTorchEncoder(seed=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory, encoder):
    d = tmp_path_factory.mktemp("robust")
    cfg = ServeConfig(store_path=d / "store.db", index_dir=d / "index", port=0,
                      max_receive_message_bytes=1 * MIB, grace_s=2.0,
                      encode_batch=BatchConfig(max_batch=32, max_wait_ms=300.0, max_queue=2))
    with ServerThread(cfg, encoder) as s:
        with RetrievalClient(f"127.0.0.1:{s.port}", max_message_bytes=8 * MIB) as c:
            c.ingest([pb.IngestItem(id="keep-img", image=png_bytes("circle")),
                      pb.IngestItem(id="keep-txt", text="Right pleural effusion.")])
        yield s


@pytest.fixture
def client(server):
    with RetrievalClient(f"127.0.0.1:{server.port}", max_message_bytes=8 * MIB) as c:
        yield c


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def _still_serving_and_intact(client) -> None:
    assert client.search(pb.SearchRequest(image=png_bytes("circle"), k=1)).hits[0].id == "keep-img"
    assert {i.id for i in client.get(["keep-img", "keep-txt"]).items} == {"keep-img", "keep-txt"}
    assert {c.name: c.items for c in client.stats().collections} == {"image": 1, "report": 1}


def test_generated_code_is_up_to_date():
    assert stale_files() == []


@pytest.mark.parametrize("data, words", [
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "PNG"),
    (png_bytes("stripes")[:60], "items[0].image"),
    (b"\x00" * 128 + b"DICM" + b"\x02\x00garbage", "items[0].image"),
    (b"not an image at all", "unrecognised"),
])
def test_corrupt_or_truncated_image_is_invalid_argument(client, data, words):
    resp = client.ingest([pb.IngestItem(id="bad", image=data),
                          pb.IngestItem(id="after", text="Heart size normal.")], check=False)
    bad, after = resp.acks
    assert (bad.index, bad.id, bad.status) == (0, "bad", "failed")
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "items[0].image" in bad.error.message and words in bad.error.message
    assert (after.index, after.status, after.HasField("error")) == (1, "inserted", False)
    assert (resp.inserted, resp.failed) == (1, 1)
    assert client.delete(["after"]).deleted == ["after"]  # the module's store as it was
    code, details = _code(lambda: client.search(pb.SearchRequest(image=data)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("image")
    _still_serving_and_intact(client)


def test_bad_volumes_name_the_field(client):
    code, details = _code(lambda: client.search(pb.SearchRequest(volume=nifti_bytes(0, nan=True))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "volume" in details and "NaN" in details
    code, details = _code(lambda: client.search(pb.SearchRequest(volume=png_bytes("circle"))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("volume")
    _still_serving_and_intact(client)


@pytest.mark.parametrize("request_, field", [
    (pb.SearchRequest(), "query"),
    (pb.SearchRequest(text="x", k=5000), "k"),
    (pb.SearchRequest(text="x", mmr_lambda=1.5), "mmr_lambda"),
    (pb.SearchRequest(text="x", collection="nope"), "collection"),
    (pb.SearchRequest(text="x", region=pb.Region(name="centre")), "region.box"),
    (pb.SearchRequest(text="   "), "text"),
])
def test_bad_search_fields_are_named(client, request_, field):
    code, details = _code(lambda: client.search(request_))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field)


def test_unknown_ids_are_not_found(client):
    assert _code(lambda: client.get(["nobody"]))[0] == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: client.delete(["nobody"]))[0] == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: client.search(pb.SearchRequest(item_id="nobody")))[0] == \
        grpc.StatusCode.NOT_FOUND
    _still_serving_and_intact(client)


def test_oversize_message_is_resource_exhausted(client):
    big = png_bytes("circle") + b"\x00" * (2 * MIB)
    code, _ = _code(lambda: client.search(pb.SearchRequest(image=big)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    _still_serving_and_intact(client)


def test_full_queue_is_resource_exhausted_not_a_crash(tmp_path, encoder):
    # One query is held inside the encoder, so nothing drains the queue: of 7 more, the
    # 2 that fit max_queue=2 wait and are answered once the gate opens; 5 are refused.
    gated = GatedTextEncoder(encoder)
    # joint: report text goes through the gated encoder (hybrid would embed it in process)
    cfg = ServeConfig(store_path=tmp_path / "s.db", index_dir=tmp_path / "idx", port=0,
                      grace_s=2.0, report_ranker="joint",
                      encode_batch=BatchConfig(max_batch=32, max_wait_ms=0.0, max_queue=2))
    with ServerThread(cfg, gated) as s, RetrievalClient(f"127.0.0.1:{s.port}") as c, \
            cf.ThreadPoolExecutor(8) as pool:
        c.ingest([pb.IngestItem(id="t", text="Left pleural effusion.")])
        gated.gate.clear()
        try:
            held = pool.submit(c.search, pb.SearchRequest(text="effusion 0", k=1))
            assert gated.entered.wait(timeout=120), "the first query never reached the encoder"
            rest = [pool.submit(c.search, pb.SearchRequest(text=f"effusion {i}", k=1))
                    for i in range(1, 8)]
            refused = _first_finished(rest, 5)
        finally:
            gated.gate.set()  # also on a failure, or the pool would wait forever
        assert len(refused) == 5
        for fut in refused:
            with pytest.raises(grpc.RpcError) as err:
                fut.result()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in err.value.details()
        answered = [held] + [f for f in rest if f not in refused]
        assert [f.result().hits[0].id for f in answered] == ["t", "t", "t"]
        assert c.search(pb.SearchRequest(text="effusion", k=1)).hits[0].id == "t"


def _first_finished(futures, n: int) -> list:
    """The first ``n`` of ``futures`` to finish. Only refusals can finish while the gate is
    shut; the time-out only ends a broken bound (an unbounded queue refuses nothing)."""
    done = []
    for fut in cf.as_completed(futures, timeout=120):
        done.append(fut)
        if len(done) == n:
            break
    return done


def test_expired_deadline_is_deadline_exceeded(client):
    code, _ = _code(lambda: client.search(pb.SearchRequest(text="effusion"), timeout=0.05))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    _still_serving_and_intact(client)


def test_dicom_without_a_deid_key_is_refused(client):
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    code, details = _code(lambda: client.ingest([pb.IngestItem(id="dcm", image=data)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "de-identification" in details
    _still_serving_and_intact(client)


def test_graceful_shutdown_finishes_in_flight_requests(tmp_path, encoder):
    gated = GatedTextEncoder(encoder)
    cfg = ServeConfig(store_path=tmp_path / "s.db", index_dir=tmp_path / "idx", port=0,
                      grace_s=60.0, report_ranker="joint")  # report text through the gate
    s = ServerThread(cfg, gated)
    with RetrievalClient(f"127.0.0.1:{s.port}") as c, cf.ThreadPoolExecutor(2) as pool:
        try:
            c.ingest([pb.IngestItem(id="a", text="Left pleural effusion.")])
            gated.gate.clear()
            fut = pool.submit(c.search, pb.SearchRequest(text="effusion", k=1))
            assert gated.entered.wait(timeout=120), "the query never reached the encoder"
            stopping = pool.submit(s.stop)
            # while the query is held, the shutdown begins and new calls are refused: gRPC
            # answers UNAVAILABLE once the port is closed, CANCELLED for a call that
            # reached the server as it was shutting down
            codes = []
            while not codes or codes[-1] == grpc.StatusCode.OK:
                codes.append(_status_of_a_new_call(s.port))
            assert codes[-1] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), codes
            assert not fut.done()
        finally:
            gated.gate.set()  # also on a failure: the server's stop waits for the query
        assert fut.result().hits[0].id == "a"
        stopping.result()
    assert (tmp_path / "idx" / "report.npz").exists()  # indexes saved on the way out


def _status_of_a_new_call(port: int) -> grpc.StatusCode:
    """The status of a Stats call on a fresh channel (OK, or the code it failed with)."""
    with RetrievalClient(f"127.0.0.1:{port}") as probe:
        try:
            probe.stats(timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_encoder_backend_down_is_unavailable(tmp_path, encoder):
    """A real Triton client pointed at a port nobody listens on: image queries get
    UNAVAILABLE, text queries (another encoder) still work, the server keeps serving."""
    pytest.importorskip("tritonclient.grpc")
    import socket

    from medseek.encoders import EncoderSpec, TritonEncoder, TritonEncoderConfig
    from medseek.serve.routed import RoutedEncoder

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    spec = EncoderSpec(embed_dim=encoder.dim, modality="image", max_length=128,
                       image_size=(64, 64))
    triton = TritonEncoder(TritonEncoderConfig(url=f"127.0.0.1:{dead}", retries=1,
                                               backoff=0.05, max_backoff=0.05,
                                               client_timeout=5.0), spec)
    cfg = ServeConfig(store_path=tmp_path / "s.db", index_dir=tmp_path / "idx", port=0,
                      grace_s=1.0)
    with ServerThread(cfg, RoutedEncoder(images=triton, volumes=encoder, texts=encoder)) as s, \
            RetrievalClient(f"127.0.0.1:{s.port}") as c:
        c.ingest([pb.IngestItem(id="t", text="Left pleural effusion.")])
        code, details = _code(lambda: c.search(pb.SearchRequest(image=png_bytes("circle"))))
        assert code == grpc.StatusCode.UNAVAILABLE and "EncoderUnavailable" in details
        code, _ = _code(lambda: c.ingest([pb.IngestItem(id="i", image=png_bytes("circle"))]))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert c.search(pb.SearchRequest(text="effusion", k=1)).hits[0].id == "t"
        assert [x.items for x in c.stats().collections] == [1]
    triton.close()


def test_tls_serves_encrypted_and_refuses_plaintext(tmp_path, encoder):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not found")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    cfg = ServeConfig(store_path=tmp_path / "s.db", index_dir=tmp_path / "idx", port=0,
                      grace_s=1.0, tls_cert=cert, tls_key=key)
    with ServerThread(cfg, encoder) as s:
        with RetrievalClient(f"127.0.0.1:{s.port}", root_certificates=cert.read_bytes()) as c:
            c.ingest([pb.IngestItem(id="t", text="Left pleural effusion.")])
            assert c.search(pb.SearchRequest(text="effusion", k=1)).hits[0].id == "t"
        with RetrievalClient(f"127.0.0.1:{s.port}") as plain:
            code, _ = _code(lambda: plain.stats(timeout=3))
            assert code == grpc.StatusCode.UNAVAILABLE
