"""rope_attention: Triton kernel vs torch reference, and the reference vs a naive twin.

Without a GPU the kernel runs on CPU tensors in Triton's interpreter (conftest sets
TRITON_INTERPRET=1 before medseek.kernels is imported); with one it runs on CUDA.
Inputs are fresh random draws on every run (no fixed seed).
"""

import math
import re

import pytest
import torch

from medseek import kernels
from medseek.kernels import reference as ref

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# triton 3.9 warns once, at the first real (GPU) compile, that its FP-fusion default will
# change; harmless here, and pytest turns warnings into errors.
pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning")

# Tolerances. float32: kernel and reference sum in different orders (online softmax
# over key tiles, split rotate-half dots), observed max error ~1e-6 on O(1) values, so
# 2e-5 leaves margin without hiding a wrong term. 16-bit: both round the output (and the
# kernel its dot operands) to the input dtype; allow about 4 ulp at magnitude 1
# (fp16 ulp 2^-10, bf16 ulp 2^-7) plus the same relative slack.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def _kernel():
    fn = kernels.rope_attention_triton
    if DEVICE == "cpu" and not getattr(triton.knobs.runtime, "interpret", False):
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    return fn


def _inputs(B, H, N, Dh, A, dtype, masked, max_pos=4096, device=DEVICE):
    q, k, v = (torch.randn(B, H, N, Dh, device=device).to(dtype).requires_grad_() for _ in range(3))
    pos = torch.randint(0, max_pos, (B, N, A), device=device, dtype=torch.int32)
    key_mask = None
    if masked:
        key_mask = torch.rand(B, N, device=device) > 0.3
        key_mask[0, -1] = False  # the ragged last key tile holds a padded key
        key_mask[0, 0] = True  # batch item 0 keeps at least one real key
        if B > 1:
            key_mask[1] = False  # batch item 1 has no real key at all: output defined as 0
    return q, k, v, pos, key_mask


def _sections(Dh, A):
    P = Dh // 2
    base = [P // A] * A
    base[-1] += P - sum(base)
    return tuple(base)


def _check_against_reference(B, H, N, Dh, A, dtype, masked):
    fn = _kernel()
    q, k, v, pos, key_mask = _inputs(B, H, N, Dh, A, dtype, masked)
    sections = _sections(Dh, A)
    out = fn(q, k, v, pos, sections, key_mask=key_mask)
    expected = ref.rope_attention(q, k, v, pos, sections, key_mask=key_mask)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, expected, **TOL[dtype])
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    expected_grads = torch.autograd.grad(expected, (q, k, v), do)
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        torch.testing.assert_close(g, e, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")
    if masked and B > 1:  # no real key: zero output, zero gradients
        assert torch.all(out[1] == 0)
        assert all(torch.all(g[1] == 0) for g in grads)


@pytest.mark.parametrize(
    "B,H,N,Dh,A,masked",
    [
        (2, 2, 37, 32, 1, False),  # one ragged query tile, two key tiles
        (2, 2, 37, 64, 3, True),
        (1, 3, 130, 64, 2, True),  # several query and key tiles, last ones ragged
        (3, 1, 130, 32, 3, False),
        (2, 1, 70, 128, 1, True),  # Dh = 128
    ],
)
def test_kernel_matches_reference_fp32(B, H, N, Dh, A, masked):
    _check_against_reference(B, H, N, Dh, A, torch.float32, masked)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_matches_reference_16bit(dtype):
    # In the interpreter bf16 dot operands are widened to float32 (see _launch.dot_dtype),
    # so the bf16 tensor-core path itself is only exercised by benchmarks/gpu.
    _check_against_reference(2, 2, 37, 64, 2, dtype, True)


def _naive_rope_attention(q, k, v, pos, sections, theta, key_mask, scale):
    """Rotate q, k explicitly pair by pair (float64 angles), then plain softmax attention."""
    B, H, N, Dh = q.shape
    P = Dh // 2
    qr, kr = q.clone(), k.clone()
    j = 0
    for axis, sec in enumerate(sections):
        for i in range(sec):
            angle = pos[:, :, axis].double() * theta ** (-i / sec)  # (B, N)
            c, s = angle.cos()[:, None, :], angle.sin()[:, None, :]
            for x, xr in ((q, qr), (k, kr)):
                xr[..., j] = x[..., j] * c - x[..., j + P] * s
                xr[..., j + P] = x[..., j + P] * c + x[..., j] * s
            j += 1
    out = torch.zeros_like(q)
    for b in range(B):
        keys = key_mask[b] if key_mask is not None else torch.ones(N, dtype=torch.bool)
        if not keys.any():
            continue
        w = torch.softmax(qr[b] @ kr[b][:, keys].transpose(-1, -2) * scale, dim=-1)
        out[b] = w @ v[b][:, keys]
    return out


@pytest.mark.parametrize("A", [1, 2, 3])
def test_reference_matches_naive_rotation(A):
    B, H, N, Dh = 3, 2, 11, 16
    q, k, v, pos, key_mask = _inputs(B, H, N, Dh, A, torch.float64, masked=True, max_pos=3000, device="cpu")
    sections = _sections(Dh, A)
    out = ref.rope_attention(q, k, v, pos, sections, theta=500.0, key_mask=key_mask, scale=0.3)
    naive = _naive_rope_attention(q, k, v, pos, sections, 500.0, key_mask, 0.3)
    # float64 throughout, except the frequency table, rounded to float32 by design
    # (rope_tables): angle error ≈ pos·2^-24 ≈ 2e-4 rad at pos 3000.
    torch.testing.assert_close(out, naive, atol=1e-3, rtol=0)
    exact = ref.rope_attention(q, k, v, pos, sections, theta=500.0, key_mask=None, scale=0.3)
    assert not torch.allclose(out, exact), "key_mask must change the result"


def test_one_axis_section_is_standard_rope():
    # Standard (GPT-NeoX / HF Llama) RoPE: inv_freq = theta^(-2i/Dh), cos/sin duplicated
    # over both halves, x·cos + rotate_half(x)·sin.
    B, H, N, Dh, theta = 2, 3, 9, 32, 10000.0
    x = torch.randn(B, H, N, Dh, dtype=torch.float64)
    pos = torch.randint(0, 2000, (B, N, 1), dtype=torch.int32)
    inv_freq = 1.0 / theta ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    freqs = pos[..., 0].double()[..., None] * inv_freq  # (B, N, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, N, Dh)
    rotate_half = torch.cat((-x[..., Dh // 2:], x[..., : Dh // 2]), dim=-1)
    standard = x * emb.cos() + rotate_half * emb.sin()
    cos, sin = ref.rope_cos_sin(pos, (Dh // 2,), theta, torch.float64)
    # same float32-table rounding bound as above, at pos < 2000
    torch.testing.assert_close(ref.apply_rope(x, cos, sin), standard, atol=5e-4, rtol=0)


def test_reference_gradcheck_float64():
    q, k, v, pos, key_mask = _inputs(2, 1, 5, 8, 2, torch.float64, masked=True, max_pos=50, device="cpu")
    fn = lambda q, k, v: ref.rope_attention(q, k, v, pos, (2, 2), key_mask=key_mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_public_op_sends_cpu_tensors_to_reference(monkeypatch):
    calls = []
    original = ref.rope_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ref, "rope_attention", spy)
    q, k, v, pos, _ = _inputs(1, 1, 4, 8, 1, torch.float32, masked=False, device="cpu")
    kernels.rope_attention(q, k, v, pos, (4,))
    assert calls == [1]


@pytest.mark.parametrize(
    "change,exc,needle",
    [
        (dict(pos_dtype=torch.int64), TypeError, "pos must be int32"),
        (dict(sections=(3, 3)), ValueError, "sections must sum to Dh // 2 = 8"),
        (dict(A=4), ValueError, "A in (1, 2, 3)"),
        (dict(mask_dtype=torch.uint8), TypeError, "key_mask must be bool"),
        (dict(theta=0.0), ValueError, "theta must be > 0, got 0.0"),
    ],
)
def test_bad_arguments_are_named(change, exc, needle):
    A = change.get("A", 2)
    q, k, v, pos, _ = _inputs(1, 1, 4, 16, A, torch.float32, masked=False, device="cpu")
    pos = pos.to(change.get("pos_dtype", torch.int32))
    mask = torch.ones(1, 4, dtype=change.get("mask_dtype", torch.bool))
    sections = change.get("sections", (4, 4) if A == 2 else (2,) * A)
    with pytest.raises(exc, match=re.escape(needle)):
        kernels.rope_attention(q, k, v, pos, sections, key_mask=mask, theta=change.get("theta", 10000.0))


def test_kernel_rejects_unsupported_head_dim():
    fn = _kernel()
    q, k, v, pos, _ = _inputs(1, 1, 4, 48, 1, torch.float32, masked=False)
    with pytest.raises(ValueError, match="head dim Dh in"):
        fn(q, k, v, pos, (24,))


def test_scale_default_is_inverse_sqrt_head_dim():
    q, k, v, pos, _ = _inputs(1, 2, 6, 16, 1, torch.float64, masked=False, device="cpu")
    a = ref.rope_attention(q, k, v, pos, (8,))
    b = ref.rope_attention(q, k, v, pos, (8,), scale=1 / math.sqrt(16))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
