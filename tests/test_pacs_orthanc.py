"""A real PACS: Orthanc + DICOMweb -> ``medseek pacs sync`` -> the gRPC server -> the store,
in research mode (pseudonyms only) and clinical mode (original UIDs for authorised callers,
audited).

Real parts: Orthanc 1.10 with its DICOMweb plugin on 127.0.0.1 (``tests/orthanc_pacs.py``),
the ``medseek`` CLI in a subprocess, the gRPC server on port 0 with the local encoder, SQLite
on disk, pydicom's and pydicom-data's real DICOM files (CT, MR, CT head, chest CR, and a CT
series built from a real slice).

Decision tested here: a caller whose token has no re-identification role that asks for it
gets PERMISSION_DENIED (not silently de-identified hits), and no audit line is written.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from orthanc_pacs import ORTHANC, Orthanc, derived_series, dicomweb_plugin

if ORTHANC is None or dicomweb_plugin() is None:
    pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc "
                "orthanc-dicomweb)", allow_module_level=True)

grpc = pytest.importorskip("grpc")  # the [server] extra
import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from medseek.io import DeidConfig, LimitExceededError, ReadLimits  # noqa: E402
from medseek.io.dicomweb import (DicomWebClient, DicomWebError,  # noqa: E402
                                 multipart_boundary, parse_multipart)
from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.config import ServeConfig, config_from_dict  # noqa: E402
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402
from medseek.serve.pacs_commands import SyncState, sync_once  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

REAL_FILES = ("CT_small.dcm", "MR_small.dcm", "693_UNCR.dcm", "RG1_UNCR.dcm")
TOKEN = "plain-token-0123456789"
CLINICAL = ("dr-rivera", "clinical-token-0123456789")
VIEWER = "https://viewer.example/viewer?StudyInstanceUIDs={study_uid}&series={series_uid}"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding the four real files (four studies, one image each) and a four-slice
    CT series made from CT_small (a fifth study, one volume). ``uids`` maps each Study
    Instance UID uploaded to its SOP Instance UIDs."""
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"))
    uids: dict[str, set[str]] = {}
    try:
        for name in REAL_FILES:
            data = Path(get_testdata_file(name)).read_bytes()
            ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
            uids.setdefault(ds.StudyInstanceUID, set()).add(ds.SOPInstanceUID)
            orthanc.upload(data)
        study, files = derived_series(get_testdata_file("CT_small.dcm"), 4, "ct-series")
        for data in files:
            orthanc.upload(data)
            uids.setdefault(study, set()).add(pydicom.dcmread(
                io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
        orthanc.uids = uids
        yield orthanc
    finally:
        orthanc.stop()


def _dicomweb(pacs, **kw) -> DicomWebClient:
    return DicomWebClient(pacs.dicomweb, user=pacs.user, password=pacs.password, **kw)


@pytest.fixture(scope="module")
def encoder():
    return LocalTorchEncoder(seed=0)


def _server(folder: Path, encoder, **kw) -> ServerThread:
    return ServerThread(ServeConfig(store_path=folder / "store.db", index_dir=folder / "index",
                                    port=0, grace_s=2.0, tokens=(TOKEN,),
                                    deid=DeidConfig.development(), **kw), encoder)


def _sync_cli(pacs, port: int, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    """``medseek pacs sync`` in a subprocess, against the server on ``port``."""
    (folder / "pacs_password").write_text(pacs.password)
    (folder / "token").write_text(TOKEN)
    cmd = [sys.executable, "-m", "medseek.cli", "pacs", "sync", "--dicomweb", pacs.dicomweb,
           "--dicomweb-user", pacs.user, "--dicomweb-password-file", str(folder / "pacs_password"),
           "--state", str(folder / "state.json"), "--server", f"127.0.0.1:{port}",
           "--token-file", str(folder / "token"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=folder)


def _summary_counts(stdout: str) -> dict[str, int]:
    """The counts of the CLI's summary line ("... items: 5 sent, 5 inserted, ...")."""
    line = [ln for ln in stdout.splitlines() if ln.startswith("pacs sync:")][-1]
    words = line.replace(",", " ").replace(";", " ").split()
    return {words[i + 1]: int(w) for i, w in enumerate(words[:-1]) if w.isdigit()}


def _all_original_uids(pacs) -> set[str]:
    out = set(pacs.uids)
    for sops in pacs.uids.values():
        out |= sops
    return out


# -- the DICOMweb client against the real Orthanc ------------------------------------------

def test_dicomweb_lists_and_retrieves_what_was_uploaded(pacs):
    client = _dicomweb(pacs)
    studies = list(client.studies(page=2))  # paged: 5 studies over 3 pages
    assert {s.study_uid for s in studies} == set(pacs.uids)
    for study in studies:
        series = client.series(study.study_uid)
        got = set()
        for ser in series:
            for data in client.retrieve_series(study.study_uid, ser.series_uid):
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                assert ds.StudyInstanceUID == study.study_uid
                got.add(ds.SOPInstanceUID)
        assert got == pacs.uids[study.study_uid]
        assert study.instances == len(pacs.uids[study.study_uid])
    # --since: a QIDO-RS date range; every dated study on or after it, none before it
    dated = {s.study_uid: s.study_date for s in studies if s.study_date}
    since = sorted(set(dated.values()))[-1]  # the latest date: some studies are before it
    recent = {s.study_uid for s in client.studies(since=date(int(since[:4]), int(since[4:6]),
                                                             int(since[6:])))}
    assert {u for u, d in dated.items() if d >= since} <= recent
    assert not {u for u, d in dated.items() if d < since} & recent
    assert {u for u, d in dated.items() if d < since}  # the filter was tested


def test_dicomweb_reads_are_bounded_and_errors_are_clear(pacs):
    client = _dicomweb(pacs, limits=ReadLimits(max_file_bytes=100_000))
    rg1 = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    ser = client.series(rg1.StudyInstanceUID)[0]
    with pytest.raises(LimitExceededError, match="max_file_bytes"):  # a 7 MB radiograph
        client.retrieve_series(rg1.StudyInstanceUID, ser.series_uid)
    small = _dicomweb(pacs, max_json_bytes=64)
    with pytest.raises(LimitExceededError, match="limit of 64"):
        list(small.studies())
    wrong = DicomWebClient(pacs.dicomweb, user=pacs.user, password="not-the-password")
    with pytest.raises(DicomWebError, match="HTTP 401"):
        list(wrong.studies())
    with pytest.raises(DicomWebError, match="not a valid DICOM UID"):
        client.series("1.2.3/../../instances")


def test_multipart_parser_uses_part_lengths_and_refuses_bad_bodies():
    dicom = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    b = "b0und"
    tricky = dicom[:100] + b"\r\n--b0und\r\n" + dicom[100:]  # the delimiter inside data
    body = (f"--{b}\r\nContent-Type: application/dicom\r\nContent-Length: {len(tricky)}"
            f"\r\n\r\n").encode() + tricky + f"\r\n--{b}\r\n\r\n".encode() + dicom \
        + f"\r\n--{b}--\r\n".encode()
    assert multipart_boundary(f'multipart/related; type="application/dicom"; boundary="{b}"',
                              "x") == b
    assert parse_multipart(body, b, ReadLimits(), "x") == [tricky, dicom]
    with pytest.raises(LimitExceededError, match="max_slices"):
        parse_multipart(body, b, ReadLimits(max_slices=1), "x")
    with pytest.raises(DicomWebError, match="truncated"):
        parse_multipart(body[:-200], b, ReadLimits(), "x")
    with pytest.raises(DicomWebError, match="expected a multipart/related"):
        multipart_boundary("application/dicom+json", "x")


# -- research mode: sync through the real server ------------------------------------------

def test_research_sync_picks_up_new_studies_only(pacs, encoder, tmp_path):
    with _server(tmp_path, encoder) as server:
        first = _sync_cli(pacs, server.port, tmp_path)
        assert first.returncode == 0, first.stderr
        counts = _summary_counts(first.stdout)
        assert counts["listed"] == 5 and counts["synced"] == 5
        assert counts["sent"] == 5 and counts["inserted"] == 5 and counts["failed"] == 0

        with RetrievalClient(f"127.0.0.1:{server.port}", token=TOKEN) as client:
            stats = {c.name: c.items for c in client.stats().collections}
            assert stats.get("image") == 4 and stats.get("volume") == 1

            # a new study arrives: the next pass sends it, and nothing of the old ones
            study, files = derived_series(get_testdata_file("MR_small.dcm"), 3, "mr-series")
            for data in files:
                pacs.upload(data)
            pacs.uids[study] = {pydicom.dcmread(io.BytesIO(d),
                                                stop_before_pixels=True).SOPInstanceUID
                                for d in files}
            second = _sync_cli(pacs, server.port, tmp_path)
            assert second.returncode == 0, second.stderr
            counts = _summary_counts(second.stdout)
            assert counts["listed"] == 6 and counts["synced"] == 1
            assert counts["sent"] == 1 and counts["inserted"] == 1 and counts["updated"] == 0
            stats = {c.name: c.items for c in client.stats().collections}
            assert stats.get("volume") == 2

            # research hits: pseudonyms only, no original UID anywhere in the answer
            image_ids = [h.id for h in client.search(pb.SearchRequest(
                text="chest", collection="image", k=10)).hits]
            resp = client.search(pb.SearchRequest(item_id=image_ids[0], k=10))
            assert len(resp.hits) == 3
            assert not any(h.HasField("origin") for h in resp.hits)
            wire = resp.SerializeToString()
            assert not [u for u in _all_original_uids(pacs) if u.encode() in wire]
            with pytest.raises(grpc.RpcError) as err:
                client.search(pb.SearchRequest(item_id=image_ids[0], k=3, reidentify=True))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # the state file and the store hold no UID text; the state is private
    state = tmp_path / "state.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert len(json.loads(state.read_text())["studies"]) == 6
    on_disk = state.read_bytes() + (tmp_path / "store.db").read_bytes()
    wal = tmp_path / "store.db-wal"
    on_disk += wal.read_bytes() if wal.exists() else b""
    assert not [u for u in _all_original_uids(pacs) if u.encode() in on_disk]
    assert not list(tmp_path.glob("store.db.reident*"))  # research mode keeps no map


# -- clinical mode ------------------------------------------------------------------------

@pytest.fixture
def clinical(pacs, encoder, tmp_path):
    """A clinical-mode server, filled by one in-process sync pass."""
    server = _server(tmp_path, encoder, pacs_mode="clinical", pacs_viewer_url=VIEWER,
                     reident_tokens=(CLINICAL,))
    try:
        with RetrievalClient(f"127.0.0.1:{server.port}", token=TOKEN) as client:
            report = sync_once(_dicomweb(pacs), client,
                               SyncState.open(tmp_path / "state.json", pacs.dicomweb))
        assert report.failed == 0 and report.studies_retry == 0, report.problems
        yield server, tmp_path
    finally:
        server.stop()


def _audit_lines(folder: Path) -> list[dict]:
    path = folder / "store.db.audit.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def test_clinical_hits_carry_origins_for_the_authorised_caller_only(pacs, clinical):
    server, folder = clinical
    address = f"127.0.0.1:{server.port}"
    deid = DeidConfig.development()
    with RetrievalClient(address, token=CLINICAL[1]) as doctor, \
            RetrievalClient(address, token=TOKEN) as plain:
        query = pb.SearchRequest(text="head", collection="image", k=10, request_id="q-1")
        resp = doctor.search(pb.SearchRequest(**{**_fields(query), "reidentify": True}))
        assert len(resp.hits) == len([u for u in pacs.uids if len(pacs.uids[u]) == 1])
        for hit in resp.hits:
            o = hit.origin
            assert o.study_instance_uid in pacs.uids
            assert set(o.sop_instance_uids) <= pacs.uids[o.study_instance_uid]
            # the origin is this hit's: its stored pseudonym is the keyed UID of it
            assert hit.item.study_pseudonym == deid.pseudonym_uid(o.study_instance_uid)
            assert o.viewer_url == VIEWER.format(study_uid=o.study_instance_uid,
                                                 series_uid=o.series_instance_uid)
        # the audit log: who (by name), which studies; never the token
        lines = _audit_lines(folder)
        assert len(lines) == 1
        assert lines[0]["caller"] == CLINICAL[0] and lines[0]["request_id"] == "q-1"
        assert sorted(lines[0]["studies"]) == sorted({h.origin.study_instance_uid
                                                      for h in resp.hits})
        assert CLINICAL[1] not in (folder / "store.db.audit.jsonl").read_text()

        # a volume hit: every slice's SOP Instance UID
        vol = doctor.search(pb.SearchRequest(text="head", collection="volume", k=5,
                                             reidentify=True))
        assert len(vol.hits) == len([u for u in pacs.uids if len(pacs.uids[u]) > 1]) >= 1
        for hit in vol.hits:
            sops = set(hit.origin.sop_instance_uids)
            assert len(sops) > 1 and sops == pacs.uids[hit.origin.study_instance_uid]

        # not asked: no origins, nothing audited; asked without the role: refused
        assert not any(h.HasField("origin") for h in doctor.search(query).hits)
        assert not any(h.HasField("origin") for h in plain.search(query).hits)
        with pytest.raises(grpc.RpcError) as err:
            plain.search(pb.SearchRequest(**{**_fields(query), "reidentify": True}))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert len(_audit_lines(folder)) == 2  # the volume query's line only
        streamed = list(doctor.search_stream([pb.SearchRequest(
            **{**_fields(query), "reidentify": True})]))
        assert streamed[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert not streamed[0].hits

    # the map and the log are private files; the store rows hold no original UID
    for name in ("store.db.reident.sqlite", "store.db.audit.jsonl"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    store = (folder / "store.db").read_bytes()
    wal = folder / "store.db-wal"
    store += wal.read_bytes() if wal.exists() else b""
    assert not [u for u in _all_original_uids(pacs) if u.encode() in store]


def _fields(msg) -> dict:
    return {f.name: v for f, v in msg.ListFields()}


# -- configuration ------------------------------------------------------------------------

def test_clinical_mode_is_explicit_and_complete(tmp_path):
    base = dict(store_path=tmp_path / "s.db", index_dir=tmp_path / "i")
    assert ServeConfig(**base).pacs_mode == "research"  # no default picks clinical
    with pytest.raises(ValueError, match="for pacs_mode 'clinical'"):
        ServeConfig(**base, reident_tokens=(CLINICAL,))
    with pytest.raises(ValueError, match="pacs_mode must be"):
        ServeConfig(**base, pacs_mode="Clinical")
    dev = DeidConfig.development()
    with pytest.raises(ValueError, match="needs pacs_viewer_url"):
        ServeConfig(**base, pacs_mode="clinical", deid=dev, reident_tokens=(CLINICAL,))
    with pytest.raises(ValueError, match="needs reident_tokens"):
        ServeConfig(**base, pacs_mode="clinical", deid=dev, pacs_viewer_url=VIEWER)
    with pytest.raises(ValueError, match="needs deid"):
        ServeConfig(**base, pacs_mode="clinical", pacs_viewer_url=VIEWER,
                    reident_tokens=(CLINICAL,))
    with pytest.raises(ValueError, match=r"only \{study_uid\}"):
        ServeConfig(**base, pacs_mode="clinical", deid=dev, reident_tokens=(CLINICAL,),
                    pacs_viewer_url="https://v/{study_uid}/{patient_id}")
    (tmp_path / "reident").write_text(f"# callers allowed to re-identify\n{CLINICAL[0]} "
                                      f"{CLINICAL[1]}\n")
    (tmp_path / "key").write_bytes(os.urandom(32).hex().encode())
    cfg = config_from_dict({"store_path": "s.db", "index_dir": "i", "pacs_mode": "clinical",
                            "pacs_viewer_url": VIEWER, "reident_tokens_file": "reident",
                            "deid_key_file": "key"}, tmp_path)
    assert cfg.reident_tokens == (CLINICAL,) and CLINICAL[1] in cfg.tokens
    assert cfg.audit_log == tmp_path / "s.db.audit.jsonl"
    assert CLINICAL[1] not in repr(cfg)
    (tmp_path / "bad").write_text(f"{CLINICAL[1]}\n")
    with pytest.raises(ValueError, match=r"bad:1: expected 'name token'") as err:
        config_from_dict({"store_path": "s.db", "index_dir": "i", "pacs_mode": "clinical",
                          "pacs_viewer_url": VIEWER, "reident_tokens_file": "bad"}, tmp_path)
    assert CLINICAL[1] not in str(err.value)
