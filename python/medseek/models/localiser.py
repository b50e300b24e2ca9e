"""Named-region localiser: WristMIR's first stage, boxes found without a client drawing them.

WristMIR crops the distal radius, distal ulna and ulnar styloid from every wrist film
before its region encoders see them; medseek's region rerank needs the same boxes, and
until now only a client could give them. :class:`BoxLocaliser` is a small plain-torch CNN
that regresses one box per named region from the whole image:

    image (B, 1, S, S) in [0, 1] ─► stride-4 stem ─► 3 stride-2 conv blocks ─► (B, C, S/32, S/32)
        ─► flatten ─► MLP ─► (B, R, 4) raw ─► x0 = σ(r0), x1 = x0 + (1 − x0)·σ(r2) (y alike)
        ─► boxes (B, R, 4) ``[x0, y0, x1, y1]``, normalised to [0, 1] of width / height

Flattening (not pooling) keeps where things are, which is the whole task. It is trained
with L1 + generalised-IoU on the normalised corners (:func:`localiser_loss`;
``medseek.train.localiser`` is the driver, ``medseek train --localiser wrist`` the recipe).

Shipped weights live in ``weights/localiser/<name>.safetensors`` (float16) with a JSON
card beside them (``weights/localiser/<name>.json``: the config, corpus spec and seed,
steps, test IoU with CIs, the file's SHA-256); they are kept out of ``weights/*.json``,
which lists the dual-encoder releases (:func:`medseek.models.release.list_releases`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

LOCALISER_DIR = Path(__file__).parent / "weights" / "localiser"
CARD_FORMAT = "medseek-localiser-1"
#: the named regions of each localiser, in output order
REGION_SETS = {
    "wrist": ("distal radius", "distal ulna", "ulnar styloid"),
    "chest": ("right upper zone", "right mid zone", "right lower zone", "left upper zone",
              "left mid zone", "left lower zone", "right costophrenic angle",
              "left costophrenic angle", "cardiac silhouette"),
}
#: DICOM-style body parts (upper case) each localiser covers
BODY_PARTS = {"wrist": ("WRIST", "HAND"), "chest": ("CHEST",)}
#: views each localiser was trained on (None: any); the chest one knows frontal films only
VIEWS = {"wrist": None, "chest": ("PA", "AP")}


@dataclass(frozen=True)
class LocaliserConfig:
    """Architecture of a :class:`BoxLocaliser`: a 4x4 stride-4 stem of ``stem`` channels,
    then one stride-2 block per ``channels`` entry; ``image_size`` is the square input
    side, a multiple of ``4 * 2 ** len(channels)``."""

    name: str
    regions: tuple[str, ...]
    image_size: int = 128
    stem: int = 24
    channels: tuple[int, ...] = (32, 64, 96)
    hidden: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", tuple(self.regions))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if not self.regions or len(set(self.regions)) != len(self.regions):
            raise ValueError(f"regions must be distinct names, got {self.regions!r}")
        side = 4 * 2 ** len(self.channels)
        if self.image_size < side or self.image_size % side:
            raise ValueError(f"image_size must be a multiple of {side} (one halving per "
                             f"block of {self.channels} after the stride-4 stem), got {self.image_size}")

    @classmethod
    def for_set(cls, name: str, **overrides) -> "LocaliserConfig":
        """The config of one of :data:`REGION_SETS` (``"wrist"``, ``"chest"``)."""
        if name not in REGION_SETS:
            raise ValueError(f"localiser must be one of {sorted(REGION_SETS)}, got {name!r}")
        return cls(name=name, regions=REGION_SETS[name], **overrides)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """Halve the resolution, then one more 3x3 conv at the new width."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True))


class BoxLocaliser(nn.Module):
    """One box per named region: ``forward(x (B, 1, S, S)) -> (B, R, 4)`` normalised
    ``[x0, y0, x1, y1]`` with ``0 <= x0 <= x1 <= 1`` (likewise y)."""

    def __init__(self, cfg: LocaliserConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = (cfg.stem, *cfg.channels)
        # a patchifying stem: the full-resolution convolutions were most of the CPU time
        stem = nn.Sequential(nn.Conv2d(1, cfg.stem, 4, stride=4, bias=False),
                             nn.BatchNorm2d(cfg.stem), nn.ReLU(inplace=True))
        self.features = nn.Sequential(stem, *(_block(a, b) for a, b in zip(widths, widths[1:])))
        cells = (cfg.image_size // (4 * 2 ** len(cfg.channels))) ** 2
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1),
                                  nn.Linear(cfg.channels[-1] * cells, cfg.hidden),
                                  nn.ReLU(inplace=True), nn.Linear(cfg.hidden, len(cfg.regions) * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.cfg.image_size
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) != (s, s):
            raise ValueError(f"x must be (B, 1, {s}, {s}), got {tuple(x.shape)}")
        raw = self.head(self.features(x)).view(len(x), len(self.cfg.regions), 4)
        # ordered and inside [0, 1] by construction, with a gradient everywhere (clamping
        # centre +- size / 2 left a box edge stuck at the border once it got there)
        lo = torch.sigmoid(raw[..., :2])  # (x0, y0)
        hi = lo + (1.0 - lo) * torch.sigmoid(raw[..., 2:])  # (x1, y1) in [lo, 1]
        return torch.cat([lo, hi], dim=-1)  # (B, R, 4)


# -- boxes and loss ---------------------------------------------------------------------
def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of ``[..., 4]`` xyxy boxes (0 where both are empty)."""
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = iw * ih
    area = lambda t: (t[..., 2] - t[..., 0]).clamp(min=0) * (t[..., 3] - t[..., 1]).clamp(min=0)  # noqa: E731
    union = area(a) + area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of ``[..., 4]`` xyxy boxes: IoU minus the part of the smallest
    enclosing box that neither covers; it still has a gradient when the boxes are apart."""
    iou = box_iou(a, b)
    area = lambda t: (t[..., 2] - t[..., 0]).clamp(min=0) * (t[..., 3] - t[..., 1]).clamp(min=0)  # noqa: E731
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    union = area(a) + area(b) - iw * ih
    cw = torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])
    ch = torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])
    hull = (cw * ch).clamp(min=1e-12)
    return iou - (hull - union) / hull


def localiser_loss(pred: torch.Tensor, target: torch.Tensor, w_l1: float = 5.0,
                   w_giou: float = 1.0) -> torch.Tensor:
    """``w_l1 * L1 + w_giou * (1 - GIoU)`` averaged over boxes; ``pred``, ``target``
    ``(B, R, 4)`` normalised xyxy (DETR's weighting: L1 on [0, 1] coordinates is small)."""
    if pred.shape != target.shape or pred.shape[-1] != 4:
        raise ValueError(f"pred and target must both be (B, R, 4), got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    l1 = (pred - target).abs().sum(-1).mean()
    return w_l1 * l1 + w_giou * (1.0 - giou(pred, target)).mean()


# -- inference ---------------------------------------------------------------------------
def to_input(pixels: np.ndarray, size: int) -> np.ndarray:
    """A grey (h, w) image in [0, 1] as the localiser's (1, size, size) float32 input
    (bilinear, as the training corpus images are read)."""
    from PIL import Image

    px = np.asarray(pixels, dtype=np.float32)
    if px.ndim != 2 or min(px.shape) < 2:
        raise ValueError(f"pixels must be a 2-D image of at least 2x2, got shape {px.shape}")
    if px.shape != (size, size):
        px = np.asarray(Image.fromarray(px, mode="F").resize((size, size), Image.BILINEAR))
    return np.ascontiguousarray(px, dtype=np.float32)[None]


@torch.no_grad()
def predict_boxes(model: BoxLocaliser, images: list[np.ndarray]) -> np.ndarray:
    """Boxes of each named region in the pixels of each image.

    Parameters
    ----------
    images : list of (h, w) float arrays in [0, 1] (any size; each is resized)

    Returns
    -------
    (N, R, 4) float32 ``[x0, y0, x1, y1]`` in pixel-edge coordinates of each image
    (``x`` in ``[0, w]``, ``y`` in ``[0, h]``), regions in ``model.cfg.regions`` order.
    """
    if not images:
        return np.zeros((0, len(model.cfg.regions), 4), np.float32)
    x = torch.from_numpy(np.stack([to_input(im, model.cfg.image_size) for im in images]))
    was_training = model.training
    model.eval()
    try:
        norm = model(x).numpy()  # (N, R, 4)
    finally:
        model.train(was_training)
    scale = np.array([[im.shape[1], im.shape[0], im.shape[1], im.shape[0]] for im in images],
                     np.float32)
    return (norm * scale[:, None, :]).astype(np.float32)


# -- shipped weights ---------------------------------------------------------------------
def _paths(name_or_path: str | Path) -> tuple[Path, Path]:
    path = Path(name_or_path)
    if path.suffix in (".json", ".safetensors"):
        return path.with_suffix(".safetensors"), path.with_suffix(".json")
    if (LOCALISER_DIR / f"{name_or_path}.json").is_file():
        return LOCALISER_DIR / f"{name_or_path}.safetensors", LOCALISER_DIR / f"{name_or_path}.json"
    raise ValueError(f"localiser must be a .json/.safetensors path or one of "
                     f"{list_localisers()}, got {str(name_or_path)!r}")


def list_localisers() -> list[str]:
    """Names of the shipped localisers (``weights/localiser/*.json``)."""
    return sorted(p.stem for p in LOCALISER_DIR.glob("*.json"))


def save_localiser(model: BoxLocaliser, directory: str | Path, card: dict) -> dict:
    """Write ``<directory>/<cfg.name>.safetensors`` (float16) and its card; returns the
    card (``card`` holds what the caller knows: corpus, seed, steps, metrics)."""
    from safetensors.torch import save_file

    from .release import sha256_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()).contiguous()
               for k, v in model.state_dict().items()}
    weights = directory / f"{model.cfg.name}.safetensors"
    save_file(tensors, str(weights), metadata={"format": CARD_FORMAT})
    cfg = asdict(model.cfg)
    card = {"format": CARD_FORMAT, "name": model.cfg.name, "config": cfg, **card,
            "dtype": "float16", "bytes": weights.stat().st_size, "sha256": sha256_file(weights)}
    (directory / f"{model.cfg.name}.json").write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")
    return card


def read_localiser_card(name_or_path: str | Path) -> dict:
    return json.loads(_paths(name_or_path)[1].read_text())


def load_localiser(name_or_path: str | Path = "wrist") -> BoxLocaliser:
    """A shipped (or saved) localiser, float32, in eval mode; checks the SHA-256 first."""
    from safetensors.torch import load_file

    from .release import sha256_file

    weights, card_path = _paths(name_or_path)
    if not card_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"localiser: need both {weights} and {card_path}")
    card = json.loads(card_path.read_text())
    if card.get("format") != CARD_FORMAT:
        raise ValueError(f"{card_path} is not a localiser card (format {card.get('format')!r})")
    if sha256_file(weights) != card["sha256"]:
        raise ValueError(f"{weights} does not match the SHA-256 of its card {card_path}")
    model = BoxLocaliser(LocaliserConfig(**card["config"]))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    model.load_state_dict(state)
    return model.eval()


def localiser_for_body_part(body_part: str | None, view: str | None = None) -> str | None:
    """The name of the localiser that covers a DICOM-style body part seen in ``view``
    (one with a :data:`VIEWS` list needs a view on it), None for none."""
    part = (body_part or "").strip().upper()
    name = next((n for n, parts in BODY_PARTS.items() if part in parts), None)
    views = VIEWS.get(name)
    if name is None or views is None:
        return name
    return name if (view or "").strip().upper() in views else None
