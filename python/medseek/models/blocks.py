"""Pre-norm transformer block whose attention applies sectioned RoPE inside the kernel.

The image and volume towers share this block. Positions never enter the residual stream:
each attention call rotates q and k by the integer patch-grid coordinates ``pos``
(``(y, x)`` for radiographs, ``(z, y, x)`` for CT chunks) inside
:func:`medseek.kernels.rope_attention`, which runs the Triton kernel on CUDA and the
pure-torch reference on CPU. Because q·k then depends on position offsets only, the
towers accept any grid size, and the CT z axis is unbounded.

The Triton kernel takes head dims 32, 64 and 128 (every shipped config, ``tiny``
included, uses one of them); other head dims run on CPU only, through the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medseek.kernels import rope_attention


def rope_sections(head_dim: int, n_axes: int, sections=None) -> tuple[int, ...]:
    """Split the ``head_dim // 2`` rotary pairs of a head between ``n_axes`` position axes.

    Parameters
    ----------
    head_dim : int, even
    n_axes : int, 1..3 (2 for (y, x), 3 for (z, y, x))
    sections : sequence of ints or None
        Explicit split; must have ``n_axes`` positive entries summing to ``head_dim // 2``.
        ``None`` splits evenly, the remainder going to the first axes (z for volumes,
        which has the longest range).

    Returns
    -------
    tuple of ``n_axes`` positive ints summing to ``head_dim // 2``
    """
    if head_dim % 2 or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim}")
    pairs = head_dim // 2
    if sections is None:
        if pairs < n_axes:
            raise ValueError(
                f"head_dim {head_dim} has {pairs} rotary pairs, fewer than n_axes {n_axes}"
            )
        base, rem = divmod(pairs, n_axes)
        return tuple(base + (1 if a < rem else 0) for a in range(n_axes))
    sections = tuple(int(s) for s in sections)
    if len(sections) != n_axes or any(s <= 0 for s in sections) or sum(sections) != pairs:
        raise ValueError(
            f"rope_sections must be {n_axes} positive ints summing to head_dim // 2 = {pairs}, "
            f"got {sections}"
        )
    return sections


class RopeSelfAttention(nn.Module):
    """Multi-head self-attention: fused qkv projection, RoPE attention, output projection."""

    def __init__(self, dim: int, n_head: int, sections: tuple[int, ...], theta: float) -> None:
        super().__init__()
        if dim % n_head:
            raise ValueError(f"width {dim} must be divisible by heads {n_head}")
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.sections = rope_sections(self.head_dim, len(sections), sections)
        self.theta = float(theta)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x (B, N, C); pos (B, N, A) int32; key_mask (B, N) bool or None
        B, N, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # each (B, N, C)
        q = q.view(B, N, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
        k = k.view(B, N, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
        v = v.view(B, N, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
        y = rope_attention(q, k, v, pos, self.sections, theta=self.theta, key_mask=key_mask)
        y = y.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj(y)


class MLP(nn.Module):
    """Two-layer GELU feed-forward network."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))  # (B, N, C)


class Block(nn.Module):
    """``x + attn(ln(x))`` then ``x + mlp(ln(x))`` (pre-norm, as in ViT and GPT-2)."""

    def __init__(
        self, dim: int, n_head: int, mlp_ratio: float, sections: tuple[int, ...], theta: float
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RopeSelfAttention(dim, n_head, sections, theta)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(round(dim * mlp_ratio)))

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), pos, key_mask)  # (B, N, C)
        return x + self.mlp(self.ln_2(x))  # (B, N, C)


def init_transformer_(module: nn.Module, depth: int) -> None:
    """GPT-2 style init: N(0, 0.02) weights, zero biases, residual projections scaled.

    The output projections of attention and MLP write into the residual stream; scaling
    them by ``1 / sqrt(2 * depth)`` keeps the stream's variance independent of depth.
    Meta-device parameters (shape-only models, for counting) hold no values: skipped.
    """
    for name, p in module.named_parameters():
        if p.is_meta:
            continue
        if p.dim() >= 2:
            std = 0.02
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                std = 0.02 / math.sqrt(2 * max(depth, 1))
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm) and not m.weight.is_meta:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
