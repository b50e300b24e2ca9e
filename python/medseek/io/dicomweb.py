"""A small DICOMweb client (standard library only): QIDO-RS search, WADO-RS retrieve.

It reads a PACS (Orthanc, dcm4chee, a cloud DICOM store) the way ``medseek pacs sync``
needs: the studies (optionally since a date), the series of a study, and every instance
of a series as DICOM Part 10 bytes. Every read is bounded before it is buffered: a JSON
answer by ``max_json_bytes``, a series by ``ReadLimits`` (one instance by
``max_file_bytes``, the whole series by ``max_zip_uncompressed_bytes``, the instance count
by ``max_slices``), so a misbehaving server cannot fill memory. UIDs that come back from
the server are checked against the DICOM UID grammar before they are put into a URL.
Redirects are refused (they would carry the credentials elsewhere). Nothing here logs.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date

from .errors import LimitExceededError
from .limits import ReadLimits

#: DICOM UID grammar (PS3.5 9.1): digit components separated by dots, at most 64 chars.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_STUDY_UID, _SERIES_UID, _MODALITY, _MODALITIES = "0020000D", "0020000E", "00080060", "00080061"
_STUDY_INSTANCES, _SERIES_INSTANCES, _STUDY_DATE = "00201208", "00201209", "00080020"
_CHUNK = 1 << 16


class DicomWebError(RuntimeError):
    """The DICOMweb server could not be reached, refused a request, or answered with
    something that is not what the standard says (the message names the request)."""


def check_uid(uid: str, what: str) -> str:
    """``uid`` if it is a well-formed DICOM UID, else ``DicomWebError`` naming ``what``
    (the value itself is not quoted: it is an identifier)."""
    if not isinstance(uid, str) or len(uid) > 64 or not _UID.match(uid):
        raise DicomWebError(f"{what}: not a valid DICOM UID ({len(str(uid))} characters)")
    return uid


@dataclass(frozen=True)
class StudyRef:
    """A study as QIDO-RS lists it."""

    study_uid: str
    study_date: str | None
    modalities: tuple[str, ...]
    instances: int | None


@dataclass(frozen=True)
class SeriesRef:
    """A series of a study as QIDO-RS lists it."""

    study_uid: str
    series_uid: str
    modality: str | None
    instances: int | None


def _value(dataset: dict, tag: str):
    """The first value of ``tag`` in a DICOM JSON dataset (PS3.18 F.2), or None."""
    values = (dataset.get(tag) or {}).get("Value") or ()
    return values[0] if values else None


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise DicomWebError(f"{req.get_method()} {_path(req.full_url)}: the server answered "
                            f"HTTP {code}, a redirect, which is refused (it would carry the "
                            f"credentials to another address)")


def _path(url: str) -> str:
    """The path of ``url`` without its query, for messages."""
    return urllib.parse.urlsplit(url).path


class DicomWebClient:
    """``DicomWebClient("http://127.0.0.1:8042/dicom-web", user=..., password=...)``.

    Parameters
    ----------
    base_url : str
        The DICOMweb root (``http`` or ``https``), e.g. Orthanc's ``.../dicom-web``.
    user, password : str, optional
        HTTP basic authentication.
    bearer_token : str, optional
        Sent as ``Authorization: Bearer ...`` (instead of basic authentication).
    timeout : float
        Seconds per HTTP request.
    limits : ReadLimits
        Bounds of a retrieved series (module docstring).
    max_json_bytes : int
        Largest QIDO-RS answer read.
    """

    def __init__(self, base_url: str, *, user: str | None = None, password: str | None = None,
                 bearer_token: str | None = None, timeout: float = 60.0,
                 limits: ReadLimits | None = None, max_json_bytes: int = 32 << 20) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url must be an http(s) URL with a host, got {base_url!r}")
        if (user is None) != (password is None):
            raise ValueError("user and password must be given together, got one of them")
        if user is not None and bearer_token is not None:
            raise ValueError("give basic authentication (user, password) or bearer_token, "
                             "not both")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 s, got {timeout!r}")
        if max_json_bytes < 1:
            raise ValueError(f"max_json_bytes must be >= 1, got {max_json_bytes!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout, self.max_json_bytes = float(timeout), int(max_json_bytes)
        self.limits = limits if limits is not None else ReadLimits()
        self._auth: str | None = None
        if user is not None:
            pair = f"{user}:{password}".encode()
            self._auth = "Basic " + base64.b64encode(pair).decode("ascii")
        elif bearer_token is not None:
            self._auth = f"Bearer {bearer_token}"
        self._opener = urllib.request.build_opener(_NoRedirect())

    # -- HTTP -----------------------------------------------------------------------------
    def _open(self, path: str, accept: str, query: dict | None = None):
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        req = urllib.request.Request(url, headers={"Accept": accept})
        if self._auth is not None:
            req.add_header("Authorization", self._auth)
        try:
            return self._opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise DicomWebError(f"GET {_path(url)}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DicomWebError(f"GET {_path(url)}: cannot reach the DICOMweb server "
                                f"({reason})") from None

    @staticmethod
    def _read_bounded(resp, limit: int, what: str) -> bytes:
        """The body of ``resp``, refused (``LimitExceededError``) past ``limit`` bytes: from
        its Content-Length before reading, else while reading."""
        declared = _int_or_none(resp.headers.get("Content-Length"))
        if declared is not None and declared > limit:
            raise LimitExceededError(f"{what}: the server declares {declared} bytes, over the "
                                     f"limit of {limit}")
        buf = bytearray()
        while True:
            chunk = resp.read(min(_CHUNK, limit + 1 - len(buf)))
            if not chunk:
                return bytes(buf)
            buf += chunk
            if len(buf) > limit:
                raise LimitExceededError(f"{what}: more than {limit} bytes, over the limit")

    def _json(self, path: str, query: dict | None = None) -> list:
        with self._open(path, "application/dicom+json", query) as resp:
            if resp.status == 204:  # "no content": nothing matched
                return []
            body = self._read_bounded(resp, self.max_json_bytes, f"GET {path}")
        if not body.strip():
            return []
        try:
            data = json.loads(body)
        except ValueError:
            raise DicomWebError(f"GET {path}: the answer is not JSON") from None
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise DicomWebError(f"GET {path}: the answer is not a list of DICOM JSON datasets")
        return data

    # -- QIDO-RS --------------------------------------------------------------------------
    def studies(self, since: date | None = None, page: int = 100) -> Iterator[StudyRef]:
        """Every study (``since``: with a Study Date on or after it), ``page`` at a time."""
        if page < 1:
            raise ValueError(f"page must be >= 1, got {page!r}")
        query: dict = {"includefield": f"{_MODALITIES},{_STUDY_INSTANCES}"}
        if since is not None:
            query["StudyDate"] = f"{since:%Y%m%d}-"
        offset = 0
        while True:
            rows = self._json("/studies", {**query, "limit": page, "offset": offset})
            for n, row in enumerate(rows):
                uid = check_uid(_value(row, _STUDY_UID), f"/studies answer [{offset + n}] "
                                                         "StudyInstanceUID")
                mods = (row.get(_MODALITIES) or {}).get("Value") or ()
                yield StudyRef(uid, _value(row, _STUDY_DATE), tuple(str(m) for m in mods),
                               _int_or_none(_value(row, _STUDY_INSTANCES)))
            if len(rows) < page:
                return
            offset += len(rows)

    def series(self, study_uid: str) -> list[SeriesRef]:
        """The series of one study."""
        check_uid(study_uid, "study_uid")
        rows = self._json(f"/studies/{study_uid}/series",
                          {"includefield": f"{_MODALITY},{_SERIES_INSTANCES}"})
        out = []
        for n, row in enumerate(rows):
            uid = check_uid(_value(row, _SERIES_UID), f"series answer [{n}] SeriesInstanceUID")
            out.append(SeriesRef(study_uid, uid, _value(row, _MODALITY),
                                 _int_or_none(_value(row, _SERIES_INSTANCES))))
        return out

    # -- WADO-RS --------------------------------------------------------------------------
    def retrieve_series(self, study_uid: str, series_uid: str) -> list[bytes]:
        """Every instance of a series, as DICOM Part 10 bytes (one multipart/related
        answer, bounded by ``limits``)."""
        check_uid(study_uid, "study_uid")
        check_uid(series_uid, "series_uid")
        path = f"/studies/{study_uid}/series/{series_uid}"
        what = f"GET {path}"
        with self._open(path, 'multipart/related; type="application/dicom"') as resp:
            ctype = resp.headers.get("Content-Type", "")
            boundary = multipart_boundary(ctype, what)
            body = self._read_bounded(resp, self.limits.max_zip_uncompressed_bytes, what)
        return parse_multipart(body, boundary, self.limits, what)


def multipart_boundary(content_type: str, what: str) -> str:
    """The boundary parameter of a ``multipart/related`` Content-Type (RFC 2046 5.1.1)."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/related":
        raise DicomWebError(f"{what}: expected a multipart/related answer, got "
                            f"{kind.strip() or 'no Content-Type'!r}")
    for param in _split_params(params):
        name, _, value = param.partition("=")
        if name.strip().lower() == "boundary":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if not 1 <= len(value) <= 70:
                raise DicomWebError(f"{what}: multipart boundary must be 1-70 characters, "
                                    f"got {len(value)}")
            return value
    raise DicomWebError(f"{what}: multipart/related answer without a boundary parameter")


def _split_params(params: str) -> list[str]:
    """``a=1; b="x;y"`` -> ``['a=1', 'b="x;y"']`` (semicolons inside quotes kept)."""
    out, cur, quoted = [], [], False
    for ch in params:
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [p for p in (s.strip() for s in out) if p]


def parse_multipart(body: bytes, boundary: str, limits: ReadLimits, what: str) -> list[bytes]:
    """The part bodies of a ``multipart/related`` body (RFC 2046), each bounded by
    ``limits.max_file_bytes`` and at most ``limits.max_slices`` of them.

    A part's ``Content-Length`` header, when given, says where its body ends (the boundary
    text could occur inside binary DICOM); otherwise the body ends at the next delimiter.
    A part whose Content-Type is not ``application/dicom`` is refused.
    """
    delim = b"--" + boundary.encode("ascii")
    start = body.find(delim)
    if start < 0:
        raise DicomWebError(f"{what}: the multipart body holds no boundary delimiter")
    pos, parts = start + len(delim), []
    while True:
        if body.startswith(b"--", pos):  # the close delimiter
            return parts
        eol = body.find(b"\r\n", pos)  # transport padding, then CRLF
        head_end = body.find(b"\r\n\r\n", eol)
        if eol < 0 or head_end < 0:
            raise DicomWebError(f"{what}: part {len(parts)} is truncated (no header end)")
        headers = _part_headers(body[eol + 2:head_end], what, len(parts))
        ctype = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if ctype != "application/dicom":
            raise DicomWebError(f"{what}: part {len(parts)} is {ctype!r}, expected "
                                "application/dicom")
        begin = head_end + 4
        length = _int_or_none(headers.get("content-length"))
        if length is not None:
            end = begin + length
            if length < 0 or not body.startswith(b"\r\n" + delim, end):
                raise DicomWebError(f"{what}: part {len(parts)}: its Content-Length does not "
                                    "end at a boundary delimiter")
        else:
            end = body.find(b"\r\n" + delim, begin)
            if end < 0:
                raise DicomWebError(f"{what}: part {len(parts)} is truncated (no closing "
                                    "delimiter)")
        limits.check_file_bytes(end - begin, f"{what} part {len(parts)}")
        if len(parts) >= limits.max_slices:
            raise LimitExceededError(f"{what}: more than ReadLimits.max_slices="
                                     f"{limits.max_slices} instances in one series")
        parts.append(body[begin:end])
        pos = end + 2 + len(delim)


def _part_headers(raw: bytes, what: str, n: int) -> dict[str, str]:
    out = {}
    for line in raw.split(b"\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise DicomWebError(f"{what}: part {n} has a malformed header line")
        out[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    return out
