#!/usr/bin/env python3
"""medseek.kernels on a lent GPU: correctness against the torch references, then timings.

Run through ``benchmarks/gpu/run.sh`` (which bounds the wall time). The repository's
``kernels/`` directory is imported as a standalone package (medseek itself is not
installed on the GPU host). Sections, each guarded so one failure does not stop the rest:

1. correctness, kernel vs ``kernels.reference`` on random data, forward and backward:
   rope_attention (fp32/fp16/bf16, Dh 64/128, 3-D positions, key padding, ragged N),
   clip_loss (hard and soft labels) and siglip_loss (fp32/bf16, ragged B);
2. rope_attention fwd and fwd+bwd vs PyTorch SDPA (flash backend) with RoPE applied
   separately in torch, bf16. TFLOP/s = 4·B·H·N²·Dh / t for the forward and
   2.5 × that for forward+backward (the FlashAttention-2 convention; RoPE not counted);
3. clip/siglip fwd+bwd vs the plain torch loss (``kernels.reference``, which materialises
   B×B and computes in float32) at B = 4096, 16384, 65536, D = 512, bf16 inputs: time and
   peak memory above the inputs (``max_memory_allocated`` minus the baseline); an OOM of
   the plain loss is reported as such;
4. newton_schulz: bf16 torch path (used on CUDA) vs the float32 reference.

Writes ``kernels_gpu.md`` to $OUT when set, and prints the markdown tables last.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `import kernels`
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import kernels  # noqa: E402
from kernels import reference as ref  # noqa: E402

BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", "420"))  # leave run.sh's timeout some slack
START = time.time()
TABLES: dict[str, list[list[str]]] = {}
HEADERS = {
    "correctness": ["op", "dtype", "shape", "rel. err (out / grads)", "tol (err / max abs ref)", "status"],
    "attention": ["B,H,N,Dh", "impl", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s"],
    "losses": ["loss", "B", "impl", "fwd+bwd ms", "peak MiB above inputs (incl. grads)", "note"],
    "newton_schulz": ["shape", "impl", "ms", "TFLOP/s"],
}
# Relative error bounds (max |kernel - ref| / max |ref|). fp32: GPU sin/cos and exp2
# approximations plus summation order; 16-bit: the kernel rounds rotated q, k and the
# probabilities to the input dtype before its dots, the reference does not.
REL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def row(table, *cells):
    TABLES.setdefault(table, []).append([str(c) for c in cells])
    print(f"[{table}] " + " | ".join(str(c) for c in cells), flush=True)


def out_of_time(section):
    if time.time() - START > BUDGET_S:
        row(section, f"skipped: time budget of {BUDGET_S:.0f} s spent")
        return True
    return False


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def guarded(section):
    def wrap(fn):
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # report and keep going: one bad section must not hide the rest
                traceback.print_exc()
                error = f"ERROR {type(exc).__name__}: {exc}"[:160]
                row(section, *([fn.__name__] + ["-"] * (len(HEADERS[section]) - 2)), error)
                torch.cuda.empty_cache()
        return run
    return wrap


# ----------------------------------------------------------------------------- correctness


def _rope_inputs(B, H, N, Dh, dtype, masked):
    q, k, v = (torch.randn(B, H, N, Dh, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    pos = torch.randint(0, 4096, (B, N, 3), device="cuda", dtype=torch.int32)
    mask = None
    if masked:
        mask = torch.rand(B, N, device="cuda") > 0.25
        mask[:, 0] = True
        mask[-1] = False  # last batch item: no real key, output defined as zeros
    P = Dh // 2
    return q, k, v, pos, mask, (P // 2, P // 4, P - P // 2 - P // 4)


@guarded("correctness")
def check_rope(B, H, N, Dh, dtype, masked):
    q, k, v, pos, mask, sections = _rope_inputs(B, H, N, Dh, dtype, masked)
    out = kernels.rope_attention(q, k, v, pos, sections, key_mask=mask)
    exp = ref.rope_attention(q, k, v, pos, sections, key_mask=mask)
    do = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), do)
    ge = torch.autograd.grad(exp, (q, k, v), do)
    errs = [rel_err(out, exp)] + [rel_err(a, b) for a, b in zip(g, ge)]
    ok = max(errs) <= REL_TOL[dtype] and torch.isfinite(out).all().item()
    row("correctness", "rope_attention" + (" masked" if masked else ""), str(dtype).replace("torch.", ""),
        f"{B},{H},{N},{Dh}", " / ".join(f"{e:.1e}" for e in errs), f"{REL_TOL[dtype]:.0e}", "PASS" if ok else "FAIL")


@guarded("correctness")
def check_loss(name, B, D, dtype, labels):
    img = F.normalize(torch.randn(B, D, device="cuda"), dim=-1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(B, D, device="cuda"), dim=-1).to(dtype).requires_grad_()
    scale = torch.tensor(14.0, device="cuda", requires_grad=True)
    bias = torch.tensor(-6.0, device="cuda", requires_grad=True)
    if name == "clip":
        y = (torch.rand(B, 12, device="cuda") > 0.8).float() if labels else None
        args, wrt = (img, txt, scale, y), (img, txt, scale)
        fast, slow = kernels.clip_loss, ref.clip_loss
    else:
        args, wrt = (img, txt, scale, bias), (img, txt, scale, bias)
        fast, slow = kernels.siglip_loss, ref.siglip_loss
    a, b = fast(*args), slow(*args)
    errs = [rel_err(a, b)] + [rel_err(x, y_) for x, y_ in zip(torch.autograd.grad(a, wrt), torch.autograd.grad(b, wrt))]
    ok = max(errs) <= REL_TOL[dtype]
    row("correctness", name + (" soft labels" if labels else ""), str(dtype).replace("torch.", ""), f"B={B},D={D}",
        " / ".join(f"{e:.1e}" for e in errs), f"{REL_TOL[dtype]:.0e}", "PASS" if ok else "FAIL")


# ----------------------------------------------------------------------------- timings


def _ms(fn, grad_to_none=None):
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


@guarded("attention")
def bench_attention(B, H, N, Dh):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16
    q, k, v, pos, _, sections = _rope_inputs(B, H, N, Dh, dtype, masked=False)
    do = torch.randn_like(q)
    cos, sin = ref.rope_cos_sin(pos, sections, 10000.0, dtype)  # precomputed once, as models cache them
    flops = 4 * B * H * N * N * Dh

    def ours():
        return kernels.rope_attention(q, k, v, pos, sections)

    def sdpa():
        qr, kr = ref.apply_rope(q, cos, sin), ref.apply_rope(k, cos, sin)
        return F.scaled_dot_product_attention(qr, kr, v)

    def report(impl, fwd):
        t_f = _ms(fwd)
        t_fb = _ms(lambda: fwd().backward(do), grad_to_none=[q, k, v])
        row("attention", f"{B},{H},{N},{Dh}", impl, f"{t_f:.2f}", f"{flops / t_f / 1e9:.0f}", f"{t_fb:.2f}",
            f"{2.5 * flops / t_fb / 1e9:.0f}")

    report("rope_attention (Triton)", ours)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa()  # raises if the flash backend cannot run here
            report("torch RoPE + SDPA flash", sdpa)
    except RuntimeError as exc:
        print(f"flash SDPA unavailable ({exc}); timing the default SDPA backend", flush=True)
        report("torch RoPE + SDPA (default backend)", sdpa)


@guarded("losses")
def bench_loss(name, B, D=512):
    dtype = torch.bfloat16
    torch.cuda.empty_cache()
    img = F.normalize(torch.randn(B, D, device="cuda"), dim=-1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(B, D, device="cuda"), dim=-1).to(dtype).requires_grad_()
    scale = torch.tensor(14.0, device="cuda", requires_grad=True)
    bias = torch.tensor(-6.0, device="cuda", requires_grad=True)
    extra = (bias,) if name == "siglip" else ()
    leaves = [img, txt, scale, *extra]
    for impl, fn in (("Triton", getattr(kernels, f"{name}_loss")), ("plain torch", getattr(ref, f"{name}_loss"))):
        step = lambda fn=fn: fn(img, txt, scale, *extra).backward()  # noqa: E731
        try:
            step()
            torch.cuda.synchronize()
            for t in leaves:
                t.grad = None
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = _ms(step, grad_to_none=leaves)
            # 12·B²·D: two forward passes (one per direction), two backward passes that each
            # recompute the logit tile and multiply it back: six B×B×D GEMMs.
            note = f"{12 * B * B * D / ms / 1e9:.0f} TFLOP/s (12·B²·D)" if impl == "Triton" else ""
            row("losses", name, B, impl, f"{ms:.2f}", f"{peak:.0f}", note)
        except torch.cuda.OutOfMemoryError:
            row("losses", name, B, impl, "-", "-", "OOM")
        finally:
            for t in leaves:
                t.grad = None
            torch.cuda.empty_cache()


@guarded("newton_schulz")
def bench_newton_schulz(m, n):
    G = torch.randn(m, n, device="cuda")
    s = min(m, n)
    flops = 5 * (4 * s * s * max(m, n) + 2 * s**3)  # per step: X·Xᵀ, A·A, (bA + cA²)·X
    for impl, fn in (("bf16 (public op)", kernels.newton_schulz), ("fp32 reference", ref.newton_schulz)):
        ms = _ms(lambda fn=fn: fn(G))
        row("newton_schulz", f"{m}x{n}", impl, f"{ms:.3f}", f"{flops / ms / 1e9:.1f}")
    err = (kernels.newton_schulz(G) - ref.newton_schulz(G)).abs().max().item()
    print(f"newton_schulz {m}x{n}: max |bf16 - fp32| = {err:.2e}", flush=True)


# ----------------------------------------------------------------------------- main


def markdown():
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", ""]
    for name, header in HEADERS.items():
        if name not in TABLES:
            continue
        lines += [f"### {name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r + [""] * (len(header) - len(r))) + " |" for r in TABLES[name]]
        lines.append("")
    return "\n".join(lines)


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    # Few dtype/head-dim combinations: each one compiles every autotune config of three kernels.
    for B, H, N, Dh, dtype, masked in [
        (2, 3, 1000, 64, torch.float32, True),
        (2, 2, 1029, 128, torch.bfloat16, True),
        (2, 3, 777, 64, torch.float16, False),
    ]:
        if not out_of_time("correctness"):
            check_rope(B, H, N, Dh, dtype, masked)
    for name, B, D, dtype, labels in [
        ("clip", 3000, 512, torch.float32, False),
        ("clip", 3000, 512, torch.bfloat16, True),
        ("siglip", 3000, 512, torch.float32, False),
        ("siglip", 1000, 768, torch.bfloat16, False),
    ]:
        if not out_of_time("correctness"):
            check_loss(name, B, D, dtype, labels)
    # The autotuners key on (N, head dim, mask) and (B, D, labels), not on B·H: a check at
    # the benchmark's N (or B) with fewer heads runs the very config that was timed.
    for B, H, N, Dh in [(8, 12, 4096, 64), (2, 16, 16384, 128)]:
        if not out_of_time("attention"):
            bench_attention(B, H, N, Dh)
            check_rope(1, 2, N, Dh, torch.bfloat16, False)
    for B in (4096, 16384, 65536):
        for name in ("clip", "siglip"):
            if not out_of_time("losses"):
                bench_loss(name, B)
                if B == 16384:
                    check_loss(name, B, 512, torch.bfloat16, False)
    for m, n in [(768, 3072), (4096, 4096)]:
        if not out_of_time("newton_schulz"):
            bench_newton_schulz(m, n)
    text = markdown()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "kernels_gpu.md").write_text(text + "\n")
    print(f"\n(total {time.time() - START:.0f} s)\n")
    print(text)


if __name__ == "__main__":
    main()
