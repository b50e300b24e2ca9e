"""End-to-end: a real gRPC client against the real server (port 0, SQLite, FAISS) with a
real in-process encoder (pretrained MiniLM text tower, seeded untrained tiny vision towers).
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

grpc = pytest.importorskip("grpc")  # the [server] extra
pytest.importorskip("grpc_health")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402

from medseek.io import DeidConfig  # noqa: E402
from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.config import BatchConfig, ServeConfig  # noqa: E402
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

TOKEN = "test-token-0123456789"
REPORTS = {
    "r-effusion": ("Large left pleural effusion with adjacent atelectasis.", ["effusion"], "P1"),
    "r-cardio": ("The heart is enlarged, consistent with cardiomegaly.", ["cardiomegaly"], "P2"),
    "r-normal": ("Lungs are clear. No acute cardiopulmonary abnormality.", [], "P3"),
    "r-pneumo": ("Right apical pneumothorax, no effusion.", ["pneumothorax"], "P4"),
}


def png_bytes(pattern: str, size: int = 48) -> bytes:
    yy, xx = np.mgrid[0:size, 0:size]
    arr = {"gradient": xx * 255 // size, "circle": ((xx - 24) ** 2 + (yy - 24) ** 2 < 200) * 200,
           "stripes": (xx // 6 % 2) * 180 + 30, "checker": ((xx // 8 + yy // 8) % 2) * 220}[pattern]
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def nifti_bytes(seed: int, nan: bool = False) -> bytes:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    arr = rng.normal(40, 80, size=(32, 32, 24)).astype(np.float32)
    if nan:
        arr[3, 3, 3] = np.nan
    img = nib.Nifti1Image(arr, affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    return img.to_bytes()


class GatedTextEncoder:
    """A real encoder whose ``encode_texts`` waits at a gate while the gate is closed.

    Tests hold a batch inside the encoder this way instead of racing a batching window
    against the clock, so what they see does not depend on the machine's speed.
    """

    def __init__(self, inner) -> None:
        self._inner = inner
        self.entered = threading.Event()  # a batch is waiting at the closed gate
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def encode_texts(self, texts):
        if not self.gate.is_set():
            self.entered.set()
            self.gate.wait()
        return self._inner.encode_texts(texts)


@pytest.fixture(scope="module")
def encoder():
    return LocalTorchEncoder(seed=0)


@pytest.fixture(scope="module")
def gated(encoder):
    return GatedTextEncoder(encoder)


@pytest.fixture(scope="module")
def server(tmp_path_factory, gated):
    d = tmp_path_factory.mktemp("serve")
    cfg = ServeConfig(store_path=d / "store.db", index_dir=d / "index", port=0, tokens=(TOKEN,),
                      grace_s=2.0, deid=DeidConfig.development(), metrics_port=0,
                      encode_batch=BatchConfig(max_wait_ms=25.0))
    with ServerThread(cfg, gated) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with RetrievalClient(f"127.0.0.1:{server.port}", token=TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
def ingested(client):
    items = [pb.IngestItem(id=i, text=t, modality="report", labels=lab, patient_pseudonym=p,
                           source_document=f"doc-{i}") for i, (t, lab, p) in REPORTS.items()]
    for n, pattern in enumerate(("gradient", "circle", "stripes")):
        items.append(pb.IngestItem(
            id=f"img-{pattern}", image=png_bytes(pattern), modality="CR", body_part="chest",
            view="PA" if n < 2 else "AP", patient_pseudonym=f"P{n + 1}",
            regions=[pb.Region(name="centre", box=pb.Box(x0=12, y0=12, x1=36, y1=36))]))
    items += [pb.IngestItem(id=f"vol-{s}", volume=nifti_bytes(s), modality="CT",
                            body_part="abdomen") for s in (1, 2)]
    return client.ingest(items)


def test_ingest_acknowledges_every_item_and_is_idempotent(client, ingested):
    assert [a.status for a in ingested.acks].count("inserted") == 9
    assert ingested.inserted == 9 and ingested.duplicates == 0
    again = client.ingest([pb.IngestItem(id="r-normal", text=REPORTS["r-normal"][0])])
    assert [(a.id, a.status) for a in again.acks] == [("r-normal", "updated")]
    dup = client.ingest([pb.IngestItem(id="img-copy", image=png_bytes("circle"))])
    assert (dup.acks[0].status, dup.acks[0].duplicate_of) == ("duplicate", "img-circle")
    stats = {c.name: c for c in client.stats().collections}
    assert (stats["report"].items, stats["image"].items, stats["volume"].items) == (4, 3, 2)
    assert stats["region"].items == 3 and stats["region"].indexed == 3
    assert stats["chunk"].items == 2  # each 24-slice volume is one chunk at 4 mm
    chunk = client.get(["vol-1/chunk/0"]).items[0]
    assert (chunk.parent_id, chunk.z_range.z_start, chunk.z_range.z_end) == ("vol-1", 0, 24)
    assert all(c.indexed == c.items for c in stats.values())


def test_text_query_ranks_the_matching_report_first_with_concepts(client, ingested):
    resp = client.search(pb.SearchRequest(text="pleural effusion", k=3, request_id="q1",
                                          diversify=True))
    assert resp.request_id == "q1" and len(resp.hits) == 3
    assert resp.hits[0].id == "r-effusion"
    assert resp.hits[0].item.patient_pseudonym == "P1"
    assert resp.hits[0].item.source_document == "doc-r-effusion"
    assert [c.name for c in resp.hits[0].concepts]  # shared concepts explain the match
    assert resp.timings_ms["ann"] >= 0 and resp.candidates == 4  # K' covers every report
    # diversified: the near-duplicate threshold applied is reported (floor 0.98, raised to
    # the collection's pairwise-cosine quantile), and no hits were lost to it here
    assert resp.HasField("dup_threshold") and 0.98 <= resp.dup_threshold <= 0.9999
    assert resp.near_duplicate_shortfall == 0 and resp.notice == ""
    plain = client.search(pb.SearchRequest(text="pleural effusion", k=3))
    assert plain.candidates == 3  # no rerank, no diversification: only k are fetched
    assert not plain.HasField("dup_threshold")


def test_image_and_volume_queries_find_their_own_content(client, ingested):
    img = client.search(pb.SearchRequest(image=png_bytes("stripes"), k=2))
    assert img.hits[0].id == "img-stripes" and img.hits[0].score == pytest.approx(1.0, abs=1e-4)
    vol = client.search(pb.SearchRequest(volume=nifti_bytes(2), k=2))
    assert vol.hits[0].id == "vol-2" and vol.hits[0].score == pytest.approx(1.0, abs=1e-4)
    text_to_image = client.search(pb.SearchRequest(text="chest radiograph", collection="image",
                                                   k=3))
    assert {h.id for h in text_to_image.hits} == {"img-gradient", "img-circle", "img-stripes"}


def test_stored_item_query_excludes_itself_and_filters_apply(client, ingested):
    resp = client.search(pb.SearchRequest(item_id="img-circle", k=5))
    assert [h.id for h in resp.hits] and "img-circle" not in [h.id for h in resp.hits]
    pa = client.search(pb.SearchRequest(item_id="img-circle", k=5,
                                        filters=pb.Filters(view=["PA"])))
    assert [h.id for h in pa.hits] == ["img-gradient"]
    no_p1 = client.search(pb.SearchRequest(text="effusion", k=4,
                                           filters=pb.Filters(exclude_patients=["P1"])))
    assert "r-effusion" not in [h.id for h in no_p1.hits] and len(no_p1.hits) == 3
    labels = client.search(pb.SearchRequest(text="heart", k=4,
                                            filters=pb.Filters(labels_any=["cardiomegaly"])))
    assert [h.id for h in labels.hits] == ["r-cardio"]


def test_region_rerank_reports_the_matched_region(client, ingested):
    box = pb.Box(x0=12, y0=12, x1=36, y1=36)
    resp = client.search(pb.SearchRequest(image=png_bytes("circle"), k=3,
                                          region=pb.Region(name="centre", box=box)))
    top = resp.hits[0]
    assert top.id == "img-circle" and top.matched_region == "centre"
    assert top.region_id == "img-circle/region/centre"
    assert top.HasField("region_score") and top.region_score == pytest.approx(1.0, abs=1e-4)
    by_id = client.search(pb.SearchRequest(item_id="img-gradient", k=2,
                                           region=pb.Region(name="centre")))
    assert all(h.matched_region == "centre" for h in by_id.hits)


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_region_rerank_changes_the_order_when_the_region_matches(client, ingested):
    # A shares the query's periphery, B the query's centre region: globally A is nearer,
    # reranked by the centre region B must come first.
    yy, xx = np.mgrid[0:64, 0:64]
    base = (xx * 4).clip(0, 255)
    c = slice(20, 44)
    q = base.copy()
    q[c, c] = (((xx + yy) // 4) % 2 * 255)[c, c]
    a = base.copy()
    a[c, c] = 128
    b = 255 - base
    b[c, c] = q[c, c]
    box = pb.Box(x0=20, y0=20, x1=44, y1=44)
    client.ingest([pb.IngestItem(id=f"rr-{n}", image=_png(arr), body_part="wrist",
                                 regions=[pb.Region(name="centre", box=box)])
                   for n, arr in (("A", a), ("B", b))])
    wrist = pb.Filters(body_part=["wrist"])
    plain = client.search(pb.SearchRequest(image=_png(q), k=2, filters=wrist))
    assert [h.id for h in plain.hits] == ["rr-A", "rr-B"]
    reranked = client.search(pb.SearchRequest(image=_png(q), k=2, filters=wrist,
                                              region=pb.Region(name="centre", box=box)))
    assert [h.id for h in reranked.hits] == ["rr-B", "rr-A"]
    assert reranked.hits[0].region_score == pytest.approx(1.0, abs=1e-4)
    client.delete(["rr-A", "rr-B"])


def test_search_stream_answers_every_request(client, ingested):
    reqs = [pb.SearchRequest(text=t, k=1, request_id=f"s{i}")
            for i, t in enumerate(("pleural effusion with atelectasis", "enlarged heart",
                                    "apical pneumothorax"))]
    out = {r.request_id: r.hits[0].id for r in client.search_stream(reqs, timeout=30)}
    assert out == {"s0": "r-effusion", "s1": "r-cardio", "s2": "r-pneumo"}


@pytest.mark.parametrize("request_fields, words", [
    (dict(text="effusion", mmr_lambda=1.5), "mmr_lambda: must be in [0, 1], got 1.5"),
    (dict(text="effusion", k=1001), "k: must be in [1, 1000], got 1001"),
    (dict(k=3), "query: one of text, image, volume or item_id is required"),
    (dict(text="effusion", region=pb.Region(box=pb.Box(x1=4, y1=4))),
     "region.name: must be non-empty"),
])
def test_bad_typed_query_fields_are_named(client, ingested, request_fields, words):
    with pytest.raises(grpc.RpcError) as err:
        client.search(pb.SearchRequest(**request_fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(words), err.value.details()


def test_many_mmr_weights_grow_no_cache(server, client, ingested):
    import gc

    from medseek.search import SearchPipeline

    service = server.server.service

    def sizes():
        """Lengths of every dict/list/set the servicer and its services hold."""
        parts = (service, service.queries, service.ingests, service.encoding, service.pipeline)
        return {(type(p).__name__, name): len(v) for p in parts for name, v in vars(p).items()
                if isinstance(v, (dict, list, set))}

    def search(lam):
        return client.search(pb.SearchRequest(text="pleural effusion", collection="report",
                                              k=3, diversify=True, mmr_lambda=lam))

    search(0.5)
    before = sizes()
    pipelines = sum(type(o) is SearchPipeline for o in gc.get_objects())
    for lam in np.linspace(0.0, 1.0, 41):
        assert len(search(float(lam)).hits) == 3
    assert sum(type(o) is SearchPipeline for o in gc.get_objects()) == pipelines
    assert sizes() == before
    assert not hasattr(service, "_pipelines")


def test_delete_then_never_returned_and_get_not_found(client, ingested):
    client.ingest([pb.IngestItem(id="r-tmp", text="Small left pleural effusion.")])
    assert client.search(pb.SearchRequest(text="small left pleural effusion", k=1)
                         ).hits[0].id == "r-tmp"
    assert list(client.delete(["r-tmp"]).deleted) == ["r-tmp"]
    ids = [h.id for h in client.search(pb.SearchRequest(text="small left pleural effusion",
                                                        k=10)).hits]
    assert "r-tmp" not in ids and ids
    assert all(c.indexed == c.items for c in client.stats().collections)
    with pytest.raises(grpc.RpcError) as err:
        client.get(["r-tmp"])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "r-tmp" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.search(pb.SearchRequest(item_id="r-tmp"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "item_id" in err.value.details()
    got = client.get(["r-cardio"], with_embedding=True).items[0]
    # the report collection holds hybrid vectors: MiniLM (384) + laterality-aware concepts
    from medseek.text.concepts import lateral_concept_names

    assert got.labels == ["cardiomegaly"]
    assert len(got.embedding) == 384 + len(lateral_concept_names())


def test_health_and_reflection_answer_without_token(server, ingested):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="medseek.v1.Retrieval"), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"medseek.v1.Retrieval", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("token", [None, "wrong-token-000000"])
def test_missing_or_wrong_token_is_unauthenticated(server, ingested, token):
    with RetrievalClient(f"127.0.0.1:{server.port}", token=token) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.search(pb.SearchRequest(text="effusion"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            c.ingest([pb.IngestItem(id="intruder", text="x")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_metrics_record_stages_and_index_size(server, ingested, client):
    client.search(pb.SearchRequest(text="effusion", k=1))
    import urllib.request

    port = server.server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'medseek_stage_seconds_count{stage="ann"}' in text
    assert 'medseek_index_size{collection="report"} 4.0' in text


def test_dicom_is_deidentified_on_the_way_in(client, ingested):
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    original = pydicom.dcmread(path)
    data = Path(path).read_bytes()
    ack = client.ingest([pb.IngestItem(id="dcm-1", image=data, patient_pseudonym="ignored")])
    assert ack.acks[0].status == "inserted"
    item = client.get(["dcm-1"]).items[0]
    assert item.modality == "CT"  # from the header
    assert len(item.patient_pseudonym) == 32 and item.patient_pseudonym != "ignored"
    assert str(original.PatientID) not in item.patient_pseudonym
    assert item.study_pseudonym and item.study_pseudonym != str(original.get("StudyID", ""))
    assert client.search(pb.SearchRequest(image=data, k=1)).hits[0].id == "dcm-1"
    client.delete(["dcm-1"])


def test_concurrent_queries_share_encoder_batches(server, client, gated, ingested):
    import concurrent.futures as cf

    reg = server.server.metrics.registry
    encode_queue = server.server.service.encode_batcher

    def sample(name):
        return reg.get_sample_value(name, {"batcher": "encode_text"}) or 0.0

    n0, s0 = sample("medseek_batch_size_count"), sample("medseek_batch_size_sum")
    texts = [f"pleural effusion case {i}" for i in range(8)]
    # text -> image: the served encoder's text tower, which the gate holds (text of the
    # report collection goes to the in-process hybrid ranker instead)
    with cf.ThreadPoolExecutor(8) as pool:
        gated.gate.clear()
        try:
            first = pool.submit(client.search, pb.SearchRequest(text=texts[0], k=1,
                                                                collection="image"))
            assert gated.entered.wait(timeout=120), "the first query never reached the encoder"
            rest = [pool.submit(client.search, pb.SearchRequest(text=t, k=1, collection="image"))
                    for t in texts[1:]]
            while encode_queue.depth < 7:  # all seven wait behind the held batch
                assert not any(f.done() for f in rest), [f.exception() for f in rest if f.done()]
                threading.Event().wait(0.01)
            # the queue gauges are read when scraped: the seven waiting now, in all lanes
            # and in the text lane
            assert reg.get_sample_value("medseek_queue_depth", {"queue": "encode"}) == 7
            assert reg.get_sample_value("medseek_queue_depth",
                                        {"queue": "encode_text"}) == 7
        finally:
            gated.gate.set()  # also on a failure, or the pool would wait forever
        resps = [first.result()] + [f.result() for f in rest]
    assert all(r.hits for r in resps)
    batches = sample("medseek_batch_size_count") - n0
    requests = sample("medseek_batch_size_sum") - s0
    assert requests == 8 and batches == 2  # the held query, then the seven in one call