"""Tiled CLIP (InfoNCE, optionally soft-label) and SigLIP losses that never form B×B.

Every kernel is a "row" kernel: a program owns BLOCK_M rows of one side (A) and streams
all rows of the other side (Bm) in BLOCK_N tiles, recomputing the logit tile
``s·A_tile·Bm_tileᵀ`` in registers. Calling it with (img, txt) and then (txt, img) covers
both directions, because every quantity here is symmetric under that swap. Extra memory
is O(B) float32 (per-row logsumexp, target-weighted logit sums, per-row gradient sums for
the scale and bias), reduced on the host in a fixed order, so results are deterministic.

Soft targets ``t_ab = w_ab / n_a`` with ``w = Y·Yᵀ`` (label overlap, recomputed per tile
from the (B, L) labels) and ``n_a = Σ_b w_ab = y_a·Σ_b y_b`` (computed once, O(B·L));
a row with ``n_a == 0`` (no labels) uses the identity target.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_labels, check_pair, check_scalar
from ._launch import check_runnable, dot_dtype, dot_precision, is_interpreted, launch

MAX_DIM = 1024  # a row tile keeps its full D-wide embedding and gradient in registers

_CONFIGS = tuple(
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    for m, n, w, s in ((16, 32, 4, 1), (32, 64, 4, 2), (64, 64, 8, 2))
)
# The A tile and the streamed Bm tile may both sit in shared memory: up to about
# (BLOCK_M + BLOCK_N)·BLOCK_D·element bytes, which bounds what
# benchmarks/gpu/compile_check.py measured for sm_90 (all kept configs ≤ 200 KB of the
# 227 KB limit). Configs over the budget are not even compiled; where fewer than two
# fit (float32 at D = 1024) the smallest tiles are offered instead.
_SMEM_BUDGET = 200 * 1024
_CONFIGS_SMALL = tuple(
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    for m, n, w, s in ((16, 16, 4, 1), (16, 32, 4, 1))
)
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}
_KEY = ("B", "BLOCK_D", "HAS_LABELS")


@triton.jit
def _load_rows(X, rows, row_ok, D, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    # Read a (BLOCK, BLOCK_D) tile of X (B, D) contiguous; rows past B and columns past D
    # read as 0, so they add nothing to any dot product.
    dcols = tl.arange(0, BLOCK_D)
    ptr = X + rows[:, None].to(tl.int64) * D + dcols[None, :]
    return tl.load(ptr, mask=row_ok[:, None] & (dcols < D)[None, :], other=0.0).to(DOT)


@triton.jit
def _targets(Y, NORM, rows, row_ok, cols, col_ok, L, HAS_LABELS: tl.constexpr, BLOCK_L: tl.constexpr):
    # Soft targets of a (BLOCK_M, BLOCK_N) tile, normalised per row (t_ab) and per column
    # (t_ba): reads 2·BLOCK·L labels and 2·BLOCK norms. Without labels both are the identity.
    eye = (rows[:, None] == cols[None, :]).to(tl.float32)
    if HAS_LABELS:
        lc = tl.arange(0, BLOCK_L)
        lok = lc < L
        ya = tl.load(Y + rows[:, None] * L + lc[None, :], mask=row_ok[:, None] & lok[None, :], other=0.0)
        yb = tl.load(Y + cols[:, None] * L + lc[None, :], mask=col_ok[:, None] & lok[None, :], other=0.0)
        w = tl.dot(ya, tl.trans(yb), input_precision="ieee")  # label overlap y_a·y_b
        na = tl.load(NORM + rows, mask=row_ok, other=0.0)
        nb = tl.load(NORM + cols, mask=col_ok, other=0.0)
        t_row = tl.where(na[:, None] > 0, w / tl.where(na > 0, na, 1.0)[:, None], eye)
        t_col = tl.where(nb[None, :] > 0, w / tl.where(nb > 0, nb, 1.0)[None, :], eye)
    else:
        t_row = eye
        t_col = eye
    return t_row, t_col


@triton.jit
def _clip_fwd_rows(A, Bm, SCALE, Y, NORM, LSE, TSUM, B, D, L,
                   HAS_LABELS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # A, Bm (B, D); SCALE (1,) f32; Y (B, L) f32; NORM (B,) f32; LSE, TSUM (B,) f32.
    # For each row a: LSE[a] = logsumexp_b(s·A_a·Bm_b), TSUM[a] = Σ_b t_ab·s·A_a·Bm_b.
    # grid (cdiv(B, BLOCK_M),). Reads the A tile once and all of Bm once; writes 2·BLOCK_M.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    a = _load_rows(A, rows, row_ok, D, BLOCK_D, DOT)
    scale = tl.load(SCALE)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    tsum = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, B, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < B
        bt = _load_rows(Bm, cols, col_ok, D, BLOCK_D, DOT)
        logit = tl.dot(a, tl.trans(bt), input_precision=PREC) * scale  # (BLOCK_M, BLOCK_N)
        masked = tl.where(col_ok[None, :], logit, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(masked, 1))  # finite: every tile has a real column
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(masked - m_new[:, None]), 1)
        m_i = m_new
        t_row, t_col = _targets(Y, NORM, rows, row_ok, cols, col_ok, L, HAS_LABELS, BLOCK_L)
        tsum += tl.sum(tl.where(col_ok[None, :], t_row * logit, 0.0), 1)
    tl.store(LSE + rows, m_i + tl.log(l_i), mask=row_ok)
    tl.store(TSUM + rows, tsum, mask=row_ok)


@triton.jit
def _clip_bwd_rows(A, Bm, SCALE, GOUT, Y, NORM, LSE_A, LSE_B, DA, DS_ROWS, B, D, L,
                   HAS_LABELS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dLoss/dlogit_ab = 0.5·g/B·(softmax_row_ab - t_ab + softmax_col_ab - t_ba); then
    # dA_a = s·Σ_b G_ab·Bm_b and DS_ROWS[a] = Σ_b G_ab·(A_a·Bm_b) (this row's share of
    # d/ds). Shapes as in _clip_fwd_rows; LSE_A for A's rows, LSE_B for Bm's rows;
    # GOUT (1,) f32; DA like A. Reads the A tile once and Bm once; writes BLOCK_M·D + BLOCK_M.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    a = _load_rows(A, rows, row_ok, D, BLOCK_D, DOT)
    scale = tl.load(SCALE)
    coef = 0.5 * tl.load(GOUT) / B
    lse_a = tl.load(LSE_A + rows, mask=row_ok, other=float("inf"))
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    ds = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, B, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < B
        bt = _load_rows(Bm, cols, col_ok, D, BLOCK_D, DOT)
        raw = tl.dot(a, tl.trans(bt), input_precision=PREC)
        logit = raw * scale
        lse_b = tl.load(LSE_B + cols, mask=col_ok, other=float("inf"))
        t_row, t_col = _targets(Y, NORM, rows, row_ok, cols, col_ok, L, HAS_LABELS, BLOCK_L)
        g = tl.exp(logit - lse_a[:, None]) + tl.exp(logit - lse_b[None, :]) - t_row - t_col
        g = tl.where(row_ok[:, None] & col_ok[None, :], g * coef, 0.0)
        acc = tl.dot(g.to(DOT), bt, acc, input_precision=PREC)
        ds += tl.sum(g * raw, 1)
    dcols = tl.arange(0, BLOCK_D)
    ptr = DA + rows[:, None].to(tl.int64) * D + dcols[None, :]
    tl.store(ptr, (acc * scale).to(DA.dtype.element_ty), mask=row_ok[:, None] & (dcols < D)[None, :])
    tl.store(DS_ROWS + rows, ds, mask=row_ok)


@triton.jit
def _siglip_rows(A, Bm, SCALE, BIAS, GOUT, LOSS_ROWS, DA, DS_ROWS, DB_ROWS, B, D,
                 BACKWARD: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # x_ab = z_ab·(s·A_a·Bm_b + bias), z = +1 on the diagonal, -1 elsewhere.
    # Forward: LOSS_ROWS[a] = Σ_b softplus(-x_ab) (= -logsigmoid(x_ab)).
    # Backward: G_ab = -g/B·z_ab·sigmoid(-x_ab); dA_a = s·Σ_b G_ab·Bm_b,
    # DS_ROWS[a] = Σ_b G_ab·A_a·Bm_b, DB_ROWS[a] = Σ_b G_ab.
    # A, Bm, DA (B, D); SCALE, BIAS, GOUT (1,) f32; *_ROWS (B,) f32. grid (cdiv(B, BLOCK_M),).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    a = _load_rows(A, rows, row_ok, D, BLOCK_D, DOT)
    scale = tl.load(SCALE)
    bias = tl.load(BIAS)
    total = tl.zeros((BLOCK_M,), tl.float32)
    db = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, B, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < B
        valid = row_ok[:, None] & col_ok[None, :]
        bt = _load_rows(Bm, cols, col_ok, D, BLOCK_D, DOT)
        raw = tl.dot(a, tl.trans(bt), input_precision=PREC)
        z = tl.where(rows[:, None] == cols[None, :], 1.0, -1.0)
        x = z * (raw * scale + bias)
        e = tl.exp(-tl.abs(x))  # in (0, 1]: no overflow for any x
        if BACKWARD:
            sig_neg = tl.where(x >= 0, e / (1.0 + e), 1.0 / (1.0 + e))  # sigmoid(-x)
            g = tl.where(valid, -z * sig_neg, 0.0) * (tl.load(GOUT) / B)
            acc = tl.dot(g.to(DOT), bt, acc, input_precision=PREC)
            total += tl.sum(g * raw, 1)
            db += tl.sum(g, 1)
        else:
            total += tl.sum(tl.where(valid, tl.maximum(-x, 0.0) + tl.log(1.0 + e), 0.0), 1)
    if BACKWARD:
        dcols = tl.arange(0, BLOCK_D)
        ptr = DA + rows[:, None].to(tl.int64) * D + dcols[None, :]
        tl.store(ptr, (acc * scale).to(DA.dtype.element_ty), mask=row_ok[:, None] & (dcols < D)[None, :])
        tl.store(DS_ROWS + rows, total, mask=row_ok)
        tl.store(DB_ROWS + rows, db, mask=row_ok)
    else:
        tl.store(LOSS_ROWS + rows, total, mask=row_ok)


# ----------------------------------------------------------------------------- host side


def _prepare(img, txt, logit_scale, name):
    B, D = check_pair(img, txt)
    check_scalar("logit_scale", logit_scale, img)
    check_runnable(img, is_interpreted(_clip_fwd_rows), name)
    if img.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} supports float32/float16/bfloat16 img/txt, got {img.dtype}")
    if D > MAX_DIM:
        raise ValueError(f"{name} supports embedding dim D <= {MAX_DIM}, got D={D}")
    meta = dict(BLOCK_D=max(16, triton.next_power_of_2(D)), DOT=dot_dtype(img.dtype, img.device),
                PREC=dot_precision(img.dtype))
    return B, D, meta


def _f32(t):
    return t.detach().reshape(1).to(torch.float32).contiguous()


def _rows_grid(B):
    return lambda m: (triton.cdiv(B, m["BLOCK_M"]),)


def _configs(elem_bytes: int, block_d: int):
    fits = tuple(c for c in _CONFIGS
                 if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * block_d * elem_bytes <= _SMEM_BUDGET)
    return fits if len(fits) >= 2 else _CONFIGS_SMALL


def _run(kernel, B, args, meta):
    configs = _configs(args[0].element_size(), meta["BLOCK_D"])
    launch(kernel, _rows_grid(B), args, configs=configs, key=_KEY,
           interpret_meta=_INTERPRET_BLOCKS, fixed_meta=meta)


class _ClipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, logit_scale, labels):
        B, D, meta = _prepare(img, txt, logit_scale, "clip_loss_triton")
        img, txt, scale = img.contiguous(), txt.contiguous(), _f32(logit_scale)
        if labels is not None:
            check_labels(labels, B, img)
            y = labels.to(torch.float32).contiguous()
            norm = (y @ y.sum(dim=0)).contiguous()  # n_a = Σ_b y_a·y_b, O(B·L)
            L = y.shape[1]
        else:
            y = norm = scale  # placeholders: never read when HAS_LABELS is False
            L = 1
        meta.update(HAS_LABELS=labels is not None, BLOCK_L=max(16, triton.next_power_of_2(L)))
        stats = torch.empty((4, B), device=img.device, dtype=torch.float32)
        lse_i, tsum_i, lse_t, tsum_t = stats
        _run(_clip_fwd_rows, B, (img, txt, scale, y, norm, lse_i, tsum_i, B, D, L), meta)
        _run(_clip_fwd_rows, B, (txt, img, scale, y, norm, lse_t, tsum_t, B, D, L), meta)
        ctx.save_for_backward(img, txt, scale, y, norm, lse_i, lse_t)
        ctx.info = (B, D, L, meta, logit_scale.shape, logit_scale.dtype)
        return 0.5 * ((lse_i - tsum_i).mean() + (lse_t - tsum_t).mean())

    @staticmethod
    def backward(ctx, grad):
        img, txt, scale, y, norm, lse_i, lse_t = ctx.saved_tensors
        B, D, L, meta, s_shape, s_dtype = ctx.info
        gout = _f32(grad)
        d_img, d_txt = torch.empty_like(img), torch.empty_like(txt)
        ds_rows = torch.empty((2, B), device=img.device, dtype=torch.float32)
        _run(_clip_bwd_rows, B, (img, txt, scale, gout, y, norm, lse_i, lse_t, d_img, ds_rows[0], B, D, L), meta)
        _run(_clip_bwd_rows, B, (txt, img, scale, gout, y, norm, lse_t, lse_i, d_txt, ds_rows[1], B, D, L), meta)
        d_scale = ds_rows[0].sum().reshape(s_shape).to(s_dtype)  # row 1 is the same sum, reordered
        return d_img, d_txt, d_scale, None


class _SiglipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, logit_scale, logit_bias):
        B, D, meta = _prepare(img, txt, logit_scale, "siglip_loss_triton")
        check_scalar("logit_bias", logit_bias, img)
        img, txt = img.contiguous(), txt.contiguous()
        scale, bias = _f32(logit_scale), _f32(logit_bias)
        loss_rows = torch.empty(B, device=img.device, dtype=torch.float32)
        _run(_siglip_rows, B, (img, txt, scale, bias, scale, loss_rows, img, loss_rows, loss_rows, B, D),
             {**meta, "BACKWARD": False})
        ctx.save_for_backward(img, txt, scale, bias)
        ctx.info = (B, D, meta, logit_scale.shape, logit_scale.dtype, logit_bias.shape, logit_bias.dtype)
        return loss_rows.sum() / B

    @staticmethod
    def backward(ctx, grad):
        img, txt, scale, bias = ctx.saved_tensors
        B, D, meta, s_shape, s_dtype, b_shape, b_dtype = ctx.info
        gout = _f32(grad)
        d_img, d_txt = torch.empty_like(img), torch.empty_like(txt)
        sums = torch.empty((4, B), device=img.device, dtype=torch.float32)  # ds, db per direction
        meta = {**meta, "BACKWARD": True}
        _run(_siglip_rows, B, (img, txt, scale, bias, gout, sums[0], d_img, sums[0], sums[1], B, D), meta)
        _run(_siglip_rows, B, (txt, img, scale, bias, gout, sums[2], d_txt, sums[2], sums[3], B, D), meta)
        d_scale = sums[0].sum().reshape(s_shape).to(s_dtype)
        d_bias = sums[1].sum().reshape(b_shape).to(b_dtype)
        return d_img, d_txt, d_scale, d_bias


def clip_loss_triton(img, txt, logit_scale, labels=None):
    """Tiled Triton clip_loss (contract in ``reference.clip_loss``); 0-dim float32 loss.

    img, txt (B, D) float32/float16/bfloat16 with D <= 1024; logit_scale one-element
    tensor; labels (B, L) multi-hot or None. Extra memory O(B + B·L) float32.
    """
    return _ClipLoss.apply(img, txt, logit_scale, labels)


def siglip_loss_triton(img, txt, logit_scale, logit_bias):
    """Tiled Triton siglip_loss (contract in ``reference.siglip_loss``); 0-dim float32 loss."""
    return _SiglipLoss.apply(img, txt, logit_scale, logit_bias)
