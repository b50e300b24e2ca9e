"""ONNX export of the encoders of one :class:`~medseek.models.DualEncoder`, verified.

Graphs written (only those the model's modality has):

=================  ======================================================  ===========================
file               inputs                                                  outputs
=================  ======================================================  ===========================
``image.onnx``     ``images`` (B, C, H, W) float32                         ``embeddings`` (B, dim)
``image_regions``  ``images`` (B, C, H, W) float32, ``boxes`` (B, R, 4)    ``embeddings`` (B, dim),
``.onnx``          float32 pixel (x0, y0, x1, y1) (region-head models)     ``region_embeddings`` (B, R, dim)
``chunks.onnx``    ``tokens`` (B, N, P) float32, ``positions`` (B, N, 3)   ``chunk_embeddings`` (B, dim),
                   int32, ``token_mask`` (B, N) bool                       ``chunk_features`` (B, width)
``pool.onnx``      ``chunk_features`` (B, C, width) float32,               ``embeddings`` (B, dim)
                   ``chunk_mask`` (B, C) bool
``text.onnx``      ``input_ids``, ``attention_mask`` (B, T) int64          ``embeddings`` (B, dim)
=================  ======================================================  ===========================

B is dynamic everywhere; N (tokens per chunk), C (chunks per volume), R (boxes per image)
and T (tokens per text) are dynamic too. H and W are fixed at the model's ``preprocess.image_size`` (the
preprocessing resizes every radiograph to it). Every other axis (channels, P, widths, dim) is
fixed in the graph's inputs and outputs, so the Triton configs written from these shapes
report them. Every embedding is L2-normalised.

A volume embedding is two graphs: the chunk encoder (one row per chunk, so a volume's
chunks batch with other volumes' chunks) and the small attention-pooling graph over a
volume's chunk features. The chunk grouping between them (a ragged, data-dependent
split) happens in the client, in NumPy (:mod:`medseek.encoders.preprocess`).

The exporter is torch's TorchScript tracer (``dynamo=False``: the dynamo exporter needs
``onnxscript``, which is not installed here). On CPU the RoPE attention runs
:func:`medseek.kernels.reference.rope_attention`, which traces into plain ONNX ops; that
is how the chunk graph (positions are an input) exports. The image graph, whose H and W
are fixed, is traced from :class:`FixedSizeImageGraph` instead: the same function with
its RoPE tables and shapes as constants and a last block that computes the CLS row only
(≈1.3× faster in ONNX Runtime on CPU; ``ExportConfig(fixed_size_image=False)`` traces
``encode_image`` as it is). Both are verified against ``encode_image``.
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
import torch.nn.functional as F
from torch import nn

from .region_graph import ImageRegionGraph, has_region_graph, region_inputs

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
    fixed_size_image : trace the image graph from :class:`FixedSizeImageGraph` (constant
        RoPE tables and shapes, CLS-only last block: faster in ONNX Runtime); False traces
        ``encode_image`` as it is. Either way it is verified against ``encode_image``.
    """

    opset: int = OPSET
    min_cosine: float = MIN_COSINE
    check_batches: tuple[int, ...] = (1, 3)
    seed: int = 0
    fixed_size_image: bool = True

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


class FixedSizeImageGraph(nn.Module):
    """What ``image.onnx`` is traced from: :meth:`DualEncoder.encode_image` rewritten for
    one image size, the model's ``preprocess.image_size``. Export only; the image graph is
    verified against ``encode_image`` itself (:class:`ImageGraph`).

    The graph's H and W are fixed, so everything that depends on them only is a constant:

    * the RoPE tables. The patch positions (and the CLS token's ``(0, 0)``) are known, so
      ``cos``/``sin`` of :func:`medseek.kernels.reference.rope_cos_sin` are computed here,
      once, and stored as ``(T, 1, 2, P)`` tables over the ``(B, T, heads, 2, P)`` view of
      q and k (T = 1 + patches, P = head_dim / 2). Rotate-half is then
      ``x * [c, c] + swap(x) * [-s, s]``, swap exchanging the two halves of each head (one
      ``Gather``): the same products and sums as
      :func:`~medseek.kernels.reference.apply_rope`;
    * every shape. Tokens run as one ``(B * T, width)`` matrix, so the linear layers are
      ``Gemm`` with their bias, and every reshape has a constant target with ``-1`` for
      the batch: no ``Shape``/``Gather``/``Cast`` arithmetic at run time;
    * the CLS token and the patch-embedding bias: one constant ``(width, T)`` table added
      after the (bias-free) patch convolution, with a zero column put in front for CLS.

    Two more rewrites, exact up to float rounding:

    * q, k and v are three ``Gemm``s (slices of the fused ``qkv`` weight) instead of one
      ``Gemm`` and a ``Split``; the softmax scale ``head_dim ** -0.5`` is folded into the
      q weight and bias (rotation is linear, so scaling before or after it is the same);
    * with ``pool = "cls"``, the last block computes only what the embedding reads:
      ``encode_image`` keeps the CLS row of the final tokens, so the last block needs keys
      and values of every token but the query, attention output, projection and MLP of
      the CLS row alone. The CLS position is ``(0, 0)``, where the rotation is the
      identity. With ``pool = "mean"`` every token goes through the last block and the
      embedding is the mean of the patch rows after the final LayerNorm.

    Standard ONNX ops only: the file stays parseable by TensorRT. ``cls_only_last=False``
    runs every token through the last block (to measure what the CLS-only block gains).
    """

    def __init__(self, model, image_size: tuple[int, int], cls_only_last: bool = True) -> None:
        super().__init__()
        from medseek.kernels.reference import rope_cos_sin

        v = model.visual
        # the model's own size checks (positive patch multiples), on a shape-only tensor
        self.gh, self.gw = v.grid_size(torch.empty(0, v.cfg.in_chans, *image_size, device="meta"))
        self.n = self.gh * self.gw  # patches
        self.t = self.n + 1  # tokens, CLS first
        self.width = v.cfg.width
        self.visual, self.head = v, model.visual_head
        pe = v.patch_embed
        # token table (width, T): column 0 = CLS token, columns 1.. = the patch bias
        bias = pe.bias if pe.bias is not None else torch.zeros(self.width)
        tok = torch.cat((v.cls_token.reshape(self.width, 1),
                         bias.reshape(self.width, 1).expand(-1, self.n)), dim=1)
        self.register_buffer("tokens", tok.detach().clone())
        # (T, 2) positions: CLS at (0, 0), then the grid (ViT2D.encode_tokens / embed)
        pos = torch.cat((torch.zeros(1, 2, dtype=torch.int32),
                         v.grid_positions(self.gh, self.gw)))[None]  # (1, T, 2)
        tables = {}  # (sections, theta) -> (cos, sin): one pair of constants for all blocks
        for blk in v.blocks:
            key = (tuple(blk.attn.sections), blk.attn.theta)
            if key not in tables:
                cos, sin = rope_cos_sin(pos, *key, torch.float32)  # (1, T, P)
                # (T, 1, 2, P) over the (B, T, heads, 2, P) view: [c, c] and [-s, s]
                tables[key] = (torch.stack((cos[0], cos[0]), 1)[:, None].contiguous(),
                               torch.stack((-sin[0], sin[0]), 1)[:, None].contiguous())
        self.mean_pool = v.cfg.pool == "mean"
        cls_only_last = cls_only_last and not self.mean_pool
        last = len(v.blocks) - 1 if cls_only_last else -1
        self.cls_only_last = cls_only_last
        self.blocks = nn.ModuleList(
            _FixedSizeBlock(blk, *tables[(tuple(blk.attn.sections), blk.attn.theta)],
                            cls_only=(i == last))
            for i, blk in enumerate(v.blocks)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pe = self.visual.patch_embed
        # the conv stem (nn.Identity for a plain patch embedding: no node is traced)
        x = F.conv2d(self.visual.stem(images), pe.weight, None, pe.stride, pe.padding)
        x = x.reshape(-1, self.width, self.n)  # (B, width, N)
        # a zero column in front for the CLS token (x * 0: no Shape op for the batch size)
        x = torch.cat((x[..., :1] * 0, x), dim=-1) + self.tokens  # (B, width, T)
        h = x.transpose(1, 2).reshape(-1, self.width)  # (B * T, width)
        for blk in self.blocks:
            h = blk(h)  # (B * T, width); the last block: (B, width), the CLS rows
        if self.mean_pool:  # ViT2D.forward: the patch rows' mean after the final LayerNorm
            h = self.visual.ln_f(h).reshape(-1, self.t, self.width)[:, 1:].mean(1)  # (B, width)
            return self.head(h)  # (B, dim)
        if not self.cls_only_last:
            h = h.reshape(-1, self.t, self.width)[:, 0]  # (B, width)
        return self.head(self.visual.ln_f(h))  # (B, dim)


class _FixedSizeBlock(nn.Module):
    """One :class:`~medseek.models.blocks.Block` on ``(B * T, width)`` tokens with constant
    RoPE tables ``cos``, ``sin`` ``(T, 1, 2, P)``; ``cls_only``: return the CLS rows
    ``(B, width)`` only."""

    def __init__(self, blk, cos: torch.Tensor, sin: torch.Tensor, cls_only: bool) -> None:
        super().__init__()
        attn = blk.attn
        self.ln_1, self.ln_2, self.mlp, self.proj = blk.ln_1, blk.ln_2, blk.mlp, attn.proj
        self.cls_only = cls_only
        self.heads, self.head_dim = attn.n_head, attn.head_dim
        self.t = cos.shape[0]
        self.width = self.heads * self.head_dim
        self.pairs = self.head_dim // 2
        if cls_only and not (bool((cos[0] == 1).all()) and bool((sin[0] == 0).all())):
            raise ValueError("the CLS token's rotation must be the identity (position (0, 0))")
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.register_buffer("swap", torch.tensor([1, 0]))  # halves of a head
        c, scale = self.width, self.head_dim ** -0.5  # the reference's default scale
        w, b = attn.qkv.weight.detach(), attn.qkv.bias.detach()
        for name, rows, mult in (("q", slice(0, c), scale), ("k", slice(c, 2 * c), 1.0),
                                 ("v", slice(2 * c, 3 * c), 1.0)):
            self.register_buffer(f"{name}_weight", (w[rows] * mult).contiguous())
            self.register_buffer(f"{name}_bias", (b[rows] * mult).contiguous())

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        # x (B * T, width) -> rotated (B, T, heads, 2, P)
        x = x.reshape(-1, self.t, self.heads, 2, self.pairs)
        return x * self.cos + x.index_select(-2, self.swap) * self.sin

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t, nh, dh = self.t, self.heads, self.head_dim
        a = self.ln_1(h)  # (B * T, width)
        k = self._rope(F.linear(a, self.k_weight, self.k_bias))
        k = k.reshape(-1, t, nh, dh).permute(0, 2, 3, 1)  # (B, heads, dh, T)
        v = F.linear(a, self.v_weight, self.v_bias).reshape(-1, t, nh, dh).transpose(1, 2)
        if self.cls_only:
            h = h.reshape(-1, t, self.width)[:, 0]  # (B, width)
            a = a.reshape(-1, t, self.width)[:, 0]
            q = F.linear(a, self.q_weight, self.q_bias).reshape(-1, nh, 1, dh)  # unrotated
        else:
            q = self._rope(F.linear(a, self.q_weight, self.q_bias))
            q = q.reshape(-1, t, nh, dh).transpose(1, 2)  # (B, heads, T, dh)
        y = torch.softmax(q @ k, dim=-1) @ v  # (B, heads, T or 1, dh)
        y = y.transpose(1, 2).reshape(-1, self.width)  # (B * T or B, width)
        h = h + self.proj(y)
        return h + self.mlp(self.ln_2(h))


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


def _image_size(model) -> tuple[int, int]:
    """(H, W) of the image graph: the preprocessing's size (64×64 where it has none)."""
    return tuple(model.cfg.preprocess.image_size or (64, 64))


def _image_inputs(model, batch: int, gen: torch.Generator):
    c = model.cfg.vision.in_chans
    return (torch.randn(batch, c, *_image_size(model), generator=gen),)


def _region_inputs(model, batch: int, gen: torch.Generator, regions: int = 3,
                   edges: bool = False):
    return region_inputs(model, batch, gen, _image_size(model), regions, edges)


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
    "image_regions": (ImageRegionGraph, _region_inputs, ["images", "boxes"],
                      ["embeddings", "region_embeddings"],
                      {"images": {0: "batch"}, "boxes": {0: "batch", 1: "regions"},
                       "embeddings": {0: "batch"},
                       "region_embeddings": {0: "batch", 1: "regions"}}),
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
    """Names of the graphs a model exports: image (and image_regions when the model has a
    region head) or chunks + pool, then text."""
    if model.modality == "volume":
        return ("chunks", "pool", "text")
    return ("image", "image_regions", "text") if has_region_graph(model) else ("image", "text")


def _fresh_inputs(name: str, model, batch: int, gen: torch.Generator):
    make = _GRAPHS[name][1]
    if name == "chunks":
        return make(model, batch, gen, n_side=3)  # another N than the traced one
    if name == "pool":
        return make(model, batch, gen, chunks=5)
    if name == "text":
        return make(model, batch, gen, length=21)
    if name == "image_regions":  # another R than the traced one, and the edge boxes
        return make(model, batch, gen, regions=4, edges=True)
    return make(model, batch, gen)


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each embedding (last axis): one per row of (B, dim), per region of (B, R, dim)."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-30)


def compare_to_torch(path: Path, module: nn.Module, input_sets, in_names: list[str],
                     out_names: list[str], min_cosine: float) -> float:
    """Run the ONNX file ``path`` in ONNX Runtime and ``module`` in torch on each tuple of
    ``input_sets``; return the worst row cosine. Raises :class:`ExportCheckError` when a
    shape differs or a cosine is below ``min_cosine`` (NaN included)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    worst = 1.0
    for inputs in input_sets:
        batch = inputs[0].shape[0]
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
            if not cos >= min_cosine:  # also catches NaN
                raise ExportCheckError(
                    f"{path.name}: output {out_name} cosine to torch is {cos:.6f} < "
                    f"min_cosine {min_cosine} (batch {batch})"
                )
            worst = min(worst, cos)
    return worst


def verify_graph(path: Path, name: str, model, cfg: ExportConfig) -> float:
    """Run ``path`` in ONNX Runtime and the torch module on fresh inputs; return the worst
    cosine. Raises :class:`ExportCheckError` below ``cfg.min_cosine``."""
    wrapper_cls, _, in_names, out_names, _ = _GRAPHS[name]
    module = wrapper_cls(model).eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    input_sets = [_fresh_inputs(name, model, batch, gen) for batch in cfg.check_batches]
    return compare_to_torch(path, module, input_sets, in_names, out_names, cfg.min_cosine)


def trace_onnx(module: nn.Module, args: tuple, path: Path, in_names: list[str],
               out_names: list[str], axes: dict, opset: int) -> None:
    """Trace ``module`` on ``args`` into the ONNX file ``path`` (TorchScript exporter,
    constant folding on); ``axes`` names the dynamic axes of each input and output, every
    other output axis is written as the traced size (:func:`fix_output_dims`)."""
    with warnings.catch_warnings():
        # The models' shape checks are Python conditions the tracer evaluates once;
        # the callers re-run the graph on other shapes, so they are safe to ignore.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # torch announces the deprecation of the TorchScript exporter we must use (no onnxscript)
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message="You are using the legacy TorchScript-based ONNX export")
        # ... and deprecates helpers inside it ("The feature will be removed")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        with torch.inference_mode():
            torch.onnx.export(module, args, str(path), input_names=in_names,
                              output_names=out_names, dynamic_axes=axes,
                              opset_version=opset, dynamo=False, do_constant_folding=True)
            traced = module(*args)
    traced = traced if isinstance(traced, tuple) else (traced,)
    fix_output_dims(path, {n: tuple(t.shape) for n, t in zip(out_names, traced)}, axes)


def export_graph(model, name: str, path: str | Path, cfg: ExportConfig = ExportConfig()) -> float:
    """Trace graph ``name`` of ``model`` into ``path`` and verify it; returns the worst cosine."""
    if name not in _GRAPHS:
        raise ValueError(f"name must be one of {sorted(_GRAPHS)}, got {name!r}")
    if name not in graphs_for(model):
        why = " (its config has region_head: false)" if name == "image_regions" else ""
        raise ValueError(f"this {model.modality} model has no {name!r} graph{why}; it has "
                         f"{graphs_for(model)}")
    wrapper_cls, make, in_names, out_names, axes = _GRAPHS[name]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if name == "image" and cfg.fixed_size_image:
        module = FixedSizeImageGraph(model, _image_size(model)).eval()
    else:
        module = wrapper_cls(model).eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    trace_onnx(module, make(model, 2, gen), path, in_names, out_names, axes, cfg.opset)
    return verify_graph(path, name, model, cfg)


def fix_output_dims(path: Path, shapes: dict[str, tuple[int, ...]],
                    axes: dict[str, dict[int, str]]) -> None:
    """Write the traced size into every output axis not declared dynamic in ``axes``.

    The tracer leaves some fixed output axes symbolic (the embedding width after the L2
    normalisation's ``Div`` comes out as ``Divembeddings_dim_1``), and the Triton config's
    dims are read from these shapes (:mod:`medseek.export.repository`): a fixed width must
    say so. The callers then run other batch sizes and lengths against torch (a shape
    mismatch is an :class:`ExportCheckError`), so a wrongly fixed axis fails the export.
    """
    import onnx

    proto = onnx.load(str(path))
    changed = False
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if axis in axes.get(out.name, {}) or dim.HasField("dim_value"):
                continue
            dim.dim_value = int(shapes[out.name][axis])  # clears the symbolic dim_param
            changed = True
    if changed:
        onnx.save(proto, str(path))


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
