"""medseek's metadata filters as Milvus scalar fields and boolean expressions.

A Milvus collection of medseek carries, beside ``row_key`` and ``vec``, the filterable
metadata of each item (``Store.filter_row_keys`` / ``SearchFilters``), so a filtered
search is one Milvus search with a short expression instead of an id list that grows
with the archive (1M allowed ids made a 12.9 MB expression and 6-10 s per search).

Fields and how they hold the store's values (Milvus 2.3 has no NULL scalars):

- ``modality``, ``body_part``, ``view`` (VARCHAR): ``""`` for None, ``"=" + value``
  otherwise, so None and the empty string stay distinct, as they are in SQLite (a filter
  never matches a None value; it may ask for ``""``).
- ``labels`` (ARRAY of VARCHAR): the labels as they are; ``labels_any`` is
  ``array_contains_any``.
- ``patient_sha256``, ``study_sha256`` (VARCHAR(64)): ``""`` for None, else the SHA-256
  hex of the pseudonym. Milvus is a derived cache, often run and logged by another team:
  it never holds the pseudonyms themselves (and a server error that echoes an expression
  shows digests, not identifiers). Exclusion keeps items with no pseudonym, as SQLite's
  ``col IS NULL OR col NOT IN (...)`` does.
- ``has_meta`` (BOOL): False for rows added without metadata; an index holding such rows
  refuses metadata filters rather than answer them wrongly.

String literals are written by ``quote``: double-quoted, with ``\\`` and ``"`` escaped and
newline, carriage return and tab as ``\\n``, ``\\r``, ``\\t`` (the expression grammar
forbids raw line breaks); every other character goes in as itself. That set of escapes is
the one both the Milvus 2.3 server and milvus-lite parse alike (milvus-lite rejects
``\\u``/``\\x`` escapes), and it cannot be broken out of: a value can only end the
literal through an unescaped ``"``, and every ``"`` and ``\\`` is escaped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from .records import str_list

__all__ = ["FILTER_NAMES", "filter_expression", "quote", "row_fields"]

#: the keyword names of ``Store.filter_row_keys`` (and the fields of ``SearchFilters``)
FILTER_NAMES = ("modality", "body_part", "view", "labels_any", "exclude_patients",
                "exclude_studies")
#: scalar fields holding the one-value metadata (record attribute = Milvus field)
VALUE_FIELDS = ("modality", "body_part", "view")
LABELS = "labels"
#: exclusion filter -> (record attribute, Milvus field holding its digest)
DIGEST_FIELDS = {"exclude_patients": ("patient_pseudonym", "patient_sha256"),
                 "exclude_studies": ("study_pseudonym", "study_sha256")}
HAS_META = "has_meta"
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quote(value: str) -> str:
    """``value`` as a Milvus double-quoted string literal (module docstring).

    Raises ``TypeError`` for a non-str and ``ValueError`` for a str that is not valid
    Unicode text (a lone surrogate cannot be sent to Milvus).
    """
    if not isinstance(value, str):
        raise TypeError(f"a filter value must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"a filter value is not valid Unicode text ({e.reason})") from None
    return '"' + "".join(_ESCAPES.get(ch, ch) for ch in value) + '"'


def encode_value(value: str | None) -> str:
    """A one-value field as stored: "" for None, ``"=" + value`` otherwise."""
    return "" if value is None else "=" + value


def digest(value: str | None) -> str:
    """A pseudonym as stored: "" for None, else its SHA-256 hex."""
    return "" if value is None else hashlib.sha256(value.encode("utf-8")).hexdigest()


def schema_fields(max_length: int, max_labels: int) -> list[tuple[str, str, dict]]:
    """``(name, DataType name, params)`` of the metadata fields, for ``schema.add_field``."""
    text = {"max_length": max_length}
    return [*((name, "VARCHAR", text) for name in VALUE_FIELDS),
            (LABELS, "ARRAY", {"element_type": "VARCHAR", "max_capacity": max_labels,
                               "max_length": max_length}),
            *((field, "VARCHAR", {"max_length": 64}) for _, field in DIGEST_FIELDS.values()),
            (HAS_META, "BOOL", {})]


def row_fields(record: object | None, row_key: int, max_length: int, max_labels: int) -> dict:
    """The metadata fields of one Milvus row from an ``ItemRecord``-like ``record``.

    ``record`` None stands for an item that is no longer live (it left the store between
    the two reads of a catch-up): empty fields; the next catch-up removes the row, and the
    search pipeline drops it as stale meanwhile. Values longer than ``max_length`` UTF-8
    bytes, or more than ``max_labels`` labels, raise ``ValueError`` naming the row key and
    field (never the value: it may be a pseudonym).
    """
    if record is None:
        return {**dict.fromkeys(VALUE_FIELDS, ""), LABELS: [],
                **{field: "" for _, field in DIGEST_FIELDS.values()}, HAS_META: True}
    row = {}
    for name in VALUE_FIELDS:
        row[name] = encode_value(getattr(record, name))
        _check_length(row[name], max_length, row_key, name)
    labels = list(getattr(record, "labels"))
    if len(labels) > max_labels:
        raise ValueError(f"row_key {row_key} has {len(labels)} labels; MilvusConfig.max_labels "
                         f"is {max_labels}")
    for label in labels:
        _check_length(label, max_length, row_key, "labels")
    row[LABELS] = labels
    for attr, field in DIGEST_FIELDS.values():
        row[field] = digest(getattr(record, attr))
    row[HAS_META] = True
    return row


def _check_length(value: str, max_length: int, row_key: int, name: str) -> None:
    if len(value.encode("utf-8")) > max_length:
        raise ValueError(f"row_key {row_key}: {name} is longer than MilvusConfig.max_value_length "
                         f"({max_length} UTF-8 bytes)")


def filter_kwargs(filters: object) -> dict:
    """``filters`` (a ``SearchFilters``, or a mapping of ``FILTER_NAMES`` keywords) as a dict
    of every filter name, None where not given."""
    if hasattr(filters, "as_kwargs"):
        given = filters.as_kwargs()
    elif isinstance(filters, Mapping):
        given = dict(filters)
    else:
        raise TypeError(f"filters must be a SearchFilters or a mapping, got "
                        f"{type(filters).__name__}")
    unknown = set(given) - set(FILTER_NAMES)
    if unknown:
        raise ValueError(f"filters has unknown names {sorted(unknown)}; known: {FILTER_NAMES}")
    return {name: given.get(name) for name in FILTER_NAMES}


def filter_expression(filters: object) -> str | None:
    """The Milvus boolean expression of metadata ``filters``.

    The same rows as ``Store.filter_row_keys(collection, **filters)`` within one
    collection: ``modality``/``body_part``/``view`` match any given value, ``labels_any``
    at least one label, ``exclude_*`` drop those pseudonyms (items without one are kept).

    Returns
    -------
    str or None
        ``""`` when nothing is filtered; None when no row can match (an empty list of
        values), so the caller need not ask Milvus.
    """
    kw = filter_kwargs(filters)
    terms = []
    for name in VALUE_FIELDS:
        values = str_list(name, kw[name])
        if values is None:
            continue
        if not values:
            return None
        terms.append(f"{name} in [{', '.join(quote(encode_value(v)) for v in values)}]")
    labels = str_list("labels_any", kw["labels_any"])
    if labels is not None:
        if not labels:
            return None
        terms.append(f"array_contains_any({LABELS}, [{', '.join(map(quote, labels))}])")
    for name, (_, field) in DIGEST_FIELDS.items():
        values = str_list(name, kw[name])
        if values:  # an empty exclusion list excludes nothing
            terms.append(f"{field} not in [{', '.join(quote(digest(v)) for v in values)}]")
    return " and ".join(f"({t})" for t in terms)


def combine(*expressions: str) -> str:
    """The conjunction of the non-empty ``expressions``."""
    parts = [e for e in expressions if e]
    return parts[0] if len(parts) == 1 else " and ".join(f"({e})" for e in parts)


def check_metadata(metadata: object, n: int) -> Sequence:
    """``metadata`` checked to be a sequence of ``n`` records (or None entries)."""
    if isinstance(metadata, (str, bytes)) or not isinstance(metadata, Sequence):
        raise TypeError(f"metadata must be a sequence of records (one per id), got "
                        f"{type(metadata).__name__}")
    if len(metadata) != n:
        raise ValueError(f"metadata has {len(metadata)} records but ids has {n}")
    return metadata
