"""Argument checks shared by the Triton kernels and their torch references.

Both paths call the same checks, so a bad argument fails the same way on CPU and on
CUDA, and the message names the argument and the bad value.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_rope_attention(q, k, v, pos, sections, key_mask):
    """Validate rope_attention arguments; return ``(B, Hh, N, Dh, A)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, Hh, N, Dh), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device or pos.device != q.device:
        raise ValueError(f"q, k, v, pos must be on one device, got {q.device}, {k.device}, {v.device}, {pos.device}")
    B, H, N, Dh = q.shape
    if Dh % 2:
        raise ValueError(f"head dim Dh must be even for rotate-half RoPE, got {Dh}")
    if pos.dtype != torch.int32:
        raise TypeError(f"pos must be int32, got {pos.dtype}")
    if pos.dim() != 3 or pos.shape[0] != B or pos.shape[1] != N:
        raise ValueError(f"pos must be (B, N, A) = ({B}, {N}, A), got shape {tuple(pos.shape)}")
    A = pos.shape[2]
    if A not in (1, 2, 3):
        raise ValueError(f"pos must have A in (1, 2, 3) axes, got A={A}")
    sections = tuple(sections)
    if len(sections) != A or any(not isinstance(s, int) or s <= 0 for s in sections):
        raise ValueError(f"sections must be {A} positive ints (one per pos axis), got {sections}")
    if sum(sections) != Dh // 2:
        raise ValueError(f"sections must sum to Dh // 2 = {Dh // 2}, got {sections} (sum {sum(sections)})")
    if key_mask is not None:
        if key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must be bool (True = real key), got {key_mask.dtype}")
        if tuple(key_mask.shape) != (B, N):
            raise ValueError(f"key_mask must be (B, N) = ({B}, {N}), got shape {tuple(key_mask.shape)}")
        if key_mask.device != q.device:
            raise ValueError(f"key_mask must be on {q.device}, got {key_mask.device}")
    return B, H, N, Dh, A


def check_pair(img, txt):
    """Validate a batch of paired embeddings; return ``(B, D)``."""
    for name, t in (("img", img), ("txt", txt)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be (B, D), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    if img.shape != txt.shape:
        raise ValueError(f"img and txt must have the same shape, got {tuple(img.shape)} and {tuple(txt.shape)}")
    if img.dtype != txt.dtype:
        raise TypeError(f"img and txt must share a dtype, got {img.dtype} and {txt.dtype}")
    if img.device != txt.device:
        raise ValueError(f"img and txt must be on one device, got {img.device} and {txt.device}")
    if img.shape[0] == 0:
        raise ValueError("img and txt must hold at least one pair, got B=0")
    return img.shape


def check_scalar(name, t, like):
    """A logit scale or bias: a one-element float tensor on ``like``'s device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a one-element torch.Tensor, got {type(t).__name__}")
    if t.numel() != 1 or not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a one-element float tensor, got shape {tuple(t.shape)} {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {t.device}")


def check_labels(labels, B, like):
    """Multi-hot labels ``(B, L)``; any numeric dtype (bool, int, float)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dim() != 2 or labels.shape[0] != B or labels.shape[1] == 0:
        raise ValueError(f"labels must be (B, L) with B={B}, L >= 1, got shape {tuple(labels.shape)}")
    if labels.is_complex():
        raise TypeError(f"labels must be real multi-hot values, got {labels.dtype}")
    if labels.device != like.device:
        raise ValueError(f"labels must be on {like.device}, got {labels.device}")
    # Negative entries are not checked: that would cost a device sync on every CUDA call.


def check_matrix(G):
    """newton_schulz input: a float tensor ``(..., m, n)``."""
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() < 2:
        raise ValueError(f"G must be (..., m, n), got shape {tuple(G.shape)}")
    if not G.dtype.is_floating_point:
        raise TypeError(f"G must be a float tensor, got {G.dtype}")
