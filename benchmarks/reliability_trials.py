"""SIGKILL trials, the PHI probe and grep, and the auth matrix of the reliability suite."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import grpc

from medseek.serve.client import RetrievalClient, upload_chunks
from medseek.serve.v1 import retrieval_pb2 as pb

import reliability_seeds as seeds
from reliability_server import TOKEN, ServerProcess

# -- SIGKILL during ingest ---------------------------------------------------------------------


def _present(client: RetrievalClient, ids: list[str]) -> set[str]:
    """Which of ``ids`` the server holds (Get in chunks; a NOT_FOUND chunk one by one)."""
    found = set()
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        try:
            found |= {it.id for it in client.get(chunk, timeout=120).items}
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            for one in chunk:
                try:
                    found |= {it.id for it in client.get([one], timeout=120).items}
                except grpc.RpcError as exc1:
                    if exc1.code() != grpc.StatusCode.NOT_FOUND:
                        raise
    return found


def _index_mismatch(client: RetrievalClient) -> dict:
    """``{collection: (items, indexed)}`` of the collections whose index disagrees with
    the store."""
    return {c.name: (c.items, c.indexed) for c in client.stats(timeout=120).collections
            if c.items != c.indexed}


def unique_png(*key: int) -> bytes:
    """A 32 x 32 noise PNG of its own for each key (identical content would be acked as a
    duplicate of the first item, and not stored under its own id)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(list(key))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sigkill_trials(workdir: Path, trials: int, seed: int = 0, log=print) -> dict:
    """``trials`` times: start ``medseek serve`` on one store, check that every item acked
    so far is there and the index agrees with the store, bulk-ingest (text and PNG items,
    1-8 per call) from a writer thread, SIGKILL the server at a random point (a random
    time after the call starts or after a random number of acks). A last restart checks the
    last kill."""
    rng = random.Random(seed)
    server = ServerProcess(Path(workdir), tokens=False)
    acked: dict[str, str] = {}
    lost, mismatches, kills = set(), [], 0
    for trial in range(trials + 1):
        server.start()
        with RetrievalClient(server.address) as c:
            missing = set(acked) - _present(c, sorted(acked))
            lost |= missing
            if mm := _index_mismatch(c):
                mismatches.append((trial, mm))
            log(f"  sigkill trial {trial}: {len(acked)} acked so far, {len(missing)} missing, "
                f"index mismatch {mm or 'none'}")
        if trial == trials:
            server.stop()
            break
        stop_after_acks = rng.choice((None, rng.randint(0, 40)))
        delay = rng.uniform(0.0, 3.0)
        done = threading.Event()

        def writer(trial=trial):
            with RetrievalClient(server.address) as c:
                for b in range(100000):
                    items = [pb.IngestItem(id=f"k{trial}-{b}-{j}", text=seeds.REPORTS[j % 5]
                                           + f" case {trial} {b} {j}") if (b + j) % 3 else
                             pb.IngestItem(id=f"k{trial}-{b}-{j}", image=unique_png(trial, b, j),
                                           labels=["a"])
                             for j in range(rng.randint(1, 8))]
                    try:
                        resp = c.ingest(items, timeout=120)
                    except grpc.RpcError:
                        break
                    acked.update((a.id, a.status) for a in resp.acks if a.status != "failed")
            done.set()

        before = len(acked)
        t = threading.Thread(target=writer, daemon=True)
        t0 = time.monotonic()
        t.start()
        while time.monotonic() - t0 < 120 and not done.is_set():
            if stop_after_acks is None and time.monotonic() - t0 >= delay:
                break
            if stop_after_acks is not None and len(acked) - before >= stop_after_acks:
                break
            time.sleep(0.005)
        server.kill()
        kills += 1
        t.join(timeout=180)
    return {"trials": kills, "acked": len(acked), "lost": len(lost),
            "lost_ids": sorted(lost)[:20], "index_mismatches": mismatches}


# -- PHI -----------------------------------------------------------------------------------------
PHI = {"PatientName": "Qwzxy^Phiolotta", "PatientID": "PHIID90817263",
       "StudyInstanceUID": "1.2.826.0.1.3680043.99.4711.1",
       "SeriesInstanceUID": "1.2.826.0.1.3680043.99.4711.2",
       "AccessionNumber": "ACCPHI5531", "PatientBirthDate": "19370812",
       "InstitutionName": "Phiville General Hospital",
       "ReferringPhysicianName": "Drmedphi^Grumbold", "StudyID": "STPHI0042",
       "OtherPatientIDs": "OTHERPHI777"}
#: SOP Instance UIDs of the probe's image and multi-frame volume
PHI_SOP_UIDS = ("1.2.826.0.1.3680043.99.4711.3", "1.2.826.0.1.3680043.99.4711.4")


def phi_strings() -> list[bytes]:
    """The probe's identifiers as they could appear in bytes (names split into parts)."""
    out = {uid.encode() for uid in PHI_SOP_UIDS}
    for value in PHI.values():
        out.add(value.encode())
        out.update(p.encode() for p in value.split("^") if len(p) >= 5)
    return sorted(out)


def seed_phi_strings() -> list[bytes]:
    """Patient names and ids of the fuzzer's pydicom seeds (each at least 5 characters)."""
    import io

    import pydicom

    out = set()
    for name in (*seeds.DICOM_SEEDS, "emri_small_jpeg_2k_lossless.dcm"):
        ds = pydicom.dcmread(io.BytesIO(seeds.pydicom_file(name)), stop_before_pixels=True)
        for key in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber"):
            value = str(ds.get(key, "") or "")
            if len(value) >= 5:
                out.add(value.encode())
    return sorted(out)


def phi_probe(server: ServerProcess) -> list[bytes]:
    """Ingest and query DICOMs carrying :data:`PHI` (an image, a multi-frame volume, a zipped
    series, and a corrupt one that is refused); the serialized responses and error
    messages."""
    ct = seeds.pydicom_file("CT_small.dcm")
    mr = seeds.pydicom_file("emri_small.dcm")
    image = seeds.edit_dicom(ct, **PHI, SOPInstanceUID=PHI_SOP_UIDS[0])
    volume = seeds.edit_dicom(mr, **PHI, SOPInstanceUID=PHI_SOP_UIDS[1])
    series = seeds.dicom_series_zip(ct, 4, PHI)
    broken = seeds.edit_dicom(ct, **PHI, Rows=65535, Columns=3)
    bad_uid = seeds.edit_dicom(ct, **PHI, SOPInstanceUID="1.2.PHIID90817263.x")
    out = []
    with RetrievalClient(server.address, token=server.token) as c:
        def keep(fn):
            try:
                resp = fn()
                out.append(resp.SerializeToString())
            except grpc.RpcError as exc:
                out.append((exc.details() or "").encode())

        keep(lambda: c.ingest([pb.IngestItem(id="phi-image", image=image),
                               pb.IngestItem(id="phi-volume", volume=volume),
                               pb.IngestItem(id="phi-series", volume=series),
                               pb.IngestItem(id="phi-broken", image=broken),
                               pb.IngestItem(id="phi-bad-uid", image=bad_uid)], check=False))
        keep(lambda: c.get(["phi-image", "phi-volume", "phi-series"], with_embedding=True))
        keep(lambda: c.search(pb.SearchRequest(image=image, k=5)))
        keep(lambda: c.search(pb.SearchRequest(volume=series, k=5)))
        keep(lambda: c.search(pb.SearchRequest(image=broken, k=5)))
        keep(lambda: c.diagnose(pb.DiagnoseRequest(image=image, k=3)))
        keep(lambda: c.search(pb.SearchRequest(item_id="phi-series", k=5)))
        keep(lambda: c.stats())
    return out


def grep_phi(paths: list[Path], responses: list[bytes], needles: list[bytes]) -> list[str]:
    """Where any of ``needles`` occurs: ``"<path or response #i>: <needle>"`` per hit."""
    hits = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        hits += [f"{path.name}: {n.decode(errors='replace')}" for n in needles if n in data]
    for i, resp in enumerate(responses):
        hits += [f"response #{i}: {n.decode(errors='replace')}" for n in needles if n in resp]
    return hits


# -- auth matrix ---------------------------------------------------------------------------------
BAD_CREDENTIALS = {
    "missing": (),
    "wrong-token": (("authorization", "Bearer not-the-token-0000"),),
    "basic-scheme": (("authorization", f"Basic {TOKEN}"),),
    "empty-bearer": (("authorization", "Bearer "),),
    "token-prefix": (("authorization", f"Bearer {TOKEN[:-1]}"),),
    "token-suffix": (("authorization", f"Bearer {TOKEN}x"),),
    "no-scheme": (("authorization", TOKEN),),
}


def _rpcs(stub, png: bytes):
    """Each RPC of the service as ``name -> call(metadata)``; the calls would change the
    store if they were let through (so a refused one is checked to change nothing)."""
    return {
        "Search": lambda md: stub.Search(pb.SearchRequest(text="effusion", k=1), timeout=60,
                                         metadata=md),
        "SearchUpload": lambda md: stub.SearchUpload(
            upload_chunks(pb.SearchRequest(image=png, k=1), chunk_bytes=256), timeout=60,
            metadata=md),
        "SearchStream": lambda md: list(stub.SearchStream(
            iter([pb.SearchRequest(text="effusion", k=1)]), timeout=60, metadata=md)),
        "Ingest": lambda md: stub.Ingest(iter([pb.IngestItem(id="auth-probe", image=png)]),
                                         timeout=60, metadata=md),
        "Delete": lambda md: stub.Delete(pb.DeleteRequest(ids=["base-txt"]), timeout=60,
                                         metadata=md),
        "Get": lambda md: stub.Get(pb.GetRequest(ids=["base-txt"]), timeout=60, metadata=md),
        "Stats": lambda md: stub.Stats(pb.StatsRequest(), timeout=60, metadata=md),
        "Diagnose": lambda md: stub.Diagnose(pb.DiagnoseRequest(text="effusion", k=1),
                                             timeout=60, metadata=md),
    }


def auth_matrix(server: ServerProcess) -> dict:
    """Every RPC with every bad credential must be UNAUTHENTICATED and change nothing; with
    the token none is UNAUTHENTICATED; health checking stays open. Needs ``base-txt``
    stored (deleted by the last, authorised Delete)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from medseek.serve.v1 import retrieval_pb2_grpc as pb_grpc

    failures, tried = [], 0
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.RetrievalStub(ch)
        good = (("authorization", f"Bearer {TOKEN}"),)
        before = stub.Stats(pb.StatsRequest(), timeout=60, metadata=good)
        rpcs = _rpcs(stub, seeds.png_bytes(48))
        for name, call in rpcs.items():
            for cred, md in BAD_CREDENTIALS.items():
                tried += 1
                try:
                    call(md)
                    failures.append(f"{name}/{cred}: OK")
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                        failures.append(f"{name}/{cred}: {exc.code().name}")
        after = stub.Stats(pb.StatsRequest(), timeout=60, metadata=good)
        if before.last_seq != after.last_seq:
            failures.append(f"refused calls changed the store: last_seq {before.last_seq} -> "
                            f"{after.last_seq}")
        for name in ("Stats", "Get", "Search", "SearchUpload", "SearchStream", "Diagnose",
                     "Ingest", "Delete"):
            tried += 1
            try:
                rpcs[name](good)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    failures.append(f"{name}/valid-token: UNAUTHENTICATED")
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=60)
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            failures.append(f"health without a token: {health.status}")
    return {"tried": tried, "failures": failures}
