"""Build a :class:`DualEncoder` from a JSON config, by name or by path (open_clip style).

Configs live in ``medseek/models/configs/<name>.json`` (shipped in the wheel), named
``<task>-<size>``: task ``cxr`` (chest radiographs), ``wrist`` (wrist radiographs with
bone regions) or ``ct`` (chunked volumes); size ``tiny`` (tests), ``demo`` (CPU demo),
``small``, ``base``. Every shipped config has a head dim (width / heads) of 32 or 64, so
all of them, ``tiny`` included, run the Triton attention kernel on CUDA. ``demo``,
``small`` and ``base`` load the pretrained MiniLM text weights. A config file holds::

    {"embed_dim": 256, "loss": "siglip",
     "vision": {"type": "vit2d" | "vit3d", ...ViT2DConfig / ViT3DConfig fields},
     "text": {"type": "minilm", "pretrained": true, ...TextTowerConfig fields},
     "head": {...HeadConfig fields}, "region_head": false,
     "preprocess": {...PreprocessConfig fields}}

Keyword overrides replace top-level keys; a dict override merges into a section, e.g.
``create_model("cxr-tiny", vision={"depth": 1}, embed_dim=16)``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .dual import DualEncoder, DualEncoderConfig, PreprocessConfig
from .heads import HeadConfig
from .text_tower import TextTowerConfig
from .vit2d import ViT2DConfig
from .vit3d import ViT3DConfig

CONFIG_DIR = Path(__file__).parent / "configs"
_VISION = {"vit2d": ViT2DConfig, "vit3d": ViT3DConfig}
_TOP_KEYS = {"embed_dim", "loss", "vision", "text", "head", "region_head", "finding_head", "preprocess",
             "name"}


class _SkipInitOnMeta(TorchFunctionMode):
    """Make in-place initialisers no-ops on meta tensors (they hold no values anyway).

    Without this, the first ``normal_`` on a meta tensor imports ``torch._dynamo``
    (seconds), which would make :func:`describe` slow for no result.
    """

    INIT_OPS = frozenset({"normal_", "uniform_", "fill_", "zero_", "trunc_normal_",
                          "kaiming_uniform_", "ones_", "zeros_", "constant_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__name__", "") in self.INIT_OPS and isinstance(t, torch.Tensor) and t.is_meta:
            return t
        return func(*args, **kwargs)


def list_models() -> list[str]:
    """Names of the shipped configs, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _section(cls, raw: dict, where: str, skip: tuple[str, ...] = ()):
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a JSON object, got {raw!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known - set(skip))
    if unknown:
        raise ValueError(f"unknown keys in {where}: {unknown}; known: {sorted(known)}")
    return cls(**{k: v for k, v in raw.items() if k not in skip})


def config_from_dict(raw: dict, name: str = "") -> DualEncoderConfig:
    """Parse a config dict (the JSON layout above) into a :class:`DualEncoderConfig`."""
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"unknown top-level config keys: {unknown}; known: {sorted(_TOP_KEYS)}")
    for key in ("vision", "text"):
        if key not in raw:
            raise ValueError(f"config {name!r} lacks the {key!r} section")
    vision = dict(raw["vision"])
    vtype = vision.pop("type", None)
    if vtype not in _VISION:
        raise ValueError(f"vision.type must be one of {sorted(_VISION)}, got {vtype!r}")
    text = dict(raw["text"])
    ttype = text.pop("type", "minilm")
    if ttype != "minilm":
        raise ValueError(f"text.type must be 'minilm', got {ttype!r}")
    pretrained = text.pop("pretrained", False)
    if not isinstance(pretrained, bool):
        raise ValueError(f"text.pretrained must be true or false, got {pretrained!r}")
    return DualEncoderConfig(
        vision=_section(_VISION[vtype], vision, "vision"),
        text=_section(TextTowerConfig, text, "text"),
        embed_dim=raw.get("embed_dim", 256),
        head=_section(HeadConfig, raw.get("head", {}), "head"),
        loss=raw.get("loss", "siglip"),
        region_head=bool(raw.get("region_head", False)),
        finding_head=bool(raw.get("finding_head", False)),
        text_pretrained=pretrained,
        preprocess=_section(PreprocessConfig, raw.get("preprocess", {}), "preprocess"),
        name=raw.get("name", name),
    )


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(name_or_path: str | Path, **overrides) -> DualEncoderConfig:
    """Config of a shipped model name (see :func:`list_models`) or a JSON file path."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        name = path.stem
    elif (CONFIG_DIR / f"{name_or_path}.json").is_file():
        name, path = str(name_or_path), CONFIG_DIR / f"{name_or_path}.json"
    else:
        raise ValueError(
            f"name_or_path must be a JSON file or one of {list_models()}, got {str(name_or_path)!r}"
        )
    raw = json.loads(path.read_text())
    return config_from_dict(_merge(raw, overrides), name=name)


def load_pretrained_text(model: DualEncoder, model_dir: str | Path | None = None) -> None:
    """Copy the pretrained all-MiniLM-L6-v2 weights into ``model.text``.

    The text config must be MiniLM-L6's (hidden 384, 6 layers, 12 heads, vocab 30522).
    """
    from .text_tower import TextEncoder

    src = TextEncoder(model_dir, max_length=model.cfg.text.max_length)
    ours, theirs = model.cfg.text, src.cfg
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "max_position_embeddings", "type_vocab_size"):
        if getattr(ours, f) != getattr(theirs, f):
            raise ValueError(
                f"text.{f} is {getattr(ours, f)} but the pretrained MiniLM has {getattr(theirs, f)}"
            )
    model.text.load_state_dict(src.model.state_dict(), strict=True)


def create_model(name_or_path: str | Path, *, pretrained_text: bool | None = None,
                 device: str | torch.device | None = None, **overrides) -> DualEncoder:
    """Build a :class:`DualEncoder` from a shipped config name or a JSON path.

    Parameters
    ----------
    name_or_path : a name from :func:`list_models` or a path to a JSON config
    pretrained_text : load the MiniLM weights into the text tower; None = the config's
        ``text.pretrained``
    device : where to allocate; ``"meta"`` builds shapes only (no memory), for counting
    **overrides : top-level config keys; dicts merge into sections
    """
    cfg = load_config(name_or_path, **overrides)
    device = torch.device(device or "cpu")
    if device.type == "meta":
        with device, _SkipInitOnMeta():
            return DualEncoder(cfg)
    with device:
        model = DualEncoder(cfg)
    load_text = cfg.text_pretrained if pretrained_text is None else pretrained_text
    if load_text:
        load_pretrained_text(model)
    return model


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (works on meta-device models)."""
    return int(sum(math.prod(p.shape) for p in module.parameters()))


def describe(model_or_name: DualEncoder | str | Path) -> str:
    """Parameter counts per part, as a small table; a name is built on the meta device."""
    model = model_or_name if isinstance(model_or_name, nn.Module) else \
        create_model(model_or_name, device="meta")
    cfg = model.cfg
    v = cfg.vision
    kind = "ViT2D" if model.modality == "image" else "ViT3D"
    patch = v.patch_size if kind == "ViT2D" else "x".join(map(str, v.patch_size))
    rows = [
        (f"visual ({kind} w{v.width} d{v.depth} h{v.heads} p{patch})", model.visual),
        (f"text (MiniLM h{cfg.text.hidden_size} L{cfg.text.num_hidden_layers})", model.text),
        ("heads + logit scale", [model.visual_head, model.region_head, model.text_head,
                                 model.logit_scale]),
    ]
    lines = [f"{cfg.name or 'model'}: {model.modality}, embed_dim {cfg.embed_dim}, loss {cfg.loss}"]
    for label, part in rows:
        parts = [p for p in (part if isinstance(part, list) else [part]) if p is not None]
        n = sum(count_parameters(p) for p in parts)
        lines.append(f"  {label:<42} {n:>12,}")
    lines.append(f"  {'total':<42} {count_parameters(model):>12,}")
    return "\n".join(lines)
