"""``Item`` messages of store records (status codes of failures: ``serve.errors``)."""

from __future__ import annotations

import collections
import threading

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


class ItemMessages:
    """``item_message`` of records answered before, kept by record *identity*.

    The store reader's record cache hands back the same ``ItemRecord`` object for a row
    until the row is rewritten (``index/reader.py``), so a hit's ``Item`` message is built
    once per version of the row, not once per answer. An entry holds its record, so no
    other object can take that identity while the entry lives; a rewritten row comes back
    as a new object and gets its own entry. Thread-safe (the search threads share one).
    Callers copy the message (``Hit(item=...)``), never change it.

    Parameters
    ----------
    maxsize : int
        Messages kept; the least recently used go first.
    """

    def __init__(self, maxsize: int = 8192) -> None:
        self.maxsize = maxsize
        self._msgs: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._msgs)

    def get(self, record: ItemRecord) -> pb.Item:
        key = id(record)
        with self._lock:
            got = self._msgs.get(key)
            if got is not None and got[0] is record:
                self._msgs.move_to_end(key)
                return got[1]
        msg = item_message(record)
        with self._lock:
            self._msgs[key] = (record, msg)
            self._msgs.move_to_end(key)
            while len(self._msgs) > self.maxsize:
                self._msgs.popitem(last=False)
        return msg
