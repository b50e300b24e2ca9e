"""Large ``SearchRequest`` messages read without copying their upload on the event loop.

A search by a 21 MB CT used to be copied twice on the event loop while it held the GIL:
once when protobuf parsed the message, and once more when the handler read the
``volume`` field (every read of a bytes field builds a new ``bytes``). Each copy stalls
every other request for milliseconds, and under a mix of heavy and light clients the
light ones queued behind them. :func:`search_deserializer` hands the handler a
:class:`LargeSearchRequest` instead for a message of ``LARGE_BYTES`` or more: the
wire format's top-level fields are walked (no copy), the upload (``image`` / ``volume``)
is kept as a ``memoryview`` of gRPC's buffer, and only the small remaining fields are
parsed. The content is copied once, later, on the decode thread of its lane.

Anything unusual (a group, a repeated or second query field, a field that does not
parse) falls back to protobuf's own parse, so the answer is the same as before.

That still leaves gRPC's own copy of a large message, made while it holds the GIL (about
30 ms of stalled event loop per 21 MB message here: ``benchmarks/grpc_large_messages.py``).
The ``SearchUpload`` RPC avoids most of it: the upload comes in chunks
(:func:`read_upload` puts them together; ``RetrievalClient.search`` sends uploads over
``client.UPLOAD_CHUNK_BYTES`` that way).
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from .errors import OverBudget, Undecodable, decoded
from .ingest import InvalidField

#: messages this large or larger are split (smaller ones are parsed as they are)
LARGE_BYTES = 1 << 20
#: field number -> name of the SearchRequest query fields that carry uploads
_CONTENT_FIELDS = {2: "image", 3: "volume"}
_QUERY_FIELDS = (1, 2, 3, 4)  # the ``query`` oneof: text, image, volume, item_id


class LargeSearchRequest:
    """A ``SearchRequest`` whose upload is held apart (a ``memoryview`` of the message, or
    the bytes of a ``SearchUpload``): ``WhichOneof("query")`` and the upload's field read
    from it, everything else from the parsed rest."""

    __slots__ = ("_message", "_kind", "_content")

    def __init__(self, message, kind: str, content: memoryview | bytes) -> None:
        self._message, self._kind, self._content = message, kind, content

    def WhichOneof(self, name: str):  # noqa: N802 - protobuf's name
        return self._kind if name == "query" else self._message.WhichOneof(name)

    def __getattr__(self, name: str):
        if name == self._kind:
            return self._content
        return getattr(self._message, name)


def _varint(data: memoryview, i: int) -> tuple[int, int]:
    """The varint at ``data[i]`` and the index after it; ValueError past the end or over
    10 bytes."""
    value = shift = 0
    for j in range(i, min(i + 10, len(data))):
        b = data[j]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, j + 1
        shift += 7
    raise ValueError("truncated or overlong varint")


def split_upload(data: bytes) -> tuple[bytes, int, memoryview] | None:
    """``(the other fields' bytes, the upload's field number, a view of the upload)`` of
    a serialized SearchRequest, or None when it is not one plain upload among plain
    fields (then parse it whole)."""
    view = memoryview(data)
    rest, upload, i, n = [], None, 0, len(view)
    try:
        while i < n:
            start = i
            tag, i = _varint(view, i)
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                _, i = _varint(view, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                length, i = _varint(view, i)
                if number in _CONTENT_FIELDS:
                    if upload is not None:
                        return None
                    upload = (number, i, i + length)
                    i += length
                    continue
                i += length
            else:  # groups (3, 4) or an invalid wire type
                return None
            if i > n:
                return None
            if number in _QUERY_FIELDS:
                return None  # a second query field: protobuf's last-one-wins rule decides
            rest.append(view[start:i])
    except ValueError:
        return None
    if upload is None or upload[2] > n:
        return None
    number, a, b = upload
    return b"".join(rest), number, view[a:b]


def search_deserializer(message_type, large_bytes: int = LARGE_BYTES):
    """A lenient deserializer of ``SearchRequest`` (``errors.lenient``'s contract: bytes
    that do not parse become :class:`Undecodable`) that splits large uploads out
    without copying them (module doc)."""
    name = message_type.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        try:
            if len(data) >= large_bytes:
                split = split_upload(data)
                if split is not None:
                    rest, number, content = split
                    return LargeSearchRequest(message_type.FromString(rest),
                                              _CONTENT_FIELDS[number], content)
            return message_type.FromString(data)
        except DecodeError:
            return Undecodable(name, len(data))

    return deserialize


async def read_upload(chunks, max_bytes: int, slots: dict | None = None) -> LargeSearchRequest:
    """The search of a ``SearchUpload`` stream: its head's request with the chunks' bytes
    as its upload. Refused naming what is wrong: no head first, a head that is not an
    image or volume search or already carries its upload, a second head, a size over
    ``max_bytes`` (RESOURCE_EXHAUSTED, before any chunk is read) or chunks that do not
    add up to the head's size. ``slots``: upload kind -> semaphore; the chunks are read
    holding one (``EncodeLane.uploads``), so few uploads are copied on the event loop at
    once and the others wait in gRPC's flow control."""
    it = aiter(chunks)
    first = await anext(it, None)
    if first is None:
        raise InvalidField("chunks", "empty stream: the first message must be the head")
    first = decoded(first, "chunks[0]")
    if first.WhichOneof("part") != "head":
        raise InvalidField("chunks[0]", "the first message must be the head")
    request, total = first.head.request, first.head.total_bytes
    kind = request.WhichOneof("query")
    if kind not in _CONTENT_FIELDS.values():
        raise InvalidField("head.request", f"an upload search is an image or a volume search "
                                           f"(that field set to empty bytes), not {kind!r}")
    if getattr(request, kind):
        raise InvalidField(f"head.request.{kind}", "must be empty: the upload comes in chunks")
    if total > max_bytes:
        raise OverBudget(f"head.total_bytes: {total} exceeds the server's receive limit "
                         f"max_receive_message_bytes={max_bytes}")
    slot = (slots or {}).get(kind)
    if slot is None:
        return await _read_chunks(it, request, kind, total)
    async with slot:
        return await _read_chunks(it, request, kind, total)


async def _read_chunks(it, request, kind: str, total: int) -> LargeSearchRequest:
    parts, n, i = [], 0, 0
    async for chunk in it:
        i += 1
        chunk = decoded(chunk, f"chunks[{i}]")
        if chunk.WhichOneof("part") != "data":
            raise InvalidField(f"chunks[{i}]", "only the first message is a head")
        data = chunk.data  # each read of a bytes field is a copy: read it once
        n += len(data)
        if n > total:
            raise InvalidField(f"chunks[{i}]", f"the chunks exceed head.total_bytes={total}")
        parts.append(data)
    if n != total:
        raise InvalidField("chunks", f"{n} bytes received, head.total_bytes says {total}")
    return LargeSearchRequest(request, kind, b"".join(parts))
