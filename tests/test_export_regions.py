"""The region graph (``image_regions``) of a model with a region head: exported, verified
against torch's ``encode_image_and_regions`` on fresh images and boxes (edge boxes
included), run by the in-process ONNX Runtime encoder, and refused where it cannot work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseek.encoders import EncoderInputError, EncoderSpec, OnnxRuntimeEncoder
from medseek.encoders.onnxrt import OnnxRuntimeConfig
from medseek.export.onnx import (ExportCheckError, ExportConfig, export_graph, graphs_for,
                                 verify_graph)
from medseek.export.region_graph import edge_boxes, random_boxes
from medseek.export.repository import write_repository
from medseek.models import create_model
from medseek.serve.regions import encode_region_rows

MIN_COS = 0.9999
SIZE = (64, 64)  # wrist-tiny's preprocess.image_size


def row_cos(a, b) -> np.ndarray:
    a = np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, np.float64).reshape(-1, np.shape(b)[-1])
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    m = create_model("wrist-tiny").eval()
    with torch.no_grad():  # non-trivial CLS token, biases and LayerNorm affine
        for p in m.visual.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def repo(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("region-repo")
    write_repository(model, out)
    return out


@pytest.fixture(scope="module")
def enc(repo):
    # 2 rows per session.run: batches of 5 run as 2 + 2 + 1 (an uneven last slice)
    return OnnxRuntimeEncoder(repo, "image", OnnxRuntimeConfig(batch_size=2))


def _torch(model, images: np.ndarray, boxes: np.ndarray):
    with torch.inference_mode():
        g, r = model.encode_image_and_regions(torch.from_numpy(images), torch.from_numpy(boxes))
    return g.numpy(), r.numpy()


def test_region_graph_is_exported_with_its_triton_entry(model, repo):
    assert graphs_for(model) == ("image", "image_regions", "text")
    assert graphs_for(create_model("cxr-tiny", device="meta")) == ("image", "text")
    files = sorted(p.name for p in (repo / "image_region_encoder" / "1").iterdir())
    assert files == ["model.onnx", "model.py", "spec.json"]
    config = (repo / "image_region_encoder" / "config.pbtxt").read_text()
    assert 'name: "image_region_encoder"' in config and 'name: "boxes"' in config
    assert 'name: "region_embeddings"' in config
    spec = EncoderSpec.load(repo / "image_encoder" / "1" / "spec.json")
    assert spec.region_head and spec == EncoderSpec.from_config_name("wrist-tiny")
    assert not EncoderSpec.from_config_name("cxr-tiny").region_head


@pytest.mark.parametrize("batch, n_random, edges", [(1, 1, False), (5, 3, True), (3, 12, True)])
def test_region_graph_matches_torch(model, enc, batch, n_random, edges):
    """Fresh images and boxes, other B and R than the traced (2, 3): the global rows equal
    the image graph's and torch's, every region row torch's region-head output."""
    gen = torch.Generator().manual_seed(100 + batch)
    images = torch.randn(batch, 1, *SIZE, generator=gen).numpy()
    boxes = random_boxes(batch, n_random, SIZE, gen)
    if edges:
        boxes = torch.cat((edge_boxes(SIZE, 8).expand(batch, -1, -1), boxes), dim=1)
    boxes = boxes.numpy()
    glob, regions = enc.encode_image_regions(images, boxes)
    want_g, want_r = _torch(model, images, boxes)
    assert glob.shape == (batch, 32) and regions.shape == (batch, boxes.shape[1], 32)
    assert glob.dtype == regions.dtype == np.float32
    assert row_cos(glob, want_g).min() >= MIN_COS
    assert row_cos(regions, want_r).min() >= MIN_COS
    assert row_cos(glob, enc.encode_images(images)).min() >= MIN_COS
    np.testing.assert_allclose(np.linalg.norm(regions, axis=-1), 1.0, rtol=1e-5)


def test_regions_go_through_the_region_head(model, enc):
    """The graph's region rows are the region head's, not the visual head's on the same
    pooled tokens, nor the global embedding of the box's crop."""
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(2, 1, *SIZE, generator=gen)
    boxes = torch.tensor([[[8.0, 8.0, 40.0, 48.0]], [[0.0, 16.0, 32.0, 64.0]]])
    _, regions = enc.encode_image_regions(images.numpy(), boxes.numpy())
    with torch.inference_mode():
        grid = model.visual.grid_size(images)
        pooled = model.visual.pool_regions(model.visual(images)[1], grid, boxes)
        visual = model.visual_head(pooled).numpy()
        crops = torch.nn.functional.interpolate(images[0:1, :, 8:48, 8:40], size=SIZE,
                                                mode="bilinear")
        crop = model.encode_image(crops).numpy()
    assert row_cos(regions, visual).max() < 0.99
    assert row_cos(regions[0], crop).max() < 0.99


def test_padded_rows_equal_separate_calls(enc):
    """The service pads rows with fewer boxes by the whole-image box: each row's regions
    are those of a call with its own boxes only."""
    rng = np.random.default_rng(5)
    images = [rng.standard_normal((1, *SIZE)).astype(np.float32) for _ in range(3)]
    boxes = [np.array([[4, 4, 30, 30]], np.float32),
             np.array([[0, 0, 64, 20], [10, 12, 50, 61], [33, 1, 63, 9]], np.float32),
             np.array([[20, 20, 21.5, 23]], np.float32)]
    rows = encode_region_rows(enc, images, boxes)
    for img, b, (g, r) in zip(images, boxes, rows):
        g1, r1 = enc.encode_image_regions(img[None], b[None])
        assert r.shape == (b.shape[0], 32)
        assert row_cos(r, r1[0]).min() >= MIN_COS and row_cos(g[None], g1).min() >= MIN_COS


def test_export_check_fails_for_a_wrong_region_graph(model, tmp_path):
    path = tmp_path / "regions.onnx"
    export_graph(model, "image_regions", path)
    other = create_model("wrist-tiny").eval()
    with torch.no_grad():  # same tower, another region head: only the regions disagree
        other.load_state_dict(model.state_dict())
        other.region_head.net.weight.copy_(torch.randn_like(other.region_head.net.weight))
    with pytest.raises(ExportCheckError, match="region_embeddings cosine to torch"):
        verify_graph(path, "image_regions", other, ExportConfig())


def test_bad_boxes_name_the_problem(enc):
    x = np.zeros((2, 1, *SIZE), np.float32)
    good = np.tile(np.array([[[0, 0, 8, 8]]], np.float32), (2, 1, 1))
    with pytest.raises(EncoderInputError, match="boxes must be float32, got float64"):
        enc.encode_image_regions(x, good.astype(np.float64))
    with pytest.raises(EncoderInputError, match=r"boxes must be \(2, R >= 1, 4\).*got shape \(1, 1, 4\)"):
        enc.encode_image_regions(x, good[:1])
    with pytest.raises(EncoderInputError, match=r"got shape \(2, 0, 4\)"):
        enc.encode_image_regions(x, good[:, :0])
    flat = good.copy()
    flat[1, 0] = [10, 5, 10, 20]  # zero width
    with pytest.raises(EncoderInputError, match=r"boxes\[1, 0\] = \[10.0, 5.0, 10.0, 20.0\] "
                                                r"has no area inside the 64x64 image"):
        enc.encode_image_regions(x, flat)
    outside = good.copy()
    outside[0, 0] = [64, 0, 80, 10]  # right of the image
    with pytest.raises(EncoderInputError, match=r"boxes\[0, 0\].*no area inside"):
        enc.encode_image_regions(x, outside)
    nan = good.copy()
    nan[1, 0, 2] = np.nan
    with pytest.raises(EncoderInputError, match=r"boxes\[1, 0\].*not finite"):
        enc.encode_image_regions(x, nan)
    with pytest.raises(EncoderInputError, match=r"images must be \(B >= 1, 1, 64, 64\)"):
        enc.encode_image_regions(np.zeros((2, 1, 32, 32), np.float32), good)


def test_a_model_without_region_head_has_no_region_pathway(tmp_path):
    cxr = create_model("cxr-tiny").eval()
    with pytest.raises(ValueError, match="no 'image_regions' graph .*region_head: false"):
        export_graph(cxr, "image_regions", tmp_path / "r.onnx")
    torch.manual_seed(0)
    write_repository(create_model("wrist-tiny").eval(), tmp_path / "repo")
    assert (tmp_path / "repo" / "image_region_encoder" / "1" / "model.onnx").is_file()
    write_repository(cxr, tmp_path / "repo")  # the wrist model's region graph is stale now
    assert not (tmp_path / "repo" / "image_region_encoder" / "1").exists()
    enc = OnnxRuntimeEncoder(tmp_path / "repo", "image")
    assert not enc.region_pathway
    with pytest.raises(EncoderInputError, match="has no region pathway"):
        enc.encode_image_regions(np.zeros((1, 1, *SIZE), np.float32),
                                 np.array([[[0, 0, 8, 8]]], np.float32))
