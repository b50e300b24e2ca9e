#!/usr/bin/env python3
"""Compile every medseek Triton kernel × autotune config for a CUDA target, without a GPU.

Triton's CPU wheel carries the full NVIDIA backend (down to ptxas), so a kernel can be
compiled to a cubin for sm_90 on any machine. This catches what the interpreter cannot:
code-generation errors and configs whose shared memory exceeds the 227 KB an H100 thread
block may use (the autotuner skips those, but if every config of a case fails, the op
fails). Slow: each compile takes seconds.

    python benchmarks/gpu/compile_check.py [rope|losses|all] [--all-configs]
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.pop("TRITON_INTERPRET", None)  # kernels must be real JIT functions
warnings.simplefilter("ignore")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

RA = importlib.import_module("kernels.rope_flash_attention")
CO = importlib.import_module("kernels.contrastive")
TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # bytes of dynamic shared memory per block on sm_90
TL = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}


def _cfg(config):
    return f"{config.kwargs} warps={config.num_warps} stages={config.num_stages}"


def compile_one(fn, signature, constexprs, config):
    constexprs = {**constexprs, **config.kwargs}
    signature = {**signature, **{k: "constexpr" for k in constexprs}}
    t = time.time()
    try:
        k = triton.compile(ASTSource(fn, signature, constexprs), target=TARGET,
                           options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    except Exception as exc:  # report every failing case, not just the first
        return False, f"FAIL {type(exc).__name__}: {str(exc)[:160]}"
    fits = k.metadata.shared <= SMEM_LIMIT
    return fits, f"{'ok ' if fits else 'TOO BIG'} smem={k.metadata.shared // 1024} KB ({time.time() - t:.0f} s)"


def rope_cases(all_configs):
    for dt, head in (("bf16", 64), ("bf16", 128), ("fp16", 32), ("fp32", 128), ("fp32", 64)):
        p = "*" + dt
        common = {"Q": p, "K": p, "V": p, "POS": "*i32", "MASK": "*u8", "FREQ": "*fp32", "AXIS": "*i32"}
        const = dict(A=3, HALF=head // 2, HAS_MASK=True, DOT=TL[dt], PREC="ieee" if dt == "fp32" else "tf32",
                     FAST_TRIG=True)
        configs = RA._CONFIGS_FP32 if dt == "fp32" else RA._CONFIGS_16BIT
        kernels = (
            ("fwd", RA._rope_attn_fwd, {"O": p, "LSE": "*fp32", "H": "i32", "N": "i32", "qk_scale": "fp32"}),
            ("dkdv", RA._rope_attn_bwd_dkdv, {"DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DK": p, "DV": p,
                                              "H": "i32", "N": "i32", "scale": "fp32"}),
            ("dq", RA._rope_attn_bwd_dq, {"DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DQ": p,
                                          "H": "i32", "N": "i32", "scale": "fp32"}),
        )
        for name, fn, extra in kernels:
            for cfg in configs if all_configs else configs[-1:]:
                yield f"rope {name} {dt} Dh={head} {_cfg(cfg)}", fn, {**common, **extra}, const, cfg


def loss_cases(all_configs):
    for dt, block_d, labels in (("bf16", 512, True), ("fp32", 512, False), ("fp32", 1024, False), ("bf16", 1024, False)):
        p = "*" + dt
        prec = "ieee" if dt == "fp32" else "tf32"
        const = dict(HAS_LABELS=labels, BLOCK_L=16, BLOCK_D=block_d, DOT=TL[dt], PREC=prec)
        sig_fwd = {"A": p, "Bm": p, "SCALE": "*fp32", "Y": "*fp32", "NORM": "*fp32", "LSE": "*fp32",
                   "TSUM": "*fp32", "B": "i32", "D": "i32", "L": "i32"}
        sig_bwd = {"A": p, "Bm": p, "SCALE": "*fp32", "GOUT": "*fp32", "Y": "*fp32", "NORM": "*fp32",
                   "LSE_A": "*fp32", "LSE_B": "*fp32", "DA": p, "DS_ROWS": "*fp32", "B": "i32", "D": "i32", "L": "i32"}
        sig_sig = {"A": p, "Bm": p, "SCALE": "*fp32", "BIAS": "*fp32", "GOUT": "*fp32", "LOSS_ROWS": "*fp32",
                   "DA": p, "DS_ROWS": "*fp32", "DB_ROWS": "*fp32", "B": "i32", "D": "i32"}
        sig_const = dict(BACKWARD=True, BLOCK_D=block_d, DOT=TL[dt], PREC=prec)
        configs = CO._configs(4 if dt == "fp32" else 2, block_d)
        for cfg in configs if all_configs else configs[:1]:
            yield f"clip fwd {dt} D<={block_d} {_cfg(cfg)}", CO._clip_fwd_rows, sig_fwd, const, cfg
            yield f"clip bwd {dt} D<={block_d} {_cfg(cfg)}", CO._clip_bwd_rows, sig_bwd, const, cfg
            yield f"siglip bwd {dt} D<={block_d} {_cfg(cfg)}", CO._siglip_rows, sig_sig, sig_const, cfg


def main():
    which = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "all"
    all_configs = "--all-configs" in sys.argv
    cases = []
    if which in ("rope", "all"):
        cases += list(rope_cases(all_configs))
    if which in ("losses", "all"):
        cases += list(loss_cases(all_configs))
    failures = 0
    for label, fn, sig, const, cfg in cases:
        ok, msg = compile_one(fn, sig, const, cfg)
        failures += not ok
        print(f"{label}: {msg}", flush=True)
    print(f"{len(cases) - failures}/{len(cases)} compiled and fit sm_90 shared memory")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
