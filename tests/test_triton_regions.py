"""The region pathway served by the real tritonserver (pytriton wheel, python backend +
ONNX Runtime) beside the other models of a region-head model's repository: the sync and
asyncio Triton clients give what the in-process graphs and torch give, for requests of
different box counts at once, and the retrieval server stores region children from it."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("tritonclient.grpc")  # the [triton] extra
grpc = pytest.importorskip("grpc")  # the [server] extra

from medseek.io import unit_intensity  # noqa: E402
from medseek.encoders import (AsyncTritonEncoder, EncoderInputError, EncoderSpec,  # noqa: E402
                              OnnxRuntimeEncoder, TritonEncoder)
from medseek.encoders.triton_client import TritonEncoderConfig  # noqa: E402
from medseek.export.region_graph import edge_boxes, random_boxes  # noqa: E402
from medseek.export.repository import write_repository  # noqa: E402
from medseek.models import create_model  # noqa: E402
from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.config import ServeConfig  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.triton import TritonServer, TritonServerConfig  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

MIN_COS = 0.9999
SIZE = (64, 64)


def row_cos(a, b) -> np.ndarray:
    a = np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, np.float64).reshape(-1, np.shape(b)[-1])
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(21)
    return create_model("wrist-tiny").eval()


@pytest.fixture(scope="module")
def repo(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton-region-repo")
    write_repository(model, out)
    return out


@pytest.fixture(scope="module")
def server(repo):
    with TritonServer(TritonServerConfig(repo, startup_timeout=180)) as srv:
        yield srv


@pytest.fixture(scope="module")
def spec(repo):
    return EncoderSpec.load(repo / "image_encoder" / "1" / "spec.json")


def _inputs(seed: int, batch: int, n_random: int):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 1, *SIZE, generator=gen)
    boxes = torch.cat((edge_boxes(SIZE, 8).expand(batch, -1, -1),
                       random_boxes(batch, n_random, SIZE, gen)), dim=1)
    return images.numpy(), boxes.numpy()


def test_triton_region_graph_equals_in_process_and_torch(model, repo, server, spec):
    local = OnnxRuntimeEncoder(repo, "image")
    with TritonEncoder(TritonEncoderConfig(server.grpc_url, batch_size=4), spec) as enc:
        assert enc.region_pathway
        images, boxes = _inputs(1, 11, 2)  # 3 requests of <= 4 rows, 9 boxes each
        glob, regions = enc.encode_image_regions(images, boxes)
        with torch.inference_mode():
            g, r = model.encode_image_and_regions(torch.from_numpy(images), torch.from_numpy(boxes))
        lg, lr = local.encode_image_regions(images, boxes)
        assert glob.shape == (11, 32) and regions.shape == (11, 9, 32)
        assert row_cos(regions, r.numpy()).min() >= MIN_COS and row_cos(regions, lr).min() >= MIN_COS
        assert row_cos(glob, g.numpy()).min() >= MIN_COS and row_cos(glob, lg).min() >= MIN_COS
        # requests of different box counts at once: the backend batches equal shapes only
        batches = [_inputs(10 + n, 2, n) for n in range(1, 7)]
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda a: enc.encode_image_regions(*a), batches))
        for (x, b), (_, rr) in zip(batches, got):
            assert row_cos(rr, local.encode_image_regions(x, b)[1]).min() >= MIN_COS
        with pytest.raises(EncoderInputError, match=r"boxes\[0, 0\].*no area inside"):
            enc.encode_image_regions(images[:1], np.array([[[70, 0, 80, 9]]], np.float32))


def test_async_triton_region_graph(repo, server, spec):
    local = OnnxRuntimeEncoder(repo, "image")
    images, boxes = _inputs(2, 5, 3)

    async def run():
        async with AsyncTritonEncoder(TritonEncoderConfig(server.grpc_url, batch_size=2),
                                      spec) as enc:
            assert enc.region_pathway
            return await enc.encode_image_regions(images, boxes)

    glob, regions = asyncio.run(run())
    lg, lr = local.encode_image_regions(images, boxes)
    assert regions.shape == (5, 10, 32)
    assert row_cos(regions, lr).min() >= MIN_COS and row_cos(glob, lg).min() >= MIN_COS


def test_service_stores_region_children_from_triton(repo, server, spec, tmp_path):
    yy, xx = np.mgrid[0:48, 0:96]
    arr = np.clip(xx * 2 + yy + 40 * np.sin(xx / 7.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    box = (10.0, 6.0, 70.0, 40.0)  # uploaded pixels of a 96x48 image
    enc = TritonEncoder(TritonEncoderConfig(server.grpc_url), spec)
    cfg = ServeConfig(store_path=tmp_path / "s.db", index_dir=tmp_path / "i", port=0, grace_s=1.0)
    try:
        with ServerThread(cfg, enc) as s, RetrievalClient(f"127.0.0.1:{s.port}") as c:
            c.ingest([pb.IngestItem(id="w", image=buf.getvalue(), regions=[
                pb.Region(name="distal_radius", box=pb.Box(x0=box[0], y0=box[1], x1=box[2],
                                                           y1=box[3]))])])
            got = np.asarray(c.get(["w/region/distal_radius"], with_embedding=True)
                             .items[0].embedding)
    finally:
        enc.close()
    from medseek.serve import ingest as ing

    x = np.array(ing.resize(unit_intensity(arr), SIZE)[None, None])
    mbox = np.array([[[box[0] * 64 / 96, box[1] * 64 / 48, box[2] * 64 / 96, box[3] * 64 / 48]]],
                    np.float32)
    want = OnnxRuntimeEncoder(repo, "image").encode_image_regions(x, mbox)[1][0, 0]
    assert row_cos(got[None], want[None])[0] >= MIN_COS
