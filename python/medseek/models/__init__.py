"""Encoders: ViT-2D for radiographs, chunked ViT-3D for volumes, the MiniLM text tower,
projection heads and the dual encoder, built from JSON configs by ``create_model``.

Submodules are imported lazily so that ``import medseek.models`` does not pull in torch
until a model is actually used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "create_model": "factory",
    "list_models": "factory",
    "load_config": "factory",
    "describe": "factory",
    "DualEncoder": "dual",
    "ViT2D": "vit2d",
    "ViT3D": "vit3d",
    "organ_embedding": "vit3d",
    "token_valid_mask": "vit3d",
    "TextEncoder": "text_tower",
    "TextTowerConfig": "text_tower",
    "MiniLMTextTower": "text_tower",
    "locate_minilm": "text_tower",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
