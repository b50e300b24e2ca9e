"""A small synchronous client of ``medseek.v1.Retrieval`` (CLI, tests, demo)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import grpc

from .v1 import retrieval_pb2 as pb
from .v1 import retrieval_pb2_grpc as pb_grpc

#: chunk size of a ``SearchUpload``, and the upload size over which ``search`` uses one
UPLOAD_CHUNK_BYTES = 1 << 20


def upload_chunks(request: pb.SearchRequest,
                  chunk_bytes: int = UPLOAD_CHUNK_BYTES) -> Iterator[pb.UploadChunk]:
    """The ``SearchUpload`` messages of an image or volume search: the head, then the
    upload in ``chunk_bytes`` pieces."""
    kind = request.WhichOneof("query")
    if kind not in ("image", "volume"):
        raise ValueError(f"an upload search is an image or a volume search, not {kind!r}")
    content = memoryview(getattr(request, kind))
    head = pb.SearchRequest()
    head.CopyFrom(request)
    setattr(head, kind, b"")
    yield pb.UploadChunk(head=pb.UploadHead(request=head, total_bytes=content.nbytes))
    for i in range(0, content.nbytes, chunk_bytes):
        yield pb.UploadChunk(data=content[i:i + chunk_bytes].tobytes())


class IngestFailed(grpc.RpcError):
    """Items of an ``Ingest`` call failed; the others were committed.

    ``code()`` and ``details()`` are those of the first failed item (as a failed call's
    are), ``failures`` lists every failed ack (index, id, error), ``response`` is the
    whole ``IngestResponse`` with the acks of the committed items.
    """

    def __init__(self, response: pb.IngestResponse) -> None:
        self.response = response
        self.failures = [a for a in response.acks if a.HasField("error")]
        first = self.failures[0].error
        more = len(self.failures) - 1
        self._code = status_code(first.code)
        self._details = first.message + (f" (and {more} more failed items)" if more else "")
        super().__init__(self._details)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def status_code(number: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a status number (``medseek.v1.Error.code``)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def describe_failure(ack: pb.IngestAck) -> str:
    """``INVALID_ARGUMENT: items[3].image: ...`` of an ack with an error; an item stored
    without some of its chunks or regions says so: ``(inserted, in part) INTERNAL: ...``."""
    part = f"({ack.status}, in part) " if ack.status != "failed" else ""
    return f"{part}{status_code(ack.error.code).name}: {ack.error.message}"


class RetrievalClient:
    """``RetrievalClient("127.0.0.1:50051", token=...)``; methods mirror the RPCs.

    Parameters
    ----------
    address : str
    token : str, optional
        Bearer token sent with every call.
    root_certificates : bytes, optional
        PEM roots: connect over TLS.
    max_message_bytes : int
        Largest message sent or received.
    """

    def __init__(self, address: str, token: str | None = None,
                 root_certificates: bytes | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024) -> None:
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates)
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.RetrievalStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RetrievalClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def search(self, request: pb.SearchRequest, timeout: float | None = 30.0) -> pb.SearchResponse:
        """One search. An image or volume over ``UPLOAD_CHUNK_BYTES`` goes by
        ``SearchUpload`` in chunks of that size (the proto says why); same answer."""
        kind = request.WhichOneof("query")
        if kind in ("image", "volume") and len(getattr(request, kind)) > UPLOAD_CHUNK_BYTES:
            return self.stub.SearchUpload(upload_chunks(request), timeout=timeout,
                                          metadata=self.metadata)
        return self.stub.Search(request, timeout=timeout, metadata=self.metadata)

    def search_stream(self, requests: Iterable[pb.SearchRequest],
                      timeout: float | None = None) -> Iterator[pb.SearchResponse]:
        """Responses as they are done, each with its request's ``request_id``; a request
        that failed is answered with ``error`` set (and no hits)."""
        return self.stub.SearchStream(iter(requests), timeout=timeout, metadata=self.metadata)

    def ingest(self, items: Iterable[pb.IngestItem], timeout: float | None = 300.0,
               check: bool = True) -> pb.IngestResponse:
        """Stream ``items`` in; the response acks each one (``acks[i].index``).

        With ``check`` an item that failed (an ack with ``error``) raises
        :class:`IngestFailed`, which carries the response; without it the response is
        returned as it is, failed items included (``failed`` counts them)."""
        resp = self.stub.Ingest(iter(items), timeout=timeout, metadata=self.metadata)
        if check and any(a.HasField("error") for a in resp.acks):
            raise IngestFailed(resp)
        return resp

    def delete(self, ids: list[str], timeout: float | None = 30.0) -> pb.DeleteResponse:
        return self.stub.Delete(pb.DeleteRequest(ids=ids), timeout=timeout,
                                metadata=self.metadata)

    def get(self, ids: list[str], with_embedding: bool = False,
            timeout: float | None = 30.0) -> pb.GetResponse:
        return self.stub.Get(pb.GetRequest(ids=ids, with_embedding=with_embedding),
                             timeout=timeout, metadata=self.metadata)

    def diagnose(self, request: pb.DiagnoseRequest, timeout: float | None = 30.0
                 ) -> pb.DiagnoseResponse:
        return self.stub.Diagnose(request, timeout=timeout, metadata=self.metadata)

    def draft(self, request: pb.DraftRequest, timeout: float | None = 60.0) -> pb.DraftResponse:
        return self.stub.Draft(request, timeout=timeout, metadata=self.metadata)

    def stats(self, timeout: float | None = 30.0) -> pb.StatsResponse:
        return self.stub.Stats(pb.StatsRequest(), timeout=timeout, metadata=self.metadata)
