"""Pure-torch twins of the medseek.kernels ops (same signatures, same contracts).

These run on any device, materialise every intermediate (the N×N attention matrix, the
B×B logit matrix) and use autograd for the backward. They are what CPU tensors run, and
what the Triton kernels are tested against. 16-bit inputs are computed in float32;
float64 inputs stay float64 (for ``torch.autograd.gradcheck``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_labels, check_matrix, check_pair, check_rope_attention, check_scalar

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- RoPE


def rope_tables(sections, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair RoPE tables shared by the reference and the kernel.

    Returns ``inv_freq`` (P,) float32 and ``axis`` (P,) int32 with P = sum(sections):
    pair ``j`` of axis ``a`` with local index ``i`` rotates by
    ``pos[..., a] * theta ** (-i / sections[a])``. The frequencies are computed in float64
    and rounded once, so kernel and reference multiply the same float32 numbers.
    """
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta}")
    freqs, axes = [], []
    for a, sec in enumerate(sections):
        i = torch.arange(sec, dtype=torch.float64)
        freqs.append(theta ** (-i / sec))
        axes.append(torch.full((sec,), a, dtype=torch.int32))
    return torch.cat(freqs).to(device=device, dtype=torch.float32), torch.cat(axes).to(device)


def rope_cos_sin(pos, sections, theta, dtype=torch.float32):
    """cos, sin of the rotation angles, each (B, N, P) in ``dtype``.

    The angle ``pos * inv_freq`` is formed in float32 (float64 if ``dtype`` is float64),
    exactly as the kernel forms it; large positions make this rounding visible.
    """
    inv_freq, axis = rope_tables(sections, theta, pos.device)
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    angle = pos[..., axis.long()].to(angle_dtype) * inv_freq.to(angle_dtype)  # (B, N, P)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE: x (B, Hh, N, Dh); cos, sin (B, N, Dh/2) broadcast over heads."""
    P = x.shape[-1] // 2
    x1, x2 = x[..., :P], x[..., P:]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def rope_attention(q, k, v, pos, sections, *, theta=10000.0, key_mask=None, scale=None):
    """Non-causal attention with sectioned rotary embedding on q and k.

    Parameters
    ----------
    q, k, v : (B, Hh, N, Dh) float32 / float16 / bfloat16 / float64
    pos : (B, N, A) int32, A in (1, 2, 3) position axes
    sections : A ints summing to Dh // 2 (pairs per axis)
    theta : RoPE base
    key_mask : (B, N) bool or None, True for real keys
    scale : softmax scale, default Dh ** -0.5

    Returns
    -------
    (B, Hh, N, Dh) in q's dtype. A query row whose keys are all masked returns zeros.
    """
    B, H, N, Dh, A = check_rope_attention(q, k, v, pos, sections, key_mask)
    scale = Dh**-0.5 if scale is None else float(scale)
    cdt = _compute_dtype(q.dtype)
    cos, sin = rope_cos_sin(pos, tuple(sections), theta, cdt)
    qr = apply_rope(q.to(cdt), cos, sin)
    kr = apply_rope(k.to(cdt), cos, sin)
    s = torch.matmul(qr, kr.transpose(-1, -2)) * scale  # (B, Hh, N, N)
    if key_mask is None:
        p = torch.softmax(s, dim=-1)
        return torch.matmul(p, v.to(cdt)).to(q.dtype)
    keep = key_mask[:, None, None, :]  # (B, 1, 1, N)
    has_key = key_mask.any(dim=-1)[:, None, None, None]  # (B, 1, 1, 1)
    # Rows with no real key would softmax over -inf only (NaN); give them a harmless row
    # and zero their output, as the kernel does.
    s = torch.where(keep, s, float("-inf"))
    s = torch.where(has_key, s, torch.zeros((), dtype=cdt, device=s.device))
    out = torch.matmul(torch.softmax(s, dim=-1), v.to(cdt))
    return torch.where(has_key, out, torch.zeros((), dtype=cdt, device=out.device)).to(q.dtype)


# ----------------------------------------------------------------------------- losses


def soft_targets(labels, B, device, dtype):
    """Targets (B, B): ``t_ij = (y_i·y_j) / Σ_j (y_i·y_j)``; all-zero label rows → identity."""
    eye = torch.eye(B, device=device, dtype=dtype)
    if labels is None:
        return eye
    y = labels.to(dtype)
    w = y @ y.T
    n = w.sum(dim=1, keepdim=True)
    return torch.where(n > 0, w / torch.where(n > 0, n, torch.ones_like(n)), eye)


def clip_loss(img, txt, logit_scale, labels=None):
    """Symmetric InfoNCE ``0.5 * (CE(s·I·Tᵀ) + CE(s·T·Iᵀ))``, averaged over the batch.

    img, txt (B, D) L2-normalised; logit_scale a one-element tensor (already exponentiated);
    labels (B, L) multi-hot or None (identity targets). Returns a 0-dim float32 tensor
    (float64 for float64 inputs).
    """
    B, D = check_pair(img, txt)
    check_scalar("logit_scale", logit_scale, img)
    if labels is not None:
        check_labels(labels, B, img)
    cdt = _compute_dtype(img.dtype)
    logits = logit_scale.reshape(()).to(cdt) * (img.to(cdt) @ txt.to(cdt).T)  # (B, B)
    t = soft_targets(labels, B, img.device, cdt)
    row = -(t * F.log_softmax(logits, dim=1)).sum(dim=1)  # image i against all texts
    col = -(t * F.log_softmax(logits.T, dim=1)).sum(dim=1)  # text i against all images
    return 0.5 * (row.mean() + col.mean())


def siglip_loss(img, txt, logit_scale, logit_bias):
    """Sigmoid loss ``-Σ_ij logsigmoid(z_ij (s·x_i·y_j + b)) / B``, z = +1 on the diagonal."""
    B, D = check_pair(img, txt)
    check_scalar("logit_scale", logit_scale, img)
    check_scalar("logit_bias", logit_bias, img)
    cdt = _compute_dtype(img.dtype)
    logits = logit_scale.reshape(()).to(cdt) * (img.to(cdt) @ txt.to(cdt).T) + logit_bias.reshape(()).to(cdt)
    z = 2 * torch.eye(B, device=img.device, dtype=cdt) - 1
    return -F.logsigmoid(z * logits).sum() / B


# ----------------------------------------------------------------------------- Muon


def newton_schulz_in(G, steps, compute_dtype):
    """Muon's quintic Newton–Schulz iteration on ``G`` (..., m, n) in ``compute_dtype``."""
    a, b, c = MUON_COEFFICIENTS
    X = G.to(compute_dtype)
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = X.mT  # iterate on the wide side: X·Xᵀ is then the smaller Gram matrix
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def newton_schulz(G, steps=5):
    """Approximately orthogonalise G (..., m, n): returns ≈ U·Vᵀ of its SVD, G's dtype.

    Computed in float32 (float64 for float64 input); singular values land in ≈[0.7, 1.2],
    which is what Muon wants, not an exact polar factor.
    """
    check_matrix(G)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    return newton_schulz_in(G, steps, _compute_dtype(G.dtype))


__all__ = [
    "apply_rope",
    "clip_loss",
    "newton_schulz",
    "rope_attention",
    "rope_cos_sin",
    "rope_tables",
    "siglip_loss",
    "soft_targets",
]
