"""Records the SQLite store reads and writes, and its configuration."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Collections a store accepts by default: whole radiographs, whole volumes, z-chunks of
#: volumes, region crops (e.g. a bone of a wrist radiograph), and report text.
COLLECTIONS = ("image", "volume", "chunk", "region", "report")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class StoreConfig:
    """Where the store lives and how it treats writes.

    Attributes
    ----------
    path : Path
        The SQLite file (WAL mode adds ``-wal`` and ``-shm`` files beside it).
    model : str
        Tag of the embedding model/version whose vectors this store writes and reads; a
        store may hold vectors of several models (e.g. during a re-embedding migration).
    collections : tuple of str
        Accepted collection names.
    dedup_collections : frozenset of str
        Collections where a record whose ``content_sha256`` equals that of a *different*
        live item is not written (reported as a duplicate). Chunks and regions are left
        out by default: two volumes can share identical blank chunks, and each chunk must
        stay attached to its own parent.
    busy_timeout_s : float
        How long a writer waits for another process's write lock.
    """

    path: Path
    model: str = "default"
    collections: tuple[str, ...] = COLLECTIONS
    dedup_collections: frozenset[str] = frozenset({"image", "volume", "report"})
    busy_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if not self.model:
            raise ValueError("model must be a non-empty tag, got ''")
        unknown = set(self.dedup_collections) - set(self.collections)
        if unknown:
            raise ValueError(f"dedup_collections names unknown collections {sorted(unknown)}")


@dataclass(frozen=True)
class ItemRecord:
    """One retrievable thing: an image, a volume, a chunk, a region or a report.

    Attributes
    ----------
    id : str
        The client's id; upserts are keyed on it.
    collection : str
        One of ``StoreConfig.collections``; each collection has its own ANN index.
    modality, body_part, view : str, optional
        Filterable metadata (e.g. "CR", "chest", "PA").
    labels : tuple of str
        Finding labels (stored as a JSON list; filter with ``labels_any``).
    patient_pseudonym, study_pseudonym : str, optional
        Pseudonymised identifiers, used only for exclusion filters; never logged.
    source_document : str, optional
        Provenance (e.g. the report or publication a figure came from), for diversity caps.
    parent_id : str, optional
        For chunks and regions: the id of the item they were cut from (must exist).
    region : str, optional
        Region name (e.g. "distal_radius").
    z_range : (int, int), optional
        Chunks and organs of a volume: slices ``[z0, z1)`` (``z1`` exclusive, so
        ``z0 < z1``; the serving side's one convention, ``medseek.search.query``).
    box : (float, float, float, float), optional
        Region box ``(x0, y0, x1, y1)`` in pixels.
    content_sha256 : str, optional
        Hex SHA-256 of the source content, for deduplication.
    """

    id: str
    collection: str
    modality: str | None = None
    body_part: str | None = None
    view: str | None = None
    labels: tuple[str, ...] = ()
    # kept out of repr() so that logging a record never writes a patient identifier
    patient_pseudonym: str | None = field(default=None, repr=False)
    study_pseudonym: str | None = field(default=None, repr=False)
    source_document: str | None = None
    parent_id: str | None = None
    region: str | None = None
    z_range: tuple[int, int] | None = None
    box: tuple[float, float, float, float] | None = None
    content_sha256: str | None = None
    # the item's report, kept for Draft (medseek.serve.draft_service); a table of its own
    # (report_texts), never in ITEM_FIELDS, and out of repr() like the pseudonyms
    report_text: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id or len(self.id) > 512:
            raise ValueError(f"id must be a non-empty str of <= 512 chars, got {self.id!r}")
        if not isinstance(self.collection, str) or not self.collection:
            raise ValueError(f"collection must be a non-empty str, got {self.collection!r}")
        for name in ("modality", "body_part", "view", "patient_pseudonym",
                     "study_pseudonym", "source_document", "parent_id", "region"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
        labels = self.labels
        if isinstance(labels, str) or not isinstance(labels, (list, tuple)) or not all(
                isinstance(v, str) for v in labels):
            raise TypeError(f"labels must be a list or tuple of str, got {labels!r}")
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.z_range is not None:
            z = tuple(self.z_range)
            ints = all(isinstance(v, (int, np.integer)) for v in z)
            if len(z) != 2 or not ints or not 0 <= z[0] < z[1]:
                raise ValueError(f"z_range must be half-open (z0, z1) ints with 0 <= z0 < z1, "
                                 f"got {self.z_range!r}")
            object.__setattr__(self, "z_range", (int(z[0]), int(z[1])))
        if self.box is not None:
            ok = isinstance(self.box, (list, tuple)) and all(
                isinstance(v, (int, float, np.integer, np.floating)) for v in self.box)
            b = tuple(float(v) for v in self.box) if ok else ()
            if len(b) != 4 or not all(math.isfinite(v) for v in b) or b[0] > b[2] or b[1] > b[3]:
                raise ValueError(
                    f"box must be finite (x0, y0, x1, y1), x0 <= x1, y0 <= y1, got {self.box!r}")
            object.__setattr__(self, "box", b)
        if self.content_sha256 is not None and not _SHA256.fullmatch(self.content_sha256):
            raise ValueError(
                f"content_sha256 must be 64 lowercase hex digits, got {self.content_sha256!r}"
            )
        if self.report_text is not None and (not isinstance(self.report_text, str)
                                             or not self.report_text.strip()):
            raise ValueError("report_text must be a non-empty str or None")


@dataclass(frozen=True)
class StoredItem:
    """An item as the store holds it.

    Attributes
    ----------
    record : ItemRecord
    row_key : int
        Stable int64 key, the item's id in the ANN index; never reused.
    seq : int
        Sequence number of the last write to this item.
    created_at, updated_at : float
        Unix seconds.
    embedding : np.ndarray, float32, shape (dim,), optional
        Present when asked for.
    """

    record: ItemRecord
    row_key: int
    seq: int
    created_at: float
    updated_at: float
    embedding: np.ndarray | None = field(default=None, compare=False)


@dataclass(frozen=True)
class UpsertResult:
    """What happened to one record of an ``upsert`` batch.

    ``status`` is "inserted", "updated" or "duplicate" (not written: its content hash
    matches the live item ``duplicate_of`` in a dedup collection; ``row_key`` is then that
    item's key).
    """

    id: str
    status: str
    row_key: int
    duplicate_of: str | None = None


#: The ``items`` columns that hold an ``ItemRecord``, in the order of ``row_values`` and
#: ``record_from_row``: the one definition every column list and placeholder count of the
#: store's SQL derives from (``medseek.index.sql``).
ITEM_FIELDS: tuple[str, ...] = (
    "item_id", "collection", "modality", "body_part", "view", "labels", "patient_pseudonym",
    "study_pseudonym", "source_document", "parent_id", "region", "z_start", "z_end", "box",
    "content_sha256")
#: ``ITEM_FIELDS`` as a SQL column list.
ITEM_COLUMNS = ", ".join(ITEM_FIELDS)
#: The ``items`` columns the store maintains itself, read after ``ITEM_FIELDS`` into the
#: ``StoredItem`` fields of the same names.
STORED_FIELDS: tuple[str, ...] = ("row_key", "seq", "created_at", "updated_at")


def check_upsert_batch(items: Sequence[ItemRecord], embeddings: np.ndarray,
                       collections: Sequence[str]) -> None:
    """Refuse an upsert batch that is not n distinct, printable ids of known collections
    with one finite, L2-normalised (n, dim) embedding row each (``ValueError``/``TypeError``
    naming the item)."""
    from .base import check_vectors

    if isinstance(items, ItemRecord) or not all(isinstance(r, ItemRecord) for r in items):
        raise TypeError("items must be a sequence of ItemRecord")
    if not isinstance(embeddings, np.ndarray) or embeddings.ndim != 2:
        shape = getattr(embeddings, "shape", type(embeddings).__name__)
        raise ValueError(f"embeddings must be a 2-D (n, dim) array, got {shape}")
    check_vectors("embeddings", embeddings, embeddings.shape[1])
    if embeddings.shape[0] != len(items):
        raise ValueError(f"embeddings has {embeddings.shape[0]} rows for {len(items)} items")
    seen: dict[str, int] = {}
    for i, r in enumerate(items):
        if r.collection not in collections:
            raise ValueError(f"items[{i}].collection must be one of "
                             f"{tuple(collections)}, got {r.collection!r}")
        if not r.id.isprintable():
            raise ValueError(f"items[{i}].id must be printable: no NUL or control "
                             f"characters")
        if r.id in seen:
            raise ValueError(f"items[{i}].id repeats items[{seen[r.id]}].id {r.id!r}")
        seen[r.id] = i


def row_values(r: ItemRecord) -> tuple:
    """The values of ``ITEM_FIELDS`` for ``r``."""
    z0, z1 = r.z_range if r.z_range is not None else (None, None)
    box = json.dumps(list(r.box)) if r.box is not None else None
    return (r.id, r.collection, r.modality, r.body_part, r.view, json.dumps(list(r.labels)),
            r.patient_pseudonym, r.study_pseudonym, r.source_document, r.parent_id,
            r.region, z0, z1, box, r.content_sha256)


def record_from_row(row: Sequence) -> ItemRecord:
    """Inverse of ``row_values``."""
    (item_id, collection, modality, body_part, view, labels, patient, study, source,
     parent, region, z0, z1, box, sha) = row
    return ItemRecord(
        id=item_id, collection=collection, modality=modality, body_part=body_part,
        view=view, labels=tuple(json.loads(labels)), patient_pseudonym=patient,
        study_pseudonym=study, source_document=source, parent_id=parent, region=region,
        z_range=None if z0 is None else (z0, z1),
        box=None if box is None else tuple(json.loads(box)), content_sha256=sha,
    )


def str_list(name: str, value: str | Sequence[str] | None) -> list[str] | None:
    """``value`` as a list of str (a lone str becomes ``[value]``); None stays None."""
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) for v in values):
        raise TypeError(f"{name} must be a str or a sequence of str, got {value!r}")
    return values
