"""clip_loss / siglip_loss: tiled Triton kernels vs the plain torch reference.

The interpreter runs the kernels with 16-row tiles, so B = 37 ends on a ragged tile of 5
and B = 3 is one ragged tile: these are the chunked-vs-plain checks. Inputs are fresh
random draws on every run.
"""

import re

import pytest
import torch
import torch.nn.functional as F

from medseek import kernels
from medseek.kernels import reference as ref

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# triton 3.9 warns once, at the first real (GPU) compile, that its FP-fusion default will
# change; harmless here, and pytest turns warnings into errors.
pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning")

# float32: the kernel accumulates logsumexp online over column tiles and sums gradients
# tile by tile; observed errors ~1e-7 on O(1) losses and gradients, 1e-5 leaves margin.
# 16-bit: dot operands are the 16-bit inputs in both paths but the gradients are rounded
# to the input dtype (|d img| ~ 1/B..1), so about 4 ulp at 1: fp16 4e-3, bf16 3e-2.
# The loss itself is float32 in both paths (reduced from float32 per-row statistics).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def _kernel(name):
    if DEVICE == "cpu" and not getattr(triton.knobs.runtime, "interpret", False):
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    return getattr(kernels, name)


def _pair(B, D, dtype=torch.float32, device=DEVICE):
    img = F.normalize(torch.randn(B, D, device=device), dim=-1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(B, D, device=device), dim=-1).to(dtype).requires_grad_()
    scale = (torch.rand((), device=device) * 20 + 5).requires_grad_()  # exp(t) in [5, 25]
    bias = (torch.randn((), device=device) * 3 - 5).requires_grad_()
    return img, txt, scale, bias


def _labels(B, L, device=DEVICE):
    y = (torch.rand(B, L, device=device) > 0.6).to(torch.float32)
    y[0] = 0  # a report with no finding: falls back to the identity target
    return y


def _compare(fn, expected_fn, args, wrt, dtype):
    out = fn(*args)
    expected = expected_fn(*args)
    assert out.dim() == 0 and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    grads = torch.autograd.grad(out, wrt)
    expected_grads = torch.autograd.grad(expected, wrt)
    names = ("d img", "d txt", "d scale", "d bias")
    for name, g, e in zip(names, grads, expected_grads):
        tol = TOL[dtype] if g.dtype == dtype else TOL[torch.float32]
        torch.testing.assert_close(g, e, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("B,D", [(3, 32), (37, 40), (37, 64), (130, 48)])
@pytest.mark.parametrize("with_labels", [False, True])
def test_clip_kernel_matches_reference(B, D, with_labels):
    img, txt, scale, _ = _pair(B, D)
    labels = _labels(B, 7) if with_labels else None
    _compare(_kernel("clip_loss_triton"), ref.clip_loss, (img, txt, scale, labels), (img, txt, scale), torch.float32)


@pytest.mark.parametrize("B,D", [(3, 32), (37, 40), (37, 64), (130, 48)])
def test_siglip_kernel_matches_reference(B, D):
    img, txt, scale, bias = _pair(B, D)
    _compare(_kernel("siglip_loss_triton"), ref.siglip_loss, (img, txt, scale, bias), (img, txt, scale, bias),
             torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_losses_16bit(dtype):
    img, txt, scale, bias = _pair(37, 64, dtype)
    labels = _labels(37, 5)
    _compare(_kernel("clip_loss_triton"), ref.clip_loss, (img, txt, scale, labels), (img, txt, scale), dtype)
    _compare(_kernel("siglip_loss_triton"), ref.siglip_loss, (img, txt, scale, bias), (img, txt, scale, bias), dtype)


def test_soft_clip_with_distinct_one_hot_labels_is_hard_clip():
    B = 20
    img, txt, scale, _ = _pair(B, 32)
    one_hot = F.one_hot(torch.randperm(B, device=DEVICE), num_classes=B + 3)  # int64, distinct rows
    hard = _kernel("clip_loss_triton")(img, txt, scale)
    soft = _kernel("clip_loss_triton")(img, txt, scale, one_hot)
    torch.testing.assert_close(soft, hard, **TOL[torch.float32])
    torch.testing.assert_close(ref.clip_loss(img, txt, scale, one_hot), ref.clip_loss(img, txt, scale), atol=1e-6,
                               rtol=1e-6)
    # ...and shared labels really do change the loss
    shared = torch.zeros(B, 2, device=DEVICE)
    shared[:, 0] = 1
    assert not torch.allclose(ref.clip_loss(img, txt, scale, shared), hard)


def test_reference_clip_is_symmetric_cross_entropy():
    img, txt, scale, _ = _pair(25, 16, device="cpu")
    logits = scale * img @ txt.T
    target = torch.arange(25)
    plain = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    torch.testing.assert_close(ref.clip_loss(img, txt, scale), plain, atol=1e-6, rtol=1e-6)


def test_reference_soft_targets():
    y = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]], dtype=torch.float32)
    t = ref.soft_targets(y, 4, "cpu", torch.float64)
    # row 0 overlaps itself 2, row 1 by 1, row 3 by 1: weights 2,1,0,1 over 4
    torch.testing.assert_close(t[0], torch.tensor([0.5, 0.25, 0.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(t[2], torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64))  # no labels
    torch.testing.assert_close(t.sum(dim=1), torch.ones(4, dtype=torch.float64))


def test_reference_siglip_matches_pairwise_sum():
    img, txt, scale, bias = _pair(6, 8, device="cpu")
    total = 0.0
    for i in range(6):
        for j in range(6):
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(z * (scale * img[i] @ txt[j] + bias))
    torch.testing.assert_close(ref.siglip_loss(img, txt, scale, bias), total / 6, atol=1e-5, rtol=1e-6)


def test_reference_gradcheck_float64():
    img, txt, scale, bias = (t.detach().double().requires_grad_() for t in _pair(5, 4, device="cpu"))
    labels = _labels(5, 3, device="cpu")
    assert torch.autograd.gradcheck(lambda a, b, s: ref.clip_loss(a, b, s, labels), (img, txt, scale))
    assert torch.autograd.gradcheck(ref.siglip_loss, (img, txt, scale, bias))


def test_public_ops_send_cpu_tensors_to_reference(monkeypatch):
    calls = []
    for name in ("clip_loss", "siglip_loss"):
        original = getattr(ref, name)
        monkeypatch.setattr(ref, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    img, txt, scale, bias = _pair(4, 8, device="cpu")
    kernels.clip_loss(img, txt, scale)
    kernels.siglip_loss(img, txt, scale, bias)
    assert calls == ["clip_loss", "siglip_loss"]


def test_bad_arguments_are_named():
    img, txt, scale, bias = _pair(4, 8, device="cpu")
    with pytest.raises(ValueError, match=re.escape("img and txt must have the same shape, got (4, 8) and (3, 8)")):
        kernels.clip_loss(img, txt[:3], scale)
    with pytest.raises(ValueError, match="labels must be \\(B, L\\) with B=4"):
        kernels.clip_loss(img, txt, scale, torch.ones(3, 2))
    with pytest.raises(ValueError, match="logit_bias must be a one-element float tensor"):
        kernels.siglip_loss(img, txt, scale, torch.zeros(2))


def test_kernel_rejects_too_wide_embeddings():
    img, txt, scale, _ = _pair(2, 1025)
    with pytest.raises(ValueError, match="D <= 1024, got D=1025"):
        _kernel("clip_loss_triton")(img, txt, scale)
