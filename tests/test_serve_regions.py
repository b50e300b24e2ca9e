"""Region children and region queries through the real gRPC server (port 0, SQLite, FAISS)
with an in-process ONNX Runtime encoder of a region-head model (wrist-tiny, seeded): they
are embedded by the exported region pathway, boxes mapped from uploaded pixels to model
input pixels, not by the global tower on a crop; and a store is never mixed with crop
vectors of a server that has no region pathway.

Expected vectors come from torch (``DualEncoder.encode_image_and_regions``) on the
service's preprocessing of the same bytes, with the box scaled by hand."""

from __future__ import annotations

import io
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image

grpc = pytest.importorskip("grpc")  # the [server] extra

from medseek.io import unit_intensity  # noqa: E402
from medseek.encoders import OnnxRuntimeEncoder  # noqa: E402
from medseek.export.repository import write_repository  # noqa: E402
from medseek.models import create_model  # noqa: E402
from medseek.search import SearchConfig  # noqa: E402
from medseek.serve import ingest as ing  # noqa: E402
from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.config import ServeConfig  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

H, W = 80, 120  # uploaded size; the model's input is 64x64, so x scales by 64/120, y by 64/80
BOX = (30.0, 18.5, 91.0, 62.0)  # uploaded pixels
N_IMAGES = 6


def _image(seed: int) -> np.ndarray:
    """A uint8 (H, W) radiograph-like pattern: a gradient, a blob, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    cy, cx = rng.uniform(10, H - 10), rng.uniform(10, W - 10)
    blob = 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(60, 400))
    img = rng.uniform(0.2, 1.0) * xx + rng.uniform(-0.5, 0.5) * yy + blob + rng.normal(0, 15, (H, W))
    return np.clip(img + 40, 0, 255).astype(np.uint8)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _payload(arr: np.ndarray) -> np.ndarray:
    """The service's encoder input of an upload: 8-bit / 255, stretched to 64x64."""
    return np.array(ing.resize(unit_intensity(arr), (64, 64))[None])


def _model_box(box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.array([x0 * 64 / W, y0 * 64 / H, x1 * 64 / W, y1 * 64 / H], np.float32)


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _box(box) -> pb.Box:
    return pb.Box(x0=box[0], y0=box[1], x1=box[2], y1=box[3])


@pytest.fixture(scope="module")
def wrist(tmp_path_factory):
    """(torch model, repository) of a seeded wrist-tiny: a region head of its own."""
    torch.manual_seed(11)
    model = create_model("wrist-tiny").eval()
    out = tmp_path_factory.mktemp("wrist-repo")
    write_repository(model, out)
    return model, out


def _serve(tmp, repo, **cfg):
    config = ServeConfig(store_path=tmp / "store.db", index_dir=tmp / "index", port=0,
                         grace_s=1.0, **cfg)
    return ServerThread(config, OnnxRuntimeEncoder(repo, "image"))


@pytest.fixture(scope="module")
def served(wrist, tmp_path_factory):
    """A server on the wrist model (region rerank by the region alone: alpha 1), with
    N_IMAGES images ingested, each with its "centre" region child."""
    tmp = tmp_path_factory.mktemp("region-serve")
    with _serve(tmp, wrist[1], search=SearchConfig(rerank_alpha=1.0)) as s:
        with RetrievalClient(f"127.0.0.1:{s.port}") as c:
            resp = c.ingest([pb.IngestItem(id=f"img-{n}", image=_png(_image(n)), body_part="wrist",
                                           patient_pseudonym=f"P{n}",
                                           regions=[pb.Region(name="centre", box=_box(BOX))])
                             for n in range(N_IMAGES)])
            assert resp.inserted == N_IMAGES
            yield c, tmp


def test_region_child_is_the_region_head_output(wrist, served):
    model, repo = wrist
    client, tmp = served
    got = client.get(["img-2", "img-2/region/centre"], with_embedding=True).items
    stored_global, stored_region = (np.asarray(it.embedding) for it in got)
    assert got[1].parent_id == "img-2" and got[1].collection == "region"
    assert (got[1].box.x0, got[1].box.y0, got[1].box.x1, got[1].box.y1) == BOX
    x = _payload(_image(2))
    box = _model_box(BOX)
    with torch.inference_mode():
        g, r = model.encode_image_and_regions(torch.from_numpy(x[None]),
                                              torch.from_numpy(box[None, None]))
    assert _cos(stored_global, g[0].numpy()) >= 0.9999  # the payload is reproduced
    assert _cos(stored_region, r[0, 0].numpy()) >= 0.9999  # the region pathway ...
    # ... not the global tower on the box's crop (what a crop-pathway server stores),
    # nor the region head over the unscaled box (uploaded pixels taken as model pixels)
    crop = ing.crop(unit_intensity(_image(2)), _box(BOX), "box",
                    ing.PreprocessSpec(image_size=(64, 64)))
    assert _cos(stored_region, OnnxRuntimeEncoder(repo, "image").encode_images(crop[None])[0]) < 0.99
    with torch.inference_mode():
        unscaled = model.encode_regions(torch.from_numpy(x[None]),
                                        torch.tensor([[BOX]], dtype=torch.float32))
    assert _cos(stored_region, unscaled[0, 0].numpy()) < 0.999
    # the store records which pathway embedded its region children
    with sqlite3.connect(f"file:{tmp / 'store.db'}?mode=ro", uri=True) as con:
        mark = con.execute("SELECT value FROM meta WHERE key = ?",
                           ("region_pathway/default/region",)).fetchone()
    assert mark == ("region_head",)


def test_region_query_reranks_by_region_head_cosines(wrist, served):
    model, repo = wrist
    client, _ = served
    q = _image(100)
    x = torch.from_numpy(_payload(q)[None])
    with torch.inference_mode():
        _, qr = model.encode_image_and_regions(x, torch.from_numpy(_model_box(BOX)[None, None]))
    qr = qr[0, 0].numpy()
    ids = [f"img-{n}" for n in range(N_IMAGES)]
    kids = {it.parent_id: np.asarray(it.embedding) for it in
            client.get([f"{i}/region/centre" for i in ids], with_embedding=True).items}
    want = sorted(ids, key=lambda i: -_cos(qr, kids[i]))
    plain = client.search(pb.SearchRequest(image=_png(q), k=N_IMAGES))
    reranked = client.search(pb.SearchRequest(image=_png(q), k=N_IMAGES,
                                              region=pb.Region(name="centre", box=_box(BOX))))
    assert [h.id for h in reranked.hits] == want  # alpha 1: the region cosine alone
    assert [h.id for h in plain.hits] != want  # the rerank changed the order
    for h in reranked.hits:
        assert h.matched_region == "centre" and h.region_id == f"{h.id}/region/centre"
        assert h.region_score == pytest.approx(_cos(qr, kids[h.id]), abs=1e-4)
    # the query's region is the region head's too, not the crop's global embedding
    crop = ing.crop(unit_intensity(q), _box(BOX), "box",
                    ing.PreprocessSpec(image_size=(64, 64)))
    qc = OnnxRuntimeEncoder(repo, "image").encode_images(crop[None])[0]
    assert max(abs(h.region_score - _cos(qc, kids[h.id])) for h in reranked.hits) > 0.01
    # a stored item's region child as the query region: ranks by stored vectors
    by_id = client.search(pb.SearchRequest(item_id="img-0", k=N_IMAGES - 1,
                                           region=pb.Region(name="centre")))
    assert [h.id for h in by_id.hits] == sorted(ids[1:], key=lambda i: -_cos(kids["img-0"],
                                                                              kids[i]))


def test_bad_region_boxes_are_refused_by_field(served):
    client, _ = served
    with pytest.raises(grpc.RpcError) as err:
        client.ingest([pb.IngestItem(id="bad", image=_png(_image(50)), regions=[
            pb.Region(name="a", box=_box(BOX)), pb.Region(name="b", box=_box((W, 0, W + 9, 9)))])])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[0].regions[1].box" in err.value.details() and "2x2" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.search(pb.SearchRequest(image=_png(_image(50)), k=2, region=pb.Region(
            name="centre", box=_box((5, 5, 5.5, 30)))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "region.box" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.get(["bad"])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # nothing of the refused item stored


def test_a_crop_server_refuses_to_mix_into_a_region_head_store(wrist, tmp_path):
    """Region children of a store embedded by the region head, then a server without a
    region pathway (cxr-tiny: crops through the global tower) on the same store and model
    tag: region ingests and box queries are refused, everything else is served; under a
    model tag of its own the crop server writes its region children."""
    item = lambda i, n: pb.IngestItem(id=i, image=_png(_image(n)), regions=[  # noqa: E731
        pb.Region(name="centre", box=_box(BOX))])
    with _serve(tmp_path, wrist[1]) as s, RetrievalClient(f"127.0.0.1:{s.port}") as c:
        c.ingest([item("a", 1)])
    torch.manual_seed(0)
    crop_repo = tmp_path / "cxr-repo"
    write_repository(create_model("cxr-tiny").eval(), crop_repo)  # dim 32, as wrist-tiny
    with _serve(tmp_path, crop_repo) as s, RetrievalClient(f"127.0.0.1:{s.port}") as c:
        with pytest.raises(grpc.RpcError) as err:
            c.ingest([item("b", 2)])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        msg = err.value.details()
        assert "items[0].regions" in msg and "'region_head'" in msg and "'crop'" in msg
        with pytest.raises(grpc.RpcError) as err:
            c.search(pb.SearchRequest(image=_png(_image(3)), k=1,
                                      region=pb.Region(name="centre", box=_box(BOX))))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert c.ingest([pb.IngestItem(id="c", image=_png(_image(4)))]).inserted == 1
        assert c.search(pb.SearchRequest(item_id="a", k=1, region=pb.Region(name="centre"))
                        ).hits[0].id == "c"  # stored region vectors only: served
        with pytest.raises(grpc.RpcError) as err:
            c.get(["b"])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with _serve(tmp_path, crop_repo, model="cxr") as s, \
            RetrievalClient(f"127.0.0.1:{s.port}") as c:
        assert c.ingest([item("b", 2)]).inserted == 1
