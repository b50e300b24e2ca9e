"""Freezing the text tower, and caching its features while it is frozen.

With ``text_trainable_layers = 0`` (recipe) the pretrained MiniLM tower is frozen and
only the text projection head learns. A frozen tower maps a text to the same feature
every time (the tower has no dropout), so :class:`TextFeatureCache` computes each
distinct text once, under ``no_grad``, and the training step feeds the cached
``(B, hidden)`` features straight to ``model.text_head``. On CPU this turns the 22 M
parameter MiniLM from the dominant cost of a tiny-model step into one forward per report
per run.
"""

from __future__ import annotations

import weakref

import torch


def freeze_text_layers(model, trainable_layers: int) -> None:
    """Set ``requires_grad`` of ``model.text`` for ``trainable_layers`` top layers.

    ``-1``: everything trains (nothing is changed); ``0``: the whole tower is frozen;
    ``k > 0``: embeddings and all but the top ``k`` transformer layers are frozen. The
    projection heads are never frozen here.
    """
    if trainable_layers < 0:
        return
    layers = model.text.layers
    if trainable_layers > len(layers):
        raise ValueError(f"text_trainable_layers {trainable_layers} > the tower's {len(layers)} layers")
    keep = {id(p) for layer in list(layers)[len(layers) - trainable_layers:] for p in layer.parameters()}
    for p in model.text.parameters():
        p.requires_grad_(id(p) in keep)


def text_tower_frozen(model) -> bool:
    """Whether no parameter of ``model.text`` requires a gradient."""
    return not any(p.requires_grad for p in model.text.parameters())


def _fingerprint(tower) -> tuple:
    """A cheap identity of the tower's weights: cached features of one frozen tower must
    not be served to another (different init, or a tower that was trained)."""
    with torch.no_grad():
        return tuple(round(float(p.double().sum()), 6) for p in tower.parameters())


class TextFeatureCache:
    """Frozen-tower features (mean-pooled, unit norm, before the head) per text.

    One cache may serve several models (the ablation runner shares it between variants);
    entries are keyed by the tower's weight fingerprint and the text.
    """

    def __init__(self, tokenizer, batch_size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._store: dict[tuple, torch.Tensor] = {}
        self._prints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tower -> fingerprint

    def __len__(self) -> int:
        return len(self._store)

    def features(self, model, texts: list[str]) -> torch.Tensor:
        """``(len(texts), hidden)`` float32 on CPU for ``texts`` (``(0, hidden)`` for none)."""
        from .data import tokenize

        tower = model.text
        if not text_tower_frozen(model):
            raise ValueError("the text tower trains: its features cannot be cached")
        key = self._prints.get(tower)
        if key is None:
            key = self._prints[tower] = _fingerprint(tower)
        missing = sorted({t for t in texts if (key, t) not in self._store}, key=len)
        if missing:
            dev = next(tower.parameters()).device
            was_training = tower.training
            tower.eval()
            with torch.no_grad():
                for s in range(0, len(missing), self.batch_size):
                    chunk = missing[s:s + self.batch_size]
                    ids, mask = tokenize(self.tokenizer, chunk)
                    out = tower(ids.to(dev), mask.to(dev)).float().cpu()
                    for t, row in zip(chunk, out):
                        self._store[(key, t)] = row
            tower.train(was_training)
        if not texts:
            return torch.zeros(0, tower.dim)
        return torch.stack([self._store[(key, t)] for t in texts])

    def save(self, path) -> None:
        """Write every cached feature (all towers) to ``path`` (``torch.save``)."""
        keys = list(self._store)
        torch.save({"keys": keys, "features": torch.stack([self._store[k] for k in keys]) if keys else None},
                   path)

    def load(self, path) -> int:
        """Add the features saved at ``path``; returns how many were read. Entries are
        keyed by tower fingerprint, so features of another tower are never served."""
        raw = torch.load(path, weights_only=True)
        for k, row in zip(raw["keys"], raw["features"] if raw["features"] is not None else []):
            self._store[(tuple(k[0]), k[1])] = row
        return len(raw["keys"])

    def forget(self, model) -> None:
        """Drop the remembered fingerprint of ``model.text`` (call after changing its weights)."""
        self._prints.pop(model.text, None)
