"""Chunked ViT3D: any slice count, padding masked, absolute z used, pooling, organs."""

import numpy as np
import pytest
import torch

from medseek import volume as mv
from medseek.models.vit3d import (
    ViT3D,
    ViT3DConfig,
    group_chunks,
    organ_embedding,
    token_valid_mask,
)

TINY = ViT3DConfig(patch_size=(4, 8, 8), chunk_depth=16, width=32, depth=2, heads=2, mlp_ratio=2.0)


def sharpen_attention_(model, factor=8.0):
    """At init attention is nearly uniform (position effects ~1e-3); peak it for margin."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(factor)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ViT3D(TINY).eval()


def tokens_of(vol, depth=16, pad_value=0.0):
    chunks, z_start, valid = mv.chunk(vol, depth, 0, pad_value)
    tokens, positions = mv.patchify(chunks, z_start, (4, 8, 8))
    return chunks, z_start, valid, tokens, positions


def test_40_and_400_slices_at_two_spacings(model):
    rng = np.random.default_rng(0)
    vol40 = rng.random((40, 32, 32), dtype=np.float32)  # 5 mm slices
    vol400 = mv.resample(vol40, (5.0, 1.0, 1.0), (0.5, 1.0, 1.0))  # the same body at 0.5 mm
    assert vol400.shape == (400, 32, 32)
    with torch.no_grad():
        e40 = model.encode_volume_array(vol40)
        e400 = model.encode_volume_array(vol400)
    assert e40.chunks.shape == (3, 32) and e40.volume.shape == (32,)
    assert e400.chunks.shape == (25, 32) and e400.volume.shape == (32,)
    assert e40.valid.tolist() == [16, 16, 8] and e40.depth == 16
    for e in (e40, e400):
        assert torch.isfinite(e.volume).all() and torch.isfinite(e.chunks).all()


def test_padded_slices_do_not_leak(model):
    sharpen_attention_(model)
    rng = np.random.default_rng(1)
    vol = rng.random((40, 16, 16), dtype=np.float32)  # last chunk: 8 real slices + 8 padded
    chunks, z_start, valid, tokens, positions = tokens_of(vol)
    assert valid[-1] == 8
    noisy = chunks.copy()
    noisy[-1, 8:] = rng.normal(5.0, 3.0, size=noisy[-1, 8:].shape).astype(np.float32)
    tokens_n, positions_n = mv.patchify(noisy, z_start, (4, 8, 8))
    mask = token_valid_mask(positions, z_start, valid, 4)
    assert mask[:2].all() and mask[-1].sum() == mask.shape[1] // 2
    with torch.no_grad():
        clean = model.encode_chunks(tokens, positions, mask)
        dirty = model.encode_chunks(tokens_n, positions_n, mask)
        unmasked = model.encode_chunks(tokens_n, positions_n, None)
    torch.testing.assert_close(dirty, clean, rtol=0, atol=1e-6)
    # without the key mask the pad values reach the CLS: the check above can fail
    assert (unmasked[-1] - clean[-1]).abs().max() > 1e-2


def test_absolute_z_changes_chunk_embedding(model):
    sharpen_attention_(model)
    rng = np.random.default_rng(2)
    chunk = rng.random((1, 16, 16, 16), dtype=np.float32)
    with torch.no_grad():
        base = model.encode_chunks(*mv.patchify(chunk, np.array([0], np.int32), (4, 8, 8)))
        moved = model.encode_chunks(*mv.patchify(chunk, np.array([64], np.int32), (4, 8, 8)))
        tokens, positions = mv.patchify(chunk, np.array([0], np.int32), (4, 8, 8))
        perm = torch.randperm(tokens.shape[1], generator=torch.Generator().manual_seed(0))
        shuffled = model.encode_chunks(tokens[:, perm.numpy()], positions[:, perm.numpy()])
    assert (moved - base).abs().max() > 1e-2
    # reordering tokens together with their positions changes nothing
    torch.testing.assert_close(shuffled, base, rtol=0, atol=1e-5)


def test_every_parameter_gets_gradient():
    torch.manual_seed(3)
    model = ViT3D(TINY)
    rng = np.random.default_rng(3)
    _, z_start, valid, tokens, positions = tokens_of(rng.random((40, 16, 16), dtype=np.float32))
    emb, chunks = model.encode_volume_tokens(tokens, positions,
                                             token_valid_mask(positions, z_start, valid, 4))
    assert emb.shape == (32,) and chunks.shape == (3, 32)
    (emb ** 2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("pool", ["attention", "mean"])
def test_pooling_masks_missing_chunks(pool):
    torch.manual_seed(4)
    model = ViT3D(ViT3DConfig(patch_size=(4, 8, 8), chunk_depth=16, width=32, depth=1, heads=2,
                              volume_pool=pool)).eval()
    chunks = torch.randn(5, 32)
    grouped, mask = group_chunks(chunks, [2, 3])  # (2, 3, 32), (2, 3)
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    grouped[0, 2] = 1e3  # garbage in the padded slot must be ignored
    with torch.no_grad():
        both = model.pool_chunks(grouped, mask)
        first = model.pool_chunks(chunks[None, :2])
        second = model.pool_chunks(chunks[None, 2:])
    torch.testing.assert_close(both[0], first[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(both[1], second[0], rtol=0, atol=1e-5)
    if pool == "mean":
        torch.testing.assert_close(first[0], chunks[:2].mean(0))
    with pytest.raises(ValueError, match="chunk_counts"):
        group_chunks(chunks, [2, 2])


def test_chunks_per_pass_does_not_change_result(model):
    rng = np.random.default_rng(5)
    _, _, _, tokens, positions = tokens_of(rng.random((72, 8, 8), dtype=np.float32))
    with torch.no_grad():
        all_at_once = model.encode_chunks(tokens, positions)
        two_at_a_time = model.encode_chunks(tokens, positions, max_chunks_per_pass=2)
    torch.testing.assert_close(two_at_a_time, all_at_once, rtol=0, atol=1e-6)


def test_organ_embedding_weights_by_overlap():
    chunks = torch.eye(3)  # chunk c is basis vector c: the result shows the weights
    z_start = np.array([0, 16, 32], np.int32)
    w = organ_embedding(chunks, z_start, 16, 8, 24, normalize=False)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5, 0.0]))
    w = organ_embedding(chunks, z_start, 16, 12, 48, normalize=False)
    torch.testing.assert_close(w, torch.tensor([4, 16, 16]) / 36.0)
    # with valid, the padded tail of the last chunk does not count
    w = organ_embedding(chunks, z_start, 16, 28, 60, valid=np.array([16, 16, 8]), normalize=False)
    torch.testing.assert_close(w, torch.tensor([0.0, 4 / 12, 8 / 12]))
    unit = organ_embedding(chunks, z_start, 16, 8, 24)
    torch.testing.assert_close(unit.norm(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="no chunk overlaps"):
        organ_embedding(chunks, z_start, 16, 60, 70)
    with pytest.raises(ValueError, match="z0 < z1"):
        organ_embedding(chunks, z_start, 16, 30, 20)


def test_bad_inputs_raise(model):
    tokens = np.zeros((2, 16, 256), np.float32)
    positions = np.zeros((2, 16, 3), np.int32)
    with pytest.raises(TypeError, match="tokens must be torch.float32"):
        model.encode_chunks(tokens.astype(np.float64), positions)
    with pytest.raises(TypeError, match="positions must be torch.int32"):
        model.encode_chunks(tokens, positions.astype(np.int64))
    with pytest.raises(ValueError, match=r"tokens must be \(C, N, 256\)"):
        model.encode_chunks(np.zeros((2, 16, 100), np.float32), positions)
    with pytest.raises(ValueError, match="valid_mask must be"):
        model.encode_chunks(tokens, positions, np.ones((2, 15), bool))
    with pytest.raises(ValueError, match="patch must be the model's"):
        model.encode_volume_array(np.zeros((16, 16, 16), np.float32), patch=(2, 8, 8))
    with pytest.raises(TypeError, match="windowed float32"):
        model.encode_volume_array(np.zeros((16, 16, 16), np.int16))
    with pytest.raises(ValueError, match="chunk_overlap"):
        ViT3DConfig(chunk_depth=32, chunk_overlap=2)
    with pytest.raises(ValueError, match="volume_pool"):
        ViT3DConfig(volume_pool="max")
