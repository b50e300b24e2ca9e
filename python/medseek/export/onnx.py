"""ONNX export of the encoders of one :class:`~medseek.models.DualEncoder`, verified.

Graphs written (only those the model's modality has):

=================  ======================================================  ===========================
file               inputs                                                  outputs
=================  ======================================================  ===========================
``image.onnx``     ``images`` (B, C, H, W) float32                         ``embeddings`` (B, dim)
``chunks.onnx``    ``tokens`` (B, N, P) float32, ``positions`` (B, N, 3)   ``chunk_embeddings`` (B, dim),
                   int32, ``token_mask`` (B, N) bool                       ``chunk_features`` (B, width)
``pool.onnx``      ``chunk_features`` (B, C, width) float32,               ``embeddings`` (B, dim)
                   ``chunk_mask`` (B, C) bool
``text.onnx``      ``input_ids``, ``attention_mask`` (B, T) int64          ``embeddings`` (B, dim)
=================  ======================================================  ===========================

B is dynamic everywhere; N (tokens per chunk), C (chunks per volume) and T (tokens per
text) are dynamic too. H and W are fixed at the model's ``preprocess.image_size`` (the
preprocessing resizes every radiograph to it). Every embedding is L2-normalised.

A volume embedding is two graphs: the chunk encoder (one row per chunk, so a volume's
chunks batch with other volumes' chunks) and the small attention-pooling graph over a
volume's chunk features. The chunk grouping between them (a ragged, data-dependent
split) happens in the client, in NumPy (:mod:`medseek.encoders.preprocess`).

The exporter is torch's TorchScript tracer (``dynamo=False``: the dynamo exporter needs
``onnxscript``, which is not installed here). On CPU the RoPE attention runs
:func:`medseek.kernels.reference.rope_attention`, which traces into plain ONNX ops.
Argument checks inside the models are Python conditions on shapes; the tracer evaluates
them once (``TracerWarning``s, silenced narrowly below). That is why every export is
checked against torch on fresh inputs of *other* batch sizes and lengths than the
tracing inputs: a shape baked in by mistake fails the check, and the export with it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 17
MIN_COSINE = 0.9999


class ExportCheckError(RuntimeError):
    """An exported graph disagrees with torch (cosine below the threshold)."""


@dataclass(frozen=True)
class ExportConfig:
    """Options of :func:`export_onnx`.

    opset : ONNX opset (>= 17: LayerNormalization is a single op)
    min_cosine : the smallest cosine allowed between ONNX Runtime and torch outputs
    check_batches : batch sizes of the fresh verification inputs
    seed : seed of the tracing and verification inputs
    """

    opset: int = OPSET
    min_cosine: float = MIN_COSINE
    check_batches: tuple[int, ...] = (1, 3)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.opset, int) or self.opset < 17:
            raise ValueError(f"opset must be an int >= 17, got {self.opset!r}")
        if not 0.0 < self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in (0, 1], got {self.min_cosine!r}")
        batches = tuple(int(b) for b in self.check_batches)
        if not batches or any(b < 1 for b in batches):
            raise ValueError(f"check_batches must be positive ints, got {self.check_batches!r}")
        object.__setattr__(self, "check_batches", batches)


# ----------------------------------------------------------------------------- wrappers
# DualEncoder has no forward(); each graph gets a small module whose forward is its one job.


class ImageGraph(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)  # (B, dim)


class ChunkGraph(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, token_mask):
        feats = self.model.visual.encode_chunks(tokens, positions, token_mask)  # (B, width)
        return self.model.visual_head(feats), feats


class PoolGraph(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, chunk_features, chunk_mask):
        # (B, C, width), (B, C) -> (B, dim)
        return self.model.visual_head(self.model.visual.pool_chunks(chunk_features, chunk_mask))


class TextGraph(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.encode_text(input_ids, attention_mask)  # (B, dim)


# ----------------------------------------------------------------------------- inputs


def _image_inputs(model, batch: int, gen: torch.Generator):
    size = model.cfg.preprocess.image_size or (64, 64)
    c = model.cfg.vision.in_chans
    return (torch.randn(batch, c, *size, generator=gen),)


def _chunk_inputs(model, batch: int, gen: torch.Generator, n_side: int = 2):
    v = model.cfg.vision
    pz = v.patch_size[0]
    nz = v.chunk_depth // pz
    n = nz * n_side * n_side
    tokens = torch.rand(batch, n, v.patch_dim, generator=gen)
    z, y, x = torch.meshgrid(torch.arange(nz), torch.arange(n_side), torch.arange(n_side),
                             indexing="ij")
    grid = torch.stack((z.flatten(), y.flatten(), x.flatten()), dim=-1)  # (N, 3)
    offset = torch.randint(0, 8, (batch, 1, 1), generator=gen) * nz  # chunk's absolute z
    positions = (grid[None] + offset * torch.tensor([1, 0, 0])).to(torch.int32)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[-1, n // 2:] = False  # a padded last chunk
    return tokens, positions, mask


def _pool_inputs(model, batch: int, gen: torch.Generator, chunks: int = 3):
    feats = torch.randn(batch, chunks, model.visual.width, generator=gen)
    mask = torch.ones(batch, chunks, dtype=torch.bool)
    mask[0, 1:] = False  # a one-chunk volume padded to C
    return feats, mask


def _text_inputs(model, batch: int, gen: torch.Generator, length: int = 12):
    ids = torch.randint(1000, model.cfg.text.vocab_size, (batch, length), generator=gen)
    ids[:, 0] = 101  # [CLS]
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # padding in one row
    ids[0, length // 2:] = 0
    return ids, mask


# name -> (wrapper, input maker, input names, output names, dynamic axes per tensor)
_GRAPHS = {
    "image": (ImageGraph, _image_inputs, ["images"], ["embeddings"],
              {"images": {0: "batch"}, "embeddings": {0: "batch"}}),
    "chunks": (ChunkGraph, _chunk_inputs, ["tokens", "positions", "token_mask"],
               ["chunk_embeddings", "chunk_features"],
               {"tokens": {0: "batch", 1: "tokens"}, "positions": {0: "batch", 1: "tokens"},
                "token_mask": {0: "batch", 1: "tokens"}, "chunk_embeddings": {0: "batch"},
                "chunk_features": {0: "batch"}}),
    "pool": (PoolGraph, _pool_inputs, ["chunk_features", "chunk_mask"], ["embeddings"],
             {"chunk_features": {0: "batch", 1: "chunks"}, "chunk_mask": {0: "batch", 1: "chunks"},
              "embeddings": {0: "batch"}}),
    "text": (TextGraph, _text_inputs, ["input_ids", "attention_mask"], ["embeddings"],
             {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
              "embeddings": {0: "batch"}}),
}


def graphs_for(model) -> tuple[str, ...]:
    """Names of the graphs a model exports: image or chunks + pool, then text."""
    return ("image", "text") if model.modality == "image" else ("chunks", "pool", "text")


def _fresh_inputs(name: str, model, batch: int, gen: torch.Generator):
    make = _GRAPHS[name][1]
    if name == "chunks":
        return make(model, batch, gen, n_side=3)  # another N than the traced one
    if name == "pool":
        return make(model, batch, gen, chunks=5)
    if name == "text":
        return make(model, batch, gen, length=21)
    return make(model, batch, gen)


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-30)


def verify_graph(path: Path, name: str, model, cfg: ExportConfig) -> float:
    """Run ``path`` in ONNX Runtime and the torch module on fresh inputs; return the worst
    cosine. Raises :class:`ExportCheckError` below ``cfg.min_cosine``."""
    import onnxruntime as ort

    wrapper_cls, _, in_names, out_names, _ = _GRAPHS[name]
    module = wrapper_cls(model).eval()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    worst = 1.0
    for batch in cfg.check_batches:
        inputs = _fresh_inputs(name, model, batch, gen)
        with torch.inference_mode():
            ref = module(*inputs)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = sess.run(out_names, {n: t.numpy() for n, t in zip(in_names, inputs)})
        for out_name, r, g in zip(out_names, ref, got):
            if tuple(g.shape) != tuple(r.shape):
                raise ExportCheckError(
                    f"{path.name}: output {out_name} has shape {g.shape} in ONNX Runtime, "
                    f"{tuple(r.shape)} in torch (batch {batch})"
                )
            cos = float(_row_cosines(g, r.numpy()).min())
            if not cos >= cfg.min_cosine:  # also catches NaN
                raise ExportCheckError(
                    f"{path.name}: output {out_name} cosine to torch is {cos:.6f} < "
                    f"min_cosine {cfg.min_cosine} (batch {batch})"
                )
            worst = min(worst, cos)
    return worst


def export_graph(model, name: str, path: str | Path, cfg: ExportConfig = ExportConfig()) -> float:
    """Trace graph ``name`` of ``model`` into ``path`` and verify it; returns the worst cosine."""
    if name not in _GRAPHS:
        raise ValueError(f"name must be one of {sorted(_GRAPHS)}, got {name!r}")
    if name not in graphs_for(model):
        raise ValueError(f"a {model.modality} model has no {name!r} graph; it has {graphs_for(model)}")
    wrapper_cls, make, in_names, out_names, axes = _GRAPHS[name]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = wrapper_cls(model).eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    args = make(model, 2, gen)
    with warnings.catch_warnings():
        # The models' shape checks are Python conditions the tracer evaluates once;
        # verify_graph below re-runs the graph on other shapes, so they are safe to ignore.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # torch announces the deprecation of the TorchScript exporter we must use (no onnxscript)
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message="You are using the legacy TorchScript-based ONNX export")
        # ... and deprecates helpers inside it ("The feature will be removed")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        with torch.inference_mode():
            torch.onnx.export(module, args, str(path), input_names=in_names,
                              output_names=out_names, dynamic_axes=axes,
                              opset_version=cfg.opset, dynamo=False, do_constant_folding=True)
    return verify_graph(path, name, model, cfg)


def export_onnx(model, out_dir: str | Path, cfg: ExportConfig = ExportConfig()) -> dict[str, Path]:
    """Export every graph of ``model`` into ``out_dir`` (``<name>.onnx``) and verify each.

    Also writes ``spec.json``: what the preprocessing needs (see
    :class:`medseek.encoders.EncoderSpec`) and the worst cosine of each graph.

    Returns
    -------
    dict graph name -> path of its ``.onnx`` file (plus ``"spec"`` -> ``spec.json``)
    """
    from medseek.encoders.base import EncoderSpec

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        paths, cosines = {}, {}
        for name in graphs_for(model):
            paths[name] = out / f"{name}.onnx"
            cosines[name] = export_graph(model, name, paths[name], cfg)
    finally:
        model.train(was_training)
    spec = EncoderSpec.from_model(model)
    (out / "spec.json").write_text(json.dumps(
        {**spec.to_dict(), "opset": cfg.opset, "min_cosine_to_torch": cosines}, indent=2))
    paths["spec"] = out / "spec.json"
    return paths
