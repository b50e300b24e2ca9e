"""Input checks and preprocessing shared by every encoder backend.

:class:`~medseek.encoders.OnnxRuntimeEncoder` and :class:`~medseek.encoders.TritonEncoder`
call these same functions, so the same arrays reach the same ONNX graphs. Text is the one
exception in *where* it runs: the Triton path tokenises inside the server (the
``text_tokenizer`` model of the ``text_ensemble``), with the same ``tokenizer.json``
and the same truncation and padding rules as :func:`tokenize` below.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import EncoderInputError, EncoderSpec


def check_images(images, spec: EncoderSpec) -> np.ndarray:
    """``images`` (B, C, H, W) float32 at the spec's size → C-contiguous array.

    Raises :class:`EncoderInputError` naming the bad shape or dtype; nothing is cast.
    """
    if spec.modality != "image":
        raise EncoderInputError(f"this encoder's model encodes {spec.modality}s, not images")
    if not isinstance(images, np.ndarray):
        raise EncoderInputError(f"images must be a np.ndarray, got {type(images).__name__}")
    if images.dtype != np.float32:
        raise EncoderInputError(f"images must be float32, got {images.dtype}")
    want = (spec.in_chans, *spec.image_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != want or images.shape[0] == 0:
        raise EncoderInputError(
            f"images must be (B >= 1, {want[0]}, {want[1]}, {want[2]}), got shape {images.shape}"
        )
    return np.ascontiguousarray(images)


def check_boxes(boxes, batch: int, spec: EncoderSpec) -> np.ndarray:
    """``boxes`` (batch, R >= 1, 4) float32 pixel ``(x0, y0, x1, y1)`` in model-input
    pixels → C-contiguous array.

    Every box must be finite and keep some area once clipped to the spec's image (the
    region graph clips, as the model does; a box with no area inside would pool nothing
    and give a NaN embedding). Raises :class:`EncoderInputError` naming the first bad box;
    nothing is cast.
    """
    if not isinstance(boxes, np.ndarray):
        raise EncoderInputError(f"boxes must be a np.ndarray, got {type(boxes).__name__}")
    if boxes.dtype != np.float32:
        raise EncoderInputError(f"boxes must be float32, got {boxes.dtype}")
    if (boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4
            or boxes.shape[1] == 0):
        raise EncoderInputError(
            f"boxes must be ({batch}, R >= 1, 4) (x0, y0, x1, y1), one row per image, got "
            f"shape {boxes.shape}")
    if not np.isfinite(boxes).all():
        i, r = np.argwhere(~np.isfinite(boxes).all(-1))[0]
        raise EncoderInputError(f"boxes[{i}, {r}] = {boxes[i, r].tolist()} is not finite")
    h, w = spec.image_size
    x0, x1 = np.clip(boxes[..., 0], 0, w), np.clip(boxes[..., 2], 0, w)
    y0, y1 = np.clip(boxes[..., 1], 0, h), np.clip(boxes[..., 3], 0, h)
    empty = (x1 <= x0) | (y1 <= y0)  # (B, R)
    if empty.any():
        i, r = np.argwhere(empty)[0]
        raise EncoderInputError(
            f"boxes[{i}, {r}] = {boxes[i, r].tolist()} has no area inside the {w}x{h} image "
            "(need x0 < x1, y0 < y1, overlapping the image)")
    return np.ascontiguousarray(boxes)


def check_image_regions(images, boxes, spec: EncoderSpec) -> tuple[np.ndarray, np.ndarray]:
    """The inputs of the ``image_regions`` graph, checked (:func:`check_images`,
    :func:`check_boxes`); raises :class:`EncoderInputError` when the spec's model has no
    region pathway."""
    if not (spec.modality == "image" and spec.region_head):
        raise EncoderInputError(
            f"this encoder's model ({spec.name or spec.modality}) has no region pathway "
            "(config region_head: false); embed a region as a crop with encode_images")
    images = check_images(images, spec)
    return images, check_boxes(boxes, images.shape[0], spec)


def check_texts(texts) -> list[str]:
    """A non-empty list of str (an empty string is a valid text; an empty list is not)."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise EncoderInputError(f"texts must be a list of str, got {type(texts).__name__}")
    if len(texts) == 0:
        raise EncoderInputError("texts must hold at least one string, got an empty list")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise EncoderInputError(
            f"texts must be str; texts[{bad[0]}] is {type(texts[bad[0]]).__name__}"
        )
    return list(texts)


def load_tokenizer(path: str | Path, max_length: int, padding: dict | None = None):
    """The HF ``tokenizers`` tokenizer of ``tokenizer.json``, truncating at ``max_length``
    and padding each batch to its longest text with id 0 "[PAD]" (MiniLM's), or as
    ``padding`` says (an :class:`EncoderSpec`'s ``tokenizer``: ``pad_id``, ``pad_token``,
    and ``to_max_length`` to pad every text to ``max_length``, as SigLIP was trained)."""
    from tokenizers import Tokenizer

    pad = padding or {}
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(int(max_length))
    tok.enable_padding(pad_id=int(pad.get("pad_id", 0)),
                       pad_token=str(pad.get("pad_token", "[PAD]")),
                       length=int(max_length) if pad.get("to_max_length") else None)
    return tok


def tokenize(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``attention_mask``, both (B, T) int64, padded to the longest."""
    encs = tokenizer.encode_batch(texts)
    ids = np.asarray([e.ids for e in encs], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
    return ids, mask


class VolumeTokens:
    """Chunk tokens of one volume: tokens (C, N, P) float32, positions (C, N, 3) int32,
    token_mask (C, N) bool (True where a patch holds at least one real slice); z_start and
    valid (C,) int32 (first slice, real slices) of each chunk, when known."""

    __slots__ = ("tokens", "positions", "token_mask", "z_start", "valid")

    def __init__(self, tokens: np.ndarray, positions: np.ndarray, token_mask: np.ndarray,
                 z_start: np.ndarray | None = None, valid: np.ndarray | None = None):
        self.tokens, self.positions, self.token_mask = tokens, positions, token_mask
        self.z_start, self.valid = z_start, valid

    @property
    def n_chunks(self) -> int:
        return self.tokens.shape[0]


def volume_tokens(vol, spec: EncoderSpec) -> VolumeTokens:
    """Chunk and patchify one windowed ``(D, H, W)`` float32 volume (as the model does)."""
    from medseek import volume as mv

    if spec.modality != "volume":
        raise EncoderInputError(f"this encoder's model encodes {spec.modality}s, not volumes")
    if not isinstance(vol, np.ndarray) or vol.dtype != np.float32 or vol.ndim != 3:
        raise EncoderInputError(
            "each volume must be a windowed (D, H, W) float32 np.ndarray, got "
            f"{type(vol).__name__} {getattr(vol, 'dtype', '')} {getattr(vol, 'shape', '')}"
        )
    pz, py, px = spec.patch_size
    if vol.shape[0] == 0 or vol.shape[1] % py or vol.shape[2] % px or not vol.shape[1] or not vol.shape[2]:
        raise EncoderInputError(
            f"volume (D, H, W) needs D >= 1 and H, W positive multiples of ({py}, {px}), "
            f"got {vol.shape}"
        )
    chunks, z_start, valid = mv.chunk(np.ascontiguousarray(vol), spec.chunk_depth,
                                      spec.chunk_overlap, 0.0)
    tokens, positions = mv.patchify(chunks, z_start, spec.patch_size)
    # a patch is real when its first slice lies before the chunk's last real slice
    first_slice = positions[..., 0].astype(np.int64) * pz  # (C, N)
    mask = first_slice < (z_start.astype(np.int64) + valid)[:, None]
    return VolumeTokens(tokens, positions, mask, z_start, valid)


def chunk_z_ranges(z_start: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``(C, 2)`` int64 real slices ``[z0, z1)`` of each chunk (``z1`` exclusive)."""
    z0 = np.asarray(z_start, dtype=np.int64)
    return np.stack([z0, z0 + np.asarray(valid, dtype=np.int64)], axis=1)


def group_chunks(features: np.ndarray, counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Chunk features of B volumes stored back to back ``(sum(counts), d)`` → zero-padded
    ``(B, Cmax, d)`` and the ``(B, Cmax)`` bool mask of real chunks (the pool graph's input)."""
    counts = [int(c) for c in counts]
    if any(c <= 0 for c in counts) or sum(counts) != features.shape[0]:
        raise ValueError(f"counts must be positive and sum to {features.shape[0]}, got {counts}")
    cmax = max(counts)
    out = np.zeros((len(counts), cmax, features.shape[1]), dtype=np.float32)
    mask = np.zeros((len(counts), cmax), dtype=bool)
    start = 0
    for b, c in enumerate(counts):
        out[b, :c] = features[start:start + c]
        mask[b, :c] = True
        start += c
    return out, mask


def batches(n: int, size: int):
    """``slice`` objects covering ``range(n)`` in steps of ``size``."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]
