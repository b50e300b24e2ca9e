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
    uploads : str, optional
        Where image and volume searches (and diagnoses and drafts of an image or volume)
        go. ``"auto"`` (the default): ask the server once (``Stats.upload_port``) and send
        them to its upload workers if it has them (``medseek serve --upload-workers``),
        here if not; an address: there; None: always here. A call the upload address
        answers UNAVAILABLE is sent here instead.
    """

    def __init__(self, address: str, token: str | None = None,
                 root_certificates: bytes | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024, uploads: str | None = "auto") -> None:
        self._options = [("grpc.max_send_message_length", max_message_bytes),
                         ("grpc.max_receive_message_length", max_message_bytes)]
        self._roots = root_certificates
        self.address = address
        self.channel = self._open(address)
        self.stub = pb_grpc.RetrievalStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._uploads = uploads
        self._upload_channel: grpc.Channel | None = None
        self._upload_stub = None  # resolved on the first image or volume search

    def _open(self, address: str) -> grpc.Channel:
        if self._roots is not None:
            return grpc.secure_channel(address, grpc.ssl_channel_credentials(self._roots),
                                       options=self._options)
        return grpc.insecure_channel(address, options=self._options)

    def close(self) -> None:
        self.channel.close()
        if self._upload_channel is not None:
            self._upload_channel.close()

    def __enter__(self) -> RetrievalClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def upload_address(self) -> str | None:
        """Where image and volume searches go (``uploads``); None: this server's port."""
        if self._uploads != "auto":
            return self._uploads
        try:
            port = self.stats(timeout=10.0).upload_port
        except grpc.RpcError:  # an older server, or none: upload here
            return None
        host, sep, own_port = self.address.rpartition(":")
        return f"{host}:{port}" if port and sep and own_port.isdigit() else None

    def _upload_target(self):
        if self._upload_stub is None:
            target = self.upload_address()
            if target is None:
                self._upload_stub = self.stub
            else:
                self._upload_channel = self._open(target)
                self._upload_stub = pb_grpc.RetrievalStub(self._upload_channel)
        return self._upload_stub

    def search(self, request: pb.SearchRequest, timeout: float | None = 30.0) -> pb.SearchResponse:
        """One search. An image or volume search goes to the server's upload workers if it
        has them (``uploads``): its decoding is heavy whatever its size (an 8 kB PNG can
        hold 2048 x 2048 pixels). An upload over ``UPLOAD_CHUNK_BYTES`` goes by
        ``SearchUpload`` in chunks of that size (the proto says why). Same answer."""
        kind = request.WhichOneof("query")
        if kind not in ("image", "volume"):
            return self.stub.Search(request, timeout=timeout, metadata=self.metadata)

        def call(stub):
            if len(getattr(request, kind)) > UPLOAD_CHUNK_BYTES:
                return stub.SearchUpload(upload_chunks(request), timeout=timeout,
                                         metadata=self.metadata)
            return stub.Search(request, timeout=timeout, metadata=self.metadata)
        return self._routed(call)

    def _routed(self, call):
        """``call(stub)`` on the upload workers' stub (``uploads``), then on this server's
        if they answer UNAVAILABLE."""
        stub = self._upload_target()
        try:
            return call(stub)
        except grpc.RpcError as exc:
            if stub is self.stub or exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        return call(self.stub)

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
        """One diagnosis; an image or volume query goes where ``search`` sends it."""
        def call(stub):
            return stub.Diagnose(request, timeout=timeout, metadata=self.metadata)
        content = request.WhichOneof("query") in ("image", "volume")
        return self._routed(call) if content else call(self.stub)

    def draft(self, request: pb.DraftRequest, timeout: float | None = 60.0) -> pb.DraftResponse:
        """One report draft; an image query goes where ``search`` sends it."""
        def call(stub):
            return stub.Draft(request, timeout=timeout, metadata=self.metadata)
        return self._routed(call) if request.WhichOneof("query") == "image" else call(self.stub)

    def stats(self, timeout: float | None = 30.0) -> pb.StatsResponse:
        return self.stub.Stats(pb.StatsRequest(), timeout=timeout, metadata=self.metadata)
