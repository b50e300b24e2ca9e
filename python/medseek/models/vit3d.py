"""Chunked ViT for CT/MR volumes with 3D RoPE at absolute (z, y, x) (SigVLP).

A volume of any slice count is never cropped or interpolated along z to a fixed size:
:func:`medseek.volume.chunk` cuts it into chunks of ``chunk_depth`` slices and
:func:`medseek.volume.patchify` turns each chunk into ``(pz, py, px)`` patch tokens with
integer grid positions ``(z, y, x)``, z counted from the first slice of the *volume*.

Each chunk is encoded independently (a batch of chunks):

* patch embedding: one linear map of the flattened ``pz*py*px`` voxels;
* a CLS token at position ``(0, 0, 0)`` (identity rotation). Patch–patch attention sees
  only offsets, but CLS–patch attention sees each patch's absolute ``(z, y, x)``, so the
  chunk embedding knows where along the body the chunk lies: shifting ``z_start`` changes
  it, while every chunk, wherever it lies, shares the same weights;
* ``key_mask``: tokens made of padded slices (past ``valid`` in the last chunk) are
  masked as keys, so their values cannot reach the CLS. A patch holding at least one real
  slice counts as real; with ``valid`` a multiple of ``pz`` (the usual case: chunk depth
  and overlap multiples of ``pz``) the pad values have no effect at all;
* chunk embedding = the CLS output after the final LayerNorm, ``(C, width)``.

The volume embedding pools the chunk embeddings: attention pooling (one learned query,
multi-head, masked over the chunks of each volume; a study's findings sit in a few
chunks, which a mean would dilute) or a masked mean (``volume_pool="mean"``).
:func:`organ_embedding` averages the chunks overlapping an organ's z-range, weighted by
the overlap, for chunk-wise (organ-level) alignment and localisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Block, init_transformer_, rope_sections

VOLUME_POOLS = ("attention", "mean")


@dataclass(frozen=True)
class ViT3DConfig:
    patch_size: tuple[int, int, int] = (4, 16, 16)  # (pz, py, px) voxels
    chunk_depth: int = 32  # slices per chunk; a multiple of pz
    chunk_overlap: int = 0  # slices shared by consecutive chunks; a multiple of pz
    width: int = 384
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    rope_theta: float = 100.0
    rope_sections: tuple[int, int, int] | None = None  # (z, y, x) pairs per head
    volume_pool: str = "attention"

    def __post_init__(self) -> None:
        patch = tuple(self.patch_size)
        if len(patch) != 3 or any(not isinstance(p, int) or p <= 0 for p in patch):
            raise ValueError(
                f"patch_size must be 3 positive ints (pz, py, px), got {self.patch_size!r}"
            )
        object.__setattr__(self, "patch_size", patch)
        for name in ("chunk_depth", "width", "depth", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.chunk_depth % patch[0]:
            raise ValueError(f"chunk_depth {self.chunk_depth} must be a multiple of pz {patch[0]}")
        if not 0 <= self.chunk_overlap < self.chunk_depth or self.chunk_overlap % patch[0]:
            raise ValueError(
                f"chunk_overlap must be a multiple of pz {patch[0]} in [0, {self.chunk_depth}), "
                f"got {self.chunk_overlap}"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.volume_pool not in VOLUME_POOLS:
            raise ValueError(f"volume_pool must be one of {VOLUME_POOLS}, got {self.volume_pool!r}")
        if self.rope_sections is not None:
            object.__setattr__(self, "rope_sections", tuple(self.rope_sections))
        rope_sections(self.width // self.heads, 3, self.rope_sections)  # validates

    @property
    def patch_dim(self) -> int:
        pz, py, px = self.patch_size
        return pz * py * px


class VolumeEncoding(NamedTuple):
    volume: torch.Tensor  # (width,) or (dim,) volume embedding
    chunks: torch.Tensor  # (C, width) chunk embeddings
    z_start: np.ndarray  # (C,) int32 first slice of each chunk
    valid: np.ndarray  # (C,) int32 real slices in each chunk
    depth: int  # slices per chunk


class AttentionPool(nn.Module):
    """One learned query attends over a set of vectors: ``(B, C, d)`` → ``(B, d)``."""

    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x (B, C, d); mask (B, C) bool, True for real chunks (at least one per row)
        B, C, d = x.shape
        hd = d // self.n_head
        k, v = self.kv(self.ln(x)).split(d, dim=-1)  # each (B, C, d)
        k = k.view(B, C, self.n_head, hd).transpose(1, 2)  # (B, H, C, hd)
        v = v.view(B, C, self.n_head, hd).transpose(1, 2)  # (B, H, C, hd)
        q = self.query.to(x.dtype).view(1, self.n_head, 1, hd)  # (1, H, 1, hd)
        att = (q @ k.transpose(-1, -2)) * hd**-0.5  # (B, H, 1, C)
        att = att.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(dim=-1)
        y = (att @ v).reshape(B, d)  # (B, d)
        return self.proj(y)


def _as_tensor(name: str, a, dtype: torch.dtype, device=None) -> torch.Tensor:
    """NumPy array or tensor of exactly ``dtype`` → tensor on ``device`` (None: where it
    is); no silent casts."""
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(np.ascontiguousarray(a))
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or np.ndarray, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {a.dtype}")
    return a if device is None else a.to(device)


def token_valid_mask(positions, z_start, valid, pz: int) -> torch.Tensor:
    """``(C, N)`` bool: True where a patch holds at least one real (unpadded) slice.

    positions (C, N, 3) int32 from :func:`medseek.volume.patchify`; z_start, valid (C,)
    int32 from :func:`medseek.volume.chunk`; ``pz`` the patch depth.
    """
    pos = _as_tensor("positions", positions, torch.int32)
    z0 = _as_tensor("z_start", z_start, torch.int32, pos.device)
    nv = _as_tensor("valid", valid, torch.int32, pos.device)
    if pos.dim() != 3 or pos.shape[-1] != 3 or z0.shape != (pos.shape[0],) or nv.shape != z0.shape:
        raise ValueError(
            f"positions must be (C, N, 3) and z_start, valid (C,), got {tuple(pos.shape)}, "
            f"{tuple(z0.shape)}, {tuple(nv.shape)}"
        )
    first_slice = pos[..., 0].long() * pz  # (C, N) absolute first slice of each patch
    return first_slice < (z0.long() + nv.long())[:, None]


def group_chunks(chunks: torch.Tensor, chunk_counts) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``(C, d)`` chunk embeddings of B volumes, stored back to back, into
    ``(B, Cmax, d)`` zero-padded plus a ``(B, Cmax)`` bool mask of real chunks."""
    counts = [int(c) for c in chunk_counts]
    if any(c <= 0 for c in counts) or sum(counts) != chunks.shape[0]:
        raise ValueError(
            f"chunk_counts must be positive and sum to the {chunks.shape[0]} chunks, got {counts}"
        )
    cmax = max(counts)
    out = chunks.new_zeros(len(counts), cmax, chunks.shape[-1])  # (B, Cmax, d)
    mask = torch.zeros(len(counts), cmax, dtype=torch.bool, device=chunks.device)
    start = 0
    for b, c in enumerate(counts):
        out[b, :c] = chunks[start:start + c]
        mask[b, :c] = True
        start += c
    return out, mask


def organ_embedding(chunk_embs, z_start, depth: int, z0: float, z1: float, *,
                    valid=None, normalize: bool = True) -> torch.Tensor:
    """Mean of the chunk embeddings overlapping slices ``[z0, z1)``, weighted by overlap.

    Chunk ``c`` covers ``[z_start[c], z_start[c] + depth)`` (``+ valid[c]`` when ``valid``
    is given, so the padding of the last chunk does not count). Returns ``(d,)``,
    L2-normalised when ``normalize``. Raises if no chunk overlaps the range.
    """
    if not z1 > z0:
        raise ValueError(f"organ range must have z0 < z1, got [{z0}, {z1})")
    starts = torch.as_tensor(np.asarray(z_start), dtype=torch.float64)
    lengths = torch.full_like(starts, float(depth)) if valid is None else \
        torch.as_tensor(np.asarray(valid), dtype=torch.float64)
    if starts.shape != (chunk_embs.shape[0],) or lengths.shape != starts.shape:
        raise ValueError(
            f"z_start (and valid) must be ({chunk_embs.shape[0]},), got {tuple(starts.shape)}"
        )
    overlap = (torch.clamp(starts + lengths, max=z1) - torch.clamp(starts, min=z0)).clamp_min(0)
    if overlap.sum() <= 0:
        raise ValueError(
            f"no chunk overlaps slices [{z0}, {z1}); chunks span "
            f"[{starts.min().item():g}, {(starts + lengths).max().item():g})"
        )
    w = (overlap / overlap.sum()).to(chunk_embs.device, chunk_embs.dtype)  # (C,)
    emb = w @ chunk_embs  # (d,)
    return F.normalize(emb, dim=-1) if normalize else emb


class ViT3D(nn.Module):
    """Volume tower: patch tokens of chunks → chunk embeddings → volume embedding."""

    def __init__(self, cfg: ViT3DConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.sections = rope_sections(cfg.width // cfg.heads, 3, cfg.rope_sections)
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, self.sections, cfg.rope_theta)
            for _ in range(cfg.depth)
        )
        self.ln_f = nn.LayerNorm(cfg.width, eps=1e-6)
        self.pool = AttentionPool(cfg.width, cfg.heads) if cfg.volume_pool == "attention" else None
        init_transformer_(self, cfg.depth)

    @property
    def width(self) -> int:
        return self.cfg.width

    def _check_tokens(self, tokens, positions, valid_mask):
        device = self.cls_token.device
        t = _as_tensor("tokens", tokens, torch.float32, device)
        p = _as_tensor("positions", positions, torch.int32, device)
        if t.dim() != 3 or t.shape[-1] != self.cfg.patch_dim:
            raise ValueError(
                f"tokens must be (C, N, {self.cfg.patch_dim}) for patch {self.cfg.patch_size}, "
                f"got shape {tuple(t.shape)}"
            )
        if p.shape != (*t.shape[:2], 3):
            raise ValueError(f"positions must be {(*t.shape[:2], 3)}, got {tuple(p.shape)}")
        if valid_mask is None:
            m = torch.ones(t.shape[:2], dtype=torch.bool, device=device)
        else:
            m = _as_tensor("valid_mask", valid_mask, torch.bool, device)
            if m.shape != t.shape[:2]:
                raise ValueError(f"valid_mask must be {tuple(t.shape[:2])}, got {tuple(m.shape)}")
        return t, p, m

    def encode_chunks(self, tokens, positions, valid_mask=None, *,
                      max_chunks_per_pass: int | None = None) -> torch.Tensor:
        """Chunk embeddings ``(C, width)``.

        Parameters
        ----------
        tokens : (C, N, pz*py*px) float32, from :func:`medseek.volume.patchify`
        positions : (C, N, 3) int32 ``(z, y, x)``, z absolute from the volume start
        valid_mask : (C, N) bool, True for real tokens (see :func:`token_valid_mask`);
            None = all real
        max_chunks_per_pass : bound on chunks per transformer pass (memory), None = all
        """
        t, p, m = self._check_tokens(tokens, positions, valid_mask)
        C = t.shape[0]
        step = C if max_chunks_per_pass is None else max(1, int(max_chunks_per_pass))
        out = [self._encode_batch(t[i:i + step], p[i:i + step], m[i:i + step])
               for i in range(0, C, step)]
        return torch.cat(out, dim=0)

    def _encode_batch(self, t: torch.Tensor, p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        C = t.shape[0]
        x = self.patch_embed(t)  # (C, N, width)
        x = torch.cat((self.cls_token.expand(C, -1, -1), x), dim=1)  # (C, 1 + N, width)
        cls_pos = torch.zeros(C, 1, 3, dtype=torch.int32, device=p.device)  # identity rotation
        pos = torch.cat((cls_pos, p), dim=1)  # (C, 1 + N, 3)
        key_mask = torch.cat((torch.ones(C, 1, dtype=torch.bool, device=m.device), m), dim=1)
        for block in self.blocks:
            x = block(x, pos, key_mask)
        return self.ln_f(x[:, 0])  # (C, width)

    def pool_chunks(self, chunks: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Volume embeddings ``(B, width)`` from chunk embeddings ``(B, Cmax, width)``."""
        if mask is None:
            mask = torch.ones(chunks.shape[:2], dtype=torch.bool, device=chunks.device)
        if not mask.any(dim=1).all():
            raise ValueError("mask must keep at least one chunk per volume")
        if self.pool is not None:
            return self.pool(chunks, mask)
        w = mask.to(chunks.dtype).unsqueeze(-1)  # (B, Cmax, 1)
        return (chunks * w).sum(1) / w.sum(1)

    def encode_volume_tokens(self, tokens, positions, valid_mask=None,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One volume's chunks → ``(volume_emb (width,), chunk_embs (C, width))``."""
        chunks = self.encode_chunks(tokens, positions, valid_mask)  # (C, width)
        return self.pool_chunks(chunks.unsqueeze(0))[0], chunks

    def encode_volume_array(self, vol: np.ndarray, depth: int | None = None, patch=None,
                            overlap: int | None = None, pad_value: float = 0.0) -> VolumeEncoding:
        """Chunk, patchify and encode a windowed ``(D, H, W)`` float32 volume.

        ``depth``, ``overlap`` default to the config's ``chunk_depth``, ``chunk_overlap``;
        ``patch`` must equal the config's ``patch_size`` (the patch embedding's input).
        H and W must be multiples of ``py``, ``px``.
        """
        from medseek import volume as mv  # the C++ extension: only needed on this path

        if not isinstance(vol, np.ndarray) or vol.dtype != np.float32:
            # raw int16 HU would encode without a window: refuse rather than guess one
            raise TypeError(
                "vol must be a windowed float32 np.ndarray (see medseek.volume.window), got "
                f"{getattr(vol, 'dtype', type(vol).__name__)}"
            )

        depth = self.cfg.chunk_depth if depth is None else int(depth)
        overlap = self.cfg.chunk_overlap if overlap is None else int(overlap)
        if patch is not None and tuple(patch) != self.cfg.patch_size:
            raise ValueError(f"patch must be the model's {self.cfg.patch_size}, got {tuple(patch)}")
        pz = self.cfg.patch_size[0]
        if depth % pz or overlap % pz:
            raise ValueError(
                f"depth and overlap must be multiples of pz {pz}, got depth={depth}, overlap={overlap}"
            )
        chunks, z_start, valid = mv.chunk(vol, depth, overlap, pad_value)
        tokens, positions = mv.patchify(chunks, z_start, self.cfg.patch_size)
        mask = token_valid_mask(positions, z_start, valid, pz)
        emb, chunk_embs = self.encode_volume_tokens(tokens, positions, mask)
        return VolumeEncoding(emb, chunk_embs, z_start, valid, depth)
