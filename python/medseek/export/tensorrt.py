"""TensorRT engines (``model.plan``) from the exported ONNX files, for GPU hosts.

UNTESTED HERE: no GPU and no ``tensorrt`` package exist on the development machines
(TensorRT's libraries come from outside the package registries). The code follows the
TensorRT 10 Python API (``Builder``, ``OnnxParser``, one optimisation profile per
engine, ``BuilderFlag.FP16``, ``build_serialized_network``); run it inside NVIDIA's
Triton container, then serve with ``tritonserver --model-config-name=tensorrt`` (the
``configs/tensorrt.pbtxt`` of each encoder).

Every dynamic axis gets a profile ``(min, opt, max)``: the batch axis ``(1, opt_batch,
max_batch)``; tokens-per-chunk and text length ``(1, opt, max)`` from
:class:`TensorRTConfig`. The ONNX graphs keep float32 inputs and outputs; FP16 applies to
the layers inside (LayerNorm and softmax are kept in fp32 by TensorRT's precision rules).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class TensorRTUnavailable(RuntimeError):
    """The ``tensorrt`` Python package (and a CUDA GPU) is needed to build engines."""


@dataclass(frozen=True)
class TensorRTConfig:
    """fp16 : allow fp16 kernels; max_batch / opt_batch : batch profile;
    max_tokens / opt_tokens : tokens per volume chunk; max_text / opt_text : text length;
    max_chunks : chunks per volume (pool graph); workspace_gb : builder memory pool"""

    fp16: bool = True
    max_batch: int = 32
    opt_batch: int = 8
    max_tokens: int = 1024
    opt_tokens: int = 256
    max_text: int = 256
    opt_text: int = 64
    max_chunks: int = 64
    workspace_gb: float = 4.0

    def __post_init__(self) -> None:
        for lo, hi in (("opt_batch", "max_batch"), ("opt_tokens", "max_tokens"),
                       ("opt_text", "max_text")):
            if not 1 <= getattr(self, lo) <= getattr(self, hi):
                raise ValueError(f"need 1 <= {lo} <= {hi}, got {getattr(self, lo)}, {getattr(self, hi)}")


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(
            "building TensorRT engines needs the `tensorrt` Python package and a CUDA GPU; "
            "neither is available here. Run `medseek export --tensorrt` inside NVIDIA's "
            "Triton container (nvcr.io/nvidia/tritonserver:<yy.mm>-py3), or serve the ONNX "
            "Runtime models of the same repository on CPU."
        ) from exc
    return trt


def _profile_range(name: str, axis: int, cfg: TensorRTConfig) -> tuple[int, int, int]:
    if axis == 0:
        return 1, cfg.opt_batch, cfg.max_batch
    if name in ("tokens", "positions", "token_mask"):
        return 1, cfg.opt_tokens, cfg.max_tokens
    if name in ("input_ids", "attention_mask"):
        return 1, cfg.opt_text, cfg.max_text
    if name in ("chunk_features", "chunk_mask"):
        return 1, min(8, cfg.max_chunks), cfg.max_chunks
    raise ValueError(f"no profile rule for dynamic axis {axis} of input {name!r}")


def build_engine(onnx_path: str | Path, plan_path: str | Path,
                 cfg: TensorRTConfig = TensorRTConfig()) -> Path:
    """Parse ``onnx_path`` and write a serialized engine to ``plan_path``."""
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gb * 2**30))
    if cfg.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        lo, opt, hi = list(shape), list(shape), list(shape)
        for axis, d in enumerate(shape):
            if d == -1:
                lo[axis], opt[axis], hi[axis] = _profile_range(tensor.name, axis, cfg)
        profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path = Path(plan_path)
    plan_path.write_bytes(bytes(engine))
    return plan_path


def build_engines(repo_dir: str | Path, cfg: TensorRTConfig = TensorRTConfig(),
                  version: int = 1, name_prefix: str = "") -> dict[str, Path]:
    """``model.plan`` next to each encoder's ``model.onnx`` in ``repo_dir`` (those present;
    ``name_prefix``: the export's ``--name-prefix``).

    Raises :class:`TensorRTUnavailable` where ``tensorrt`` cannot be imported.
    """
    _import_tensorrt()
    out = {}
    for model in (f"{name_prefix}{m}" for m in ("image_encoder", "volume_encoder", "text_encoder")):
        onnx_path = Path(repo_dir) / model / str(version) / "model.onnx"
        if onnx_path.is_file():
            out[model] = build_engine(onnx_path, onnx_path.with_name("model.plan"), cfg)
    if not out:
        raise FileNotFoundError(f"no encoder model.onnx under {repo_dir}; run `medseek export` first")
    return out
