"""End-to-end with the real encoders in production position: a gRPC client -> the retrieval
server (port 0, SQLite, FAISS) -> the real ``tritonserver`` (pytriton wheel, python backend
running ONNX Runtime on a repository exported from seeded tiny models) for images,
volumes and texts, exactly as ``medseek serve --encoder triton`` wires them.

Expected values come from the same repository's graphs in process (``OnnxRuntimeEncoder``):
the served scores must be the cosines of those embeddings.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

grpc = pytest.importorskip("grpc")  # the [server] extra
pytest.importorskip("tritonclient.grpc")  # the [triton] extra
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402

from medseek.encoders import EncoderSpec, OnnxRuntimeEncoder, TritonEncoder  # noqa: E402
from medseek.encoders.triton_client import TritonEncoderConfig  # noqa: E402
from medseek.export.repository import write_repository  # noqa: E402
from medseek.io import DeidConfig  # noqa: E402
from medseek.models import create_model  # noqa: E402
from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.config import ServeConfig  # noqa: E402
from medseek.serve.routed import RoutedEncoder  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.triton import TritonServer, TritonServerConfig  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

TOKEN = "triton-e2e-token-0123"
TEXTS = {"r-1": "Large left pleural effusion.", "r-2": "Heart size is enlarged.",
         "r-3": "No acute cardiopulmonary abnormality."}
CENTRE = pb.Box(x0=20, y0=20, x1=44, y1=44)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr).clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _nifti(seed: int, depth: int) -> bytes:
    import nibabel as nib

    arr = np.random.default_rng(seed).normal(40, 80, size=(40, 40, depth)).astype(np.float32)
    return nib.Nifti1Image(arr, affine=np.diag([2.0, 2.0, 2.5, 1.0])).to_bytes()


def _images() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:64, 0:64]
    rng = np.random.default_rng(3)
    return {f"img-{i}": (rng.random((64, 64)) * 60 + xx * (i + 1) + yy * (3 - i)) for i in range(3)}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    import torch

    torch.manual_seed(7)
    models = [create_model("cxr-tiny").eval(), create_model("ct-tiny").eval()]
    out = tmp_path_factory.mktemp("e2e-repo")
    write_repository(models, out)
    return out


@pytest.fixture(scope="module")
def triton(repo):
    with TritonServer(TritonServerConfig(repo, startup_timeout=180)) as srv:
        yield srv


@pytest.fixture(scope="module")
def local(repo):
    """The same graphs in process: the expected embeddings."""
    image = OnnxRuntimeEncoder(repo, "image")
    volume = OnnxRuntimeEncoder(repo, "volume")
    return RoutedEncoder(images=image, volumes=volume, texts=image)


@pytest.fixture(scope="module")
def client(triton, repo, tmp_path_factory):
    images = TritonEncoder(TritonEncoderConfig(triton.grpc_url, batch_size=8),
                           EncoderSpec.load(repo / "image_encoder" / "1" / "spec.json"))
    volumes = TritonEncoder(TritonEncoderConfig(triton.grpc_url),
                            EncoderSpec.load(repo / "volume_encoder" / "1" / "spec.json"))
    d = tmp_path_factory.mktemp("e2e-serve")
    # joint: report text too goes through Triton's text graph (the hybrid report ranker
    # embeds in process; tests/test_serve_reports.py)
    cfg = ServeConfig(store_path=d / "store.db", index_dir=d / "index", port=0,
                      tokens=(TOKEN,), grace_s=2.0, deid=DeidConfig.development(),
                      report_ranker="joint")
    with ServerThread(cfg, RoutedEncoder(images=images, volumes=volumes, texts=images)) as s:
        with RetrievalClient(f"127.0.0.1:{s.port}", token=TOKEN) as c:
            c.port = s.port
            yield c
    images.close()
    volumes.close()


@pytest.fixture(scope="module")
def ingested(client):
    items = [pb.IngestItem(id=i, text=t, labels=[i], patient_pseudonym=f"P{n}",
                           source_document=f"doc-{n}") for n, (i, t) in enumerate(TEXTS.items())]
    items += [pb.IngestItem(id=i, image=_png(a), modality="CR", body_part="chest",
                            view="PA" if n < 2 else "AP", patient_pseudonym=f"P{n}",
                            regions=[pb.Region(name="centre", box=CENTRE)])
              for n, (i, a) in enumerate(_images().items())]
    items += [pb.IngestItem(id=f"vol-{s}", volume=_nifti(s, depth), modality="CT")
              for s, depth in ((1, 40), (2, 72))]
    return client.ingest(items)


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_ingest_through_triton_stores_every_kind(client, ingested):
    assert ingested.inserted == 8 and [a.status for a in ingested.acks].count("inserted") == 8
    stats = {c.name: c for c in client.stats().collections}
    assert (stats["report"].items, stats["image"].items, stats["volume"].items,
            stats["region"].items) == (3, 3, 2, 3)
    assert all(c.indexed == c.items for c in stats.values())


def test_stored_embeddings_equal_the_in_process_graphs(client, ingested, local):
    got = {it.id: np.asarray(it.embedding) for it in
           client.get(["r-1", "r-2", "r-3"], with_embedding=True).items}
    want = local.encode_texts(list(TEXTS.values()))
    for row, key in zip(want, TEXTS):
        assert _cos(got[key], row) >= 0.9999
    # a volume through Triton (chunk graph + pooling graph, client-side grouping)
    vol = client.get(["vol-2"], with_embedding=True).items[0]
    hit = client.search(pb.SearchRequest(volume=_nifti(2, 72), k=1)).hits[0]
    assert hit.id == "vol-2" and hit.score == pytest.approx(1.0, abs=1e-4)
    assert len(vol.embedding) == local.dim


def test_every_query_kind_answers_through_triton(client, ingested):
    text = client.search(pb.SearchRequest(text=TEXTS["r-2"], k=3))
    assert text.hits[0].id == "r-2" and text.hits[0].score == pytest.approx(1.0, abs=1e-4)
    image = client.search(pb.SearchRequest(image=_png(_images()["img-1"]), k=3))
    assert image.hits[0].id == "img-1" and image.hits[0].score == pytest.approx(1.0, abs=1e-4)
    volume = client.search(pb.SearchRequest(volume=_nifti(1, 40), k=2))
    assert [h.id for h in volume.hits][0] == "vol-1"
    by_id = client.search(pb.SearchRequest(item_id="img-0", k=3))
    assert {h.id for h in by_id.hits} == {"img-1", "img-2"}  # itself excluded
    text_to_image = client.search(pb.SearchRequest(text="chest radiograph", collection="image",
                                                   k=3))
    assert {h.id for h in text_to_image.hits} == {"img-0", "img-1", "img-2"}
    # item_id scores are cosines of the stored (Triton-made) embeddings
    emb = {it.id: it.embedding for it in
           client.get(["img-0", "img-1", "img-2"], with_embedding=True).items}
    for h in by_id.hits:
        assert h.score == pytest.approx(_cos(emb["img-0"], emb[h.id]), abs=1e-5)


def test_filters_and_delete_through_triton(client, ingested):
    pa = client.search(pb.SearchRequest(item_id="img-2", k=5, filters=pb.Filters(view=["PA"])))
    assert {h.id for h in pa.hits} == {"img-0", "img-1"}
    client.ingest([pb.IngestItem(id="r-tmp", text="Tiny right apical pneumothorax.")])
    assert client.search(pb.SearchRequest(text="Tiny right apical pneumothorax.", k=1)
                         ).hits[0].id == "r-tmp"
    assert list(client.delete(["r-tmp"]).deleted) == ["r-tmp"]
    ids = [h.id for h in client.search(pb.SearchRequest(
        text="Tiny right apical pneumothorax.", k=10)).hits]
    assert "r-tmp" not in ids and len(ids) == 3


def test_region_rerank_and_diversification_through_triton(client, ingested):
    # B's centre is the query's centre (region cosine 1); A is the query with another centre.
    yy, xx = np.mgrid[0:64, 0:64]
    c = slice(20, 44)
    q = (xx * 3 + 20).astype(np.float64)
    q[c, c] = (((xx + yy) // 4) % 2 * 255)[c, c]
    a = q.copy()
    a[c, c] = 128
    b = 255 - xx * 3.0
    b[c, c] = q[c, c]
    client.ingest([pb.IngestItem(id=f"rr-{n}", image=_png(arr), body_part="wrist",
                                 patient_pseudonym="PW", regions=[pb.Region(name="centre",
                                                                           box=CENTRE)])
                   for n, arr in (("A", a), ("B", b))])
    wrist = pb.Filters(body_part=["wrist"])
    plain = client.search(pb.SearchRequest(image=_png(q), k=2, filters=wrist))
    reranked = client.search(pb.SearchRequest(image=_png(q), k=2, filters=wrist,
                                              region=pb.Region(name="centre", box=CENTRE)))
    assert [h.id for h in plain.hits] == ["rr-A", "rr-B"]
    assert [h.id for h in reranked.hits] == ["rr-B", "rr-A"]
    top = reranked.hits[0]
    assert top.matched_region == "centre" and top.region_score == pytest.approx(1.0, abs=1e-4)
    # both belong to patient PW: diversification keeps one of them
    div = client.search(pb.SearchRequest(image=_png(q), k=2, filters=wrist, diversify=True))
    assert [h.id for h in div.hits] == ["rr-A"]
    client.delete(["rr-A", "rr-B"])


def test_health_and_reflection_answer_while_triton_serves(client, ingested):
    with grpc.insecure_channel(f"127.0.0.1:{client.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="medseek.v1.Retrieval"), timeout=5)
        answers = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"medseek.v1.Retrieval", "grpc.health.v1.Health"} <= names


def test_volume_chunks_through_triton_are_stored_as_children(client, ingested):
    stats = {c.name: c for c in client.stats().collections}
    assert stats["chunk"].items >= 2 and stats["chunk"].indexed == stats["chunk"].items
    chunk = client.get(["vol-2/chunk/0"]).items[0]
    assert chunk.parent_id == "vol-2" and chunk.collection == "chunk"
    assert chunk.HasField("z_range") and chunk.z_range.z_start == 0 < chunk.z_range.z_end
