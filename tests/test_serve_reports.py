"""The report collection served with the hybrid ranker (issue 12), end to end: a real gRPC
client against the real server (port 0, SQLite, FAISS), the in-process MiniLM +
laterality-aware concepts for report text, the served encoder for everything else; and
stores whose report collection was built with the joint text embedding.

The reports are written for these tests (no IU text).
"""

from __future__ import annotations

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")  # the [server] extra

from medseek.index import ItemRecord, Store, StoreConfig  # noqa: E402
from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.config import ServeConfig  # noqa: E402
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402
from medseek.serve.report_ranker import HybridReportEncoder, meta_key  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402
from medseek.text.concepts import lateral_concept_names  # noqa: E402

from test_serve_api import png_bytes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

RIGHT = {"r-right-1": "Small right pleural effusion.",
         "r-right-2": "Moderate pleural effusion on the right. Heart size is normal.",
         "r-right-3": "Right pleural effusion with no pneumothorax."}
LEFT = {"l-left-1": "Small left pleural effusion.",
        "l-left-2": "Moderate pleural effusion on the left. Heart size is normal.",
        "l-left-3": "Left pleural effusion. No right effusion."}
OTHER = {"o-bilateral": "Small bilateral pleural effusions.",
         "o-cardio": "Cardiomegaly. No pleural effusion.",
         "o-normal": "The lungs are clear. No acute cardiopulmonary abnormality."}
REPORTS = {**RIGHT, **LEFT, **OTHER}
N_CONCEPTS = len(lateral_concept_names())


@pytest.fixture(scope="module")
def encoder():
    return LocalTorchEncoder(seed=0)


@pytest.fixture(scope="module")
def served(tmp_path_factory, encoder):
    d = tmp_path_factory.mktemp("reports")
    cfg = ServeConfig(store_path=d / "store.db", index_dir=d / "index", port=0, grace_s=2.0)
    with ServerThread(cfg, encoder) as s, RetrievalClient(f"127.0.0.1:{s.port}") as c:
        c.ingest([pb.IngestItem(id=i, text=t, modality="report", patient_pseudonym=i)
                  for i, t in REPORTS.items()]
                 + [pb.IngestItem(id="img-circle", image=png_bytes("circle"))])
        yield s, c


def test_right_sided_reports_rank_above_left_sided_ones(served):
    _, client = served
    resp = client.search(pb.SearchRequest(text="right pleural effusion", k=len(REPORTS),
                                          diversify=False))
    ids = [h.id for h in resp.hits]
    assert set(ids) == set(REPORTS)
    worst_right = max(ids.index(i) for i in RIGHT)
    best_left = min(ids.index(i) for i in LEFT)
    assert worst_right < best_left, ids
    # and the mirror query mirrors the order
    resp = client.search(pb.SearchRequest(text="left pleural effusion", k=len(REPORTS),
                                          diversify=False))
    ids = [h.id for h in resp.hits]
    assert max(ids.index(i) for i in LEFT) < min(ids.index(i) for i in RIGHT), ids
    # the side is in the explanation: the shared concepts read from the hybrid vector
    top = resp.hits[0]
    assert "left pleural effusion" in [c.name for c in top.concepts]
    assert "right pleural effusion" not in [c.name for c in top.concepts]


def test_report_vectors_are_hybrid_and_other_collections_joint(served, encoder):
    _, client = served
    hybrid_dim = encoder.dim + N_CONCEPTS  # MiniLM 384 + 139 concept axes
    dims = {c.name: c.dim for c in client.stats().collections}
    assert dims["report"] == hybrid_dim and dims["image"] == encoder.dim
    got = client.get(["r-right-1", "l-left-1"], with_embedding=True).items
    assert [len(g.embedding) for g in got] == [hybrid_dim, hybrid_dim]
    want = HybridReportEncoder(encoder._text).encode_texts([REPORTS["r-right-1"],
                                                            REPORTS["l-left-1"]])
    stored = np.array([list(g.embedding) for g in got], dtype=np.float32)
    np.testing.assert_allclose(stored, want, rtol=0, atol=1e-4)
    names = lateral_concept_names()
    concepts = stored[:, encoder.dim:]  # the concept part: which axes are on
    assert {names[j] for j in np.flatnonzero(concepts[0])} == {"pleural effusion",
                                                               "right pleural effusion"}
    assert {names[j] for j in np.flatnonzero(concepts[1])} == {"pleural effusion",
                                                               "left pleural effusion"}
    # text -> image still goes through the served encoder's text tower
    hits = client.search(pb.SearchRequest(text="chest radiograph", collection="image", k=1)).hits
    assert [h.id for h in hits] == ["img-circle"]


def test_only_text_enters_or_queries_the_hybrid_report_collection(served):
    _, client = served
    with pytest.raises(grpc.RpcError) as err:
        client.search(pb.SearchRequest(image=png_bytes("circle"), collection="report", k=1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hybrid report embeddings" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.ingest([pb.IngestItem(id="img-x", image=png_bytes("stripes"), collection="report")])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[0].image" in err.value.details()
    # a stored report queries its own collection with its stored (hybrid) vector
    hits = client.search(pb.SearchRequest(item_id="r-right-1", k=2, diversify=False)).hits
    assert hits[0].id in RIGHT and hits[0].id != "r-right-1"


def _old_store(path, encoder) -> None:
    """A store as the server wrote it before the hybrid ranker: report text embedded by the
    encoder's text tower, no ranker recorded."""
    texts = list(REPORTS.values())
    with Store(StoreConfig(path)) as store:
        store.upsert([ItemRecord(id=i, collection="report") for i in REPORTS],
                     encoder.encode_texts(texts))
        assert store.get_meta(meta_key("default", "report")) is None


def test_old_joint_store_keeps_serving_joint(tmp_path, encoder):
    _old_store(tmp_path / "old.db", encoder)
    cfg = ServeConfig(store_path=tmp_path / "old.db", index_dir=tmp_path / "idx", port=0,
                      grace_s=1.0)
    with ServerThread(cfg, encoder) as s, RetrievalClient(f"127.0.0.1:{s.port}") as c:
        assert {x.name: x.dim for x in c.stats().collections}["report"] == encoder.dim
        hit = c.search(pb.SearchRequest(text=REPORTS["l-left-2"], k=1)).hits[0]
        assert hit.id == "l-left-2" and hit.score == pytest.approx(1.0, abs=1e-4)
        c.ingest([pb.IngestItem(id="new", text="Tiny left apical pneumothorax.")])
        assert len(c.get(["new"], with_embedding=True).items[0].embedding) == encoder.dim
    with Store(StoreConfig(tmp_path / "old.db")) as store:
        assert store.get_meta(meta_key("default", "report")) == "joint"


def test_ranker_that_disagrees_with_the_store_is_refused_by_name(tmp_path, encoder):
    _old_store(tmp_path / "old.db", encoder)
    cfg = ServeConfig(store_path=tmp_path / "old.db", index_dir=tmp_path / "idx", port=0,
                      report_ranker="hybrid")
    with pytest.raises(ValueError, match="report_ranker is 'hybrid'.*holds 'joint'"):
        ServerThread(cfg, encoder)
    # and the other way round: a hybrid store is not served joint
    cfg = ServeConfig(store_path=tmp_path / "new.db", index_dir=tmp_path / "idx2", port=0,
                      grace_s=1.0)
    with ServerThread(cfg, encoder) as s, RetrievalClient(f"127.0.0.1:{s.port}") as c:
        c.ingest([pb.IngestItem(id="a", text="Right pleural effusion.")])
    with pytest.raises(ValueError, match="report_ranker is 'joint'.*holds 'hybrid:"):
        ServerThread(ServeConfig(store_path=tmp_path / "new.db", index_dir=tmp_path / "idx2",
                                 port=0, report_ranker="joint"), encoder)


def test_report_collection_of_an_unknown_dim_is_refused(tmp_path, encoder):
    with Store(StoreConfig(tmp_path / "odd.db")) as store:
        vec = np.zeros((1, 7), dtype=np.float32)
        vec[0, 0] = 1.0
        store.upsert([ItemRecord(id="x", collection="report")], vec)
    cfg = ServeConfig(store_path=tmp_path / "odd.db", index_dir=tmp_path / "idx", port=0)
    with pytest.raises(ValueError, match="holds dim-7 embeddings with no recorded report ranker"):
        ServerThread(cfg, encoder)
