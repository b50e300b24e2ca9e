"""The region graph of a model with a region head (WristMIR): one image pass, global and
region embeddings.

``image_regions.onnx``: ``images`` (B, C, H, W) float32 and ``boxes`` (B, R, 4) float32
pixel ``(x0, y0, x1, y1)`` in model-input pixels → ``embeddings`` (B, dim), the global
embedding (``visual_head`` on the CLS output, what ``image.onnx`` gives), and
``region_embeddings`` (B, R, dim), the patch tokens pooled over each box by area
(:meth:`ViT2D.region_weights`) through the model's own ``region_head``. B and R are
dynamic; H and W are the model's ``preprocess.image_size``, as for the image graph.

Traced from :meth:`DualEncoder.encode_image_and_regions` as it is. The model raises for a
box with no area inside the image; the graph cannot raise, and would return NaN rows for
such a box (0/0 weights), so the clients check boxes first
(:func:`medseek.encoders.preprocess.check_boxes`). Boxes partly outside the image are
clipped by the graph, as by the model.
"""

from __future__ import annotations

import torch
from torch import nn


class ImageRegionGraph(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, boxes: torch.Tensor):
        # (B, C, H, W), (B, R, 4) -> (B, dim), (B, R, dim)
        return self.model.encode_image_and_regions(images, boxes)


def has_region_graph(model) -> bool:
    """True for an image model with its own region head (config ``region_head: true``)."""
    return model.modality == "image" and getattr(model, "region_head", None) is not None


def random_boxes(batch: int, regions: int, size: tuple[int, int],
                 gen: torch.Generator) -> torch.Tensor:
    """``(batch, regions, 4)`` float32 boxes with some area inside an (H, W) image: x0 from
    a quarter of the width left of the image to 0.9 W, widths from 2 % to 60 % of W (so
    some boxes stick out on the left or the right), likewise in y."""
    h, w = size
    u = torch.rand(batch, regions, 4, generator=gen)
    x0 = (u[..., 0] * 1.15 - 0.25) * w
    y0 = (u[..., 1] * 1.15 - 0.25) * h
    x1 = x0.clamp_min(0) + (0.02 + 0.58 * u[..., 2]) * w
    y1 = y0.clamp_min(0) + (0.02 + 0.58 * u[..., 3]) * h
    return torch.stack((x0, y0, x1, y1), dim=-1)


def edge_boxes(size: tuple[int, int], patch: int) -> torch.Tensor:
    """``(7, 4)`` boxes at the edges of what the pooling must handle: the whole image, one
    larger than the image on every side, one past the bottom-right corner, one strip of
    one pixel along the right edge, one sub-pixel box inside a single patch, one exactly
    on patch boundaries, and one whose corners fall mid-patch across several patches."""
    h, w = (float(v) for v in size)
    p = float(patch)
    return torch.tensor([
        [0.0, 0.0, w, h],
        [-7.5, -3.0, w + 11.0, h + 2.5],
        [w - 3.25, h - 2.5, w + 20.0, h + 20.0],
        [w - 1.0, 0.0, w, h],
        [p + 0.2, p + 0.3, p + 0.7, p + 0.9],
        [p, p, 3 * p, 2 * p],
        [0.5 * p, 1.5 * p, 2.25 * p, 2.75 * p],
    ], dtype=torch.float32)


def region_inputs(model, batch: int, gen: torch.Generator, size: tuple[int, int],
                  regions: int = 3, edges: bool = False):
    """Images ``(batch, C, H, W)`` and boxes ``(batch, R, 4)``: ``regions`` random boxes per
    image, after the :func:`edge_boxes` when ``edges``."""
    c = model.cfg.vision.in_chans
    images = torch.randn(batch, c, *size, generator=gen)
    boxes = random_boxes(batch, regions, size, gen)
    if edges:
        fixed = edge_boxes(size, model.cfg.vision.patch_size)
        boxes = torch.cat((fixed.expand(batch, -1, -1), boxes), dim=1)
    return images, boxes
