"""From a failure to a gRPC status: one map, shared by every handler of the servicer.

Client faults keep their message, which names the request field at fault:

- INVALID_ARGUMENT: bad content or a bad field (``InvalidField``, a search's
  ``InvalidQuery``, ``MedicalImageError``), a
  message that does not parse (``Undecodable``), corrupt compressed content (``decoding``);
- NOT_FOUND: an id the store does not hold (``NotFound``);
- RESOURCE_EXHAUSTED: a full queue or a request over a budget (``QueueFull``,
  ``OverBudget``, ``LimitExceededError``);
- FAILED_PRECONDITION: well formed, but the stored data cannot answer (``FailedPrecondition``);
- PERMISSION_DENIED: the caller's token lacks the role asked for (``PermissionDenied``);
- UNAVAILABLE: the encoder's backend is down (the servicer's ``unavailable_errors``).

Anything else is a bug of the server: our own ``TypeError``, ``KeyError`` or
``AttributeError``, an encoder's own failure. It is INTERNAL with a generic message and an
error id; the log line under that id gives the exception's type and traceback frames
only, never its message, arguments or locals, which may hold item ids, pseudonyms or
request content.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import lzma
import traceback
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import grpc
from google.protobuf.message import DecodeError

from medseek.io import LimitExceededError, MedicalImageError
from medseek.search.query import InvalidQuery

from .batcher import QueueFull
from .ingest import InvalidField
from .v1 import retrieval_pb2 as pb

log = logging.getLogger(__name__)

#: what decompressing corrupt uploaded content raises (zip members, gzip'd NIfTI) past the
#: readers' own checks; raised while decoding a request's content it is that content's fault
CORRUPT_CONTENT_ERRORS = (zlib.error, zipfile.BadZipFile, gzip.BadGzipFile, lzma.LZMAError,
                          EOFError)


class NotFound(LookupError):
    """An id the store does not hold."""


class FailedPrecondition(RuntimeError):
    """The request is well formed but the stored data cannot answer it (e.g. a diagnosis
    over a collection that holds no items, or no labels)."""


class PermissionDenied(RuntimeError):
    """An authenticated caller asks for what its token's role does not allow (e.g.
    re-identification without a ``reident_tokens`` token)."""


class OverBudget(RuntimeError):
    """A request asks for more than a configured budget allows (RESOURCE_EXHAUSTED)."""


class Failure(NamedTuple):
    """A failure as the client sees it."""

    code: grpc.StatusCode
    message: str
    error_id: str = ""

    def proto(self) -> pb.Error:
        """The per-response ``medseek.v1.Error`` (SearchStream responses, Ingest acks)."""
        return pb.Error(code=self.code.value[0], message=self.message, error_id=self.error_id)


class Undecodable:
    """What a lenient deserializer (:func:`lenient`) hands a handler for bytes that do not
    parse as its message type, so the handler answers INVALID_ARGUMENT itself instead of
    gRPC answering UNKNOWN."""

    __slots__ = ("type_name", "size")

    def __init__(self, type_name: str, size: int) -> None:
        self.type_name, self.size = type_name, size

    def error(self, field: str) -> InvalidField:
        return InvalidField(field, f"not a valid {self.type_name} message ({self.size} bytes "
                                   f"that do not parse as protobuf)")


def lenient(message_type):
    """A request deserializer for ``message_type`` that returns :class:`Undecodable` for
    bytes that do not parse (gRPC itself would end the call with UNKNOWN)."""
    name = message_type.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Undecodable(name, len(data))

    return deserialize


def decoded(request, field: str = "request"):
    """``request``, or raise the INVALID_ARGUMENT of a message that did not parse."""
    if isinstance(request, Undecodable):
        raise request.error(field)
    return request


@contextlib.contextmanager
def decoding(field: str) -> Iterator[None]:
    """Around the decoding of a request's content: corrupt compressed data is that field's
    fault (INVALID_ARGUMENT), not a server error."""
    try:
        yield
    except CORRUPT_CONTENT_ERRORS as exc:
        raise InvalidField(field, f"corrupt compressed data ({type(exc).__name__})") from None


def classify(exc: BaseException, unavailable: tuple = (), where: str = "request") -> Failure:
    """The status of ``exc`` (module docstring); an INTERNAL one is logged under its id.

    Parameters
    ----------
    exc : the failure
    unavailable : tuple of exception types
        Errors that mean the encoder's backend is down (UNAVAILABLE).
    where : str
        What failed, for the log line: an RPC name, never request data.
    """
    if isinstance(exc, (InvalidField, InvalidQuery)):
        return Failure(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, NotFound):
        return Failure(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, FailedPrecondition):
        return Failure(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, PermissionDenied):
        return Failure(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    if isinstance(exc, (QueueFull, OverBudget, LimitExceededError)):
        return Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, MedicalImageError):
        return Failure(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, DecodeError):  # a request stream that raised instead of (lenient)
        return Failure(grpc.StatusCode.INVALID_ARGUMENT,
                       f"{where}: a message does not parse as protobuf")
    if unavailable and isinstance(exc, unavailable):
        return Failure(grpc.StatusCode.UNAVAILABLE,
                       f"encoder backend unavailable ({type(exc).__name__})")
    error_id = uuid.uuid4().hex[:12]
    # type and frames only: the message or the locals may hold ids, pseudonyms or content
    log.error("%s: internal error %s: unexpected %s at\n%s", where, error_id,
              type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__)).rstrip())
    return Failure(grpc.StatusCode.INTERNAL,
                   f"internal error (id {error_id}); the server has logged it", error_id)


def status_of(exc: BaseException, unavailable: tuple = (),
              where: str = "request") -> tuple[grpc.StatusCode, str]:
    """``(code, message)`` of :func:`classify`."""
    failure = classify(exc, unavailable, where)
    return failure.code, failure.message
