"""Muon's Newton–Schulz orthogonalisation on CUDA: torch matmuls in bfloat16, no Triton.

Each step is three GEMMs (A = X·Xᵀ, A·A, (b·A + c·A·A)·X) on an (m, n) matrix with
m <= n; cuBLAS already runs these near tensor-core peak in bf16, so a Triton GEMM could
only win by exploiting the symmetry of X·Xᵀ and A·A (about half of the first two GEMMs'
work, roughly a third of the total). That kernel is not written; until then the
torch path is the fast path. bf16 is what Muon itself uses: the quintic iteration is
designed to tolerate it (singular values land in ≈[0.7, 1.2] either way).
"""

from __future__ import annotations

import torch

from ._checks import check_matrix
from .reference import newton_schulz_in


def newton_schulz_cuda(G, steps=5):
    """Newton–Schulz as ``reference.newton_schulz``, computed in bfloat16; G's dtype out.

    G (..., m, n) float tensor on any device (used for CUDA tensors by the public op).
    """
    check_matrix(G)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    return newton_schulz_in(G, steps, torch.bfloat16)
