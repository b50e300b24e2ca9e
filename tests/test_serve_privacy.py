"""PHI and exposure: DICOM volumes follow the images' de-identification rule, no item id or
header value reaches a log or stderr, the store is private on disk, and a server bound
beyond loopback without tokens or TLS refuses to start unless told otherwise.

Real parts: the gRPC server on port 0, the real encoder, SQLite on disk, the CLI in a
subprocess, pydicom's real MR test file.
"""

from __future__ import annotations

import gc
import io
import logging
import os
import sqlite3
import stat
import subprocess
import sys
import zipfile

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")  # the [server] extra
pytest.importorskip("grpc_health")
import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from medseek.index import ItemRecord, Store, StoreConfig  # noqa: E402
from medseek.io import DeidConfig  # noqa: E402
from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.config import ServeConfig, is_loopback  # noqa: E402
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

from test_serve_api import nifti_bytes, png_bytes  # noqa: E402

PATIENT = "PHI-PATIENT-4711"
BAD_UID = "1.2.840.PHI99.malformed"  # letters: not a valid UID, so pydicom would warn


def mr_volume_dicom() -> bytes:
    """pydicom's real multi-frame MR (10 x 64 x 64) with a patient id and a malformed
    original SOP Instance UID."""
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    settings = pydicom.config.settings
    modes = settings.reading_validation_mode, settings.writing_validation_mode
    # a UID is validated as it is set, by the reading mode: it would warn and log here
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        ds.PatientID = PATIENT
        ds.PatientName = "Doe^PHI"
        ds.SOPInstanceUID = BAD_UID
        ds.file_meta.MediaStorageSOPInstanceUID = BAD_UID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = modes
    return buf.getvalue()


def zipped(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def encoder():
    return LocalTorchEncoder(seed=0)


def _serve(d, encoder, **kw):
    return ServerThread(ServeConfig(store_path=d / "store.db", index_dir=d / "index", port=0,
                                    grace_s=2.0, **kw), encoder)


@pytest.fixture(scope="module")
def keyless(tmp_path_factory, encoder):
    with _serve(tmp_path_factory.mktemp("keyless"), encoder) as s:
        yield s


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, encoder):
    with _serve(tmp_path_factory.mktemp("keyed"), encoder, deid=DeidConfig.development()) as s:
        yield s


def _client(server) -> RetrievalClient:
    return RetrievalClient(f"127.0.0.1:{server.port}")


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


# -- de-identification of volumes ---------------------------------------------------------
@pytest.mark.parametrize("wrap", [lambda d: d, lambda d: zipped("series/mr.dcm", d)],
                         ids=["multiframe", "zipped-series"])
def test_dicom_volume_without_a_deid_key_is_refused_like_an_image(keyless, wrap):
    data = wrap(mr_volume_dicom())
    with _client(keyless) as c:
        code, details = _code(lambda: c.ingest([pb.IngestItem(id="mr", volume=data)]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("items[0].volume") and "de-identification" in details
        code, details = _code(lambda: c.search(pb.SearchRequest(volume=data)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "de-identification" in details
        # NIfTI carries no identifier that is read: still accepted
        acked = c.ingest([pb.IngestItem(id="nii", volume=nifti_bytes(1))])
        assert acked.inserted + acked.updated == 1
        assert {s.name: s.items for s in c.stats().collections}.get("volume") == 1  # no "mr"


def test_dicom_volume_with_a_key_is_pseudonymised_and_quotes_nothing(keyed, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    with _client(keyed) as c:
        resp = c.ingest([pb.IngestItem(id="mr", volume=mr_volume_dicom(), modality="MR")])
        assert resp.inserted == 1
        item = c.get(["mr"]).items[0]
    assert item.patient_pseudonym and item.patient_pseudonym != PATIENT
    out, err = capfd.readouterr()
    for secret in (PATIENT, BAD_UID, "PHI99"):
        assert secret not in caplog.text and secret not in out + err


# -- no ids in logs ----------------------------------------------------------------------
def test_failing_and_cancelled_streams_log_no_ids(keyless, caplog):
    caplog.set_level(logging.DEBUG)
    secret = "PHI-ID-0042"
    with _client(keyless) as c:
        try:  # stored-item queries of ids the store does not hold
            list(c.search_stream([pb.SearchRequest(item_id=f"{secret}-{i}", k=1)
                                  for i in range(24)]))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
        call = c.search_stream([pb.SearchRequest(item_id=f"{secret}-c{i}", k=1)
                                for i in range(24)])
        call.cancel()  # the client walks away with requests in flight
        with pytest.raises(grpc.RpcError):
            list(call)
        with pytest.raises(grpc.RpcError):
            c.ingest([pb.IngestItem(id=f"{secret}-ok", text="Heart size normal."),
                      pb.IngestItem(id=f"{secret}-bad", image=b"not an image"),
                      pb.IngestItem(id=f"{secret}-empty", text="  ")])
        with pytest.raises(grpc.RpcError):
            c.delete([f"{secret}-missing"])
        c.stats()  # a round trip after the streams: their tasks are finished
    gc.collect()  # asyncio reports a never-retrieved task exception when it is collected
    assert caplog.records, "nothing was logged at all: the capture is not working"
    assert secret not in caplog.text


# -- the store on disk ---------------------------------------------------------------------
def test_a_new_store_is_private_to_its_owner(tmp_path):
    folder = tmp_path / "fresh" / "archive"
    with Store(StoreConfig(folder / "store.db")) as store:
        store.upsert([ItemRecord(id="a", collection="report")],
                     np.eye(1, 4, dtype=np.float32))
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes["store.db"] == 0o600
    assert modes.get("store.db-wal", 0o600) == 0o600
    assert modes.get("store.db-shm", 0o600) == 0o600
    assert len(modes) >= 2  # the WAL files were there to check
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_the_servers_store_is_private(keyed):
    path = keyed.server.config.store_path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_store_refuses_control_characters_and_can_erase_a_legacy_nul_id(tmp_path):
    path = tmp_path / "store.db"
    with Store(StoreConfig(path)) as store:
        with pytest.raises(ValueError, match="printable"):
            store.upsert([ItemRecord(id="a\x00b", collection="report")],
                         np.eye(1, 4, dtype=np.float32))
        store.upsert([ItemRecord(id="a", collection="report")], np.eye(1, 4, dtype=np.float32))
    con = sqlite3.connect(path)  # a row a store without the rule once wrote
    con.execute("UPDATE items SET item_id = ? WHERE item_id = 'a'", ("a\x00b",))
    con.commit()
    con.close()
    with Store(StoreConfig(path)) as store:
        assert list(store.get(["a\x00b"])) == ["a\x00b"]
        assert store.get(["a"]) == {}
        assert store.delete(["a\x00b"]) == ["a\x00b"]
        assert store.count("report") == 0


# -- exposure ------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "192.0.2.10", "example.org", ""])
def test_a_public_bind_needs_tokens_tls_or_the_override(tmp_path, host):
    base = dict(store_path=tmp_path / "s.db", index_dir=tmp_path / "i", host=host)
    assert not is_loopback(host)
    with pytest.raises(ValueError, match="insecure_public"):
        ServeConfig(**base)
    ServeConfig(**base, tokens=("a-long-token-0123",))
    ServeConfig(**base, tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem")
    ServeConfig(**base, insecure_public=True)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost"])
def test_loopback_binds_need_nothing(tmp_path, host):
    assert is_loopback(host)
    ServeConfig(store_path=tmp_path / "s.db", index_dir=tmp_path / "i", host=host)


def test_the_cli_refuses_a_public_bind_with_a_clear_error(tmp_path):
    cmd = [sys.executable, "-m", "medseek.cli", "serve", "--host", "0.0.0.0", "--port", "0",
           "--store", str(tmp_path / "s.db"), "--index-dir", str(tmp_path / "i")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "'0.0.0.0' is not loopback" in run.stderr and "--insecure-public" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "s.db").exists()  # refused before anything was opened


def test_the_override_starts_a_public_server(tmp_path, encoder):
    from medseek.cli import build_parser

    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--insecure-public",
                                      "--store", "s.db", "--index-dir", "i"])
    assert args.insecure_public is True
    cfg = ServeConfig(store_path=tmp_path / "s.db", index_dir=tmp_path / "i", port=0,
                      host="0.0.0.0", insecure_public=True, grace_s=1.0)
    with ServerThread(cfg, encoder) as s, RetrievalClient(f"127.0.0.1:{s.port}") as c:
        c.ingest([pb.IngestItem(id="img", image=png_bytes("circle"))])
        assert c.search(pb.SearchRequest(image=png_bytes("circle"), k=1)).hits[0].id == "img"
