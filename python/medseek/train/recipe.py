"""Training recipes: one JSON file per recipe, parsed into a :class:`TrainConfig`.

Shipped recipes live in ``medseek/train/recipes/<name>.json`` (``tiny-cxr``,
``tiny-wrist``, ``tiny-ct``, ``demo``, ``small``, ``base``); a path to any JSON file of
the same layout works too::

    {"model": "wrist-tiny", "steps": 300, "batch_size": 16, "accum_steps": 1, "seed": 0,
     "loss": {...LossConfig fields}, "optim": {...OptimConfig fields},
     "curation": {"method": "curated" | "random", "fraction": 0.25, "clusters": 8, "seed": 0,
                  "rescore_every": 0, "loss_weight": 1.0},
     "eval_every": 100, "save_every": 100, "log_every": 10, "model_overrides": {...},
     "pretrained_text": true, "text_trainable_layers": 0}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from .losses import LossConfig
from .optim import OptimConfig
from .unpaired import UnpairedConfig

RECIPE_DIR = Path(__file__).parent / "recipes"
CURATION_METHODS = ("none", "curated", "random")


@dataclass(frozen=True)
class CurationConfig:
    method: str = "none"  # "none": all pairs; "curated": CheXficient-style; "random"
    fraction: float = 1.0
    clusters: int = 8
    seed: int = 0  # k-means and within-cluster draw (random: the subset)
    # online curation ("curated" only): every rescore_every optimizer steps the whole pool
    # is scored with the current model and the subset re-selected with loss priority
    # (medseek.train.curation.OnlineSubset); 0: the subset is chosen once, before training
    rescore_every: int = 0
    loss_weight: float = 1.0  # weight of the standardised per-pair loss against the noise

    def __post_init__(self) -> None:
        if self.method not in CURATION_METHODS:
            raise ValueError(f"curation.method must be one of {CURATION_METHODS}, got {self.method!r}")
        if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise ValueError(f"curation.fraction must be in (0, 1], got {self.fraction!r}")
        if not isinstance(self.clusters, int) or self.clusters < 1:
            raise ValueError(f"curation.clusters must be an int >= 1, got {self.clusters!r}")
        if not isinstance(self.rescore_every, int) or isinstance(self.rescore_every, bool) or self.rescore_every < 0:
            raise ValueError(f"curation.rescore_every must be an int >= 0, got {self.rescore_every!r}")
        if self.rescore_every and self.method != "curated":
            raise ValueError(f"curation.rescore_every needs method 'curated' (losses re-rank inside the "
                             f"clusters), got method {self.method!r}")
        if not isinstance(self.loss_weight, (int, float)) or not 0 <= self.loss_weight < float("inf"):
            raise ValueError(f"curation.loss_weight must be a finite number >= 0, got {self.loss_weight!r}")


@dataclass(frozen=True)
class TrainConfig:
    model: str  # model config name (medseek.models.list_models()) or JSON path
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)
    # LGDEA unpaired evidence alignment (medseek.train.unpaired); pairs_kept 1.0: off
    unpaired: UnpairedConfig = field(default_factory=UnpairedConfig)
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # global pairs per optimizer step (all ranks, all micro-batches)
    accum_steps: int = 1  # micro-batches per step (contrastive negatives stay within one)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end (when a val split exists)
    save_every: int = 0  # 0: save only at the end
    max_grad_norm: float = 0.0  # 0: no clipping
    pretrained_text: bool | None = None  # None: the model config decides
    # text layers to train, counted from the top: -1 all (the whole tower trains); 0 the
    # tower is frozen and only the text projection head learns (its features are cached
    # per report, so a frozen pretrained MiniLM costs one forward per report per run);
    # k: the top k transformer layers train, embeddings and lower layers are frozen
    text_trainable_layers: int = -1
    # radiographs: each training image is shifted by up to this fraction of its side in
    # y and x (torch.roll, region boxes moved with it), drawn per sample from the seed and
    # step; no flips, since laterality is part of what a finding is. 0: no augmentation
    augment_shift: float = 0.0
    model_overrides: dict = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        for n in ("steps", "batch_size", "accum_steps"):
            v = getattr(self, n)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{n} must be an int >= 1, got {v!r}")
        if self.batch_size % self.accum_steps:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by accum_steps ({self.accum_steps})"
            )
        if not 0 <= self.augment_shift < 0.5:
            raise ValueError(f"augment_shift must be in [0, 0.5), got {self.augment_shift!r}")
        if not isinstance(self.text_trainable_layers, int) or self.text_trainable_layers < -1:
            raise ValueError(f"text_trainable_layers must be an int >= -1, got {self.text_trainable_layers!r}")
        for n in ("log_every", "eval_every", "save_every"):
            if not isinstance(getattr(self, n), int) or getattr(self, n) < 0:
                raise ValueError(f"{n} must be an int >= 0, got {getattr(self, n)!r}")

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.json"))


def recipe_from_dict(raw: dict, name: str = "") -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown recipe keys: {unknown}; known: {sorted(known)}")
    if "model" not in raw:
        raise ValueError(f"recipe {name!r} lacks 'model'")
    sections = {"loss": LossConfig, "optim": OptimConfig, "curation": CurationConfig,
                "unpaired": UnpairedConfig}
    kwargs = dict(raw)
    for key, cls in sections.items():
        sub = raw.get(key, {})
        if isinstance(sub, cls):
            continue
        bad = sorted(set(sub) - {f.name for f in fields(cls)})
        if bad:
            raise ValueError(f"unknown keys in recipe.{key}: {bad}")
        kwargs[key] = cls(**sub)
    kwargs.setdefault("name", name)
    return TrainConfig(**kwargs)


def load_recipe(name_or_path: str | Path, **overrides) -> TrainConfig:
    """A shipped recipe by name, or a JSON file; top-level ``overrides`` replace keys."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        name = path.stem
    elif (RECIPE_DIR / f"{name_or_path}.json").is_file():
        name, path = str(name_or_path), RECIPE_DIR / f"{name_or_path}.json"
    else:
        raise ValueError(f"recipe must be a JSON file or one of {list_recipes()}, got {str(name_or_path)!r}")
    raw = json.loads(path.read_text())
    raw.update(overrides)
    return recipe_from_dict(raw, name)
