"""DualEncoder: an image or volume tower and the MiniLM text tower in one embedding space.

One model serves one imaging modality: radiographs (:class:`ViT2D`, ``modality ==
"image"``) or CT/MR volumes (:class:`ViT3D`, ``modality == "volume"``). Every
``encode_*`` method returns L2-normalised ``embed_dim`` vectors from a
:class:`ProjectionHead`, so any pair of them compares by dot product.

Heads
-----
* ``visual_head``: global image / volume embeddings and, for volumes, chunk embeddings
  (chunks and whole volumes live in one space, so an organ-level sentence can be matched
  against a chunk or a volume; SigVLP's chunk-wise alignment);
* ``region_head`` (when ``region_head`` is set, WristMIR): region embeddings are
  mean-pooled patch tokens, a different distribution from the CLS output, and they are
  trained against region captions, so they get their own projection; otherwise regions
  use ``visual_head``;
* ``text_head``: on the (already unit-norm) mean-pooled MiniLM output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .heads import LOSSES, HeadConfig, LogitScale, ProjectionHead
from .text_tower import MiniLMTextTower, TextTowerConfig
from .vit2d import ViT2D, ViT2DConfig
from .vit3d import ViT3D, ViT3DConfig, VolumeEncoding, group_chunks, organ_embedding


@dataclass(frozen=True)
class PreprocessConfig:
    """What the data pipeline must do before the tower (read by io/data, not the model)."""

    image_size: tuple[int, int] | None = None  # radiographs resized/padded to (H, W) px
    target_spacing: tuple[float, float, float] | None = None  # CT/MR resampled to (sz, sy, sx) mm
    window: tuple[float, float] | None = None  # CT intensity window (center, width) HU
    # a second window averaged with ``window`` into the same channel, e.g. a lung window
    # beside the soft-tissue one: one input that still separates what ``window`` clips
    blend_window: tuple[float, float] | None = None
    regions: tuple[str, ...] = ()  # named regions with boxes, e.g. WristMIR's bones

    def __post_init__(self) -> None:
        for name, n in (("image_size", 2), ("target_spacing", 3)):
            value = getattr(self, name)
            if value is not None:
                value = tuple(value)
                if len(value) != n or any(not v > 0 for v in value):
                    raise ValueError(f"preprocess.{name} must be {n} positive numbers, got {value}")
                object.__setattr__(self, name, value)
        for name in ("window", "blend_window"):
            if getattr(self, name) is not None:
                window = tuple(float(v) for v in getattr(self, name))
                if len(window) != 2 or not window[1] > 0:
                    raise ValueError(f"preprocess.{name} must be (center, width > 0), "
                                     f"got {window}")
                object.__setattr__(self, name, window)
        if self.blend_window is not None and self.window is None:
            raise ValueError("preprocess.blend_window needs preprocess.window")
        object.__setattr__(self, "regions", tuple(self.regions))


@dataclass(frozen=True)
class DualEncoderConfig:
    vision: ViT2DConfig | ViT3DConfig
    text: TextTowerConfig
    embed_dim: int = 256
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: str = "siglip"  # which logit scale / bias initialisation (see heads.LogitScale)
    region_head: bool = False  # separate projection for region embeddings (2D only)
    # a linear classifier of the lexicon's findings (+ "normal") on the unit embedding,
    # shared by both modalities: LGDEA's diagnostic evidence space (see ``finding_logits``)
    finding_head: bool = False
    text_pretrained: bool = False  # factory loads the MiniLM weights into the text tower
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.embed_dim, int) or self.embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {self.embed_dim!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not isinstance(self.vision, (ViT2DConfig, ViT3DConfig)):
            raise TypeError(
                f"vision must be ViT2DConfig or ViT3DConfig, got {type(self.vision).__name__}"
            )
        if self.region_head and isinstance(self.vision, ViT3DConfig):
            raise ValueError("region_head is for image (ViT2D) towers, got a ViT3D vision config")

    @property
    def modality(self) -> str:
        return "image" if isinstance(self.vision, ViT2DConfig) else "volume"


class DualEncoder(nn.Module):
    """Image or volume tower + text tower + projection heads + logit scale."""

    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = ViT2D(cfg.vision) if cfg.modality == "image" else ViT3D(cfg.vision)
        self.text = MiniLMTextTower(cfg.text)
        self.visual_head = ProjectionHead(self.visual.width, cfg.embed_dim, cfg.head)
        self.region_head = (
            ProjectionHead(self.visual.width, cfg.embed_dim, cfg.head) if cfg.region_head else None
        )
        self.text_head = ProjectionHead(self.text.dim, cfg.embed_dim, cfg.head)
        self.logit_scale = LogitScale(cfg.loss)
        self.finding_head = None
        if cfg.finding_head:
            from medseek.text.concepts import concept_names

            # the scale of unit embeddings is fixed, so the head learns its own sharpness
            self.finding_head = nn.Linear(cfg.embed_dim, len(concept_names()))
            nn.init.normal_(self.finding_head.weight, std=cfg.embed_dim**-0.5)
            # most findings are absent from most reports: start every finding at a prior
            # of ~5 % instead of 50 %, or the bias alone spends the first steps getting there
            nn.init.constant_(self.finding_head.bias, -3.0)
            # per-finding logit above which the finding counts as shown by an embedding;
            # fitted on a validation split after training (medseek.train.calibrate), saved
            # with the weights. 0 (probability 0.5) until then.
            self.register_buffer("finding_threshold", torch.zeros(len(concept_names())))

    @property
    def modality(self) -> str:
        return self.cfg.modality

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def _need(self, modality: str, method: str) -> None:
        if self.modality != modality:
            raise TypeError(f"{method} needs a {modality} model, this one encodes {self.modality}s")

    # ---------------------------------------------------------------- radiographs

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, C, H, W) float → (B, embed_dim), unit norm."""
        self._need("image", "encode_image")
        cls, _ = self.visual(images)  # (B, width)
        return self.visual_head(cls)

    def encode_image_and_regions(
        self, images: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: global ``(B, embed_dim)`` and region ``(B, R, embed_dim)`` embeddings.

        ``boxes`` (B, R, 4) are pixel ``(x0, y0, x1, y1)``; see :meth:`ViT2D.region_weights`.
        """
        self._need("image", "encode_image_and_regions")
        grid = self.visual.grid_size(images)
        cls, tokens = self.visual(images)  # (B, width), (B, N, width)
        regions = self.visual.pool_regions(tokens, grid, boxes)  # (B, R, width)
        head = self.region_head if self.region_head is not None else self.visual_head
        return self.visual_head(cls), head(regions)

    def encode_regions(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Region embeddings ``(B, R, embed_dim)``, unit norm, for pixel boxes (B, R, 4)."""
        return self.encode_image_and_regions(images, boxes)[1]

    # ---------------------------------------------------------------- volumes

    def encode_chunks(self, tokens, positions, valid_mask=None, **kw) -> torch.Tensor:
        """Chunk embeddings ``(C, embed_dim)``, unit norm; arguments as
        :meth:`ViT3D.encode_chunks`."""
        self._need("volume", "encode_chunks")
        return self.visual_head(self.visual.encode_chunks(tokens, positions, valid_mask, **kw))

    def encode_volume(self, tokens, positions, valid_mask=None, chunk_counts=None,
                      **kw) -> torch.Tensor:
        """Volume embeddings ``(B, embed_dim)``, unit norm.

        The chunks of B volumes are stored back to back in ``tokens`` (C, N, P),
        ``positions`` (C, N, 3), ``valid_mask`` (C, N); ``chunk_counts`` (B,) says how
        many belong to each volume (None: all chunks are one volume, B = 1).
        """
        self._need("volume", "encode_volume")
        chunks = self.visual.encode_chunks(tokens, positions, valid_mask, **kw)  # (C, width)
        counts = [chunks.shape[0]] if chunk_counts is None else chunk_counts
        grouped, mask = group_chunks(chunks, counts)  # (B, Cmax, width), (B, Cmax)
        return self.visual_head(self.visual.pool_chunks(grouped, mask))

    def encode_volume_array(self, vol: np.ndarray, depth: int | None = None, patch=None,
                            overlap: int | None = None) -> VolumeEncoding:
        """Chunk, patchify and encode one windowed ``(D, H, W)`` float32 volume.

        Returns a :class:`VolumeEncoding` whose ``volume`` (embed_dim,) and ``chunks``
        (C, embed_dim) are projected and unit norm; pass ``chunks``, ``z_start``,
        ``depth`` to :meth:`organ_embedding`.
        """
        self._need("volume", "encode_volume_array")
        enc = self.visual.encode_volume_array(vol, depth, patch, overlap)
        return enc._replace(volume=self.visual_head(enc.volume),
                            chunks=self.visual_head(enc.chunks))

    @staticmethod
    def organ_embedding(chunk_embs, z_start, depth: int, z0: float, z1: float, *,
                        valid=None) -> torch.Tensor:
        """Unit-norm overlap-weighted mean of the chunks over slices ``[z0, z1)``."""
        return organ_embedding(chunk_embs, z_start, depth, z0, z1, valid=valid)

    def finding_logits(self, emb: torch.Tensor) -> torch.Tensor:
        """Per-finding logits ``(..., F)`` of unit embeddings ``(..., embed_dim)`` of either
        modality; axes are :func:`medseek.text.concepts.concept_names`. Trained against
        the findings extracted from each paired report (the ``finding`` loss term), so an
        image and a report that assert the same findings are pulled to the same side of
        every finding's hyperplane, and ``sigmoid`` of them is a per-finding probability."""
        if self.finding_head is None:
            raise TypeError("this model has no finding head (config finding_head: false)")
        return self.finding_head(emb)

    def concept_bank(self):
        """The finding head as a :class:`medseek.search.explain.ConceptBank`: a finding's
        score for an embedding is its logit margin over the calibrated threshold, in
        units of the head's weight norm, so "score > 0" means "the finding head shows it".
        Findings calibration never found a threshold for (``NEVER``) are not in the bank:
        the head cannot tell them either way. None for a model without a finding head, a
        shape-only one, or one with no calibrated finding."""
        if self.finding_head is None or self.finding_head.weight.is_meta:
            return None  # no head, or a shape-only model (no values to explain with)
        from medseek.search.explain import ConceptBank
        from medseek.text.concepts import concept_names
        from medseek.train.calibrate import NEVER

        return ConceptBank.from_linear(concept_names(), self.finding_head.weight.detach().cpu().numpy(),
                                       self.finding_head.bias.detach().cpu().numpy(),
                                       self.finding_threshold.cpu().numpy(), never=NEVER)

    # ---------------------------------------------------------------- text

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask ``(B, T)`` (from ``TextEncoder.tokenize``) → (B, embed_dim)."""
        return self.text_head(self.text(input_ids, attention_mask))
