"""ONNX export of the tiny image / volume / text encoders, the repository writer, and the
in-process ONNX Runtime encoder, each against torch on fresh inputs."""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from medseek.encoders import Encoder, EncoderInputError, EncoderSpec, OnnxRuntimeEncoder
from medseek.encoders.preprocess import tokenize
from medseek.export.onnx import ExportCheckError, ExportConfig, export_graph, verify_graph
from medseek.export.repository import write_repository
from medseek.models import create_model

MIN_COS = 0.9999


def row_cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return create_model("cxr-tiny").eval(), create_model("ct-tiny").eval()


@pytest.fixture(scope="module")
def repo(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo")
    write_repository(list(models), out)
    return out


def test_repository_layout(repo):
    for model in ("image_encoder", "volume_encoder", "volume_pool", "text_encoder"):
        files = sorted(p.name for p in (repo / model / "1").iterdir())
        assert files == ["model.onnx", "model.py", "spec.json"], model
        assert (repo / model / "config.pbtxt").is_file()
    assert (repo / "image_encoder" / "configs" / "tensorrt.pbtxt").is_file()
    assert sorted(p.name for p in (repo / "text_tokenizer" / "1").iterdir()) == \
        ["model.py", "spec.json", "tokenizer.json"]
    assert (repo / "text_ensemble" / "1").is_dir()
    # what a client needs to know, from the export or from the config name alone
    assert EncoderSpec.load(repo / "image_encoder" / "1" / "spec.json") == \
        EncoderSpec.from_config_name("cxr-tiny")
    assert EncoderSpec.load(repo / "volume_encoder" / "1" / "spec.json").patch_size == (4, 8, 8)


def test_graphs_have_opset_17_and_dynamic_batch(repo):
    m = onnx.load(str(repo / "volume_encoder" / "1" / "model.onnx"))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in m.graph.input}
    assert dims["tokens"][:2] == ["batch", "tokens"] and dims["positions"][2] == 3


def test_image_matches_torch(models, repo):
    enc = OnnxRuntimeEncoder(repo, "image")
    assert isinstance(enc, Encoder) and enc.dim == 32
    gen = torch.Generator().manual_seed(11)
    for batch in (1, 5):
        x = torch.randn(batch, 1, 64, 64, generator=gen)
        got = enc.encode_images(x.numpy())
        with torch.inference_mode():
            want = models[0].encode_image(x).numpy()
        assert got.shape == (batch, 32) and got.dtype == np.float32
        assert row_cos(got, want).min() >= MIN_COS
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_volume_matches_torch(models, repo):
    enc = OnnxRuntimeEncoder(repo, "volume")
    rng = np.random.default_rng(3)
    # 20 slices: a padded last chunk; 40x24: another token count than the traced one
    vols = [rng.random((20, 32, 32), dtype=np.float32), rng.random((37, 40, 24), dtype=np.float32)]
    got = enc.encode_volumes(vols)
    with torch.inference_mode():
        want = np.stack([models[1].encode_volume_array(v).volume.numpy() for v in vols])
        chunks = models[1].encode_volume_array(vols[1]).chunks.numpy()
    assert got.shape == (2, 32)
    assert row_cos(got, want).min() >= MIN_COS
    assert row_cos(enc.encode_chunks(vols[1]), chunks).min() >= MIN_COS


def test_text_matches_torch(models, repo):
    enc = OnnxRuntimeEncoder(repo, "image")
    texts = ["", "No acute cardiopulmonary disease.",
             "Left lower lobe opacity, likely pneumonia, with a small effusion. " * 8]  # truncated
    got = enc.encode_texts(texts)
    ids, mask = tokenize(enc.tokenizer, texts)
    assert ids.shape[1] == 64  # the tiny config's max_length
    with torch.inference_mode():
        want = models[0].encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert row_cos(got, want).min() >= MIN_COS


def test_image_graph_has_no_run_time_rope_or_shape_arithmetic(repo):
    """H and W are fixed, so the RoPE tables and every reshape target are constants."""
    m = onnx.load(str(repo / "image_encoder" / "1" / "model.onnx"))
    ops = Counter(n.op_type for n in m.graph.node)
    assert not {"Sin", "Cos", "Cast", "Range", "ConstantOfShape", "Unsqueeze"} & set(ops), ops
    assert ops["Shape"] <= 1, ops  # the head's L2 normalisation expands its norm
    assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}  # standard ops (TensorRT)
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 64, 64]


@pytest.mark.parametrize("depth, sections, size, stem, pool", [(1, None, (48, 80), "patch", "cls"),
                                                               (3, (5, 11), (64, 40), "patch", "cls"),
                                                               (2, None, (64, 48), "conv", "cls"),
                                                               (2, None, (64, 48), "conv", "mean"),
                                                               (1, None, (48, 80), "patch", "mean")])
def test_fixed_size_image_graph_equals_encode_image(tmp_path, depth, sections, size, stem, pool):
    """The fixed-size image graph (constant RoPE tables, CLS-only last block, or every
    token through it for a mean-pooled tower) and the generic trace of encode_image both
    match torch, with every parameter made non-trivial (CLS token, biases, LayerNorm
    affine, BatchNorm statistics of a conv stem), one block (the only block is the last)
    or three, uneven RoPE sections, a non-square image."""
    torch.manual_seed(5)
    model = create_model("cxr-tiny", vision={"depth": depth, "rope_sections": sections,
                                             "stem": stem, "stem_channels": 8, "pool": pool},
                         preprocess={"image_size": list(size)}).eval()
    with torch.no_grad():
        for buf_name, buf in model.named_buffers():
            if buf_name.endswith(("running_mean", "running_var")):
                buf.copy_(torch.rand_like(buf) + 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    fixed, generic = tmp_path / "fixed.onnx", tmp_path / "generic.onnx"
    assert export_graph(model, "image", fixed) >= MIN_COS  # verified against encode_image
    assert export_graph(model, "image", generic, ExportConfig(fixed_size_image=False)) >= MIN_COS
    x = torch.randn(4, 1, *size, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        want = model.encode_image(x).numpy()
    for path in (fixed, generic):
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"images": x.numpy()})[0]
        assert row_cos(got, want).min() >= MIN_COS
        np.testing.assert_allclose(got, want, atol=1e-5)
    ops = Counter(n.op_type for n in onnx.load(str(fixed)).graph.node)
    assert ops["Shape"] <= 1 and "Sin" not in ops


def test_export_check_fails_for_a_wrong_graph(models, tmp_path):
    """The export-time check is real: a graph of other weights does not pass it."""
    path = tmp_path / "image.onnx"
    export_graph(models[0], "image", path)
    other = create_model("cxr-tiny").eval()  # fresh random weights
    with pytest.raises(ExportCheckError, match="cosine to torch"):
        verify_graph(path, "image", other, ExportConfig())


def test_bad_inputs_name_the_problem(repo):
    enc = OnnxRuntimeEncoder(repo, "image")
    with pytest.raises(EncoderInputError, match=r"\(B >= 1, 1, 64, 64\), got shape \(2, 1, 32, 32\)"):
        enc.encode_images(np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(EncoderInputError, match="float32, got float64"):
        enc.encode_images(np.zeros((2, 1, 64, 64)))
    with pytest.raises(EncoderInputError, match="empty list"):
        enc.encode_texts([])
    with pytest.raises(EncoderInputError, match="not volumes"):
        enc.encode_volumes([np.zeros((16, 32, 32), np.float32)])
    with pytest.raises(ValueError, match="modality must be given"):
        OnnxRuntimeEncoder(repo)


def test_config_errors_name_the_argument(models, tmp_path):
    with pytest.raises(ValueError, match="opset must be an int >= 17, got 16"):
        ExportConfig(opset=16)
    with pytest.raises(ValueError, match="at most one image and one volume"):
        write_repository([models[0], models[0]], tmp_path)


def test_cli_tensorrt_says_what_is_missing(tmp_path, capsys):
    from medseek.export import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["export", "--model", "cxr-tiny", "--repo", str(tmp_path), "--tensorrt"])
    assert args.func(args) == 3  # ONNX written, engines not
    assert "tensorrt` Python package" in capsys.readouterr().err
    assert (tmp_path / "image_encoder" / "1" / "model.onnx").is_file()


def test_cli_exports_the_checkpoint_weights(tmp_path):
    """``--checkpoint`` weights, not fresh ones, end up in the exported graph."""
    ckpt_mod = pytest.importorskip("medseek.train.checkpoint")
    from medseek.export import commands

    trained = create_model("cxr-tiny").eval()
    ckpt = ckpt_mod.save_checkpoint(tmp_path / "ckpt.safetensors", trained,
                                    torch.optim.SGD(trained.parameters(), lr=0.1), {"step": 1})
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["export", "--model", "cxr-tiny", "--checkpoint", str(ckpt),
                              "--repo", str(tmp_path / "repo")])
    assert args.func(args) == 0
    x = np.random.default_rng(9).standard_normal((2, 1, 64, 64)).astype(np.float32)
    with torch.inference_mode():
        want = trained.encode_image(torch.from_numpy(x)).numpy()
    got = OnnxRuntimeEncoder(tmp_path / "repo").encode_images(x)
    assert row_cos(got, want).min() >= MIN_COS
