"""Hugging Face checkpoints (DINOv2, CLIP, SigLIP) exported by ``medseek export --from-hf``.

No weights can be downloaded here, so each checkpoint is a randomly initialised model of
a small config, saved with ``save_pretrained`` beside a ``preprocessor_config.json`` and,
for the image-text models, a word-level ``tokenizer.json`` built with ``tokenizers``
(CLIP's with start and end tokens, SigLIP's with an end token only, as theirs). The
reference is transformers itself: a fresh ``from_pretrained`` (its default attention,
not the eager one the export traces) on the pixel values and the token ids that the
checkpoint's own processor conventions give, against medseek's exported ONNX graphs in
ONNX Runtime. Then the exported models are served by the real gRPC service.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")  # the [hf] extra
pytest.importorskip("onnxruntime")
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # noqa: E402

from medseek.cli import main as medseek_main  # noqa: E402
from medseek.encoders import EncoderInputError, OnnxRuntimeEncoder  # noqa: E402
from medseek.export.hf import (HFCheckpointError, HFExportConfig, export_hf,  # noqa: E402
                               read_checkpoint)

MIN_COSINE = 0.9999
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # not ImageNet's: a swapped constant shows
WORDS = ("no acute cardiopulmonary process left lower lobe pneumonia small right pleural "
         "effusion with adjacent atelectasis heart size normal fracture of the and , .").split()
TEXTS = ["left lower lobe pneumonia", "No acute cardiopulmonary process.",
         "small right pleural effusion with adjacent atelectasis , heart size normal , no "
         "fracture of the left lower lobe and no pneumonia",  # longer than max_length 16
         "effusion"]
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _tokenizer(folder: Path, kind: str) -> int:
    """A word-level tokenizer.json (+ tokenizer_config.json naming the pad token)."""
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = "<bos> $A <eos>" if kind == "clip" else "$A <eos>"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
        eos_token="<eos>", model_max_length=16)
    fast.save_pretrained(folder)
    return len(vocab)


def _preprocessor(folder: Path, **sizes) -> None:
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": MEAN, "image_std": STD, **sizes}))


def build_checkpoint(kind: str, folder: Path) -> Path:
    """A seeded tiny ``kind`` checkpoint saved into ``folder``."""
    torch.manual_seed({"dinov2": 1, "clip": 2, "siglip": 3}[kind])
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "dinov2":  # the processor crops 56 out of a 64 resize: 4x4 patches of 14
        model = transformers.Dinov2Model(transformers.Dinov2Config(
            **TINY, image_size=56, patch_size=14))
        _preprocessor(folder, size={"shortest_edge": 64}, do_center_crop=True,
                      crop_size={"height": 56, "width": 56})
    else:
        vocab = _tokenizer(folder, kind)
        text = dict(TINY, vocab_size=vocab, max_position_embeddings=16, pad_token_id=0,
                    bos_token_id=2, eos_token_id=3)
        vision = dict(TINY, image_size=32, patch_size=8)
        if kind == "clip":
            cfg = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                          projection_dim=24)
            model = transformers.CLIPModel(cfg)
        else:
            model = transformers.SiglipModel(transformers.SiglipConfig(
                text_config=text, vision_config=vision))
        _preprocessor(folder, size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (checkpoint folder, repository folder). SigLIP goes through the command."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in ("dinov2", "clip", "siglip"):
        ckpt = build_checkpoint(kind, root / kind)
        repo = root / f"{kind}-repo"
        if kind == "siglip":
            assert medseek_main(["export", "--from-hf", str(ckpt), "--out", str(repo)]) == 0
        else:
            export_hf(ckpt, repo)
        out[kind] = (ckpt, repo)
    return out


def _reference(folder: Path):
    """transformers' own model of the checkpoint (default attention), float32."""
    return transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval()


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _images(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """(n, 1, H, W) float32 in [0, 1]: medseek's encoder input."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, 1, *size)).astype(np.float32)


def _pixel_values(images: np.ndarray) -> torch.Tensor:
    """The checkpoint's processor convention after its 1/255 rescale: RGB, (x - mean) / std."""
    rgb = np.repeat(images, 3, axis=1)
    mean, std = np.reshape(MEAN, (1, 3, 1, 1)), np.reshape(STD, (1, 3, 1, 1))
    return torch.from_numpy(((rgb - mean) / std).astype(np.float32))


@pytest.mark.parametrize("kind", ["dinov2", "clip", "siglip"])
def test_image_embeddings_match_transformers(exported, kind):
    folder, repo = exported[kind]
    enc = OnnxRuntimeEncoder(repo, "image")
    size = enc.spec.image_size
    assert size == ((56, 56) if kind == "dinov2" else (32, 32))
    images = _images(3, size)
    got = enc.encode_images(images)
    model = _reference(folder)
    with torch.inference_mode():
        if kind == "dinov2":  # CLS after the final layer norm
            want = model(pixel_values=_pixel_values(images)).pooler_output
        else:
            want = _features(model.get_image_features(pixel_values=_pixel_values(images)))
    cos = (_unit(got) * _unit(want.numpy())).sum(-1)
    assert cos.min() >= MIN_COSINE, cos
    assert got.shape == (3, want.shape[1]) and enc.dim == want.shape[1]
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # three different images give three different embeddings: the check can fail
    assert (_unit(got[:1]) * _unit(got[1:])).sum(-1).max() < MIN_COSINE


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_text_embeddings_match_transformers(exported, kind):
    folder, repo = exported[kind]
    enc = OnnxRuntimeEncoder(repo, "image")
    got = enc.encode_texts(TEXTS)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    # the model cards' usage: CLIP pads to the longest text, SigLIP to max_length
    padding = "max_length" if kind == "siglip" else True
    batch = tok(TEXTS, padding=padding, truncation=True, max_length=16, return_tensors="pt")
    assert batch["input_ids"].shape[1] == 16  # the long text was truncated
    model = _reference(folder)
    with torch.inference_mode():
        if kind == "siglip":  # its processor passes no attention mask
            want = _features(model.get_text_features(input_ids=batch["input_ids"]))
        else:
            want = _features(model.get_text_features(**batch))
    cos = (_unit(got) * _unit(want.numpy())).sum(-1)
    assert cos.min() >= MIN_COSINE, cos
    # one space: the image and text towers share the width
    assert got.shape == (len(TEXTS), enc.dim)
    spec = json.loads((repo / "text_tokenizer" / "1" / "spec.json").read_text())
    assert spec["tokenizer"] == {"pad_id": 0, "pad_token": "<pad>",
                                 "to_max_length": kind == "siglip"}


def test_siglip_text_embedding_depends_on_padding_to_max_length(exported):
    """Why the spec records SigLIP's padding: its text head reads the last position, so
    the same text padded only to its own length embeds differently."""
    folder, repo = exported["siglip"]
    enc = OnnxRuntimeEncoder(repo, "image")
    enc.tokenizer.no_padding()
    short = enc.encode_texts(TEXTS[:1])
    enc.tokenizer.enable_padding(pad_id=0, pad_token="<pad>", length=16)
    padded = enc.encode_texts(TEXTS[:1])
    assert float((_unit(short) * _unit(padded)).sum()) < MIN_COSINE


def test_dinov2_cls_mean_pooling(exported, tmp_path):
    folder, _ = exported["dinov2"]
    export_hf(folder, tmp_path / "repo", HFExportConfig(pooling="cls_mean"))
    enc = OnnxRuntimeEncoder(tmp_path / "repo", "image")
    images = _images(2, (56, 56), seed=4)
    got = enc.encode_images(images)
    with torch.inference_mode():
        tokens = _reference(folder)(pixel_values=_pixel_values(images)).last_hidden_state
    want = torch.cat((tokens[:, 0], tokens[:, 1:].mean(1)), dim=-1).numpy()
    assert got.shape == (2, 64) and enc.dim == 64
    assert (_unit(got) * _unit(want)).sum(-1).min() >= MIN_COSINE


def test_image_only_model_has_no_text_tower(exported):
    _, repo = exported["dinov2"]
    assert not (repo / "text_encoder").exists() and not (repo / "text_tokenizer").exists()
    enc = OnnxRuntimeEncoder(repo, "image")
    assert enc.encodes_text is False
    with pytest.raises(EncoderInputError, match="no text tower"):
        enc.encode_texts(["pleural effusion"])


def test_bad_checkpoints_are_refused_naming_what_is_wrong(exported, tmp_path):
    folder, _ = exported["dinov2"]
    with pytest.raises(HFCheckpointError, match="config.json missing"):
        read_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(HFCheckpointError, match="model_type 'vit' is not supported"):
        read_checkpoint(tmp_path)
    no_proc = tmp_path / "no-proc"
    no_proc.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_proc / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(HFCheckpointError, match="preprocessor_config.json missing"):
        read_checkpoint(no_proc)
    with pytest.raises(ValueError, match="pooling 'cls_mean' is for DINOv2"):
        export_hf(exported["clip"][0], tmp_path / "x", HFExportConfig(pooling="cls_mean"))


def test_command_refuses_both_or_neither_source_and_foreign_models(exported, tmp_path, capsys):
    folder, _ = exported["dinov2"]
    assert medseek_main(["export", "--out", str(tmp_path / "a")]) == 2
    assert "--from-hf" in capsys.readouterr().err
    assert medseek_main(["export", "--model", "cxr-tiny", "--from-hf", str(folder),
                         "--out", str(tmp_path / "a")]) == 2
    assert "one of the two" in capsys.readouterr().err
    # a repository of other models: the export would serve them beside this one
    other = tmp_path / "other"
    (other / "volume_encoder").mkdir(parents=True)
    (other / "volume_encoder" / "config.pbtxt").write_text('name: "volume_encoder"\n')
    assert medseek_main(["export", "--from-hf", str(folder), "--out", str(other)]) == 2
    assert "volume_encoder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- served


def _png(seed: int) -> bytes:
    """A (48, 40) uint8 grey pattern: gradient, blob, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:48, 0:40]
    cy, cx = rng.uniform(8, 40), rng.uniform(8, 32)
    img = (rng.uniform(0.5, 3) * xx + rng.uniform(-2, 2) * yy
           + 150 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(20, 120))
           + rng.normal(0, 10, (48, 40)))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img + 30, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.usefixtures("one_faiss_thread")
@pytest.mark.parametrize("kind", ["dinov2", "clip"])
def test_served_through_the_grpc_service(exported, kind, tmp_path):
    grpc = pytest.importorskip("grpc")  # the [server] extra
    from medseek.serve.client import RetrievalClient
    from medseek.serve.config import BatchConfig, ServeConfig
    from medseek.serve.server import ServerThread
    from medseek.serve.v1 import retrieval_pb2 as pb

    _, repo = exported[kind]
    cfg = ServeConfig(store_path=tmp_path / "store.db", index_dir=tmp_path / "index", port=0,
                      grace_s=1.0, encode_batch=BatchConfig(max_wait_ms=5.0))
    pngs = [_png(n) for n in range(6)]
    with ServerThread(cfg, OnnxRuntimeEncoder(repo, "image")) as s, \
            RetrievalClient(f"127.0.0.1:{s.port}") as client:
        client.ingest([pb.IngestItem(id=f"img-{n}", image=png, body_part="chest")
                       for n, png in enumerate(pngs)])
        for n in (1, 4):  # an uploaded image finds its stored self first
            hits = client.search(pb.SearchRequest(image=pngs[n], k=3, collection="image")).hits
            assert hits[0].id == f"img-{n}" and hits[0].score > 0.999
            assert hits[1].score < hits[0].score
        text = pb.SearchRequest(text="left lower lobe pneumonia", k=3, collection="image")
        if kind == "clip":  # the checkpoint's text tower queries the image collection
            assert len(client.search(text).hits) == 3
        else:
            with pytest.raises(grpc.RpcError) as err:
                client.search(text)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "image-only encoder" in err.value.details()
            # and the server keeps serving
            assert client.search(pb.SearchRequest(image=pngs[0], k=1)).hits[0].id == "img-0"


def test_siglip_served_by_tritonserver_equals_in_process(exported):
    """The same repository in the real tritonserver: the server-side tokenizer pads to
    max_length from spec.json, as the in-process encoder does."""
    from medseek.encoders import EncoderSpec, TritonEncoder
    from medseek.encoders.triton_client import TritonEncoderConfig
    from medseek.serve.triton import TritonServer, TritonServerConfig

    _, repo = exported["siglip"]
    local = OnnxRuntimeEncoder(repo, "image")
    images = _images(5, local.spec.image_size, seed=7)
    spec = EncoderSpec.load(repo / "image_encoder" / "1" / "spec.json")
    with TritonServer(TritonServerConfig(repo, startup_timeout=180)) as server:
        enc = TritonEncoder(TritonEncoderConfig(server.grpc_url, batch_size=2), spec)
        try:
            got_images, got_texts = enc.encode_images(images), enc.encode_texts(TEXTS)
        finally:
            enc.close()
    for got, want in ((got_images, local.encode_images(images)),
                      (got_texts, local.encode_texts(TEXTS))):
        assert got.shape == want.shape
        assert (_unit(got) * _unit(want)).sum(-1).min() >= MIN_COSINE
