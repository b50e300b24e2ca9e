"""Flash attention with sectioned rotary embedding applied inside the kernel.

Forward: one program per (query tile, batch·head); the query tile is rotated once, then
key tiles stream through with an online softmax (base-2 exponentials, the softmax scale
folded into q). It writes the output and the per-row log2-sum-exp, nothing N×N.
Backward (FlashAttention-2 order): delta = rowsum(dO·O); one kernel per key tile
accumulates dK, dV over all query tiles; one per query tile accumulates dQ over all key
tiles (no atomics, deterministic). Scores are recomputed from the rotated q and k, and
dQ, dK are rotated back by the inverse rotation, so they are gradients w.r.t. the
unrotated inputs. cos/sin are computed in-kernel from the int32 positions and a (Dh/2,)
table of frequencies (``reference.rope_tables``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # hardware sin/cos (MUFU) for the reduced angle; absent from the interpreter
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older triton
    libdevice = None

from ._checks import check_rope_attention
from ._launch import check_runnable, dot_dtype, dot_precision, is_interpreted, launch
from .reference import rope_tables

LOG2E = 1.4426950408889634

_CONFIGS_16BIT = tuple(
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    for m, n, w, s in ((128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3))
)
# float32 tiles take twice the shared memory: at Dh = 128 the dK/dV kernel with
# (64, 32, 3 stages) needs 233 KB, over the 227 KB an H100 block may use.
_CONFIGS_FP32 = tuple(
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    for m, n, w, s in ((64, 32, 4, 1), (32, 32, 4, 1))
)
_INTERPRET_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 32}


@triton.jit
def _load_halves(base, rows, row_ok, HALF: tl.constexpr):
    # Read a (BLOCK, Dh) tile of a contiguous (N, Dh) head as its two rotate-half
    # halves, each (BLOCK, HALF) float32; rows past N read as 0.
    cols = tl.arange(0, HALF)
    ptr = base + rows[:, None] * (2 * HALF) + cols[None, :]
    x1 = tl.load(ptr, mask=row_ok[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=row_ok[:, None], other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _cos_sin(pos_base, rows, row_ok, FREQ, AXIS, A: tl.constexpr, HALF: tl.constexpr, FAST: tl.constexpr):
    # pos (N, A) int32 of this batch item, FREQ (HALF,) f32, AXIS (HALF,) i32.
    # Reads BLOCK·HALF positions (a gather over the A columns) and HALF+HALF table
    # entries; returns cos, sin (BLOCK, HALF) float32 of angle = pos[row, axis[j]]·freq[j].
    cols = tl.arange(0, HALF)
    freq = tl.load(FREQ + cols)
    axis = tl.load(AXIS + cols)
    p = tl.load(pos_base + rows[:, None] * A + axis[None, :], mask=row_ok[:, None], other=0)
    angle = p.to(tl.float32) * freq[None, :]  # the same float32 product as the reference
    # Reduce to [-pi, pi] (Cody-Waite, 2pi = C1 + C2 with C1 = 6.28125 exact in 8 bits, so
    # k·C1 is exact): positions of a few thousand give angles of a few thousand radians.
    # On [-pi, pi] the hardware sin/cos approximations are accurate to ~1e-6 and cost one
    # MUFU op each, against ~25 instructions for libdevice's exact sinf/cosf; the keys'
    # cos/sin are recomputed for every query tile, so this is on the hot path.
    k = tl.floor(angle * 0.15915494309189535 + 0.5)
    r = (angle - k * 6.28125) - k * 0.0019353071795864769
    if FAST:
        return libdevice.fast_cosf(r), libdevice.fast_sinf(r)
    else:
        return tl.cos(r), tl.sin(r)


@triton.jit
def _key_ok(MASK, b, cols, N, HAS_MASK: tl.constexpr):
    # (BLOCK_N,) bool: key index inside N and, with a mask, a real key (reads BLOCK_N bytes).
    ok = cols < N
    if HAS_MASK:
        ok = ok & (tl.load(MASK + b * N + cols, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _rope_attn_fwd(Q, K, V, POS, MASK, FREQ, AXIS, O, LSE, H, N, qk_scale,
                   A: tl.constexpr, HALF: tl.constexpr, HAS_MASK: tl.constexpr,
                   DOT: tl.constexpr, PREC: tl.constexpr, FAST_TRIG: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Q, K, V, O: (B, H, N, 2·HALF) contiguous; POS (B, N, A) int32; MASK (B, N) uint8;
    # LSE (B·H, N) float32, log2-sum-exp of the scaled scores (+inf for rows with no key).
    # grid (cdiv(N, BLOCK_M), B·H). Reads Q once, K and V once per query tile;
    # writes BLOCK_M·Dh outputs and BLOCK_M LSE values.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    head = bh * N * (2 * HALF)
    pos_b = POS + b * N * A
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N

    q1, q2 = _load_halves(Q + head, rows, row_ok, HALF)
    cq, sq = _cos_sin(pos_b, rows, row_ok, FREQ, AXIS, A, HALF, FAST_TRIG)
    # rotate, and fold scale·log2(e) in so that exp2(s - m) is the softmax numerator
    qr1 = ((q1 * cq - q2 * sq) * qk_scale).to(DOT)
    qr2 = ((q2 * cq + q1 * sq) * qk_scale).to(DOT)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, 2 * HALF), tl.float32)
    dcols = tl.arange(0, 2 * HALF)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        in_n = cols < N
        ok = _key_ok(MASK, b, cols, N, HAS_MASK)
        k1, k2 = _load_halves(K + head, cols, in_n, HALF)
        ck, sk = _cos_sin(pos_b, cols, in_n, FREQ, AXIS, A, HALF, FAST_TRIG)
        kr1 = (k1 * ck - k2 * sk).to(DOT)
        kr2 = (k2 * ck + k1 * sk).to(DOT)
        s = tl.dot(qr1, tl.trans(kr1), input_precision=PREC)
        s = tl.dot(qr2, tl.trans(kr2), s, input_precision=PREC)  # (BLOCK_M, BLOCK_N)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + head + cols[:, None] * (2 * HALF) + dcols[None, :], mask=in_n[:, None], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(DOT), v.to(DOT), acc, input_precision=PREC)
        m_i = m_new

    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]  # rows with no key: acc is 0
    tl.store(O + head + rows[:, None] * (2 * HALF) + dcols[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    lse = m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))
    tl.store(LSE + bh * N + rows, tl.where(has_key, lse, float("inf")), mask=row_ok)


@triton.jit
def _rope_attn_bwd_delta(O, DO, DELTA, ROWS, HEAD: tl.constexpr, BLOCK_M: tl.constexpr):
    # O, DO (B·H·N, HEAD); DELTA (B·H·N,) float32 = rowsum(dO·O).
    # ROWS = B·H·N; grid (cdiv(ROWS, BLOCK_M),). Reads 2·BLOCK_M·HEAD elements, writes BLOCK_M.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < ROWS
    cols = tl.arange(0, HEAD)
    off = rows[:, None] * HEAD + cols[None, :]
    o = tl.load(O + off, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _rotate_back_store(base, rows, row_ok, g1, g2, c, s, HALF: tl.constexpr):
    # g = d/d(rotated x); the rotation is orthogonal, so d/dx = Rᵀ g:
    # dx1 = g1·c + g2·s, dx2 = g2·c - g1·s. Writes a (BLOCK, 2·HALF) tile.
    cols = tl.arange(0, HALF)
    ptr = base + rows[:, None] * (2 * HALF) + cols[None, :]
    dt = base.dtype.element_ty
    tl.store(ptr, (g1 * c + g2 * s).to(dt), mask=row_ok[:, None])
    tl.store(ptr + HALF, (g2 * c - g1 * s).to(dt), mask=row_ok[:, None])


@triton.jit
def _rope_attn_bwd_dkdv(Q, K, V, POS, MASK, FREQ, AXIS, DO, LSE, DELTA, DK, DV, H, N, scale,
                        A: tl.constexpr, HALF: tl.constexpr, HAS_MASK: tl.constexpr,
                        DOT: tl.constexpr, PREC: tl.constexpr, FAST_TRIG: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One key tile (BLOCK_N keys) against every query tile, in transposed form
    # (scores are (BLOCK_N, BLOCK_M)). Q, K, V, DO, DK, DV (B, H, N, 2·HALF) contiguous;
    # LSE, DELTA (B·H, N) float32. grid (cdiv(N, BLOCK_N), B·H). Reads K, V once and
    # Q, dO, LSE, delta once per key tile; writes BLOCK_N·Dh of dK and of dV.
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    head = bh * N * (2 * HALF)
    pos_b = POS + b * N * A
    qk_scale = scale * 1.4426950408889634
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = cols < N
    ok = _key_ok(MASK, b, cols, N, HAS_MASK)
    dcols = tl.arange(0, 2 * HALF)

    k1, k2 = _load_halves(K + head, cols, in_n, HALF)
    ck, sk = _cos_sin(pos_b, cols, in_n, FREQ, AXIS, A, HALF, FAST_TRIG)
    kr1 = (k1 * ck - k2 * sk).to(DOT)
    kr2 = (k2 * ck + k1 * sk).to(DOT)
    v = tl.load(V + head + cols[:, None] * (2 * HALF) + dcols[None, :], mask=in_n[:, None], other=0.0).to(DOT)

    dv = tl.zeros((BLOCK_N, 2 * HALF), tl.float32)
    dk1 = tl.zeros((BLOCK_N, HALF), tl.float32)
    dk2 = tl.zeros((BLOCK_N, HALF), tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        q1, q2 = _load_halves(Q + head, rows, row_ok, HALF)
        cq, sq = _cos_sin(pos_b, rows, row_ok, FREQ, AXIS, A, HALF, FAST_TRIG)
        qr1 = (q1 * cq - q2 * sq).to(DOT)
        qr2 = (q2 * cq + q1 * sq).to(DOT)
        lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)
        do = tl.load(DO + head + rows[:, None] * (2 * HALF) + dcols[None, :], mask=row_ok[:, None], other=0.0).to(DOT)
        sT = tl.dot(kr1, tl.trans(qr1), input_precision=PREC)
        sT = tl.dot(kr2, tl.trans(qr2), sT, input_precision=PREC)  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(sT * qk_scale - lse[None, :])  # lse = +inf (no key / row past N) → 0
        pT = tl.where(ok[:, None], pT, 0.0)
        dv = tl.dot(pT.to(DOT), do, dv, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = (pT * (dpT - delta[None, :])).to(DOT)  # d loss / d score (natural units)
        dk1 = tl.dot(dsT, qr1, dk1, input_precision=PREC)
        dk2 = tl.dot(dsT, qr2, dk2, input_precision=PREC)

    tl.store(DV + head + cols[:, None] * (2 * HALF) + dcols[None, :], dv.to(DV.dtype.element_ty), mask=in_n[:, None])
    _rotate_back_store(DK + head, cols, in_n, dk1 * scale, dk2 * scale, ck, sk, HALF)


@triton.jit
def _rope_attn_bwd_dq(Q, K, V, POS, MASK, FREQ, AXIS, DO, LSE, DELTA, DQ, H, N, scale,
                      A: tl.constexpr, HALF: tl.constexpr, HAS_MASK: tl.constexpr,
                      DOT: tl.constexpr, PREC: tl.constexpr, FAST_TRIG: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One query tile against every key tile. Shapes as in _rope_attn_bwd_dkdv; DQ like Q.
    # grid (cdiv(N, BLOCK_M), B·H). Reads Q, dO once and K, V once per query tile;
    # writes BLOCK_M·Dh of dQ.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    head = bh * N * (2 * HALF)
    pos_b = POS + b * N * A
    qk_scale = scale * 1.4426950408889634
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    dcols = tl.arange(0, 2 * HALF)

    q1, q2 = _load_halves(Q + head, rows, row_ok, HALF)
    cq, sq = _cos_sin(pos_b, rows, row_ok, FREQ, AXIS, A, HALF, FAST_TRIG)
    qr1 = (q1 * cq - q2 * sq).to(DOT)
    qr2 = (q2 * cq + q1 * sq).to(DOT)
    lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)
    do = tl.load(DO + head + rows[:, None] * (2 * HALF) + dcols[None, :], mask=row_ok[:, None], other=0.0).to(DOT)

    dq1 = tl.zeros((BLOCK_M, HALF), tl.float32)
    dq2 = tl.zeros((BLOCK_M, HALF), tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        in_n = cols < N
        ok = _key_ok(MASK, b, cols, N, HAS_MASK)
        k1, k2 = _load_halves(K + head, cols, in_n, HALF)
        ck, sk = _cos_sin(pos_b, cols, in_n, FREQ, AXIS, A, HALF, FAST_TRIG)
        kr1 = (k1 * ck - k2 * sk).to(DOT)
        kr2 = (k2 * ck + k1 * sk).to(DOT)
        v = tl.load(V + head + cols[:, None] * (2 * HALF) + dcols[None, :], mask=in_n[:, None], other=0.0).to(DOT)
        s = tl.dot(qr1, tl.trans(kr1), input_precision=PREC)
        s = tl.dot(qr2, tl.trans(kr2), s, input_precision=PREC)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        p = tl.where(ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = (p * (dp - delta[:, None])).to(DOT)
        dq1 = tl.dot(ds, kr1, dq1, input_precision=PREC)
        dq2 = tl.dot(ds, kr2, dq2, input_precision=PREC)

    _rotate_back_store(DQ + head, rows, row_ok, dq1 * scale, dq2 * scale, cq, sq, HALF)


def _prepare(q, k, v, pos, sections, theta, key_mask, scale):
    B, H, N, Dh, A = check_rope_attention(q, k, v, pos, sections, key_mask)
    interpreted = is_interpreted(_rope_attn_fwd)
    check_runnable(q, interpreted, "rope_attention_triton")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"rope_attention_triton supports float32/float16/bfloat16, got {q.dtype}")
    if Dh not in (32, 64, 128):
        raise ValueError(f"rope_attention_triton supports head dim Dh in (32, 64, 128), got {Dh}")
    freq, axis = rope_tables(tuple(sections), float(theta), q.device)
    mask = key_mask.to(torch.uint8).contiguous() if key_mask is not None else freq  # dummy pointer
    return dict(B=B, H=H, N=N, Dh=Dh, A=A, freq=freq, axis=axis, mask=mask,
                pos=pos.contiguous(), scale=Dh**-0.5 if scale is None else float(scale))


def _configs(dtype):
    return _CONFIGS_FP32 if dtype == torch.float32 else _CONFIGS_16BIT


def _meta(ctx, dtype, device):
    return dict(A=ctx["A"], HALF=ctx["Dh"] // 2, HAS_MASK=ctx["mask"].dtype == torch.uint8,
                DOT=dot_dtype(dtype, device), PREC=dot_precision(dtype),
                FAST_TRIG=device.type == "cuda" and libdevice is not None)


class _RopeAttention(torch.autograd.Function):
    @staticmethod
    def forward(fctx, q, k, v, pos, sections, theta, key_mask, scale):
        c = _prepare(q, k, v, pos, sections, theta, key_mask, scale)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, N = c["B"], c["H"], c["N"]
        o = torch.empty_like(q)
        lse = torch.empty((B * H, N), device=q.device, dtype=torch.float32)
        launch(_rope_attn_fwd, lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H),
               (q, k, v, c["pos"], c["mask"], c["freq"], c["axis"], o, lse, H, N, c["scale"] * LOG2E),
               configs=_configs(q.dtype), key=("N", "HALF", "HAS_MASK"), interpret_meta=_INTERPRET_BLOCKS,
               fixed_meta=_meta(c, q.dtype, q.device))
        fctx.save_for_backward(q, k, v, o, lse)
        fctx.c = c
        return o

    @staticmethod
    def backward(fctx, do):
        q, k, v, o, lse = fctx.saved_tensors
        c = fctx.c
        B, H, N, Dh = c["B"], c["H"], c["N"], c["Dh"]
        do = do.contiguous()
        delta = torch.empty_like(lse)
        rows = B * H * N
        block = 64
        _rope_attn_bwd_delta[(triton.cdiv(rows, block),)](o, do, delta, rows, HEAD=Dh, BLOCK_M=block)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = (q, k, v, c["pos"], c["mask"], c["freq"], c["axis"], do, lse, delta)
        meta = _meta(c, q.dtype, q.device)
        launch(_rope_attn_bwd_dkdv, lambda m: (triton.cdiv(N, m["BLOCK_N"]), B * H),
               (*common, dk, dv, H, N, c["scale"]), configs=_configs(q.dtype), key=("N", "HALF", "HAS_MASK"),
               interpret_meta=_INTERPRET_BLOCKS, fixed_meta=meta)
        launch(_rope_attn_bwd_dq, lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H),
               (*common, dq, H, N, c["scale"]), configs=_configs(q.dtype), key=("N", "HALF", "HAS_MASK"),
               interpret_meta=_INTERPRET_BLOCKS, fixed_meta=meta)
        return dq, dk, dv, None, None, None, None, None


def rope_attention_triton(q, k, v, pos, sections, *, theta=10000.0, key_mask=None, scale=None):
    """Triton rope_attention (see ``reference.rope_attention`` for the contract).

    q, k, v (B, Hh, N, Dh) float32/float16/bfloat16 with Dh in (32, 64, 128); pos (B, N, A)
    int32; key_mask (B, N) bool or None. Extra memory: (B·Hh·N) float32 for the logsumexp
    (and as much again for delta in the backward). Non-contiguous inputs are copied.
    """
    return _RopeAttention.apply(q, k, v, pos, tuple(sections), theta, key_mask, scale)
