"""SQL text over the store's tables, shared by ``Store`` and ``StoreReader``.

Every column list and placeholder count derives from ``records.ITEM_FIELDS`` and
``records.STORED_FIELDS``; nothing here counts columns by hand. Only ``medseek.index``
writes SQL against these tables.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import numpy as np

from .records import (ITEM_COLUMNS, ITEM_FIELDS, STORED_FIELDS, ItemRecord, StoredItem,
                      record_from_row, str_list)

#: ``SELECT`` list of a ``StoredItem`` row: the record, the stored fields, then the vector.
_STORED_COLUMNS = ", ".join(STORED_FIELDS)
_N_RECORD, _N_STORED = len(ITEM_FIELDS), len(ITEM_FIELDS) + len(STORED_FIELDS)
#: the item's vector of the store's model (bound first), or NULL
_VECTOR = ("(SELECT vector FROM embeddings e WHERE e.row_key = items.row_key "
           "AND e.model = ?)")

#: ``UPDATE`` of an item in place: the record's values but its id, ``updated_at``, row_key.
UPDATE_ITEM = ("UPDATE items SET " + ", ".join(f"{c} = ?" for c in ITEM_FIELDS[1:])
               + ", updated_at = ? WHERE row_key = ?")

#: ids bound per statement (SQLite allows 32766 parameters)
ID_PART = 500


def marks(n: int) -> str:
    """``n`` comma-separated ``?`` placeholders."""
    return ", ".join("?" * n)


#: ``INSERT`` of a new item: the record's values, then ``created_at``, ``updated_at``.
INSERT_ITEM = (f"INSERT INTO items ({ITEM_COLUMNS}, created_at, updated_at, seq) "
               f"VALUES ({marks(len(ITEM_FIELDS) + 2)}, 0)")


def parts(ids: list[str]) -> Iterator[list[str]]:
    """``ids`` in slices of at most ``ID_PART`` (one statement each)."""
    for start in range(0, len(ids), ID_PART):
        yield ids[start:start + ID_PART]


def select_items(where: str, with_embedding: bool) -> str:
    """``SELECT`` of ``StoredItem`` rows of ``items`` matching ``where``; with an embedding
    the store's model is the statement's first parameter (``stored_item`` reads the rows)."""
    vector = _VECTOR if with_embedding else "NULL"
    return f"SELECT {ITEM_COLUMNS}, {_STORED_COLUMNS}, {vector} FROM items WHERE {where}"


def stored_item(row: Sequence, record: ItemRecord | None = None) -> StoredItem:
    """A row of ``select_items`` as a ``StoredItem`` (embedding None when NULL); ``record``,
    when given, is the row's record already built (a reader's cache)."""
    blob = row[_N_STORED]
    emb = None if blob is None else np.frombuffer(blob, dtype="<f4").astype(np.float32)
    if record is None:
        record = record_from_row(row[:_N_RECORD])
    return StoredItem(record, *row[_N_RECORD:_N_STORED], embedding=emb)


def filter_where(collection: str, modality=None, body_part=None, view=None, labels_any=None,
                 exclude_patients=None, exclude_studies=None) -> tuple[str, list]:
    """``WHERE`` clause and parameters of ``Store.filter_row_keys`` over ``items``."""
    where, args = ["collection = ?"], [collection]
    for column, value in (("modality", modality), ("body_part", body_part), ("view", view)):
        values = str_list(column, value)
        if values is not None:
            where.append(f"{column} IN (SELECT value FROM json_each(?))")
            args.append(json.dumps(values))
    labels = str_list("labels_any", labels_any)
    if labels is not None:
        where.append("EXISTS (SELECT 1 FROM json_each(items.labels) l "
                     "WHERE l.value IN (SELECT value FROM json_each(?)))")
        args.append(json.dumps(labels))
    for column, name, value in (("patient_pseudonym", "exclude_patients", exclude_patients),
                                ("study_pseudonym", "exclude_studies", exclude_studies)):
        values = str_list(name, value)
        if values:
            where.append(f"({column} IS NULL OR "
                         f"{column} NOT IN (SELECT value FROM json_each(?)))")
            args.append(json.dumps(values))
    return " AND ".join(where), args


#: Row keys an index of a collection must drop after the writes in a seq window:
#: parameters (collection, since, until) twice, then the store's model.
REMOVED_ROW_KEYS = """SELECT c.row_key FROM changelog c
   WHERE c.collection = ? AND c.op = 'delete' AND c.seq > ? AND c.seq <= ?
   AND NOT EXISTS (SELECT 1 FROM items i
                   WHERE i.row_key = c.row_key AND i.collection = c.collection)
   UNION
   SELECT i.row_key FROM items i
   WHERE i.collection = ? AND i.seq > ? AND i.seq <= ?
   AND NOT EXISTS (SELECT 1 FROM embeddings e
                   WHERE e.row_key = i.row_key AND e.model = ?)
   ORDER BY 1"""

#: One page of a catch-up: (row_key, vector) of the model, for row keys given as a JSON
#: array, re-checked to be in the collection and the seq window: parameters (model, keys,
#: collection, since, until).
EMBEDDINGS_PAGE = ("SELECT i.row_key, e.vector FROM items i JOIN embeddings e "
                   "ON e.row_key = i.row_key AND e.model = ? "
                   "WHERE i.row_key IN (SELECT value FROM json_each(?)) AND i.collection = ? "
                   "AND i.seq > ? AND i.seq <= ? ORDER BY i.row_key")
