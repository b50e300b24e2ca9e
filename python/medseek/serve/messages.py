"""Status codes of failures, and ``Item`` messages of store records."""

from __future__ import annotations

import grpc
import numpy as np

from medseek.index import ItemRecord

from .batcher import QueueFull
from .ingest import InvalidField
from .v1 import retrieval_pb2 as pb


class NotFound(LookupError):
    """An id the store does not hold."""


class FailedPrecondition(RuntimeError):
    """The request is well formed but the stored data cannot answer it (e.g. a diagnosis
    over a collection that holds no items, or no labels)."""


def status_of(exc: BaseException, unavailable: tuple) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, InvalidField):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, FailedPrecondition):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, unavailable):
        return grpc.StatusCode.UNAVAILABLE, f"encoder backend unavailable ({type(exc).__name__})"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"


def item_message(record: ItemRecord, embedding: np.ndarray | None = None) -> pb.Item:
    msg = pb.Item(id=record.id, collection=record.collection, modality=record.modality or "",
                  body_part=record.body_part or "", view=record.view or "",
                  labels=list(record.labels), patient_pseudonym=record.patient_pseudonym or "",
                  study_pseudonym=record.study_pseudonym or "",
                  source_document=record.source_document or "",
                  parent_id=record.parent_id or "", region=record.region or "",
                  content_sha256=record.content_sha256 or "")
    if record.box is not None:
        msg.box.CopyFrom(pb.Box(x0=record.box[0], y0=record.box[1], x1=record.box[2],
                                y1=record.box[3]))
    if record.z_range is not None:
        msg.z_range.CopyFrom(pb.ZRange(z_start=record.z_range[0], z_end=record.z_range[1]))
    if embedding is not None:
        msg.embedding.extend(embedding.tolist())
    return msg
