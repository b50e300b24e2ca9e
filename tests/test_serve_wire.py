"""``serve.wire``: large SearchRequests split without copying their upload, read exactly as
protobuf reads them; anything unusual falls back to protobuf's own parse."""

import numpy as np
import pytest

from medseek.serve.errors import Undecodable
from medseek.serve.v1 import retrieval_pb2 as pb
from medseek.serve.wire import LargeSearchRequest, search_deserializer, split_upload


def _fields(req):
    content = getattr(req, req.WhichOneof("query"))
    return (req.WhichOneof("query"), content if isinstance(content, str) else bytes(content),
            req.collection, req.k, list(req.filters.labels_any), req.region.name,
            req.region.box.x1, req.diversify, req.HasField("mmr_lambda"), req.request_id,
            req.reidentify)


def _random_request(rng) -> pb.SearchRequest:
    kind = ("image", "volume")[rng.integers(2)]
    req = pb.SearchRequest(**{kind: rng.bytes(int(rng.integers(0, 3000)))})
    if rng.random() < 0.5:
        req.collection = "image"
    if rng.random() < 0.5:
        req.k = int(rng.integers(1, 2**32 - 1))
    if rng.random() < 0.5:
        req.filters.labels_any.extend(["effusion", "x" * int(rng.integers(0, 300))])
    if rng.random() < 0.5:
        req.region.name = "distal_radius"
        req.region.box.x1 = float(rng.random())
    req.diversify = bool(rng.random() < 0.5)
    if rng.random() < 0.5:
        req.mmr_lambda = float(rng.random())
    req.request_id = "r" * int(rng.integers(0, 200))
    req.reidentify = bool(rng.random() < 0.3)
    return req


def test_split_requests_read_as_protobuf_reads_them():
    rng = np.random.default_rng(0)
    read = search_deserializer(pb.SearchRequest, large_bytes=0)
    for _ in range(300):
        req = _random_request(rng)
        data = req.SerializeToString()
        got = read(data)
        assert isinstance(got, LargeSearchRequest)
        assert isinstance(getattr(got, got.WhichOneof("query")), memoryview)
        assert _fields(got) == _fields(pb.SearchRequest.FromString(data))


def test_upload_is_a_view_of_the_message_not_a_copy():
    data = pb.SearchRequest(volume=b"\x01" * 4096, k=3).SerializeToString()
    rest, number, view = split_upload(data)
    assert number == 3 and view.obj is data and view.nbytes == 4096
    assert pb.SearchRequest.FromString(rest).k == 3


@pytest.mark.parametrize("data", [
    pb.SearchRequest(image=b"a" * 10).SerializeToString()
    + pb.SearchRequest(volume=b"b" * 10).SerializeToString(),  # two uploads: the last wins
    pb.SearchRequest(image=b"a" * 10).SerializeToString()
    + pb.SearchRequest(text="effusion").SerializeToString(),  # then text: text wins
    pb.SearchRequest(text="effusion", k=4).SerializeToString(),  # no upload at all
    pb.SearchRequest(image=b"a" * 10).SerializeToString() + b"\x0b",  # a group start tag
])
def test_unusual_messages_fall_back_to_protobuf(data):
    assert split_upload(data) is None
    got = search_deserializer(pb.SearchRequest, large_bytes=0)(data)
    if isinstance(got, Undecodable):
        with pytest.raises(Exception):
            pb.SearchRequest.FromString(data)
    else:
        assert _fields(got) == _fields(pb.SearchRequest.FromString(data))


@pytest.mark.parametrize("data", [
    pb.SearchRequest(volume=b"v" * 100).SerializeToString()[:-5],  # upload cut short
    b"\x1a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # an overlong length varint
    pb.SearchRequest(volume=b"v" * 100, k=2).SerializeToString() + b"\x32\x05ab",  # cut field
])
def test_truncated_messages_are_undecodable_as_protobuf_says(data):
    got = search_deserializer(pb.SearchRequest, large_bytes=0)(data)
    assert isinstance(got, Undecodable)
    with pytest.raises(Exception):
        pb.SearchRequest.FromString(data)


# -- SearchUpload through a real server ----------------------------------------------------

grpc = pytest.importorskip("grpc")  # the [server] extra


def _volume(seed: int, shape=(96, 96, 48)) -> bytes:
    """A NIfTI CT of ``shape`` float32 voxels (1.7 MiB at the default: over one chunk)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    arr = rng.normal(40, 80, size=shape).astype(np.float32)
    return nib.Nifti1Image(arr, affine=np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes()


@pytest.fixture(scope="module")
def upload_server(tmp_path_factory):
    from medseek.serve.client import RetrievalClient
    from medseek.serve.config import ServeConfig
    from medseek.serve.local_encoder import LocalTorchEncoder
    from medseek.serve.server import ServerThread

    d = tmp_path_factory.mktemp("upload")
    cfg = ServeConfig(store_path=d / "store.db", index_dir=d / "index", port=0, grace_s=2.0,
                      max_receive_message_bytes=8 * 2**20)
    with ServerThread(cfg, LocalTorchEncoder(seed=0)) as s:
        with RetrievalClient(f"127.0.0.1:{s.port}") as c:
            c.ingest([pb.IngestItem(id=f"vol-{i}", volume=_volume(i, (48, 48, 24)))
                      for i in range(6)])
        yield s


@pytest.fixture
def upload_client(upload_server):
    from medseek.serve.client import RetrievalClient

    with RetrievalClient(f"127.0.0.1:{upload_server.port}") as c:
        yield c


def test_an_upload_search_answers_as_the_unary_search_does(upload_client):
    from medseek.serve.client import UPLOAD_CHUNK_BYTES, upload_chunks

    req = pb.SearchRequest(volume=_volume(7), k=4, request_id="q-7")
    chunks = list(upload_chunks(req))
    assert len(req.volume) > UPLOAD_CHUNK_BYTES and len(chunks) == 3  # head + 2 chunks
    by_upload = upload_client.search(req, timeout=120)  # over one chunk: SearchUpload
    unary = upload_client.stub.Search(req, timeout=120)
    assert by_upload.request_id == "q-7" and len(by_upload.hits) == 4
    assert [(h.item.id, h.score) for h in by_upload.hits] == \
        [(h.item.id, h.score) for h in unary.hits]


def _head(total: int, kind: str = "volume", content: bytes = b""):
    return pb.UploadChunk(head=pb.UploadHead(request=pb.SearchRequest(**{kind: content}, k=2),
                                             total_bytes=total))


@pytest.mark.parametrize("chunks, code, message", [
    ([], "INVALID_ARGUMENT", "empty stream"),
    ([pb.UploadChunk(data=b"x")], "INVALID_ARGUMENT", "chunks[0]: the first message must be the head"),
    ([_head(1, "text", "effusion")], "INVALID_ARGUMENT", "not 'text'"),
    ([_head(3, content=b"abc")], "INVALID_ARGUMENT", "head.request.volume: must be empty"),
    ([_head(9 * 2**20)], "RESOURCE_EXHAUSTED", "max_receive_message_bytes=8388608"),
    ([_head(10), pb.UploadChunk(data=b"0123")], "INVALID_ARGUMENT", "4 bytes received, head.total_bytes says 10"),
    ([_head(3), pb.UploadChunk(data=b"0123")], "INVALID_ARGUMENT", "chunks[1]: the chunks exceed"),
    ([_head(3), _head(3)], "INVALID_ARGUMENT", "chunks[1]: only the first message is a head"),
    ([_head(5), pb.UploadChunk(data=b"notct")], "INVALID_ARGUMENT", "volume"),  # the decoder's
])
def test_bad_upload_streams_are_refused_naming_what_is_wrong(upload_client, chunks, code, message):
    with pytest.raises(grpc.RpcError) as err:
        upload_client.stub.SearchUpload(iter(chunks), timeout=60)
    assert err.value.code().name == code
    assert message in err.value.details()
    # the server goes on
    ok = upload_client.search(pb.SearchRequest(item_id="vol-1", k=2), timeout=60)
    assert ok.hits


def test_uploads_beyond_the_lanes_slots_wait_before_their_chunks_are_read():
    """``EncodeLane.uploads``: with one slot, a second upload's chunks are not read until
    the first upload is whole (its client is held by flow control meanwhile)."""
    import asyncio

    from medseek.serve.wire import read_upload

    log = []

    async def stream(name, gate=None):
        yield _head(4)
        for part in (b"ab", b"cd"):
            if gate is not None:
                await gate.wait()
            log.append((name, part))
            yield pb.UploadChunk(data=part)

    async def main():
        slots = {"volume": asyncio.Semaphore(1)}
        gate = asyncio.Event()
        first = asyncio.ensure_future(read_upload(stream("first", gate), 100, slots))
        second = asyncio.ensure_future(read_upload(stream("second"), 100, slots))
        for _ in range(20):  # let both run as far as they can
            await asyncio.sleep(0)
        assert log == []  # the first waits at its gate, the second for the slot
        gate.set()
        a, b = await first, await second
        assert getattr(a, "volume") == getattr(b, "volume") == b"abcd"
        assert [n for n, _ in log] == ["first", "first", "second", "second"]
        assert not slots["volume"].locked()  # given back

    asyncio.run(main())
