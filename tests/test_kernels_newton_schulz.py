"""newton_schulz: the reference against a naive twin, its orthogonalising effect, and
the CUDA (bfloat16) path, which is plain torch and so also runs on CPU here."""

import pytest
import torch

from medseek import kernels
from medseek.kernels import reference as ref


def _naive(G, steps):
    """Muon's quintic as written in the paper, float64, one matrix, explicit transposes."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.t()
    X = X / (torch.sqrt((X * X).sum()) + 1e-7)
    for _ in range(steps):
        gram = X @ X.t()
        X = a * X + b * (gram @ X) + c * (gram @ (gram @ X))
    return X.t() if tall else X


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (17, 17)])
def test_reference_matches_naive(shape):
    G = torch.randn(*shape, dtype=torch.float64)
    # float64 in, float64 out: only summation order differs.
    torch.testing.assert_close(ref.newton_schulz(G, steps=5), _naive(G, 5), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_output_is_nearly_orthogonal(shape):
    G = torch.randn(*shape)
    X = ref.newton_schulz(G)
    assert X.shape == G.shape and X.dtype == torch.float32
    sv = torch.linalg.svdvals(X)
    # Muon's coefficients trade exactness for speed: singular values end in ≈[0.7, 1.2].
    assert sv.min() > 0.5 and sv.max() < 1.3, sv
    before = torch.linalg.svdvals(G / torch.linalg.matrix_norm(G))
    assert before.max() / before.min() > 2 * sv.max() / sv.min()  # the spread really shrank


def test_batched_equals_loop_and_steps_zero_normalises():
    G = torch.randn(3, 20, 12)
    batched = ref.newton_schulz(G, steps=3)
    for i in range(3):
        torch.testing.assert_close(batched[i], ref.newton_schulz(G[i], steps=3), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ref.newton_schulz(G[0], steps=0), G[0] / (G[0].norm() + 1e-7))


def test_bfloat16_path_tracks_float32():
    G = torch.randn(48, 96)
    fast, exact = kernels.newton_schulz_cuda(G), ref.newton_schulz(G)
    assert fast.dtype == torch.float32
    # bf16 (8-bit mantissa) matmuls over 5 steps: entries of X are O(1/sqrt(n)) ~ 0.1;
    # observed max error ~2e-2 on entries up to ~0.35 (bf16 ulp there is 2^-9 ≈ 2e-3,
    # so ~10 ulp after 15 bf16 GEMMs); 5e-2 still fails a wrong coefficient or transpose.
    torch.testing.assert_close(fast, exact, atol=5e-2, rtol=0)
    sv = torch.linalg.svdvals(fast)
    assert sv.min() > 0.5 and sv.max() < 1.3, sv


def test_public_op_sends_cpu_tensors_to_reference(monkeypatch):
    calls = []
    original = ref.newton_schulz
    monkeypatch.setattr(ref, "newton_schulz", lambda G, steps=5: calls.append(steps) or original(G, steps))
    kernels.newton_schulz(torch.randn(4, 6), steps=2)
    assert calls == [2]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"G must be \(\.\.\., m, n\), got shape \(5,\)"):
        kernels.newton_schulz(torch.randn(5))
    with pytest.raises(TypeError, match="G must be a float tensor, got torch.int64"):
        kernels.newton_schulz(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="steps must be a non-negative int, got -1"):
        kernels.newton_schulz(torch.randn(2, 2), steps=-1)
