"""Launch helpers shared by the Triton ops: dot dtypes, block sizes, autotuning.

On CUDA each kernel is autotuned over a small, hand-picked set of configs (a config that
does not fit shared memory or registers is skipped by the autotuner). On CPU tensors a
kernel can only run in Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernel
module is imported); there it runs with fixed small blocks, since timing means nothing.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_dtype(dtype: torch.dtype, device: torch.device):
    """Operand dtype for ``tl.dot``: the input dtype, except bfloat16 in the interpreter.

    Triton 3.9's interpreter stores bfloat16 as uint16 and ``tl.dot`` then multiplies the
    raw bit patterns (numpy has no bfloat16), so on CPU bf16 operands are widened to
    float32. Loads, stores and casts of bf16 are exact in the interpreter.
    """
    if dtype == torch.bfloat16 and device.type == "cpu":
        return tl.float32
    return _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """float32 operands use full-precision ("ieee") dots, matching torch's default of no
    TF32 for matmuls; 16-bit operands use tensor cores either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_runnable(t: torch.Tensor, interpreted: bool, name: str) -> None:
    """A Triton kernel runs on CUDA tensors, or on CPU tensors under the interpreter."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreted:
        return
    raise RuntimeError(
        f"{name} runs on CUDA tensors, or on CPU tensors only when TRITON_INTERPRET=1 was set "
        f"before medseek.kernels was imported; got a tensor on {t.device}"
    )


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a @triton.jit function) was decorated in interpreter mode."""
    return type(kernel).__name__ == "InterpretedFunction"


@functools.cache
def autotuned(kernel, configs: tuple, key: tuple):
    """``kernel`` wrapped in ``triton.autotune`` (built lazily, on first CUDA use)."""
    return triton.autotune(configs=list(configs), key=list(key))(kernel)


def launch(kernel, grid, args, *, configs, key, interpret_meta, fixed_meta):
    """Run ``kernel`` with autotuned blocks on CUDA or ``interpret_meta`` in the interpreter.

    ``grid`` is a function of the meta-parameters; ``fixed_meta`` are constexprs that do
    not depend on the config (head dim, flags, dtypes).
    """
    if is_interpreted(kernel):
        meta = {**interpret_meta, **fixed_meta}
        kernel[grid(meta)](*args, **meta)
    else:
        autotuned(kernel, configs, key)[grid](*args, **fixed_meta)
