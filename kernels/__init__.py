"""medseek.kernels: Triton kernels for training, each with a pure-torch twin.

Public ops dispatch on the device of their first tensor argument: CUDA tensors run the
Triton kernel (float64 excepted), anything else runs the torch reference in ``medseek.kernels.reference``
(same signature, same contract). The Triton versions are also exported under explicit
names (``rope_attention_triton``, ``clip_loss_triton``, ``siglip_loss_triton``,
``newton_schulz_cuda``) so tests can run them on CPU tensors in Triton's interpreter.

Only torch and triton are imported, with relative imports, so this directory also
imports standalone (``import kernels``) on a GPU host without the rest of medseek.
Triton is imported lazily: CPU-only installs without it can still use the references.
"""

from __future__ import annotations

import importlib

import torch

from . import reference

_TRITON_NAMES = {
    "rope_attention_triton": ".rope_flash_attention",
    "clip_loss_triton": ".contrastive",
    "siglip_loss_triton": ".contrastive",
    "newton_schulz_cuda": ".muon_newton_schulz",
}


def __getattr__(name):
    # Lazy import of the Triton modules (PEP 562): importing triton is slow and optional.
    if name in _TRITON_NAMES:
        return getattr(importlib.import_module(_TRITON_NAMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _on_cuda(t) -> bool:
    # float64 (gradcheck) has no Triton path: it takes the reference on any device.
    return getattr(t, "is_cuda", False) and t.dtype != torch.float64


def rope_attention(q, k, v, pos, sections, *, theta=10000.0, key_mask=None, scale=None):
    """Attention with sectioned RoPE on q, k; see ``reference.rope_attention`` for shapes."""
    fn = __getattr__("rope_attention_triton") if _on_cuda(q) else reference.rope_attention
    return fn(q, k, v, pos, sections, theta=theta, key_mask=key_mask, scale=scale)


def clip_loss(img, txt, logit_scale, labels=None):
    """Symmetric InfoNCE (soft targets with ``labels``); see ``reference.clip_loss``."""
    fn = __getattr__("clip_loss_triton") if _on_cuda(img) else reference.clip_loss
    return fn(img, txt, logit_scale, labels)


def siglip_loss(img, txt, logit_scale, logit_bias):
    """Sigmoid pairwise loss; see ``reference.siglip_loss``."""
    fn = __getattr__("siglip_loss_triton") if _on_cuda(img) else reference.siglip_loss
    return fn(img, txt, logit_scale, logit_bias)


def newton_schulz(G, steps=5):
    """Muon's quintic Newton–Schulz orthogonalisation; see ``reference.newton_schulz``."""
    fn = __getattr__("newton_schulz_cuda") if _on_cuda(G) else reference.newton_schulz
    return fn(G, steps)


__all__ = ["clip_loss", "newton_schulz", "reference", "rope_attention", "siglip_loss"]  # Triton names: lazy
