"""CPU timings of the medseek.kernels torch references (what CPU training runs).

Each benchmark reports a derived GFLOP/s and its ratio to a plain float32 GEMM measured
in the same run (``gemm_floor``, torch.mm 1024³), so a regression in the reference shows
as a falling fraction rather than only as a time that depends on the machine.

FLOP formulas (multiply-add = 2):
* rope_attention fwd: 4·B·H·N²·Dh (QKᵀ and PV); fwd+bwd: 2.5 × that (FlashAttention-2
  convention; the rotation and softmax are not counted);
* clip / siglip, plain (B×B materialised) fwd+bwd: 6·B²·D (logits, then two gradient GEMMs);
* newton_schulz, X (m, n) with m <= n, per step 4·m²·n + 2·m³ (X·Xᵀ, A·A, (bA + cA²)·X).

    pytest benchmarks/test_kernels_reference.py -p no:cacheprovider -s
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from medseek.kernels import reference as ref

ROUNDS = dict(rounds=5, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def gemm_gflops():
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * 1024**3 / best / 1e9


def _report(benchmark, name, flops, gemm_gflops):
    gflops = flops / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update(gflops=round(gflops, 2), vs_gemm=round(gflops / gemm_gflops, 3),
                                gemm_gflops=round(gemm_gflops, 1))
    print(f"\n{name}: {gflops:.1f} GFLOP/s, {gflops / gemm_gflops:.2f} of the {gemm_gflops:.0f} GFLOP/s GEMM floor")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_rope_attention_reference(benchmark, gemm_gflops, mode):
    B, H, N, Dh = 2, 4, 512, 64
    q, k, v = (torch.randn(B, H, N, Dh, requires_grad=True) for _ in range(3))
    pos = torch.randint(0, 64, (B, N, 3), dtype=torch.int32)
    mask = torch.rand(B, N) > 0.1
    do = torch.randn(B, H, N, Dh)

    def step():
        out = ref.rope_attention(q, k, v, pos, (12, 10, 10), key_mask=mask)
        if mode == "fwd+bwd":
            torch.autograd.grad(out, (q, k, v), do)

    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
        benchmark.pedantic(step, **ROUNDS)
    flops = 4 * B * H * N * N * Dh * (2.5 if mode == "fwd+bwd" else 1)
    _report(benchmark, f"rope_attention reference {mode} B={B} H={H} N={N} Dh={Dh}", flops, gemm_gflops)


@pytest.mark.parametrize("loss", ["clip", "clip_soft", "siglip"])
def test_loss_reference(benchmark, gemm_gflops, loss):
    B, D = 1024, 256
    img = F.normalize(torch.randn(B, D), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(B, D), dim=-1).requires_grad_()
    scale = torch.tensor(14.0, requires_grad=True)
    bias = torch.tensor(-6.0, requires_grad=True)
    labels = (torch.rand(B, 14) > 0.8).float()
    if loss == "siglip":
        fn, args = ref.siglip_loss, (img, txt, scale, bias)
    else:
        fn, args = ref.clip_loss, (img, txt, scale, labels if loss == "clip_soft" else None)
    wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    benchmark.pedantic(lambda: torch.autograd.grad(fn(*args), wrt), **ROUNDS)
    _report(benchmark, f"{loss} reference fwd+bwd B={B} D={D}", 6 * B * B * D, gemm_gflops)


def test_newton_schulz_reference(benchmark, gemm_gflops):
    m, n, steps = 768, 3072, 5
    G = torch.randn(m, n)
    benchmark.pedantic(lambda: ref.newton_schulz(G, steps), **ROUNDS)
    _report(benchmark, f"newton_schulz reference {m}x{n} fp32", steps * (4 * m * m * n + 2 * m**3), gemm_gflops)
