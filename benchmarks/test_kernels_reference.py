"""CPU timings of the medseek.kernels torch references (what CPU training runs).

Each benchmark reports a derived GFLOP/s and its ratio to a plain float32 GEMM measured
in the same run (``gemm_floor``, torch.mm 1024³, timed once before each round of the
benchmark: ``bench_gate.paired``), so a regression in the reference shows as a falling
fraction rather than only as a time that depends on the machine. That fraction
(GFLOP/s over the GEMM's GFLOP/s, by CPU time) is ``extra_info["ratio"]``, the number
``benchmarks/compare.py`` gates. None is in the CI ``quick`` tier: with torch's threads
on the loaded 2-core VM, ``rope_attention[fwd]``'s ratio moved 5x between two runs.

FLOP formulas (multiply-add = 2):
* rope_attention fwd: 4·B·H·N²·Dh (QKᵀ and PV); fwd+bwd: 2.5 × that (FlashAttention-2
  convention; the rotation and softmax are not counted);
* clip / siglip, plain (B×B materialised) fwd+bwd: 6·B²·D (logits, then two gradient GEMMs);
* newton_schulz, X (m, n) with m <= n, per step 4·m²·n + 2·m³ (X·Xᵀ, A·A, (bA + cA²)·X).

    pytest benchmarks/test_kernels_reference.py -p no:cacheprovider -s
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench_gate import paired, record_ratio

from medseek.kernels import reference as ref

ROUNDS = dict(rounds=10, warmup_rounds=1)


GEMM_N = 1024


@pytest.fixture(scope="module")
def gemm_floor():
    """One float32 torch.mm of GEMM_N³: the in-run baseline (2·GEMM_N³ FLOP)."""
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    torch.mm(a, b)
    return lambda: torch.mm(a, b)


def run_paired(benchmark, step, gemm_floor):
    """Time ``step`` with the GEMM floor timed before each round."""
    return paired(benchmark, step, gemm_floor, f"torch.mm {GEMM_N}^3 fp32",
                  rounds=ROUNDS["rounds"], warmup_rounds=ROUNDS["warmup_rounds"])


def _report(benchmark, name, flops):
    """GFLOP/s (min time) and its fraction of the GEMM floor's, which becomes the ratio."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    gflops = flops / stats.stats.min / 1e9
    gemm_gflops = 2 * GEMM_N**3 / benchmark.extra_info["baseline_min_s"] / 1e9
    # speed-up x (FLOP of the step / FLOP of the GEMM) = fraction of the GEMM's GFLOP/s;
    # the gated one is by CPU time (bench_gate.paired), the printed one by wall time
    per_gemm = flops / (2 * GEMM_N**3)
    info = benchmark.extra_info
    record_ratio(benchmark, info["ratio"] * per_gemm, f"GFLOP/s of torch.mm {GEMM_N}^3 fp32",
                 gflops=round(gflops, 2), gemm_gflops=round(gemm_gflops, 1),
                 ratio_wall=info["ratio_wall"] * per_gemm,
                 ratio_median_pairs=info["ratio_median_pairs"] * per_gemm)
    print(f"\n{name}: {gflops:.1f} GFLOP/s, {gflops / gemm_gflops:.2f} of the {gemm_gflops:.0f} GFLOP/s GEMM floor")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_rope_attention_reference(benchmark, gemm_floor, mode):
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
        run_paired(benchmark, step, gemm_floor)
    flops = 4 * B * H * N * N * Dh * (2.5 if mode == "fwd+bwd" else 1)
    _report(benchmark, f"rope_attention reference {mode} B={B} H={H} N={N} Dh={Dh}", flops)


@pytest.mark.parametrize("loss", ["clip", "clip_soft", "siglip"])
def test_loss_reference(benchmark, gemm_floor, loss):
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

    run_paired(benchmark, lambda: torch.autograd.grad(fn(*args), wrt), gemm_floor)
    _report(benchmark, f"{loss} reference fwd+bwd B={B} D={D}", 6 * B * B * D)


def test_newton_schulz_reference(benchmark, gemm_floor):
    m, n, steps = 768, 3072, 5
    G = torch.randn(m, n)
    run_paired(benchmark, lambda: ref.newton_schulz(G, steps), gemm_floor)
    _report(benchmark, f"newton_schulz reference {m}x{n} fp32", steps * (4 * m * m * n + 2 * m**3))
