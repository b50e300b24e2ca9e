"""``Diagnose``: the labels of the k nearest neighbours voted into probabilities. Real gRPC
server on port 0, real SQLite and FAISS, the in-process torch encoder."""

from __future__ import annotations

import math

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")  # the [server] extra
pytest.importorskip("grpc_health")
from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.commands import main  # noqa: E402
from medseek.serve.config import BatchConfig, ServeConfig  # noqa: E402
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

from test_serve_api import png_bytes  # noqa: E402

#: four labelled radiographs: "fracture" on three, "effusion" on one, one without labels
IMAGES = {"gradient": ["fracture"], "circle": ["effusion", "fracture"],
          "stripes": ["fracture"], "checker": []}
BOX = pb.Box(x0=12, y0=12, x1=36, y1=36)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("diagnose")
    cfg = ServeConfig(store_path=d / "store.db", index_dir=d / "index", port=0, grace_s=2.0,
                      encode_batch=BatchConfig(max_wait_ms=10.0))
    with ServerThread(cfg, LocalTorchEncoder(seed=0)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with RetrievalClient(f"127.0.0.1:{server.port}") as c:
        items = [pb.IngestItem(id=f"img-{p}", image=png_bytes(p), labels=labels, view=p,
                               regions=[pb.Region(name="centre", box=BOX)])
                 for p, labels in IMAGES.items()]
        items += [pb.IngestItem(id=f"r-{n}", text=t) for n, t in enumerate((
            "Left pleural effusion.", "No acute cardiopulmonary abnormality."))]  # no labels
        assert c.ingest(items).inserted == 6
        yield c


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def _probs(resp) -> dict[str, float]:
    return {p.label: p.probability for p in resp.probabilities}


def test_probabilities_are_the_weighted_vote_of_the_neighbours(client):
    resp = client.diagnose(pb.DiagnoseRequest(image=png_bytes("stripes"), k=3,
                                              request_id="d1"))
    assert resp.request_id == "d1" and resp.temperature == pytest.approx(0.1)
    scores = np.array([h.score for h in resp.neighbours], dtype=np.float64)
    assert len(scores) == 3 and resp.neighbours[0].id == "img-stripes"
    assert (np.diff(scores) <= 0).all()  # closest first
    w = np.exp((scores - scores.max()) / 0.1)
    w /= w.sum()  # softmax(score / temperature) over the k neighbours
    np.testing.assert_allclose(resp.weights, w, atol=1e-6)
    labels = [set(h.item.labels) for h in resp.neighbours]
    want = {lab: sum(wj for wj, ls in zip(w, labels) if lab in ls)
            for lab in set().union(*labels)}
    assert _probs(resp) == pytest.approx(want, abs=1e-6)
    assert resp.no_label_probability == pytest.approx(
        sum(wj for wj, ls in zip(w, labels) if not ls), abs=1e-6)
    ps = [p.probability for p in resp.probabilities]
    assert ps == sorted(ps, reverse=True)
    assert resp.timings_ms["ann"] >= 0


def test_temperature_moves_from_nearest_neighbour_to_majority(client):
    # k = 4 covers the whole collection: a flat vote is the label frequency
    flat = client.diagnose(pb.DiagnoseRequest(image=png_bytes("circle"), k=4,
                                              temperature=1e4))
    assert _probs(flat) == pytest.approx({"fracture": 0.75, "effusion": 0.25}, abs=1e-3)
    assert flat.no_label_probability == pytest.approx(0.25, abs=1e-3)
    # a sharp vote follows the identical image: both of its labels, nothing else
    sharp = client.diagnose(pb.DiagnoseRequest(image=png_bytes("circle"), k=4,
                                               temperature=1e-3))
    assert sharp.neighbours[0].id == "img-circle"
    assert sharp.neighbours[0].score - sharp.neighbours[1].score > 0.01
    assert _probs(sharp) == pytest.approx({"fracture": 1.0, "effusion": 1.0}, abs=1e-3)
    assert sharp.no_label_probability == pytest.approx(0.0, abs=1e-3)


def test_stored_item_votes_without_itself_and_region_rerank_applies(client):
    resp = client.diagnose(pb.DiagnoseRequest(item_id="img-circle", k=3))
    assert "img-circle" not in [h.id for h in resp.neighbours] and len(resp.neighbours) == 3
    assert _probs(resp)["fracture"] == pytest.approx(
        sum(w for w, h in zip(resp.weights, resp.neighbours) if "fracture" in h.item.labels))
    region = client.diagnose(pb.DiagnoseRequest(image=png_bytes("circle"), k=2,
                                                region=pb.Region(name="centre", box=BOX)))
    assert all(h.matched_region == "centre" for h in region.neighbours)
    assert region.neighbours[0].region_score == pytest.approx(1.0, abs=1e-4)


def test_unlabelled_neighbours_vote_no_label(client):
    resp = client.diagnose(pb.DiagnoseRequest(image=png_bytes("circle"), k=2,
                                              filters=pb.Filters(view=["checker"])))
    assert [h.id for h in resp.neighbours] == ["img-checker"]
    assert list(resp.probabilities) == [] and resp.no_label_probability == pytest.approx(1.0)


@pytest.mark.parametrize("request_, code, words", [
    (pb.DiagnoseRequest(text="fracture", collection="image", k=5000),
     grpc.StatusCode.INVALID_ARGUMENT, "k: must be in [1, 1000], got 5000"),
    (pb.DiagnoseRequest(text="fracture", temperature=0.0),
     grpc.StatusCode.INVALID_ARGUMENT, "temperature: must be finite and > 0"),
    (pb.DiagnoseRequest(text="fracture", temperature=math.nan),
     grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (pb.DiagnoseRequest(k=3), grpc.StatusCode.INVALID_ARGUMENT, "query"),
    (pb.DiagnoseRequest(item_id="no-such-item"), grpc.StatusCode.NOT_FOUND,
     "item_id: no stored item 'no-such-item'"),
    (pb.DiagnoseRequest(text="fracture", collection="volume"),
     grpc.StatusCode.FAILED_PRECONDITION, "'volume' holds no items to vote"),
    (pb.DiagnoseRequest(text="fracture", collection="image",
                        filters=pb.Filters(view=["lateral"])),
     grpc.StatusCode.FAILED_PRECONDITION, "holds no items that pass the filters"),
    (pb.DiagnoseRequest(text="pleural effusion"),
     grpc.StatusCode.FAILED_PRECONDITION, "'report' holds no labelled items"),
])
def test_bad_requests_get_the_right_code_and_the_server_keeps_serving(client, request_, code,
                                                                      words):
    got, msg = _code(lambda: client.diagnose(request_))
    assert got == code and words in msg
    assert client.diagnose(pb.DiagnoseRequest(image=png_bytes("stripes"), k=1)
                           ).neighbours[0].id == "img-stripes"


def test_cli_query_diagnose_prints_the_probabilities(server, client, tmp_path, capsys):
    png = tmp_path / "q.png"
    png.write_bytes(png_bytes("circle"))
    common = ["--server", f"127.0.0.1:{server.port}"]
    assert main(["query", "--diagnose", "--image", str(png), "-k", "4", "--temperature",
                 "10000", *common]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["label", "probability"]
    assert out[1].split() == ["fracture", "0.7500"] and out[2].split() == ["effusion", "0.2500"]
    assert out[3].split() == ["(no", "label)", "0.2500"]
    assert "voted by 4 neighbours" in out[4] and "img-circle" in out[5]
    with pytest.raises(SystemExit, match="--temperature needs --diagnose"):
        main(["query", "--image", str(png), "--temperature", "1", *common])
