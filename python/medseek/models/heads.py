"""Projection heads into the shared embedding space, and the learnable logit scale/bias.

Every tower ends in a :class:`ProjectionHead` mapping its own width to ``embed_dim`` and
L2-normalising, so image, volume, region, chunk and text embeddings are unit vectors in
one space and cosine similarity is a dot product (what the ANN index searches).

:class:`LogitScale` holds the contrastive temperature the losses in
:mod:`medseek.kernels` multiply by (already exponentiated):

* CLIP (InfoNCE): ``log s`` starts at ``log(1 / 0.07)`` (s ≈ 14.3), no bias;
* SigLIP (sigmoid): ``log s`` starts at ``log(10)`` and the bias at ``-10``, so that the
  B² - B negative pairs start with a small loss (SigLIP, Zhai et al. 2023).

The scale is capped at 100 (``log s`` clamped), as CLIP does, so training cannot run the
temperature to zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HEAD_KINDS = ("linear", "mlp")
LOSSES = ("clip", "siglip")
MAX_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class HeadConfig:
    kind: str = "linear"  # "linear": one matrix; "mlp": Linear-GELU-Linear
    hidden: int | None = None  # MLP hidden width; None = the input width

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if self.hidden is not None and (not isinstance(self.hidden, int) or self.hidden <= 0):
            raise ValueError(f"head hidden must be a positive int or None, got {self.hidden!r}")


class ProjectionHead(nn.Module):
    """``(..., in_dim)`` → L2-normalised ``(..., out_dim)``."""

    def __init__(self, in_dim: int, out_dim: int, cfg: HeadConfig = HeadConfig()) -> None:
        super().__init__()
        if cfg.kind == "linear":
            # no bias: a bias would shift every embedding the same way before normalising
            self.net = nn.Linear(in_dim, out_dim, bias=False)
        else:
            hidden = cfg.hidden or in_dim
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim, bias=False)
            )
        for m in self.net.modules():
            if isinstance(m, nn.Linear) and not m.weight.is_meta:
                nn.init.normal_(m.weight, std=in_dim**-0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)  # (..., out_dim)


class LogitScale(nn.Module):
    """Learnable temperature ``s = exp(log_scale)`` and, for SigLIP, a logit bias ``b``."""

    def __init__(self, loss: str = "siglip") -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.loss = loss
        init = math.log(10.0) if loss == "siglip" else math.log(1 / 0.07)
        self.log_scale = nn.Parameter(torch.full((1,), init))
        self.bias = nn.Parameter(torch.full((1,), -10.0)) if loss == "siglip" else None

    def scale(self) -> torch.Tensor:
        """``(1,)`` multiplier for the losses, ``exp(log_scale)`` capped at 100."""
        return self.log_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Pair logits ``s · a bᵀ (+ bias)``: ``(B, D), (M, D) → (B, M)``, for inspection and
        small-batch evaluation (the training losses in :mod:`medseek.kernels` never build
        this matrix on CUDA)."""
        out = self.scale() * (a @ b.T)
        return out if self.bias is None else out + self.bias
