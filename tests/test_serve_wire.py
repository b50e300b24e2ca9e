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
