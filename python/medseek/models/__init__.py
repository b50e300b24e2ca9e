"""Encoders: the MiniLM text tower (and, alongside it, the image and volume towers).

Submodules are imported lazily so that ``import medseek.models`` does not pull in torch
until a model is actually used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
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
