"""DualEncoder + factory: every JSON config, unit-norm outputs, gradients, save/load."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from medseek.kernels import clip_loss, siglip_loss
from medseek.models.factory import (
    count_parameters,
    create_model,
    describe,
    list_models,
    load_config,
    load_pretrained_text,
)
from medseek.models.vit2d import ViT2DConfig
from medseek.models.vit3d import ViT3DConfig

SIZES = ("tiny", "demo", "small", "base")


def text_batch(B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30522, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0  # one padded row
    return ids, mask


def assert_unit(x):
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(x.shape[:-1]), rtol=0, atol=1e-5)


def volume_batch(seed=0):
    """Chunks of two volumes (40 and 24 slices, 16x16) back to back, via medseek.volume."""
    from medseek import volume as mv
    from medseek.models.vit3d import token_valid_mask

    rng = np.random.default_rng(seed)
    toks, poss, masks, counts = [], [], [], []
    for d in (40, 24):
        chunks, z0, valid = mv.chunk(rng.random((d, 16, 16), dtype=np.float32), 16)
        t, p = mv.patchify(chunks, z0, (4, 8, 8))
        toks.append(t), poss.append(p), counts.append(len(z0))
        masks.append(token_valid_mask(p, z0, valid, 4).numpy())
    return np.concatenate(toks), np.concatenate(poss), np.concatenate(masks), counts


def test_every_shipped_config_parses_and_counts():
    names = list_models()
    # the <task>-<size> grid, plus tiny vision towers with the full pretrained MiniLM
    # (the tiny-cxr / tiny-ct recipes) and the shipped retrieval models
    assert names == sorted([f"{t}-{s}" for t in ("ct", "cxr", "wrist") for s in SIZES]
                           + ["ct-tiny-minilm", "cxr-tiny-minilm"]
                           + [f"{t}-retrieval" for t in ("ct", "cxr", "wrist")])
    totals = {}
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name
        assert isinstance(cfg.vision, ViT3DConfig if name.startswith("ct") else ViT2DConfig)
        model = create_model(name, device="meta")  # shapes only, no memory
        assert all(p.is_meta for p in model.parameters())
        totals[name] = count_parameters(model)
        assert "total" in describe(model)
    # ViT-B/16 vision tower ~ 85 M + MiniLM 22.6 M; sizes grow tiny < demo < small < base
    assert 105e6 < totals["cxr-base"] < 112e6
    for task in ("ct", "cxr", "wrist"):
        counts = [totals[f"{task}-{s}"] for s in SIZES]
        assert counts == sorted(counts) and counts[0] < 2e6


@pytest.mark.parametrize("name", ["cxr-tiny", "wrist-tiny"])
def test_image_model_outputs_and_gradients(name):
    torch.manual_seed(0)
    model = create_model(name)
    images = torch.rand(3, 1, 64, 48)
    boxes = torch.tensor([[[0.0, 0.0, 24.0, 32.0], [24.0, 16.0, 48.0, 64.0]]]).expand(3, -1, -1)
    img, regions = model.encode_image_and_regions(images, boxes)
    txt = model.encode_text(*text_batch())
    assert img.shape == (3, 32) and regions.shape == (3, 2, 32) and txt.shape == (3, 32)
    for x in (img, regions, txt):
        assert_unit(x)
    torch.testing.assert_close(model.encode_image(images), img, rtol=0, atol=1e-6)
    ls = model.logit_scale
    if model.cfg.loss == "siglip":
        loss = siglip_loss(img, txt, ls.scale(), ls.bias) + siglip_loss(
            regions[:, 0], txt, ls.scale(), ls.bias)
    else:
        loss = clip_loss(img, txt, ls.scale()) + clip_loss(regions[:, 1], txt, ls.scale())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_volume_model_outputs_and_gradients():
    torch.manual_seed(1)
    model = create_model("ct-tiny")
    tokens, positions, mask, counts = volume_batch()
    assert counts == [3, 2]
    vol = model.encode_volume(tokens, positions, mask, chunk_counts=counts)
    chunks = model.encode_chunks(tokens, positions, mask)
    txt = model.encode_text(*text_batch(B=2))
    assert vol.shape == (2, 32) and chunks.shape == (5, 32)
    for x in (vol, chunks, txt):
        assert_unit(x)
    # each volume of the batch encodes as it does alone
    alone = model.encode_volume(tokens[3:], positions[3:], mask[3:])
    torch.testing.assert_close(alone[0], vol[1], rtol=0, atol=1e-5)
    ls = model.logit_scale
    loss = siglip_loss(vol, txt, ls.scale(), ls.bias) + siglip_loss(chunks[:2], txt, ls.scale(), ls.bias)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_volume_array_and_organs():
    torch.manual_seed(2)
    model = create_model("ct-tiny").eval()
    vol = np.random.default_rng(3).random((40, 32, 32), dtype=np.float32)
    with torch.no_grad():
        enc = model.encode_volume_array(vol)
        organ = model.organ_embedding(enc.chunks, enc.z_start, enc.depth, 4, 20, valid=enc.valid)
    assert enc.volume.shape == (32,) and enc.chunks.shape == (3, 32)
    for x in (enc.volume, enc.chunks, organ):
        assert_unit(x)


def test_logit_scale_initialisation():
    torch.manual_seed(0)
    sig = create_model("wrist-tiny").logit_scale
    torch.testing.assert_close(sig.scale(), torch.tensor([10.0]))
    torch.testing.assert_close(sig.bias.detach(), torch.tensor([-10.0]))
    clip = create_model("cxr-tiny").logit_scale
    torch.testing.assert_close(clip.scale(), torch.tensor([1 / 0.07]))
    assert clip.bias is None
    with torch.no_grad():
        clip.log_scale.fill_(10.0)
    torch.testing.assert_close(clip.scale(), torch.tensor([100.0]))  # capped


def test_wrong_modality_raises():
    model = create_model("cxr-tiny")
    with pytest.raises(TypeError, match="needs a volume model"):
        model.encode_chunks(np.zeros((1, 4, 256), np.float32), np.zeros((1, 4, 3), np.int32))
    with pytest.raises(TypeError, match="needs a image model"):
        create_model("ct-tiny").encode_image(torch.zeros(1, 1, 16, 16))


def test_overrides_and_json_path(tmp_path):
    model = create_model("cxr-tiny", vision={"depth": 1}, embed_dim=16)
    assert len(model.visual.blocks) == 1 and model.embed_dim == 16
    assert model.visual.cfg.width == 64  # untouched keys of the section stay
    raw = json.loads(json.dumps(load_config_raw("ct-tiny")))
    raw["vision"]["chunk_depth"] = 8
    path = tmp_path / "my-ct.json"
    path.write_text(json.dumps(raw))
    cfg = load_config(path)
    assert cfg.name == "my-ct" and cfg.vision.chunk_depth == 8
    with pytest.raises(ValueError, match="unknown keys in vision: \\['dept'\\]"):
        create_model("cxr-tiny", vision={"dept": 1})
    with pytest.raises(ValueError, match="unknown top-level config keys"):
        create_model("cxr-tiny", embedding=3)
    with pytest.raises(ValueError, match="name_or_path must be"):
        create_model("cxr-huge")
    with pytest.raises(ValueError, match="vision.type"):
        create_model("cxr-tiny", vision={"type": "vit4d"})
    with pytest.raises(ValueError, match="region_head is for image"):
        create_model("ct-tiny", region_head=True)


def load_config_raw(name):
    from medseek.models.factory import CONFIG_DIR

    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["wrist-tiny", "ct-tiny"])
def test_safetensors_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    torch.manual_seed(1)
    other = create_model(name).eval()
    ids, mask = text_batch()
    with torch.no_grad():
        assert not torch.equal(other.encode_text(ids, mask), model.encode_text(ids, mask))
        other.load_state_dict(load_file(str(path)), strict=True)
        torch.testing.assert_close(other.encode_text(ids, mask), model.encode_text(ids, mask),
                                   rtol=0, atol=0)
        if model.modality == "image":
            images = torch.rand(2, 1, 32, 32)
            boxes = torch.tensor([[[0.0, 0.0, 16.0, 16.0]]]).expand(2, -1, -1)
            a, b = model.encode_image_and_regions(images, boxes), other.encode_image_and_regions(images, boxes)
        else:
            tokens, positions, valid, counts = volume_batch()
            a = model.encode_volume(tokens, positions, valid, counts)
            b = other.encode_volume(tokens, positions, valid, counts)
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_pretrained_text_matches_minilm():
    from medseek.models.text_tower import TextEncoder

    model = create_model("cxr-tiny", text={"hidden_size": 384, "num_hidden_layers": 6,
                                           "num_attention_heads": 12, "intermediate_size": 1536,
                                           "max_position_embeddings": 512, "max_length": 256})
    load_pretrained_text(model)
    ref = TextEncoder()
    ids, mask = ref.tokenize(["No acute cardiopulmonary abnormality.", "Small left effusion."])
    with torch.no_grad():
        torch.testing.assert_close(model.text(ids, mask), ref.model(ids, mask), rtol=0, atol=0)
    with pytest.raises(ValueError, match="text.hidden_size is 32"):
        load_pretrained_text(create_model("cxr-tiny"))
