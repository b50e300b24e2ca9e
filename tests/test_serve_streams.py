"""Streams and per-item failures: a bad request of a SearchStream is answered with its own
error and the stream goes on; an undecodable message ends it with INVALID_ARGUMENT; a stream
is read at most ``stream_window`` requests ahead; Ingest acks every item; a server bug is
INTERNAL with an error id and a log line without PHI. Real server on port 0, real encoder,
real SQLite and FAISS; the encoder is only wrapped to hold or break it on cue."""

from __future__ import annotations

import io
import logging
import threading
import zipfile
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")  # the [server] extra
pytest.importorskip("grpc_health")
from medseek.io import DeidConfig  # noqa: E402
from medseek.serve.batcher import QueueFull  # noqa: E402
from medseek.serve.client import IngestFailed, RetrievalClient  # noqa: E402
from medseek.serve.config import BatchConfig, ServeConfig  # noqa: E402
from medseek.serve.errors import (NotFound, Undecodable, classify, lenient,  # noqa: E402
                                  status_of)
from medseek.serve.ingest import InvalidField  # noqa: E402
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

from test_serve_api import REPORTS, png_bytes  # noqa: E402

WINDOW = 4
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]
GARBAGE = b"\xff\xff\xff"  # a truncated varint tag: no protobuf message parses from it


class HeldOrBroken:
    """A real encoder that holds text and image batches at a closed gate (counting the
    inputs held) and, while ``image_bug`` is set, fails every image batch with a
    ``TypeError`` carrying that text (a stand-in for an encoder bug whose message holds
    request data)."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.held = 0  # texts waiting at the closed gate
        self.image_bug: str | None = None

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _hold(self, n: int) -> None:
        if not self.gate.is_set():
            self.held += n
            self.entered.set()
            self.gate.wait()
            self.held -= n

    def encode_texts(self, texts):
        self._hold(len(texts))
        return self._inner.encode_texts(texts)

    def encode_images(self, images):
        if self.image_bug is not None:
            raise TypeError(self.image_bug)
        self._hold(len(images))
        return self._inner.encode_images(images)


@pytest.fixture(scope="module")
def encoder():
    return HeldOrBroken(LocalTorchEncoder(seed=0))


@pytest.fixture(scope="module")
def server(tmp_path_factory, encoder):
    d = tmp_path_factory.mktemp("streams")
    # joint: report text goes through the served encoder (and its gate), not the hybrid ranker
    cfg = ServeConfig(store_path=d / "store.db", index_dir=d / "index", port=0, grace_s=2.0,
                      report_ranker="joint", stream_window=WINDOW, deid=DeidConfig.development(),
                      encode_batch=BatchConfig(max_batch=8, max_wait_ms=0.0))
    with ServerThread(cfg, encoder) as s:
        with RetrievalClient(f"127.0.0.1:{s.port}") as c:
            c.ingest([pb.IngestItem(id=i, text=t, labels=lab) for i, (t, lab, _) in
                      REPORTS.items()] + [pb.IngestItem(id="img-circle", image=png_bytes("circle"))])
        yield s


@pytest.fixture
def client(server):
    with RetrievalClient(f"127.0.0.1:{server.port}") as c:
        yield c


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def _in_flight(server) -> float:
    return server.server.metrics.registry.get_sample_value("medseek_stream_in_flight")


# -- SearchStream ------------------------------------------------------------------------
@pytest.mark.parametrize("bad, code, words", [
    (pb.SearchRequest(text="effusion", k=5000), grpc.StatusCode.INVALID_ARGUMENT, "k: must be"),
    (pb.SearchRequest(image=b"not an image"), grpc.StatusCode.INVALID_ARGUMENT, "image"),
    (pb.SearchRequest(item_id="nobody"), grpc.StatusCode.NOT_FOUND, "item_id"),
])
def test_a_bad_request_of_a_stream_gets_its_own_error_and_the_stream_goes_on(
        client, server, bad, code, words):
    bad.request_id = "bad"
    reqs = [pb.SearchRequest(text="pleural effusion with atelectasis", k=1, request_id="g1"),
            bad, pb.SearchRequest(text="enlarged heart", k=1, request_id="g2")]
    out = {r.request_id: r for r in client.search_stream(reqs, timeout=120)}
    assert sorted(out) == ["bad", "g1", "g2"]
    assert (out["bad"].error.code, list(out["bad"].hits)) == (code.value[0], [])
    assert out["bad"].error.message.startswith(words) and out["bad"].error.error_id == ""
    assert out["g1"].hits[0].id == "r-effusion" and out["g2"].hits[0].id == "r-cardio"
    assert not out["g1"].HasField("error") and not out["g2"].HasField("error")
    assert _in_flight(server) == 0


def test_an_undecodable_message_ends_the_stream_with_invalid_argument(channel):
    call = channel.stream_stream("/medseek.v1.Retrieval/SearchStream")  # raw bytes both ways
    first = pb.SearchRequest(text="enlarged heart", k=1, request_id="first")
    after = pb.SearchRequest(text="pleural effusion", k=1, request_id="after")
    answers = []
    with pytest.raises(grpc.RpcError) as err:
        for raw in call(iter([first.SerializeToString(), GARBAGE, after.SerializeToString()]),
                        timeout=120):  # a hang fails as DEADLINE_EXCEEDED
            answers.append(pb.SearchResponse.FromString(raw))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith("requests[1]: not a valid medseek.v1.SearchRequest")
    # the request before it is answered; nothing after it is read
    assert [(a.request_id, a.hits[0].id) for a in answers] == [("first", "r-cardio")]


def test_undecodable_unary_requests_are_invalid_argument(channel):
    for method in ("Search", "Get", "Delete", "Diagnose", "Stats"):
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(f"/medseek.v1.Retrieval/{method}")(GARBAGE, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value)
        assert err.value.details().startswith("request: not a valid medseek.v1.")


def _noise_png(seed: int, size: int = 1024) -> bytes:
    """A PNG of about ``size**2`` bytes (noise does not compress)."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
                    ).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("large", [False, True], ids=["small-text", "1MiB-images"])
def test_a_stream_is_read_at_most_stream_window_requests_ahead(server, client, encoder, large):
    """With the encoder held, the server reads WINDOW requests of 5 * WINDOW and no more;
    once released, every one is answered. Small requests all fit gRPC's transport window,
    so the client hands over every one while the server reads only WINDOW; 1 MiB ones
    do not, and the client is held back by flow control."""
    n = 5 * WINDOW
    sent = threading.Event()
    images = [_noise_png(i) for i in range(n)] if large else None

    def requests():
        for i in range(n):
            if large:
                yield pb.SearchRequest(image=images[i], k=1, request_id=f"w{i}")
            else:
                yield pb.SearchRequest(text=f"pleural effusion {i}", k=1, request_id=f"w{i}")
        sent.set()  # gRPC has taken the last one

    service = server.server.service
    encoder.entered.clear()
    encoder.gate.clear()
    try:
        answers = client.search_stream(requests(), timeout=300)
        assert encoder.entered.wait(timeout=120), "no request reached the encoder"
        if not large:
            assert sent.wait(timeout=120), "the client could not hand over its requests"
        while encoder.held + service.encode_batcher.depth < WINDOW:
            assert _in_flight(server) <= WINDOW
            threading.Event().wait(0.01)
        client.stats()  # a round trip on the same connection, after those requests
        # the held requests are in the encoder or its queue, nothing beyond the window
        assert _in_flight(server) == WINDOW
        assert encoder.held + service.encode_batcher.depth == WINDOW
    finally:
        encoder.gate.set()  # also on a failure: the server would wait for it
    got = {a.request_id: a for a in answers}
    assert sorted(got) == sorted(f"w{i}" for i in range(n))
    assert all(a.hits and not a.HasField("error") for a in got.values())
    assert _in_flight(server) == 0 and sent.is_set()


# -- Ingest --------------------------------------------------------------------------------
def test_ingest_stores_and_acks_the_good_items_and_reports_the_bad_one(client):
    items = [pb.IngestItem(id="ing-a", text="Small right pleural effusion."),
             pb.IngestItem(id="ing-b", image=png_bytes("stripes")[:60]),  # truncated PNG
             pb.IngestItem(id="ing-c", text="Mild cardiomegaly.")]
    resp = client.ingest(items, check=False)
    assert [(a.index, a.id, a.status) for a in resp.acks] == [
        (0, "ing-a", "inserted"), (1, "ing-b", "failed"), (2, "ing-c", "inserted")]
    bad = resp.acks[1].error
    assert bad.code == INVALID and bad.message.startswith("items[1].image")
    assert not resp.acks[0].HasField("error") and not resp.acks[2].HasField("error")
    assert (resp.inserted, resp.failed) == (2, 1)
    assert {i.id for i in client.get(["ing-a", "ing-c"]).items} == {"ing-a", "ing-c"}
    with pytest.raises(grpc.RpcError) as err:
        client.get(["ing-b"])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # the client raises on a failed item, with the whole response (ingest is idempotent)
    with pytest.raises(IngestFailed) as failed:
        client.ingest(items)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.value.details().startswith("items[1].image")
    assert [a.status for a in failed.value.response.acks] == ["updated", "failed", "updated"]
    assert [a.index for a in failed.value.failures] == [1]
    client.delete(["ing-a", "ing-c"])


def test_a_bad_item_among_many_batches_loses_no_ack(client):
    """Items commit in batches (of 8 here): the bad one in the second batch fails alone, and
    the first batch, committed before it was read, is acked all the same."""
    items = [pb.IngestItem(id=f"many-{i}", text=f"Left pleural effusion, case {i}.")
             for i in range(11)]
    items[9] = pb.IngestItem(id="many-9", text="   ")  # empty text
    resp = client.ingest(items, check=False)
    assert [a.index for a in resp.acks] == list(range(11))
    assert [a.status for a in resp.acks] == ["inserted"] * 9 + ["failed", "inserted"]
    assert resp.acks[9].error.message.startswith("items[9].text")
    stored = [f"many-{i}" for i in range(11) if i != 9]
    assert {i.id for i in client.get(stored).items} == set(stored)
    client.delete(stored)


def test_an_undecodable_ingest_item_is_acked_as_failed_and_the_rest_stored(channel, client):
    call = channel.stream_unary("/medseek.v1.Retrieval/Ingest")
    raw = call(iter([pb.IngestItem(id="raw-a", text="Right apical pneumothorax.").SerializeToString(),
                     GARBAGE,
                     pb.IngestItem(id="raw-c", text="No acute findings.").SerializeToString()]),
               timeout=120)
    resp = pb.IngestResponse.FromString(raw)
    assert [(a.index, a.id, a.status) for a in resp.acks] == [
        (0, "raw-a", "inserted"), (1, "", "failed"), (2, "raw-c", "inserted")]
    assert resp.acks[1].error.code == INVALID
    assert resp.acks[1].error.message.startswith("items[1]: not a valid medseek.v1.IngestItem")
    client.delete(["raw-a", "raw-c"])


# -- errors ------------------------------------------------------------------------------
def test_an_encoder_bug_is_internal_with_an_error_id_and_logs_no_phi(client, encoder, caplog):
    secret = "PSEUDO-4711-SECRET"
    caplog.set_level(logging.ERROR, logger="medseek.serve.errors")
    encoder.image_bug = f"cannot encode the pixels of {secret}"
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.search(pb.SearchRequest(image=png_bytes("gradient"), k=1))
        resp = client.ingest([pb.IngestItem(id="phi-item-4711", image=png_bytes("checker"),
                                            patient_pseudonym=secret),
                              pb.IngestItem(id="fine-4711", text="Left pleural effusion.")],
                             check=False)
        streamed = {r.request_id: r for r in client.search_stream(
            [pb.SearchRequest(image=png_bytes("stripes"), k=1, request_id="img"),
             pb.SearchRequest(text="enlarged heart", k=1, request_id="txt")], timeout=120)}
    finally:
        encoder.image_bug = None
    assert err.value.code() == grpc.StatusCode.INTERNAL
    details = err.value.details()
    assert "internal error (id " in details and secret not in details
    bug, fine = resp.acks
    assert (bug.status, bug.error.code, fine.status) == ("failed", INTERNAL, "inserted")
    assert bug.error.error_id and bug.error.error_id in bug.error.message
    assert streamed["img"].error.code == INTERNAL and streamed["txt"].hits[0].id == "r-cardio"
    ids = [details.split("(id ")[1].split(")")[0], bug.error.error_id,
           streamed["img"].error.error_id]
    logged = [r for r in caplog.records if r.name == "medseek.serve.errors"]
    for error_id in ids:  # each failure logged once, under its id, with its traceback
        (line,) = [r.getMessage() for r in logged if error_id in r.getMessage()]
        assert "unexpected TypeError" in line and "encode_images" in line
    text = caplog.text
    assert secret not in text and "4711" not in text and "phi-item" not in text
    assert client.search(pb.SearchRequest(image=png_bytes("circle"), k=1)).hits[0].id == \
        "img-circle"  # still serving
    client.delete(["fine-4711"])


def _zip_with_a_corrupt_member() -> bytes:
    from pydicom.data import get_testdata_file

    dcm = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("series/slice-1.dcm", dcm)
    data = bytearray(buf.getvalue())
    start = 30 + len("series/slice-1.dcm")  # the member's deflate stream
    for i in range(start + 10, start + 200, 7):
        data[i] ^= 0xFF
    return bytes(data)


def test_a_corrupt_zip_member_is_invalid_argument(client):
    data = _zip_with_a_corrupt_member()
    with pytest.raises(grpc.RpcError) as err:
        client.search(pb.SearchRequest(volume=data, k=1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith("volume") and "corrupt" in err.value.details()
    resp = client.ingest([pb.IngestItem(id="zip-1", volume=data)], check=False)
    assert (resp.acks[0].status, resp.acks[0].error.code) == ("failed", INVALID)
    assert resp.acks[0].error.message.startswith("items[0].volume")


@pytest.mark.parametrize("exc, code", [
    (InvalidField("k", "must be in [1, 1000]"), grpc.StatusCode.INVALID_ARGUMENT),
    (Undecodable("medseek.v1.SearchRequest", 3).error("request"),
     grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound("ids: no stored items"), grpc.StatusCode.NOT_FOUND),
    (QueueFull("encode queue is full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ConnectionError("refused"), grpc.StatusCode.UNAVAILABLE),
    (TypeError("P-123"), grpc.StatusCode.INTERNAL),
    (KeyError("P-123"), grpc.StatusCode.INTERNAL),
    (AttributeError("P-123"), grpc.StatusCode.INTERNAL),
    (ValueError("P-123"), grpc.StatusCode.INTERNAL),  # not named as a client fault: ours
])
def test_client_faults_keep_their_message_and_bugs_are_internal(exc, code):
    got, message = status_of(exc, (ConnectionError,), "Search")
    assert got == code
    if code == grpc.StatusCode.INTERNAL:
        assert "P-123" not in message and classify(exc).error_id
    elif code != grpc.StatusCode.UNAVAILABLE:
        assert message == str(exc)


def test_lenient_deserializer_hands_over_undecodable_bytes():
    decode = lenient(pb.SearchRequest)
    assert decode(pb.SearchRequest(text="x").SerializeToString()).text == "x"
    bad = decode(GARBAGE)
    assert isinstance(bad, Undecodable) and bad.size == 3
    assert str(bad.error("requests[2]")).startswith(
        "requests[2]: not a valid medseek.v1.SearchRequest message")


def test_cli_ingest_reports_each_failed_item_and_stores_the_rest(server, client, tmp_path,
                                                                 capsys):
    from medseek.serve.commands import main

    folder = tmp_path / "archive"
    folder.mkdir()
    (folder / "a-good.png").write_bytes(png_bytes("gradient"))
    (folder / "b-bad.png").write_bytes(b"not a png at all")
    (folder / "c-good.txt").write_text("Right pleural effusion, small.")
    assert main(["ingest", str(folder), "--server", f"127.0.0.1:{server.port}",
                 "--batch-size", "2"]) == 1
    out, err = capsys.readouterr()
    assert "2 inserted, 0 updated, 0 duplicates, 1 failed" in out
    assert "failed: item 1 'b-bad.png': INVALID_ARGUMENT: items[1].image" in err
    assert {i.id for i in client.get(["a-good.png", "c-good.txt"]).items} == \
        {"a-good.png", "c-good.txt"}
    client.delete(["a-good.png", "c-good.txt"])
