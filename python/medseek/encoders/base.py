"""The ``Encoder`` interface, the exported model's preprocessing spec, and the errors.

Every encoder returns ``(B, dim)`` float32 rows of unit L2 norm, so image, volume and
text vectors compare by dot product in one space (DESIGN.md, "Encoders").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


class EncoderError(RuntimeError):
    """Base class of the encoder errors."""


class EncoderInputError(EncoderError, ValueError):
    """The input is malformed (shape, dtype, empty list); the backend is fine."""


class EncoderUnavailable(EncoderError, ConnectionError):
    """The encoder backend (Triton server) cannot be reached, after the retries."""


class EncoderTimeout(EncoderError, TimeoutError):
    """The backend did not answer within the deadline."""


@dataclass(frozen=True)
class EncoderSpec:
    """What a client needs to prepare inputs for an exported model (``spec.json``).

    embed_dim : output dimension
    modality : ``"image"`` or ``"volume"``
    image_size : (H, W) radiographs are resized to (image models)
    in_chans : image channels
    patch_size : (pz, py, px) voxels per token (volume models)
    chunk_depth, chunk_overlap : slices per chunk and shared by neighbours (volume models)
    max_length : text token budget, [CLS] and [SEP] included
    name : the model config's name
    region_head : the model has its own region pathway (config ``region_head: true``,
        WristMIR): the ``image_regions`` graph embeds boxes of an image by pooling its
        patch tokens through the region head (:meth:`GraphEncoder.encode_image_regions`)
    target_spacing : (z, y, x) mm volumes were resampled to in training (volume models;
        None in specs written before it was recorded)
    window : (center, width) HU volumes were windowed with in training (volume models)
    blend_window : a second (center, width) averaged with ``window`` in training
        (``PreprocessConfig.blend_window``); None when there was none
    has_text : the model has a text tower (``text`` graph and ``tokenizer.json``); False
        for an image-only model (a DINOv2 checkpoint, :mod:`medseek.export.hf`), whose
        encoders refuse texts
    tokenizer : how texts are padded, when not as MiniLM's (pad id 0 "[PAD]", batches
        padded to their longest text): ``{"pad_id": int, "pad_token": str,
        "to_max_length": bool}`` (SigLIP pools the last position, so it pads every text to
        ``max_length``)
    """

    embed_dim: int
    modality: str
    max_length: int
    image_size: tuple[int, int] | None = None
    in_chans: int = 1
    patch_size: tuple[int, int, int] | None = None
    chunk_depth: int | None = None
    chunk_overlap: int = 0
    name: str = ""
    # the model's calibrated finding concepts (DualEncoder.concept_bank), for explanations:
    # {"names": [C], "directions": [C x embed_dim], "baseline": [C]}; None without a head
    concepts: dict | None = None
    region_head: bool = False
    target_spacing: tuple[float, float, float] | None = None
    window: tuple[float, float] | None = None
    has_text: bool = True
    tokenizer: dict | None = None
    blend_window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.modality not in ("image", "volume"):
            raise ValueError(f"modality must be 'image' or 'volume', got {self.modality!r}")
        if not isinstance(self.embed_dim, int) or self.embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {self.embed_dim!r}")
        if self.image_size is not None:
            object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        if self.patch_size is not None:
            object.__setattr__(self, "patch_size", tuple(int(v) for v in self.patch_size))
        for name, n in (("target_spacing", 3), ("window", 2), ("blend_window", 2)):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) != n or not all(v > 0 for v in value[-1 if n == 2 else 0:]):
                    raise ValueError(f"{name} must be {n} numbers (positive spacings / width), "
                                     f"got {getattr(self, name)!r}")
                object.__setattr__(self, name, value)
        if self.modality == "volume" and (self.patch_size is None or self.chunk_depth is None):
            raise ValueError("a volume spec needs patch_size and chunk_depth")
        if not isinstance(self.region_head, bool):
            raise TypeError(f"region_head must be a bool, got {self.region_head!r}")
        if self.region_head and self.modality != "image":
            raise ValueError(f"region_head is for image models, got a {self.modality} spec")
        if not isinstance(self.has_text, bool):
            raise TypeError(f"has_text must be a bool, got {self.has_text!r}")
        if self.has_text and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 for a model with a text tower, "
                             f"got {self.max_length!r}")

    @classmethod
    def from_model(cls, model) -> "EncoderSpec":
        """Spec of a :class:`medseek.models.DualEncoder`."""
        cfg = model.cfg
        v = cfg.vision
        bank = model.concept_bank()
        concepts = None if bank is None else {
            "names": list(bank.names), "directions": bank.embeddings.tolist(),
            "baseline": bank.baseline.tolist()}
        common = dict(embed_dim=cfg.embed_dim, modality=model.modality,
                      max_length=cfg.text.max_length, name=cfg.name, concepts=concepts)
        if model.modality == "image":
            size = cfg.preprocess.image_size or (64, 64)
            return cls(**common, image_size=size, in_chans=v.in_chans,
                       region_head=model.region_head is not None)
        pre = cfg.preprocess
        return cls(**common, patch_size=v.patch_size, chunk_depth=v.chunk_depth,
                   chunk_overlap=v.chunk_overlap, target_spacing=pre.target_spacing,
                   window=pre.window, blend_window=pre.blend_window)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "EncoderSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def from_config_name(cls, name_or_path) -> "EncoderSpec":
        """Spec of a shipped model config (``"cxr-tiny"``) or JSON path, without weights."""
        from medseek.models.factory import create_model

        return cls.from_model(create_model(name_or_path, device="meta"))

    @classmethod
    def load(cls, path: str | Path) -> "EncoderSpec":
        """Read a ``spec.json`` written by :func:`medseek.export.export_onnx`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"spec file not found: {path}")
        return cls.from_dict(json.loads(path.read_text()))


@dataclass(frozen=True)
class VolumeChunks:
    """One volume's embedding together with the embeddings of its z-chunks.

    volume : (dim,) float32, unit norm: what ``encode_volumes`` returns for the volume
    chunks : (C, dim) float32, unit rows: each chunk through the visual head alone
    z_range : (C, 2) int64, real slices ``[z0, z1)`` of each chunk (``z1`` exclusive),
        counted along z of the encoder's input volume (a padded last chunk ends at its
        depth)
    """

    volume: np.ndarray
    chunks: np.ndarray
    z_range: np.ndarray

    def __post_init__(self) -> None:
        c = self.chunks.shape[0]
        if self.chunks.ndim != 2 or self.volume.shape != self.chunks.shape[1:]:
            raise ValueError(f"chunks must be (C, d) beside a (d,) volume, got chunks "
                             f"{self.chunks.shape} and volume {self.volume.shape}")
        if self.z_range.shape != (c, 2):
            raise ValueError(f"z_range must be ({c}, 2), got {self.z_range.shape}")


@runtime_checkable
class Encoder(Protocol):
    """Images, volumes and texts → ``(B, dim)`` float32, L2-normalised rows.

    Optional beyond the protocol: ``encode_volume_chunks(volumes) -> list[VolumeChunks]``
    (the volume embeddings with their chunk embeddings, one pass); :class:`GraphEncoder`
    backends (ONNX Runtime, Triton) and ``medseek.serve.local_encoder.LocalTorchEncoder``
    have it. ``region_pathway`` (bool) and ``encode_image_regions(images, boxes) ->
    (global (B, dim), regions (B, R, dim))``: the model's trained region pathway, which
    the :class:`GraphEncoder` backends run when the spec says ``region_head``.
    """

    @property
    def dim(self) -> int: ...

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """``images`` (B, 1, H, W) float32 at the model's image size → (B, dim)."""
        ...

    def encode_volumes(self, volumes: Sequence[np.ndarray]) -> np.ndarray:
        """Windowed ``(D, H, W)`` float32 volumes (H, W multiples of the patch) → (B, dim)."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Non-empty list of strings → (B, dim)."""
        ...


def spec_concept_bank(spec: EncoderSpec):
    """:class:`~medseek.search.explain.ConceptBank` of ``spec.concepts`` (or None)."""
    if spec.concepts is None:
        return None
    from medseek.search.explain import ConceptBank

    c = spec.concepts
    return ConceptBank(tuple(c["names"]), np.asarray(c["directions"], dtype=np.float32),
                       np.asarray(c["baseline"], dtype=np.float64))


class GraphEncoder:
    """The encode_* logic both backends share, on top of one primitive, ``run_graph``.

    Subclasses set ``spec`` and ``batch_size`` and implement
    ``run_graph(graph, inputs, outputs) -> list[np.ndarray]`` for the graphs ``image``,
    ``image_regions`` (region-head models), ``chunks``, ``pool`` and ``text`` of
    :mod:`medseek.export.onnx`.
    """

    spec: EncoderSpec
    batch_size: int

    @property
    def dim(self) -> int:
        return self.spec.embed_dim

    def concept_bank(self):
        """The served model's calibrated finding concepts (None when it has none)."""
        return spec_concept_bank(self.spec)

    @property
    def encodes_text(self) -> bool:
        """False for an image-only model: :meth:`encode_texts` raises, and the service
        refuses text bound for this encoder instead of calling it."""
        return self.spec.has_text

    def run_graph(self, graph: str, inputs: dict, outputs: list[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def _batched(self, graph: str, inputs: dict, outputs: list[str]) -> list[np.ndarray]:
        """Run ``graph`` over the batch axis in slices of ``batch_size``; concatenate."""
        from .preprocess import batches

        n = next(iter(inputs.values())).shape[0]
        parts = [self.run_graph(graph, {k: v[s] for k, v in inputs.items()}, outputs)
                 for s in batches(n, self.batch_size)]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(outputs))]

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        from .preprocess import check_images

        images = check_images(images, self.spec)
        return self._batched("image", {"images": images}, ["embeddings"])[0]

    @property
    def region_pathway(self) -> bool:
        """True when :meth:`encode_image_regions` runs the model's trained region pathway."""
        return self.spec.modality == "image" and self.spec.region_head

    def encode_image_regions(self, images: np.ndarray,
                             boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global and region embeddings of one pass through the ``image_regions`` graph.

        Parameters
        ----------
        images : (B, 1, H, W) float32 at the model's image size
        boxes : (B, R, 4) float32 pixel ``(x0, y0, x1, y1)`` in model-input pixels (pixel
            ``i`` spans ``[i, i + 1)``); each box needs some area inside the image, the
            part outside is ignored

        Returns
        -------
        (B, dim) float32 global embeddings (as :meth:`encode_images`) and (B, R, dim)
        float32 region embeddings, unit rows
        """
        from .preprocess import check_image_regions

        images, boxes = check_image_regions(images, boxes, self.spec)
        glob, regions = self._batched("image_regions", {"images": images, "boxes": boxes},
                                      ["embeddings", "region_embeddings"])
        return glob, regions

    def encode_chunks(self, volume: np.ndarray) -> np.ndarray:
        """Chunk embeddings ``(C, dim)`` of one windowed ``(D, H, W)`` float32 volume."""
        from .preprocess import volume_tokens

        vt = volume_tokens(volume, self.spec)
        return self._batched("chunks", {"tokens": vt.tokens, "positions": vt.positions,
                                        "token_mask": vt.token_mask}, ["chunk_embeddings"])[0]

    def encode_volumes(self, volumes) -> np.ndarray:
        """Volume embeddings ``(B, dim)`` of windowed ``(D, H, W)`` float32 volumes.

        The chunks of all volumes with the same tokens per chunk (same H, W) run together
        through the chunk graph; the pool graph then pools each volume's chunk features.
        """
        toks, parts = self._chunk_outputs(volumes, ["chunk_features"])
        return self._pool_chunks(toks, [p[0] for p in parts])

    def encode_volume_chunks(self, volumes) -> list[VolumeChunks]:
        """As :meth:`encode_volumes`, with each volume's chunk embeddings and z-ranges.

        One pass through the chunk graph gives both of its outputs: the chunk embeddings
        (visual head on each chunk) and the features the pool graph turns into the volume
        embedding, so the volume vectors equal those of :meth:`encode_volumes`.
        """
        from .preprocess import chunk_z_ranges

        toks, parts = self._chunk_outputs(volumes, ["chunk_features", "chunk_embeddings"])
        pooled = self._pool_chunks(toks, [p[0] for p in parts])
        return [VolumeChunks(pooled[i], np.ascontiguousarray(p[1], dtype=np.float32),
                             chunk_z_ranges(vt.z_start, vt.valid))
                for i, (vt, p) in enumerate(zip(toks, parts))]

    def _chunk_outputs(self, volumes, outputs: list[str]):
        """Tokens of each volume and, per volume, the chunk graph's ``outputs`` for its chunks."""
        from .preprocess import volume_tokens

        if isinstance(volumes, np.ndarray) or not isinstance(volumes, Sequence):
            raise EncoderInputError(
                f"volumes must be a list of (D, H, W) arrays, got {type(volumes).__name__}")
        if not volumes:
            raise EncoderInputError("volumes must hold at least one volume, got an empty list")
        toks = [volume_tokens(v, self.spec) for v in volumes]
        parts: list[list[np.ndarray] | None] = [None] * len(toks)
        by_shape: dict[tuple, list[int]] = {}
        for i, vt in enumerate(toks):
            by_shape.setdefault(vt.tokens.shape[1:], []).append(i)
        for idx in by_shape.values():
            cat = {"tokens": np.concatenate([toks[i].tokens for i in idx]),
                   "positions": np.concatenate([toks[i].positions for i in idx]),
                   "token_mask": np.concatenate([toks[i].token_mask for i in idx])}
            out = self._batched("chunks", cat, outputs)
            start = 0
            for i in idx:
                parts[i] = [o[start:start + toks[i].n_chunks] for o in out]
                start += toks[i].n_chunks
        return toks, parts

    def _pool_chunks(self, toks, feats: list[np.ndarray]) -> np.ndarray:
        from .preprocess import group_chunks

        grouped, mask = group_chunks(np.concatenate(feats), [vt.n_chunks for vt in toks])
        return self._batched("pool", {"chunk_features": grouped, "chunk_mask": mask},
                             ["embeddings"])[0]
