"""Triton conventions: fixed dims in the exported configs, a name prefix per export, and
several exports served by ONE real tritonserver (pytriton wheel, python backend + ONNX
Runtime), started and stopped with ``medseek triton start|stop --repo A --repo B``.

Two exports of tiny models: ``chest_`` (cxr-tiny + ct-tiny) and ``wrist_`` (wrist-tiny,
with its region head). Each is encoded through the Triton clients with its prefix and
compared with ONNX Runtime in process on the same repository; the expected dims come from
the model configs. The stop test runs last and ends the module's server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from math import prod
from pathlib import Path

import numpy as np
import pytest
import torch

grpcclient = pytest.importorskip("tritonclient.grpc")  # the [triton] extra

from tritonclient.utils import InferenceServerException  # noqa: E402

from medseek.encoders import (AsyncTritonEncoder, EncoderInputError, EncoderSpec,  # noqa: E402
                              OnnxRuntimeEncoder, TritonEncoder)
from medseek.encoders.onnxrt import OnnxRuntimeConfig  # noqa: E402
from medseek.encoders.triton_client import TritonEncoderConfig, spec_model_prefix  # noqa: E402
from medseek.export.model_config import onnx_dims, render_config  # noqa: E402
from medseek.export.repository import (RepositoryConfig, committed_repository,  # noqa: E402
                                       write_repository)
from medseek.models import create_model  # noqa: E402
from medseek.serve.triton import (RepositoryMergeError, find_tritonserver,  # noqa: E402
                                  merge_repositories, read_pid_file)

MIN_COS = 0.9999
CLI = ("import sys, argparse\n"
       "from medseek.export import commands\n"
       "p = argparse.ArgumentParser(); commands.register(p.add_subparsers())\n"
       "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n")
COMMON = ("text_encoder", "text_tokenizer", "text_ensemble")


def row_cos(a, b) -> np.ndarray:
    a = np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, np.float64).reshape(-1, np.shape(b)[-1])
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(3)
    chest = [create_model("cxr-tiny").eval(), create_model("ct-tiny").eval()]
    torch.manual_seed(4)
    return {"chest_": chest, "wrist_": [create_model("wrist-tiny").eval()]}


@pytest.fixture(scope="module")
def repos(models, tmp_path_factory):
    out = {}
    for prefix, ms in models.items():
        out[prefix] = tmp_path_factory.mktemp(f"repo-{prefix.rstrip('_')}")
        write_repository(ms, out[prefix], RepositoryConfig(name_prefix=prefix))
    return out


@pytest.fixture(scope="module")
def server(repos):
    """One tritonserver over both exports, started by the CLI; yields its pid record."""
    try:
        find_tritonserver()
    except RuntimeError as exc:
        pytest.skip(f"no tritonserver: {exc}")
    started = _cli("triton", "start", "--repository", str(repos["chest_"]),
                   "--repository", str(repos["wrist_"]), "--timeout", "180")
    info = read_pid_file(repos["chest_"])
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        yield info
    finally:
        if info is not None and Path(f"/proc/{info['pid']}").exists():
            _cli("triton", "stop", "--repo", str(repos["chest_"]))
            if Path(f"/proc/{info['pid']}").exists():
                os.killpg(info["pid"], 9)


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(f"{server['host']}:{server['grpc_port']}")
    yield c
    c.close()


def _encoder(server, repo: Path, prefix: str, graph: str) -> TritonEncoder:
    spec_path = repo / f"{prefix}{graph}" / "1" / "spec.json"
    cfg = TritonEncoderConfig(f"{server['host']}:{server['grpc_port']}", batch_size=4,
                              model_prefix=spec_model_prefix(spec_path))
    return TritonEncoder(cfg, EncoderSpec.load(spec_path))


def _local(repo: Path, prefix: str, modality: str) -> OnnxRuntimeEncoder:
    return OnnxRuntimeEncoder(repo, modality, OnnxRuntimeConfig(model_prefix=prefix))


# ----------------------------------------------------------------------------- export


def test_export_names_every_model_with_the_prefix(repos):
    chest = sorted(p.name for p in repos["chest_"].iterdir() if p.is_dir())
    wrist = sorted(p.name for p in repos["wrist_"].iterdir() if p.is_dir())
    assert chest == sorted(f"chest_{m}" for m in (*COMMON, "image_encoder", "volume_encoder",
                                                   "volume_pool"))
    assert wrist == sorted(f"wrist_{m}" for m in (*COMMON, "image_encoder",
                                                   "image_region_encoder"))
    ensemble = (repos["wrist_"] / "wrist_text_ensemble" / "config.pbtxt").read_text()
    assert 'name: "wrist_text_ensemble"' in ensemble
    assert 'model_name: "wrist_text_tokenizer"' in ensemble
    assert 'model_name: "wrist_text_encoder"' in ensemble
    assert '"text_tokenizer"' not in ensemble and '"text_encoder"' not in ensemble
    # the TensorRT variant is renamed too
    trt = (repos["chest_"] / "chest_image_encoder" / "configs" / "tensorrt.pbtxt").read_text()
    assert 'name: "chest_image_encoder"' in trt and "dims: [ 1, 64, 64 ]" in trt
    assert spec_model_prefix(repos["wrist_"] / "wrist_image_encoder" / "1" / "spec.json") == "wrist_"


def test_onnx_graphs_fix_every_axis_but_the_varying_ones(models, repos):
    cxr, ct = models["chest_"]
    h, w = cxr.cfg.preprocess.image_size
    dim, width = cxr.cfg.embed_dim, ct.cfg.vision.width
    patch = prod(ct.cfg.vision.patch_size)
    version = repos["chest_"]
    assert onnx_dims(version / "chest_image_encoder" / "1" / "model.onnx") == \
        {"images": [1, h, w], "embeddings": [dim]}
    assert onnx_dims(version / "chest_volume_encoder" / "1" / "model.onnx") == \
        {"tokens": [-1, patch], "positions": [-1, 3], "token_mask": [-1],
         "chunk_embeddings": [ct.cfg.embed_dim], "chunk_features": [width]}
    assert onnx_dims(version / "chest_text_encoder" / "1" / "model.onnx") == \
        {"input_ids": [-1], "attention_mask": [-1], "embeddings": [dim]}


def test_bad_prefixes_and_templates_are_refused(models):
    with pytest.raises(ValueError, match="name_prefix must start with a letter.*'a/b'"):
        RepositoryConfig(name_prefix="a/b")
    with pytest.raises(ValueError, match=r"model_prefix must start with a letter.*'\.\./x'"):
        TritonEncoderConfig("127.0.0.1:1", model_prefix="../x")
    with pytest.raises(ValueError, match="needs a repository folder other than the committed"):
        write_repository(models["wrist_"], committed_repository(),
                         RepositoryConfig(name_prefix="wrist_"))
    template = (committed_repository() / "image_encoder" / "config.pbtxt").read_text()
    with pytest.raises(ValueError, match="exactly one tensor 'pixels' with dims, found 0"):
        render_config(template, "x_image_encoder", {"pixels": [1, 64, 64]})


# ----------------------------------------------------------------------------- serving


def test_one_server_serves_both_exports(server, repos, client):
    names = {m.name for m in client.get_model_repository_index().models}
    want = {p.name for r in repos.values() for p in r.iterdir() if p.is_dir()}
    assert names == want and len(want) == 11
    assert all(client.is_model_ready(n) for n in names)
    assert server["repositories"] == [str(repos["chest_"].resolve()), str(repos["wrist_"].resolve())]
    status = _cli("triton", "status", "--repo", str(repos["wrist_"]))
    assert status.returncode == 0 and json.loads(status.stdout)["pid"] == server["pid"]


def test_metadata_reports_fixed_dims(models, client):
    cxr, ct = models["chest_"]
    wrist = models["wrist_"][0]

    def shapes(model):
        meta = client.get_model_metadata(model, as_json=True)
        return {t["name"]: [int(d) for d in t["shape"]] for t in (*meta["inputs"], *meta["outputs"])}

    h, w = cxr.cfg.preprocess.image_size
    assert shapes("chest_image_encoder") == {"images": [-1, 1, h, w],
                                             "embeddings": [-1, cxr.cfg.embed_dim]}
    wh, ww = wrist.cfg.preprocess.image_size
    assert shapes("wrist_image_region_encoder") == {
        "images": [-1, 1, wh, ww], "boxes": [-1, -1, 4], "embeddings": [-1, wrist.cfg.embed_dim],
        "region_embeddings": [-1, -1, wrist.cfg.embed_dim]}
    assert shapes("chest_volume_encoder") == {
        "tokens": [-1, -1, prod(ct.cfg.vision.patch_size)], "positions": [-1, -1, 3],
        "token_mask": [-1, -1], "chunk_embeddings": [-1, ct.cfg.embed_dim],
        "chunk_features": [-1, ct.cfg.vision.width]}
    assert shapes("chest_volume_pool") == {"chunk_features": [-1, -1, ct.cfg.vision.width],
                                           "chunk_mask": [-1, -1],
                                           "embeddings": [-1, ct.cfg.embed_dim]}
    # text length varies: padded to each request's longest text
    assert shapes("wrist_text_encoder") == {"input_ids": [-1, -1], "attention_mask": [-1, -1],
                                            "embeddings": [-1, wrist.cfg.embed_dim]}
    assert shapes("wrist_text_ensemble") == {"TEXT": [-1, 1], "embeddings": [-1, wrist.cfg.embed_dim]}


def test_both_prefixes_encode_as_onnx_runtime_in_process(server, repos):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((5, 1, 64, 64)).astype(np.float32)
    texts = ["No acute disease.", "", "Distal radius fracture with dorsal angulation. " * 8]
    vectors = {}
    for prefix, graph, modality in (("chest_", "image_encoder", "image"),
                                    ("wrist_", "image_encoder", "image")):
        repo = repos[prefix]
        with _encoder(server, repo, prefix, graph) as enc:
            local = _local(repo, prefix, modality)
            vectors[prefix] = enc.encode_images(images)
            assert row_cos(vectors[prefix], local.encode_images(images)).min() >= MIN_COS
            assert row_cos(enc.encode_texts(texts), local.encode_texts(texts)).min() >= MIN_COS
    # two models behind one server: each prefix reached its own weights
    assert row_cos(vectors["chest_"], vectors["wrist_"]).max() < 0.99
    vols = [rng.random((20, 32, 32), dtype=np.float32), rng.random((7, 16, 24), dtype=np.float32)]
    with _encoder(server, repos["chest_"], "chest_", "volume_encoder") as enc:
        local = _local(repos["chest_"], "chest_", "volume")
        assert row_cos(enc.encode_volumes(vols), local.encode_volumes(vols)).min() >= MIN_COS
    boxes = np.tile(np.array([[4, 4, 40, 40], [10, 20, 60, 63]], np.float32), (5, 1, 1))
    with _encoder(server, repos["wrist_"], "wrist_", "image_encoder") as enc:
        local = _local(repos["wrist_"], "wrist_", "image")
        g, r = enc.encode_image_regions(images, boxes)
        lg, lr = local.encode_image_regions(images, boxes)
        assert row_cos(g, lg).min() >= MIN_COS and row_cos(r, lr).min() >= MIN_COS


def test_async_client_uses_the_prefix(server, repos):
    spec = EncoderSpec.load(repos["wrist_"] / "wrist_image_encoder" / "1" / "spec.json")
    url = f"{server['host']}:{server['grpc_port']}"
    texts = ["Scaphoid fracture.", "Normal wrist."]
    images = np.random.default_rng(1).standard_normal((3, 1, 64, 64)).astype(np.float32)

    async def run():
        async with AsyncTritonEncoder(TritonEncoderConfig(url, model_prefix="wrist_"), spec) as enc:
            return await enc.encode_images(images), await enc.encode_texts(texts)

    got_images, got_texts = asyncio.run(run())
    local = _local(repos["wrist_"], "wrist_", "image")
    assert row_cos(got_images, local.encode_images(images)).min() >= MIN_COS
    assert row_cos(got_texts, local.encode_texts(texts)).min() >= MIN_COS
    # without the prefix there is no such model on this server
    with TritonEncoder(TritonEncoderConfig(url, retries=0), spec) as bare:
        with pytest.raises(Exception, match="image_encoder"):
            bare.encode_images(images)


def test_serve_finds_the_prefix_in_the_spec(server, repos):
    import argparse

    from medseek.serve.commands import encoder_from_args

    spec = repos["wrist_"] / "wrist_image_encoder" / "1" / "spec.json"
    args = argparse.Namespace(encoder="triton", triton_url=f"{server['host']}:{server['grpc_port']}",
                              spec=spec, triton_model_prefix=None, volume_triton_url=None)
    images = np.random.default_rng(2).standard_normal((2, 1, 64, 64)).astype(np.float32)
    with encoder_from_args(args) as enc:
        assert enc.cfg.model_prefix == "wrist_"
        local = _local(repos["wrist_"], "wrist_", "image")
        assert row_cos(enc.encode_images(images), local.encode_images(images)).min() >= MIN_COS
    args.triton_model_prefix = "chest_"  # given explicitly, it wins over the spec
    with encoder_from_args(args) as enc:
        assert enc.cfg.model_prefix == "chest_"


def test_wrong_shapes_get_a_clear_error_from_triton(server, repos, client):
    small = grpcclient.InferInput("images", [2, 1, 32, 32], "FP32")
    small.set_data_from_numpy(np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("chest_image_encoder", [small])
    assert "INVALID_ARGUMENT" in str(info.value.status())
    assert "unexpected shape for input 'images' for model 'chest_image_encoder'" in info.value.message()
    assert "Expected [-1,1,64,64], got [2,1,32,32]" in info.value.message()
    with _encoder(server, repos["chest_"], "chest_", "volume_encoder") as enc:
        with pytest.raises(EncoderInputError, match=r"'tokens'.*Expected \[-1,-1,256\]"):
            enc.run_graph("chunks", {"tokens": np.zeros((1, 5, 100), np.float32),
                                     "positions": np.zeros((1, 5, 3), np.int32),
                                     "token_mask": np.ones((1, 5), bool)}, ["chunk_features"])
        # the server is still serving
        assert enc.encode_volumes([np.zeros((8, 16, 16), np.float32)]).shape == (1, 32)
    assert client.is_server_live()


# ----------------------------------------------------------------------------- merging


def test_name_collisions_are_refused(repos, tmp_path):
    clash = tmp_path / "clash"
    (clash / "wrist_text_encoder").mkdir(parents=True)
    shutil.copy2(repos["wrist_"] / "wrist_text_encoder" / "config.pbtxt",
                 clash / "wrist_text_encoder" / "config.pbtxt")
    with pytest.raises(RepositoryMergeError, match="model 'wrist_text_encoder' is in both"):
        merge_repositories([repos["wrist_"], clash], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()  # refused before linking anything
    with pytest.raises(RepositoryMergeError, match="is given twice"):
        merge_repositories([repos["wrist_"], repos["wrist_"]], tmp_path / "merged")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepositoryMergeError, match="holds no model"):
        merge_repositories([repos["wrist_"], tmp_path / "empty"], tmp_path / "merged")
    # the CLI, on two repositories no server runs for (the exports above are served)
    shutil.copytree(clash, tmp_path / "clash2")
    started = _cli("triton", "start", "--repo", str(clash), "--repo", str(tmp_path / "clash2"))
    assert started.returncode == 2, started.stderr
    assert "model 'wrist_text_encoder' is in both" in started.stderr
    assert "--name-prefix" in started.stderr
    assert not (clash / "triton.pid").exists()


def test_stop_from_either_repository_ends_the_server(server, repos):
    """Last: ends the module's server."""
    assert read_pid_file(repos["wrist_"])["pid"] == server["pid"]
    stopped = _cli("triton", "stop", "--repo", str(repos["wrist_"]))
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 120  # only a broken stop waits this long
    while time.monotonic() < deadline and Path(f"/proc/{server['pid']}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{server['pid']}").exists()
    assert read_pid_file(repos["chest_"]) is None and read_pid_file(repos["wrist_"]) is None
    assert not Path(server["work_dir"]).exists()  # the merged folder of links went with it
    assert all(p.is_dir() for p in repos["chest_"].iterdir() if p.name.startswith("chest_"))
