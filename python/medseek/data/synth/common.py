"""Shared pieces of the corpus builders: per-case RNGs, deterministic PNGs, hashing."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

# zlib level fixed so identical pixels always give identical PNG bytes; Pillow writes
# no tIME chunk, so the files carry no timestamp.
PNG_COMPRESS_LEVEL = 6


def case_rng(seed: int, *keys: object) -> np.random.Generator:
    """A generator seeded from ``(seed, *keys)`` by SHA-256: stable across processes."""
    text = "\x1f".join([str(int(seed))] + [str(k) for k in keys])
    digest = hashlib.sha256(text.encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def stable_id(prefix: str, key: str, n: int = 12) -> str:
    """``prefix`` + the first ``n`` hex digits of SHA-256(key): a pseudonymous id."""
    return prefix + hashlib.sha256(key.encode()).hexdigest()[:n]


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a 2D uint8 or uint16 array (grey), deterministic."""
    from PIL import Image

    if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"image must be 2D uint8/uint16, got {image.dtype} {image.shape}")
    # Pillow infers the mode from the dtype: uint8 -> "L", little-endian uint16 -> "I;16"
    pil = Image.fromarray(np.ascontiguousarray(image.astype(image.dtype.newbyteorder("<"), copy=False)))
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates ``(X, Y)`` in [0, 1), each ``(size, size)`` float32."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(t, t)


def severity_word(severity: float) -> str:
    if severity < 0.3:
        return "minimal"
    if severity < 0.5:
        return "mild"
    if severity < 0.8:
        return "moderate"
    return "severe"
