"""``Item`` messages of store records (status codes of failures: ``serve.errors``)."""

from __future__ import annotations

import numpy as np

from medseek.index import ItemRecord

from .auto_regions import is_automatic
from .errors import FailedPrecondition, NotFound, status_of  # noqa: F401 - moved to errors
from .v1 import retrieval_pb2 as pb


def item_message(record: ItemRecord, embedding: np.ndarray | None = None) -> pb.Item:
    msg = pb.Item(id=record.id, collection=record.collection, modality=record.modality or "",
                  body_part=record.body_part or "", view=record.view or "",
                  labels=list(record.labels), patient_pseudonym=record.patient_pseudonym or "",
                  study_pseudonym=record.study_pseudonym or "",
                  source_document=record.source_document or "",
                  parent_id=record.parent_id or "", region=record.region or "",
                  content_sha256=record.content_sha256 or "",
                  automatic=is_automatic(record))
    if record.box is not None:
        msg.box.CopyFrom(pb.Box(x0=record.box[0], y0=record.box[1], x1=record.box[2],
                                y1=record.box[3]))
    if record.z_range is not None:
        msg.z_range.CopyFrom(pb.ZRange(z_start=record.z_range[0], z_end=record.z_range[1]))
    if embedding is not None:
        msg.embedding.extend(embedding.tolist())
    return msg
