"""The named-region localiser (WristMIR's first stage): model format, a training run that
must learn, the shipped wrist weights on unseen phantoms, synth-cxr boxes that leave the
pixels alone, and automatic regions through the real gRPC server (port 0, SQLite, FAISS,
in-process ONNX Runtime encoder of a seeded wrist-tiny)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from medseek.data.synth.wrist import build_synth_wrist, render_wrist
from medseek.models.localiser import (REGION_SETS, BoxLocaliser, LocaliserConfig, box_iou, giou,
                                      list_localisers, load_localiser, localiser_loss,
                                      predict_boxes, read_localiser_card, save_localiser)
from medseek.train.localiser import iou_report, load_box_set, mean_iou, train_localiser

WRIST = REGION_SETS["wrist"]


def test_output_is_one_ordered_normalised_box_per_region():
    torch.manual_seed(0)
    model = BoxLocaliser(LocaliserConfig.for_set("wrist", image_size=64)).eval()
    with torch.no_grad():
        out = model(torch.rand(5, 1, 64, 64))
    assert out.shape == (5, len(WRIST), 4)
    assert (out >= 0).all() and (out <= 1).all()
    assert (out[..., 2] >= out[..., 0]).all() and (out[..., 3] >= out[..., 1]).all()
    with pytest.raises(ValueError, match=r"x must be \(B, 1, 64, 64\)"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        LocaliserConfig.for_set("wrist", image_size=80)
    with pytest.raises(ValueError, match="localiser must be one of"):
        LocaliserConfig.for_set("knee")
    # predict_boxes answers in each image's own pixels, whatever its size
    a, b = np.random.default_rng(0).random((40, 100)), np.random.default_rng(1).random((64, 64))
    px = predict_boxes(model, [a, b])
    assert px.shape == (2, len(WRIST), 4) and px.dtype == np.float32
    assert px[0, :, 2].max() <= 100 and px[0, :, 3].max() <= 40
    with torch.no_grad():
        norm = model(torch.from_numpy(b[None, None].astype(np.float32)))[0].numpy()
    np.testing.assert_allclose(px[1], norm * 64, rtol=1e-5, atol=1e-4)


def test_iou_giou_and_loss():
    a = torch.tensor([[0.1, 0.1, 0.5, 0.5]])
    assert box_iou(a, a).item() == pytest.approx(1.0)
    half = torch.tensor([[0.3, 0.1, 0.7, 0.5]])
    assert box_iou(a, half).item() == pytest.approx(1 / 3, abs=1e-6)
    far = torch.tensor([[0.6, 0.6, 0.9, 0.9]])
    assert box_iou(a, far).item() == 0.0 and giou(a, far).item() < 0  # apart: still a signal
    assert localiser_loss(a[None], a[None]).item() == pytest.approx(0.0, abs=1e-6)
    assert localiser_loss(far[None], a[None]).item() > localiser_loss(half[None], a[None]).item()
    with pytest.raises(ValueError, match=r"\(B, R, 4\)"):
        localiser_loss(a, a[None])


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("loc-wrist")
    build_synth_wrist(root, n=40, seed=3, size=64, progress=False)
    return root


def test_training_learns_the_boxes(tiny_corpus, tmp_path, one_torch_thread):
    """A short run must lift IoU well above the untrained model's (a broken loss, target
    or augmentation leaves it near the start), and a saved checkpoint reloads exactly."""
    cfg = LocaliserConfig(name="wrist", regions=WRIST, image_size=64, stem=16, channels=(24, 32),
                          hidden=128)
    train = load_box_set(tiny_corpus, "train", cfg.regions, 64)
    assert train.images.shape[1:] == (1, 64, 64) and train.boxes.shape[1:] == (3, 4)
    torch.manual_seed(0)
    before = mean_iou(BoxLocaliser(cfg), train)
    model, history = train_localiser(cfg, train, None, steps=150, batch_size=32, lr=3e-3,
                                     max_shift=2, eval_every=50)
    after = mean_iou(model, train)
    assert [h["step"] for h in history] == [50, 100, 150]
    assert history[-1]["loss"] < history[0]["loss"]
    assert after >= 0.6 and after > before + 0.3, (before, after)
    card = save_localiser(model, tmp_path, {"steps": 150})
    again = load_localiser(tmp_path / "wrist.json")
    assert mean_iou(again, train) == pytest.approx(after, abs=0.01)  # float16 weights
    assert card["dtype"] == "float16" and list(card["config"]["channels"]) == [24, 32]
    (tmp_path / "wrist.safetensors").write_bytes(b"0" + (tmp_path / "wrist.safetensors").read_bytes())
    with pytest.raises(ValueError, match="SHA-256"):
        load_localiser(tmp_path / "wrist.json")


def test_shipped_wrist_weights_find_the_bones_of_unseen_phantoms(tmp_path):
    """Seed 9 (training used seed 1): the shipped localiser's mean IoU with the
    generator's boxes is >= 0.6 on every bone, and its card says how it was made."""
    assert "wrist" in list_localisers()
    card = read_localiser_card("wrist")
    assert card["corpus"] == {"kind": "synth-wrist", "n": 800, "size": 128, "seed": 1}
    assert card["bytes"] < 20 * 2**20 and "--localiser wrist" in card["reproduce"]
    model = load_localiser("wrist")
    build_synth_wrist(tmp_path, n=12, seed=9, size=128, progress=False)
    data = load_box_set(tmp_path, None, WRIST, 128)
    with torch.no_grad():
        iou = box_iou(model(data.images), data.boxes).mean(0)
    assert len(data) == 24
    assert (iou >= 0.6).all(), dict(zip(WRIST, iou.tolist()))
    report = iou_report(model, data, n_boot=200)
    assert report["distal radius"]["lo"] <= report["distal radius"]["value"] <= report["distal radius"]["hi"]


class _Report:
    """A report of our own (tests never read IU text into fixtures)."""

    def __init__(self, uid: str, terms: list[str]) -> None:
        self.uid, self.mesh_major, self.text = uid, tuple(terms), "No acute disease."


_CHEST_TERMS = ([], ["Cardiomegaly/mild"], ["Pleural Effusion/right"], ["Cardiomegaly/severe"],
                ["Pneumothorax/left"], ["Opacity/lung/base/left"])


def test_shipped_chest_weights_find_the_zones_of_unseen_phantoms(tmp_path):
    """Seed 6 (training used seed 0, other report keys): PA films only; mean IoU >= 0.6 on
    every region, and the card names its corpus."""
    from medseek.data.synth.cxr import build_synth_cxr

    assert "chest" in list_localisers()
    card = read_localiser_card("chest")
    assert card["corpus"]["kind"] == "synth-cxr" and card["config"]["regions"] == list(REGION_SETS["chest"])
    build_synth_cxr(tmp_path, seed=6, size=128, progress=False,
                    reports=[_Report(f"T{i}", _CHEST_TERMS[i % len(_CHEST_TERMS)]) for i in range(18)])
    model = load_localiser("chest")
    data = load_box_set(tmp_path, None, REGION_SETS["chest"], 128)
    images, boxes = data.images, data.boxes
    assert len(images) == 18  # the PA films; laterals carry the cardiac silhouette only
    with torch.no_grad():
        iou = box_iou(model(images), boxes).mean(0)
    assert (iou >= 0.6).all(), dict(zip(REGION_SETS["chest"], iou.tolist()))


def test_which_localiser_covers_a_film():
    from medseek.models.localiser import localiser_for_body_part

    assert localiser_for_body_part("WRIST") == "wrist" == localiser_for_body_part(" hand ", "LAT")
    assert localiser_for_body_part("CHEST", "PA") == "chest" == localiser_for_body_part("chest", "ap")
    assert localiser_for_body_part("CHEST", "LATERAL") is None  # trained on frontal films
    assert localiser_for_body_part("CHEST") is None and localiser_for_body_part("KNEE", "PA") is None


def test_cxr_boxes_leave_every_pixel_as_it_was(tmp_path):
    """Rendering with boxes asked for gives the same pixels as without, the corpus's PNGs
    are those pixels, and the boxes sit where the generator drew the lungs and heart."""
    from medseek.data.manifest import read_manifest
    from medseek.data.mesh import parse_mesh_terms
    from medseek.data.synth.cxr import build_synth_cxr, render_case
    from medseek.io import read_image

    for key, terms in (("K1", []), ("K2", ["Cardiomegaly/severe", "Pleural Effusion/right"])):
        boxes: dict = {}
        plain = render_case(parse_mesh_terms(terms), 4, key, 96)
        with_boxes = render_case(parse_mesh_terms(terms), 4, key, 96, boxes=boxes)
        for view in plain:
            assert hashlib.sha256(plain[view].tobytes()).digest() == \
                hashlib.sha256(with_boxes[view].tobytes()).digest()
        assert set(boxes["PA"]) == set(REGION_SETS["chest"])
        assert set(boxes["LATERAL"]) == {"cardiac silhouette"}
        pa = boxes["PA"]
        # right lung on the image left; zones stack top to bottom; the heart is central
        assert pa["right mid zone"][2] <= pa["left mid zone"][0]
        assert pa["right upper zone"][3] == pytest.approx(pa["right mid zone"][1], abs=0.11)
        assert pa["right lower zone"][1] < pa["right costophrenic angle"][3] <= pa["right lower zone"][3]
        heart = pa["cardiac silhouette"]
        assert heart[0] < 48 < heart[2] and heart[1] > pa["right upper zone"][3]

    recs = build_synth_cxr(tmp_path, seed=4, size=96, progress=False,
                           reports=[_Report("K1", []), _Report("K2", ["Cardiomegaly/severe"])])
    assert read_manifest(tmp_path) == recs
    for r in (r for r in recs if r.kind == "image"):
        key, view = r.id.rsplit("_", 1)
        view = "PA" if view == "PA" else "LATERAL"
        boxes = {}
        img = render_case(parse_mesh_terms(["Cardiomegaly/severe"] if key == "K2" else []), 4, key,
                          96, boxes=boxes)[view]
        np.testing.assert_array_equal(read_image(tmp_path / r.path).pixels, img)
        assert {g.name: tuple(g.box) for g in r.regions} == boxes[view]


# -- through the real gRPC server ----------------------------------------------------------
grpc = pytest.importorskip("grpc")  # the [server] extra


def _png(arr: np.ndarray) -> bytes:
    from medseek.data.synth.common import png_bytes

    return png_bytes(arr)


def _film(patient: int) -> tuple[np.ndarray, dict]:
    """A PA wrist phantom of seed 5 (unseen by the shipped models) and its true boxes."""
    images, boxes, _, _ = render_wrist(5, patient, 0, {}, 128)
    return images["PA"], boxes["PA"]


def _iou(a, b) -> float:
    return float(box_iou(torch.tensor([a], dtype=torch.float32), torch.tensor([b], dtype=torch.float32)))


@pytest.fixture(scope="module")
def auto_server(tmp_path_factory):
    """A server with auto_regions on, over a seeded wrist-tiny (a region head)."""
    from medseek.encoders import OnnxRuntimeEncoder
    from medseek.export.repository import write_repository
    from medseek.models import create_model
    from medseek.serve.client import RetrievalClient
    from medseek.serve.config import ServeConfig
    from medseek.serve.server import ServerThread

    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    tmp = tmp_path_factory.mktemp("auto-serve")
    torch.manual_seed(11)
    write_repository(create_model("wrist-tiny").eval(), tmp / "repo")
    config = ServeConfig(store_path=tmp / "store.db", index_dir=tmp / "index", port=0,
                         grace_s=1.0, auto_regions=True)
    with ServerThread(config, OnnxRuntimeEncoder(tmp / "repo", "image")) as s:
        with RetrievalClient(f"127.0.0.1:{s.port}") as c:
            yield c, tmp
    faiss.omp_set_num_threads(threads)


def test_ingest_without_boxes_stores_automatic_region_children(auto_server):
    from medseek.serve.v1 import retrieval_pb2 as pb

    client, _ = auto_server
    films = [_film(p) for p in range(6)]
    own = pb.Region(name="distal radius", box=pb.Box(x0=10, y0=10, x1=40, y1=40))
    resp = client.ingest(  # other films for the last two: equal pixels are duplicates
        [pb.IngestItem(id=f"w{p}", image=_png(img), body_part="WRIST") for p, (img, _) in enumerate(films)]
        + [pb.IngestItem(id="drawn", image=_png(_film(6)[0]), body_part="WRIST", regions=[own]),
           pb.IngestItem(id="chest", image=_png(_film(7)[0]), body_part="CHEST")])
    assert resp.inserted == 8
    ids = [f"w{p}/region/auto/{r}" for p in range(6) for r in WRIST]
    kids = {k.id: k for k in client.get(ids).items}
    assert set(kids) == set(ids)
    for p, (_, truth) in enumerate(films):
        for r in WRIST:
            k = kids[f"w{p}/region/auto/{r}"]
            assert k.automatic and k.parent_id == f"w{p}" and k.region == r and k.collection == "region"
            assert _iou((k.box.x0, k.box.y0, k.box.x1, k.box.y1), truth[r]) >= 0.6, (p, r)
    # a client's own boxes are kept as they are, and are not automatic
    drawn = client.get(["drawn/region/distal radius"]).items[0]
    assert not drawn.automatic and (drawn.box.x0, drawn.box.x1) == (10, 40)
    for missing in ("drawn/region/auto/distal radius", "chest/region/auto/distal radius"):
        with pytest.raises(grpc.RpcError) as err:
            client.get([missing])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_frontal_chest_films_get_the_chest_regions(auto_server):
    """A PA chest film gets its nine zones; the same patient's lateral film gets none."""
    from medseek.data.mesh import parse_mesh_terms
    from medseek.data.synth.cxr import render_case
    from medseek.serve.v1 import retrieval_pb2 as pb

    client, _ = auto_server
    truth: dict = {}
    films = render_case(parse_mesh_terms(["Cardiomegaly/mild"]), 8, "G1", 128, boxes=truth)
    client.ingest([pb.IngestItem(id="cxr-pa", image=_png(films["PA"]), body_part="CHEST", view="PA"),
                   pb.IngestItem(id="cxr-lat", image=_png(films["LATERAL"]), body_part="CHEST",
                                 view="LATERAL")])
    names = REGION_SETS["chest"]
    kids = client.get([f"cxr-pa/region/auto/{r}" for r in names]).items
    assert [k.region for k in kids] == list(names) and all(k.automatic for k in kids)
    ious = [_iou((k.box.x0, k.box.y0, k.box.x1, k.box.y1), truth["PA"][k.region]) for k in kids]
    assert np.mean(ious) >= 0.6, dict(zip(names, ious))
    with pytest.raises(grpc.RpcError) as err:
        client.get(["cxr-lat/region/auto/cardiac silhouette"])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_region_query_without_box_uses_the_localiser(auto_server):
    from medseek.serve.v1 import retrieval_pb2 as pb

    client, _ = auto_server
    q, truth = _film(50)
    resp = client.search(pb.SearchRequest(image=_png(q), k=4, region=pb.Region(name="distal radius")))
    assert len(resp.hits) == 4
    for h in resp.hits:
        assert h.matched_region == "distal radius"
        assert h.region_id.endswith("/region/auto/distal radius") or h.region_id.endswith(
            "/region/distal radius")
    # the same query with the generator's own box ranks (nearly) the same: the found box is close
    drawn = client.search(pb.SearchRequest(image=_png(q), k=4, region=pb.Region(
        name="distal radius", box=pb.Box(x0=truth["distal radius"][0], y0=truth["distal radius"][1],
                                         x1=truth["distal radius"][2], y1=truth["distal radius"][3]))))
    assert {h.id for h in drawn.hits} & {h.id for h in resp.hits}
    # a name no localiser knows still needs a box
    with pytest.raises(grpc.RpcError) as err:
        client.search(pb.SearchRequest(image=_png(q), k=2, region=pb.Region(name="patella")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "region.box" in err.value.details()


def test_demo_step(auto_server, tmp_path):
    from medseek.demo_localiser import demo_step

    client, _ = auto_server
    lines: list[str] = []
    got = demo_step(client, tmp_path, log=lines.append, n=3)
    assert got["children"] == 9 and got["mean_iou"] >= 0.7
    assert got["query_hits"] >= 1 and got["matched_region"] == "distal radius"
    assert (tmp_path / "auto_regions.png").stat().st_size > 0 and "IoU" in lines[-1]
