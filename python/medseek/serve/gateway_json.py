"""JSON <-> ``medseek.v1`` messages for the HTTP gateway (``gateway.py``).

Requests are checked strictly, field by field, so a REST user gets the same kind of answer
a gRPC user does: ``BadField`` (the gateway's INVALID_ARGUMENT) names the JSON field at
fault and what was wrong with it; unknown fields are refused rather than ignored (a typo
such as ``"diversity": true`` would otherwise search without what was asked for).
Responses use the proto's field names (snake_case); unset optional numbers are ``null``,
boxes are ``[x0, y0, x1, y1]`` and z-ranges ``[z_start, z_end)`` lists.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass

from .v1 import retrieval_pb2 as pb

QUERY_FIELDS = ("text", "image", "volume", "item_id")
FILTER_FIELDS = ("modality", "body_part", "view", "labels_any", "exclude_patients",
                 "exclude_studies")
#: what the gateway adds to a search on its own (not sent to the gRPC server)
VIEW_FIELDS = ("thumbnails", "thumbnail_size", "preview", "preview_size")
SEARCH_FIELDS = (*QUERY_FIELDS, "collection", "k", "filters", "region", "diversify",
                 "mmr_lambda", "request_id", *VIEW_FIELDS)
UINT32_MAX = 2**32 - 1


class BadField(ValueError):
    """A request field is missing, of the wrong type or out of range (HTTP 400)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class ViewOptions:
    """What the gateway renders beside the hits: each hit's thumbnail, the query's
    (larger by default: the viewer shows it beside one hit)."""

    thumbnails: bool = False
    thumbnail_size: int = 160
    preview: bool = False
    preview_size: int = 384


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _str(value, field: str) -> str:
    if not isinstance(value, str):
        raise BadField(field, f"must be a string, got {_kind(value)}")
    return value


def _bool(value, field: str) -> bool:
    if not isinstance(value, bool):
        raise BadField(field, f"must be true or false, got {_kind(value)}")
    return value


def _int(value, field: str, lo: int = 0, hi: int = UINT32_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadField(field, f"must be an integer, got {_kind(value)}")
    if not lo <= value <= hi:
        raise BadField(field, f"must be in [{lo}, {hi}], got {value}")
    return value


def _number(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadField(field, f"must be a number, got {_kind(value)}")
    if not math.isfinite(value):
        raise BadField(field, f"must be finite, got {value}")
    return float(value)


def _strings(value, field: str) -> list[str]:
    if not isinstance(value, list):
        raise BadField(field, f"must be a list of strings, got {_kind(value)}")
    return [_str(v, f"{field}[{i}]") for i, v in enumerate(value)]


def _object(value, field: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise BadField(field or "body", f"must be an object, got {_kind(value)}")
    for key in value:
        if key not in allowed:
            raise BadField(f"{field}.{key}" if field else key,
                           f"unknown field (expected one of {', '.join(allowed)})")
    return value


def _base64(value, field: str) -> bytes:
    """Standard base64 (a ``data:...;base64,`` prefix, as a browser's FileReader gives, is
    allowed); empty or malformed content is refused here, not sent on."""
    text = _str(value, field)
    if text.startswith("data:") and ";base64," in text:
        text = text.split(";base64,", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadField(field, f"not valid base64 ({exc})") from None
    if not data:
        raise BadField(field, "is empty")
    return data


def _box(value, field: str) -> pb.Box:
    """``[x0, y0, x1, y1]`` or ``{"x0": .., "y0": .., "x1": .., "y1": ..}``."""
    keys = ("x0", "y0", "x1", "y1")
    if isinstance(value, dict):
        _object(value, field, keys)
        missing = [k for k in keys if k not in value]
        if missing:
            raise BadField(field, f"needs x0, y0, x1, y1; missing {', '.join(missing)}")
        value = [value[k] for k in keys]
    if not isinstance(value, list) or len(value) != 4:
        raise BadField(field, f"must be [x0, y0, x1, y1], got {value!r}")
    return pb.Box(**{k: _number(v, f"{field}[{i}]") for i, (k, v) in enumerate(zip(keys, value))})


def _z_range(value, field: str) -> pb.ZRange:
    if not isinstance(value, list) or len(value) != 2:
        raise BadField(field, f"must be [z_start, z_end] (z_end exclusive), got {value!r}")
    return pb.ZRange(z_start=_int(value[0], f"{field}[0]"), z_end=_int(value[1], f"{field}[1]"))


def _region(value, field: str) -> pb.Region:
    raw = _object(value, field, ("name", "box", "z_range"))
    region = pb.Region(name=_str(raw.get("name", ""), f"{field}.name"))
    if raw.get("box") is not None:
        region.box.CopyFrom(_box(raw["box"], f"{field}.box"))
    if raw.get("z_range") is not None:
        region.z_range.CopyFrom(_z_range(raw["z_range"], f"{field}.z_range"))
    return region


def _filters(value, field: str) -> pb.Filters:
    raw = _object(value, field, FILTER_FIELDS)
    return pb.Filters(**{k: _strings(v, f"{field}.{k}") for k, v in raw.items()})


def search_request(body) -> tuple[pb.SearchRequest, ViewOptions]:
    """The ``SearchRequest`` of a ``POST /v1/search`` body, and the gateway's own options.

    Exactly one of ``text``, ``image`` (base64), ``volume`` (base64) or ``item_id``; the
    other fields as in ``medseek.v1.SearchRequest`` (``filters`` an object of string
    lists; ``region`` ``{"name", "box", "z_range"}``).
    """
    raw = _object(body, "", SEARCH_FIELDS)
    given = [f for f in QUERY_FIELDS if raw.get(f) is not None]
    if len(given) != 1:
        found = f"got {', '.join(given)}" if given else "got none"
        raise BadField("query", f"give exactly one of {', '.join(QUERY_FIELDS)} ({found})")
    req = pb.SearchRequest()
    (kind,) = given
    if kind in ("image", "volume"):
        setattr(req, kind, _base64(raw[kind], kind))
    else:
        setattr(req, kind, _str(raw[kind], kind))
    if raw.get("collection") is not None:
        req.collection = _str(raw["collection"], "collection")
    if raw.get("k") is not None:
        req.k = _int(raw["k"], "k")
    if raw.get("filters") is not None:
        req.filters.CopyFrom(_filters(raw["filters"], "filters"))
    if raw.get("region") is not None:
        req.region.CopyFrom(_region(raw["region"], "region"))
    if raw.get("diversify") is not None:
        req.diversify = _bool(raw["diversify"], "diversify")
    if raw.get("mmr_lambda") is not None:
        req.mmr_lambda = _number(raw["mmr_lambda"], "mmr_lambda")
    if raw.get("request_id") is not None:
        req.request_id = _str(raw["request_id"], "request_id")
    view = ViewOptions(
        thumbnails=_bool(raw.get("thumbnails", False), "thumbnails"),
        thumbnail_size=_int(raw.get("thumbnail_size", 160), "thumbnail_size", 32, 512),
        preview=_bool(raw.get("preview", False), "preview"),
        preview_size=_int(raw.get("preview_size", 384), "preview_size", 32, 512))
    return req, view


def _f(value: float) -> float:
    """A float32 of the proto as the decimal it was meant to be (0.8 not 0.800000011)."""
    return float(f"{value:.7g}")


def box_json(box: pb.Box) -> list[float]:
    return [_f(box.x0), _f(box.y0), _f(box.x1), _f(box.y1)]


def item_json(item: pb.Item) -> dict:
    """An ``Item`` as JSON (its embedding only when the request asked for it)."""
    out = {f: getattr(item, f) for f in (
        "id", "collection", "modality", "body_part", "view", "patient_pseudonym",
        "study_pseudonym", "source_document", "parent_id", "region", "content_sha256")}
    out["labels"] = list(item.labels)
    out["box"] = box_json(item.box) if item.HasField("box") else None
    out["z_range"] = ([item.z_range.z_start, item.z_range.z_end]
                      if item.HasField("z_range") else None)
    if item.embedding:
        out["embedding"] = [float(v) for v in item.embedding]
    return out


def hit_json(hit: pb.Hit) -> dict:
    return {
        "id": hit.id, "score": _f(hit.score), "global_score": _f(hit.global_score),
        "region_score": _f(hit.region_score) if hit.HasField("region_score") else None,
        "matched_region": hit.matched_region, "region_id": hit.region_id,
        "item": item_json(hit.item),
        "concepts": [{"name": c.name, "query_score": _f(c.query_score),
                      "hit_score": _f(c.hit_score), "contribution": _f(c.contribution)}
                     for c in hit.concepts],
    }


def search_json(resp: pb.SearchResponse) -> dict:
    return {
        "hits": [hit_json(h) for h in resp.hits],
        "timings_ms": dict(resp.timings_ms), "candidates": resp.candidates,
        "request_id": resp.request_id,
        "dup_threshold": _f(resp.dup_threshold) if resp.HasField("dup_threshold") else None,
        "near_duplicate_shortfall": resp.near_duplicate_shortfall, "notice": resp.notice,
    }


def stats_json(resp: pb.StatsResponse) -> dict:
    return {
        "collections": [{"name": c.name, "items": c.items, "indexed": c.indexed, "dim": c.dim,
                         "applied_seq": c.applied_seq} for c in resp.collections],
        "last_seq": resp.last_seq, "model": resp.model,
        "encode_queue_depth": resp.encode_queue_depth,
        "search_queue_depth": resp.search_queue_depth,
    }
