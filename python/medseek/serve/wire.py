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
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from .errors import Undecodable

#: messages this large or larger are split (smaller ones are parsed as they are)
LARGE_BYTES = 1 << 20
#: field number -> name of the SearchRequest query fields that carry uploads
_CONTENT_FIELDS = {2: "image", 3: "volume"}
_QUERY_FIELDS = (1, 2, 3, 4)  # the ``query`` oneof: text, image, volume, item_id


class LargeSearchRequest:
    """A ``SearchRequest`` whose upload is a ``memoryview``: ``WhichOneof("query")`` and
    the upload's field read from the view, everything else from the parsed rest."""

    __slots__ = ("_message", "_kind", "_content")

    def __init__(self, message, kind: str, content: memoryview) -> None:
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
