"""ViT2D: shapes at any patch-multiple size, gradient flow, RoPE position use, regions."""

import pytest
import torch

from medseek.models.blocks import rope_sections
from medseek.models.vit2d import ViT2D, ViT2DConfig

TINY = ViT2DConfig(patch_size=8, width=32, depth=2, heads=2, mlp_ratio=2.0)
CONV = ViT2DConfig(patch_size=8, width=32, depth=2, heads=2, mlp_ratio=2.0, stem="conv",
                   stem_channels=8)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ViT2D(TINY).eval()


@pytest.mark.parametrize("hw", [(64, 48), (32, 80)])
def test_shapes_at_two_sizes(model, hw):
    H, W = hw
    images = torch.rand(3, 1, H, W)
    cls, tokens = model(images)
    assert cls.shape == (3, 32)
    assert tokens.shape == (3, (H // 8) * (W // 8), 32)
    assert torch.isfinite(cls).all() and torch.isfinite(tokens).all()
    # batch rows are independent: image 1 alone gives the same CLS
    alone, _ = model(images[1:2])
    torch.testing.assert_close(alone[0], cls[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("hw", [(64, 48), (32, 80)])
def test_conv_stem_gives_the_same_token_grid(hw):
    """The conv stem strides by patch_size in log2(patch_size) layers: same grid, same
    positions, so RoPE, regions and export see the tokens of a patch embedding."""
    torch.manual_seed(2)
    model = ViT2D(CONV).eval()
    H, W = hw
    images = torch.rand(3, 1, H, W)
    tokens, pos = model.embed(images)
    assert tokens.shape == (3, (H // 8) * (W // 8), 32)
    assert torch.equal(pos[0], ViT2D.grid_positions(H // 8, W // 8))
    strides = [m.stride for m in model.stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [(2, 2)] * 3 and model.patch_embed.kernel_size == (1, 1)
    alone, _ = model(images[1:2])
    torch.testing.assert_close(alone[0], model(images)[0][1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("cfg", [TINY, CONV], ids=["patch", "conv"])
def test_every_parameter_gets_gradient(cfg):
    torch.manual_seed(1)
    model = ViT2D(cfg)
    cls, _ = model(torch.rand(2, 1, 32, 40))
    (cls ** 2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mean_pool_is_the_mean_of_the_patch_tokens():
    """pool="mean": the global feature is the final patch tokens' mean, same weights
    otherwise; the CLS token still runs (regions and CLS-free exports agree)."""
    from dataclasses import replace

    torch.manual_seed(3)
    cls_model = ViT2D(CONV).eval()
    mean_model = ViT2D(replace(CONV, pool="mean")).eval()
    mean_model.load_state_dict(cls_model.state_dict())
    images = torch.rand(2, 1, 32, 40)
    cls, tokens = cls_model(images)
    pooled, tokens2 = mean_model(images)
    torch.testing.assert_close(tokens2, tokens)
    torch.testing.assert_close(pooled, tokens.mean(1))
    assert not torch.allclose(pooled, cls)


def sharpen_attention_(model, factor=8.0):
    """At init (std 0.02) attention is nearly uniform, so position effects are ~1e-3;
    scaling the q/k/v projections makes it peaked, giving the checks a wide margin."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(factor)


def test_positions_move_with_tokens_not_without(model):
    sharpen_attention_(model)
    x, pos = model.embed(torch.rand(2, 1, 48, 40))  # (2, 30, 32), (2, 30, 2)
    cls, tokens = model.encode_tokens(x, pos)
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(3))
    # permuting tokens together with their positions: same CLS, permuted patch outputs
    cls_p, tokens_p = model.encode_tokens(x[:, perm], pos[:, perm])
    torch.testing.assert_close(cls_p, cls, rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens_p, tokens[:, perm], rtol=0, atol=1e-5)
    # moving tokens but keeping the positions in place: the model must notice
    cls_moved, _ = model.encode_tokens(x[:, perm], pos)
    assert (cls_moved - cls).abs().max() > 1e-2
    # translating every patch (CLS stays at the origin): the global feature changes
    cls_shift, _ = model.encode_tokens(x, pos + torch.tensor([1, 2], dtype=torch.int32))
    assert (cls_shift - cls).abs().max() > 1e-2


def test_grid_positions_are_row_major(model):
    _, pos = model.embed(torch.zeros(1, 1, 16, 24))
    assert pos.dtype == torch.int32
    assert pos[0].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_bad_images_raise(model):
    with pytest.raises(ValueError, match="patch_size 8"):
        model(torch.rand(1, 1, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.rand(1, 3, 32, 32))
    x, pos = model.embed(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="pos must be int32"):
        model.encode_tokens(x, pos.long())
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(1, 1, 32, 32, dtype=torch.int64))


def test_region_weights(model):
    boxes = torch.tensor([[[0.0, 0.0, 32.0, 16.0],   # whole 32x16 image
                           [9.0, 1.0, 12.0, 5.0],    # inside patch (row 0, col 1)
                           [4.0, 0.0, 12.0, 8.0]]])  # half of patch 0, half of patch 1
    w = model.region_weights(boxes, (2, 4))  # (1, 3, 8)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 3))
    torch.testing.assert_close(w[0, 0], torch.full((8,), 1 / 8))
    assert w[0, 1].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert w[0, 2].tolist() == [0.5, 0.5, 0, 0, 0, 0, 0, 0]


def test_region_embedding_follows_the_box(model):
    images = torch.rand(1, 1, 32, 32)
    a = model.region_embedding(images, torch.tensor([[[0.0, 0.0, 16.0, 16.0]]]))
    b = model.region_embedding(images, torch.tensor([[[16.0, 16.0, 32.0, 32.0]]]))
    c = model.region_embedding(images, torch.tensor([[[0.0, 0.0, 32.0, 32.0]]]))
    assert a.shape == (1, 1, 32)
    assert (a - b).abs().max() > 1e-3
    _, tokens = model(images)
    torch.testing.assert_close(c[0, 0], tokens[0].mean(0), rtol=0, atol=1e-6)


def test_bad_boxes_raise(model):
    images = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"boxes\[0, 1\]"):
        model.region_embedding(images, torch.tensor([[[0.0, 0, 8, 8], [8.0, 8, 4, 12]]]))
    with pytest.raises(ValueError, match="no area inside"):
        model.region_embedding(images, torch.tensor([[[20.0, 20, 30, 30]]]))
    with pytest.raises(ValueError, match="one row per image"):
        model.region_embedding(images, torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match=r"\(B, R, 4\)"):
        model.region_embedding(images, torch.zeros(1, 4))


def test_config_validation():
    assert rope_sections(16, 2) == (4, 4)
    assert rope_sections(16, 3) == (3, 3, 2)
    assert ViT2DConfig(width=32, heads=2, rope_sections=[6, 2]).rope_sections == (6, 2)
    with pytest.raises(ValueError, match="rope_sections"):
        ViT2DConfig(width=32, heads=2, rope_sections=(4, 3))
    with pytest.raises(ValueError, match="divisible by heads"):
        ViT2DConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="patch_size must be a positive int, got 0"):
        ViT2DConfig(patch_size=0)
    with pytest.raises(ValueError, match="stem must be one of"):
        ViT2DConfig(stem="resnet")
    with pytest.raises(ValueError, match="pool must be one of"):
        ViT2DConfig(pool="max")
    with pytest.raises(ValueError, match="power-of-two patch_size >= 2, got 12"):
        ViT2DConfig(patch_size=12, width=32, heads=2, stem="conv")
