"""ViT for radiographs with 2D RoPE: any image size whose sides the patch divides.

There is no learned position table. Each patch carries its integer grid coordinate
``(y, x)`` (row, column of the patch, from 0), and every attention layer rotates q and k
by it (:func:`medseek.kernels.rope_attention`, the head's rotary pairs split between y
and x). A 224×224 and a 512×384 image therefore run through the same weights.

CLS token
---------
The CLS token sits at position ``(0, 0)``, where the rotation is the identity: it is an
unrotated anchor. Patch–patch attention depends only on position offsets, but CLS–patch
attention depends on each patch's offset from the origin, i.e. its absolute place in the
image, so the global embedding knows *where* a finding is (left vs right lung), not only
*what* it is. Permuting patches together with their positions changes nothing; moving
patches without their positions does.

Region embedding (WristMIR's bone regions)
------------------------------------------
:meth:`ViT2D.region_embedding` pools the final patch tokens inside a pixel box,
each patch weighted by the fraction of its area the box covers (a box smaller than a
patch still gets the patch it lies in). One forward pass serves the global embedding and
any number of regions, which is what a second-stage region rerank over many candidates
needs; crop-and-re-encode would cost one pass per region. The patch tokens have attended
to the whole image, so a region embedding carries context, as a radiologist reading a
distal radius does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import Block, init_transformer_, rope_sections

STEMS = ("patch", "conv")
POOLS = ("cls", "mean")


def conv_stem(in_chans: int, channels: int, patch_size: int,
              convs: int = 1) -> tuple[nn.Sequential, int]:
    """``log2(patch_size)`` stages of ``convs`` 3x3 conv + BatchNorm + ReLU layers, the
    first of each stage with stride 2, channels doubling per stage from ``channels``
    (capped at 8x): ``(B, in_chans, H, W)`` → ``(B, C, H/p, W/p)``. Returns the stem and
    its output channels C."""
    layers, c_in, c = [], in_chans, channels
    for i in range(patch_size.bit_length() - 1):
        c = channels * min(2 ** i, 8)
        for j in range(convs):
            layers += [nn.Conv2d(c_in, c, 3, stride=2 if j == 0 else 1, padding=1, bias=False),
                       nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
    return nn.Sequential(*layers), c


@dataclass(frozen=True)
class ViT2DConfig:
    in_chans: int = 1
    patch_size: int = 16
    width: int = 384
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    rope_theta: float = 100.0
    rope_sections: tuple[int, int] | None = None  # (y, x) pairs per head; None = even split
    # "patch": one patch_size x patch_size convolution per token (plain ViT);
    # "conv": a convolutional stem (Xiao et al. 2021, "Early convolutions help
    # transformers see better") of log2(patch_size) stride-2 3x3 conv + BatchNorm + ReLU
    # layers, then a 1x1 projection to width: the same token grid, but local edges and
    # textures are learnt by convolutions, which small-data, few-step training needs
    stem: str = "patch"
    stem_channels: int = 32  # channels after the first stem stage, doubled per stage
    stem_convs: int = 1  # 3x3 conv layers per stem stage (the first of them strides by 2)
    # the global feature: "cls" (the CLS token's output) or "mean" (the mean of the final
    # patch tokens, a CNN's global average pool: every patch contributes directly, where
    # CLS must learn through attention which patches to gather)
    pool: str = "cls"

    def __post_init__(self) -> None:
        for name in ("in_chans", "patch_size", "width", "depth", "heads", "stem_channels",
                     "stem_convs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"stem='conv' needs a power-of-two patch_size >= 2, got {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.rope_sections is not None:
            object.__setattr__(self, "rope_sections", tuple(self.rope_sections))
        rope_sections(self.width // self.heads, 2, self.rope_sections)  # validates


class ViT2D(nn.Module):
    """Image tower: ``(B, C, H, W)`` float32 → CLS feature ``(B, width)`` + patch tokens."""

    def __init__(self, cfg: ViT2DConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.sections = rope_sections(cfg.width // cfg.heads, 2, cfg.rope_sections)
        if cfg.stem == "conv":
            # the stem does the striding; patch_embed is then a 1x1 projection to width
            self.stem, stem_out = conv_stem(cfg.in_chans, cfg.stem_channels, cfg.patch_size,
                                            cfg.stem_convs)
            self.patch_embed = nn.Conv2d(stem_out, cfg.width, kernel_size=1)
        else:
            self.stem = nn.Identity()
            self.patch_embed = nn.Conv2d(
                cfg.in_chans, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size
            )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, self.sections, cfg.rope_theta)
            for _ in range(cfg.depth)
        )
        self.ln_f = nn.LayerNorm(cfg.width, eps=1e-6)
        init_transformer_(self, cfg.depth)
        for m in self.stem.modules():  # ReLU convolutions: He init, not the N(0, 0.02) above
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    @property
    def width(self) -> int:
        return self.cfg.width

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(gh, gw)`` of ``images``; raises if a side is not a patch multiple."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != self.cfg.in_chans:
            raise ValueError(
                f"images must be (B, {self.cfg.in_chans}, H, W), got shape {tuple(images.shape)}"
            )
        if not images.dtype.is_floating_point:
            raise TypeError(f"images must be floating point, got {images.dtype}")
        p = self.cfg.patch_size
        H, W = images.shape[-2:]
        if H % p or W % p or H == 0 or W == 0:
            raise ValueError(
                f"images height and width must be positive multiples of patch_size {p}, "
                f"got {H}x{W}"
            )
        return H // p, W // p

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens ``(B, N, width)`` and their ``(y, x)`` grid positions ``(B, N, 2)`` int32.

        Tokens are in row-major order: token ``n`` is patch ``(n // gw, n % gw)``.
        """
        gh, gw = self.grid_size(images)
        x = self.patch_embed(self.stem(images))  # (B, width, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, N, width)
        pos = self.grid_positions(gh, gw, images.device)  # (N, 2)
        return x, pos.unsqueeze(0).expand(x.shape[0], -1, -1)

    @staticmethod
    def grid_positions(gh: int, gw: int, device=None) -> torch.Tensor:
        """``(gh * gw, 2)`` int32 ``(y, x)`` of a patch grid, row-major (:meth:`embed`'s order).

        The CLS token, which :meth:`encode_tokens` puts first, sits at ``(0, 0)``.
        """
        ys, xs = torch.meshgrid(
            torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij"
        )
        return torch.stack((ys.flatten(), xs.flatten()), dim=-1).to(torch.int32)  # (N, 2)

    def encode_tokens(
        self, x: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the transformer on embedded patches.

        Parameters
        ----------
        x : (B, N, width) patch tokens, any order
        pos : (B, N, 2) int32 ``(y, x)`` grid positions of those tokens

        Returns
        -------
        cls : (B, width) the CLS output after the final LayerNorm
        tokens : (B, N, width) the patch outputs, in the input order
        """
        B = x.shape[0]
        if pos.dtype != torch.int32 or pos.shape != (*x.shape[:2], 2):
            raise ValueError(
                f"pos must be int32 {(*x.shape[:2], 2)}, got {pos.dtype} {tuple(pos.shape)}"
            )
        cls = self.cls_token.expand(B, -1, -1).to(x.dtype)  # (B, 1, width)
        h = torch.cat((cls, x), dim=1)  # (B, 1 + N, width)
        cls_pos = torch.zeros(B, 1, 2, dtype=torch.int32, device=pos.device)  # identity rotation
        p = torch.cat((cls_pos, pos), dim=1)  # (B, 1 + N, 2)
        for block in self.blocks:
            h = block(h, p)
        h = self.ln_f(h)
        return h[:, 0], h[:, 1:]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` (B, C, H, W) → ``(global feature (B, width), patch tokens (B, N,
        width))``; the global feature is the CLS output or the tokens' mean (``cfg.pool``)."""
        x, pos = self.embed(images)
        cls, tokens = self.encode_tokens(x, pos)
        return (tokens.mean(1) if self.cfg.pool == "mean" else cls), tokens

    def region_weights(
        self, boxes: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Pooling weights ``(B, R, N)`` of boxes over a patch grid; each row sums to 1.

        ``boxes`` (B, R, 4) are ``(x0, y0, x1, y1)`` in pixels, pixel ``i`` spanning
        ``[i, i + 1)``; the weight of a patch is the box area inside it, normalised.
        Boxes are clipped to the image; a box with no area inside it raises.
        """
        if not isinstance(boxes, torch.Tensor):
            raise TypeError(f"boxes must be a torch.Tensor, got {type(boxes).__name__}")
        if boxes.dim() != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be (B, R, 4) (x0, y0, x1, y1), got {tuple(boxes.shape)}")
        if not torch.isfinite(boxes).all():
            raise ValueError("boxes must be finite")
        gh, gw = grid
        p = self.cfg.patch_size
        b = boxes.to(torch.float32)
        x0 = b[..., 0].clamp(0, gw * p)
        y0 = b[..., 1].clamp(0, gh * p)
        x1 = b[..., 2].clamp(0, gw * p)
        y1 = b[..., 3].clamp(0, gh * p)
        bad = (x1 <= x0) | (y1 <= y0)  # (B, R)
        if bad.any():
            i, r = (int(t) for t in bad.nonzero()[0])
            raise ValueError(
                f"boxes[{i}, {r}] = {boxes[i, r].tolist()} has no area inside the "
                f"{gw * p}x{gh * p} image (need x0 < x1, y0 < y1, overlapping the image)"
            )
        edges_x = torch.arange(gw, device=b.device, dtype=torch.float32) * p  # (gw,)
        edges_y = torch.arange(gh, device=b.device, dtype=torch.float32) * p  # (gh,)
        # 1D overlaps of the box with each patch column / row, in pixels
        ox = torch.minimum(x1[..., None], edges_x + p) - torch.maximum(x0[..., None], edges_x)
        oy = torch.minimum(y1[..., None], edges_y + p) - torch.maximum(y0[..., None], edges_y)
        ox, oy = ox.clamp_min(0), oy.clamp_min(0)  # (B, R, gw), (B, R, gh)
        w = (oy[..., :, None] * ox[..., None, :]).flatten(-2)  # (B, R, gh * gw)
        return w / w.sum(-1, keepdim=True)

    def pool_regions(
        self, tokens: torch.Tensor, grid: tuple[int, int], boxes: torch.Tensor
    ) -> torch.Tensor:
        """Area-weighted mean of patch ``tokens`` (B, N, width) in each box → (B, R, width)."""
        if boxes.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"boxes must have one row per image ({tokens.shape[0]}), got {boxes.shape[0]}"
            )
        w = self.region_weights(boxes.to(tokens.device), grid).to(tokens.dtype)  # (B, R, N)
        return torch.bmm(w, tokens)  # (B, R, width)

    def region_embedding(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Features ``(B, R, width)`` of pixel boxes ``(B, R, 4)`` ``(x0, y0, x1, y1)``.

        Pre-projection features; :meth:`medseek.models.dual.DualEncoder.encode_regions`
        applies the region head and L2-normalises.
        """
        grid = self.grid_size(images)
        _, tokens = self(images)
        return self.pool_regions(tokens, grid, boxes)
