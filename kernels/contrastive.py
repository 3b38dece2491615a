"""Triton kernels of the contrastive family, flash-attention style.

The similarity matrix ``X = scale * A @ B.T`` (rows A: (M, D), columns B: (C, D)) is never
stored. Each program holds a tile of X in registers and streams row statistics over the column
tiles (online max + sum of exponentials), so a forward pass saves O(M + C) numbers. The backward
recomputes the tiles from those statistics, in two passes with no M x C buffer: one
row-parallel pass for dA, one column-parallel pass for dB.

Three kernel sets:

* ``lse``: the log-sum-exp statistics of NT-Xent, InfoNCE, DCL and SogCLR. Per row, over the
  columns not masked out (the row's own column ``self_col``, and its positive ``pos_col`` when
  ``exclude_pos``): a log-sum-exp per column segment (``split`` cuts the columns in two for DCL),
  the softmax-weighted mean of the logits (SogCLR's weighted sum), and, from the same tiles, the
  log-sum-exp of every column (symmetric InfoNCE), merged across row blocks under a per-column-
  block lock as in the Triton layer-norm tutorial.
* ``sce``: SCE's student log-softmax (q against the columns at 1/temperature) and teacher
  softmax (k against the same columns at 1/temperature_m, own column masked) streamed over the
  same column tiles; saves the two log-sum-exps and the teacher-weighted mean of the student
  logits.
* ``gram``: the symmetric schedule (issue 25) for X = scale * Z @ Z.T with symmetric masks
  (NT-Xent, DCL, SogCLR on one process): each upper-triangle tile serves its rows and its
  transpose's, so the forward costs half a Gram product and the backward one and a half (two
  in all, against three for the symmetric op on the lse kernels). Its cross mode serves
  symmetric InfoNCE on z = [q; k] from the q x k tiles only. See "Symmetric schedule".

Every tile accumulates in float32 (float32, bfloat16, float16 inputs; the gram kernels also take
float64, accumulated in float64); the feature dimension is looped over in chunks of BLOCK_D, so
any D works; odd sizes are handled by masks.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._launch import UnsupportedDtype, check_range, check_tensor, launch, target

# A constexpr global: @triton.jit may only read globals that are tl.constexpr (the real compiler
# rejects a plain float global; the interpreter does not, which hid it).
NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))


# ----------------------------------------------------------------------------------------------
# Shared building blocks
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST: the CPU interpreter of triton 3.9 miscomputes bfloat16 dots, so there
    the operands go to float32 first (exact for bfloat16 values, like a tensor core's products)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_tile(A, B, rows, cols, row_ok, col_ok, D, stride_a, stride_b, scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """scale * A[rows] @ B[cols].T for one (BLOCK_M, BLOCK_N) tile, looping over D."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_ptr = A + rows.to(tl.int64)[:, None] * stride_a
    b_ptr = B + cols.to(tl.int64)[:, None] * stride_b
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        a = tl.load(a_ptr + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(b_ptr + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _dot(a, tl.trans(b), acc, PRECISION, UPCAST)
    return acc * scale


@triton.jit
def _online_lse(x, ok, m, l):
    """One step of the streaming log-sum-exp over the entries of x where ok is set.

    Returns the new running max and sum, the rescale factor of the old sum, and the
    exponentials of this tile (0 where masked). A row with nothing unmasked yet keeps m = -inf
    and l = 0 without producing NaN.
    """
    xm = tl.where(ok, x, NEG_INF)
    m_new = tl.maximum(m, tl.max(xm, axis=1))
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(xm - m_safe[:, None])
    return m_new, l * alpha + tl.sum(p, axis=1), alpha, p


@triton.jit
def _merge_column_stats(x, ok, cols, col_ok, COL_M, COL_L, LOCK):
    """Fold this tile's column log-sum-exp into the global per-column (max, sum) under a lock."""
    xm = tl.where(ok, x, NEG_INF)
    tile_m = tl.max(xm, axis=0)
    tile_m_safe = tl.where(tile_m == NEG_INF, 0.0, tile_m)
    tile_l = tl.sum(tl.exp(xm - tile_m_safe[None, :]), axis=0)
    while tl.atomic_cas(LOCK, 0, 1) == 1:
        pass
    # .cg: read through L2, never a stale L1 line written by another program before its release.
    old_m = tl.load(COL_M + cols, mask=col_ok, other=NEG_INF, cache_modifier=".cg")
    old_l = tl.load(COL_L + cols, mask=col_ok, other=0.0, cache_modifier=".cg")
    new_m = tl.maximum(old_m, tile_m)
    new_m_safe = tl.where(new_m == NEG_INF, 0.0, new_m)
    new_l = old_l * tl.exp(old_m - new_m_safe) + tile_l * tl.exp(tile_m - new_m_safe)
    tl.store(COL_M + cols, new_m, mask=col_ok)
    tl.store(COL_L + cols, new_l, mask=col_ok)
    # Every thread's stores must land before the lock is released.
    tl.debug_barrier()
    tl.atomic_xchg(LOCK, 0)


@triton.jit
def _unmasked(rows, cols, row_ok, col_ok, self_col, pos_col, EXCLUDE_POS: tl.constexpr):
    ok = row_ok[:, None] & col_ok[None, :] & (cols[None, :] != self_col[:, None])
    if EXCLUDE_POS:
        ok = ok & (cols[None, :] != pos_col[:, None])
    return ok


@triton.jit
def _lse_logit_grad(x, ok, cols, split, lse0, g0, lse1, g1, col_lse, g_col,
                    SPLIT: tl.constexpr, COL_GRAD: tl.constexpr):
    """d loss / d X for one tile: each log-sum-exp passes its incoming gradient times softmax."""
    if SPLIT:
        first = cols[None, :] < split
        lse_row = tl.where(first, lse0[:, None], lse1[:, None])
        g_row = tl.where(first, g0[:, None], g1[:, None])
    else:
        lse_row = lse0[:, None]
        g_row = g0[:, None]
    # The mask goes in before the exp: a masked entry must not overflow.
    dx = g_row * tl.exp(tl.where(ok, x - lse_row, NEG_INF))
    if COL_GRAD:
        dx += g_col[None, :] * tl.exp(tl.where(ok, x - col_lse[None, :], NEG_INF))
    return dx


# ----------------------------------------------------------------------------------------------
# LSE family: forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _lse_fwd_kernel(A, B, SELF_COL, POS_COL, LSE0, LSE1, WMEAN, COL_M, COL_L, COL_LOCK,
                    M, C, D, stride_a, stride_b, scale, split,
                    EXCLUDE_POS: tl.constexpr, SPLIT: tl.constexpr, WEIGHTED: tl.constexpr,
                    COL_STATS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    self_col = tl.load(SELF_COL + rows, mask=row_ok, other=-1)
    pos_col = tl.load(POS_COL + rows, mask=row_ok, other=-1)

    m0 = tl.full((BLOCK_M,), NEG_INF, tl.float32)
    l0 = tl.zeros((BLOCK_M,), tl.float32)
    w0 = tl.zeros((BLOCK_M,), tl.float32)
    m1 = tl.full((BLOCK_M,), NEG_INF, tl.float32)
    l1 = tl.zeros((BLOCK_M,), tl.float32)

    n_tiles = tl.cdiv(C, BLOCK_N)
    for t in range(0, n_tiles):
        # Row blocks start at different column blocks, so they rarely wait on the same lock.
        tile = (t + pid) % n_tiles
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        x = _logits_tile(A, B, rows, cols, row_ok, col_ok, D, stride_a, stride_b, scale,
                         BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        ok = _unmasked(rows, cols, row_ok, col_ok, self_col, pos_col, EXCLUDE_POS)
        if SPLIT:
            ok0 = ok & (cols[None, :] < split)
            m1, l1, _a1, _p1 = _online_lse(x, ok & (cols[None, :] >= split), m1, l1)
        else:
            ok0 = ok
        m0, l0, alpha0, p0 = _online_lse(x, ok0, m0, l0)
        if WEIGHTED:
            w0 = w0 * alpha0 + tl.sum(p0 * tl.where(ok0, x, 0.0), axis=1)
        if COL_STATS:
            _merge_column_stats(x, ok, cols, col_ok, COL_M, COL_L, COL_LOCK + tile)

    # Padding rows (beyond M) have l = 0: give them 1 so they compute quietly; not stored.
    l0 = tl.where(row_ok, l0, 1.0)
    l1 = tl.where(row_ok, l1, 1.0)
    tl.store(LSE0 + rows, m0 + tl.log(l0), mask=row_ok)
    if SPLIT:
        tl.store(LSE1 + rows, m1 + tl.log(l1), mask=row_ok)
    if WEIGHTED:
        tl.store(WMEAN + rows, w0 / l0, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# LSE family: backward (dA row-parallel, dB column-parallel; grid axis 1 splits D)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _lse_bwd_rows_kernel(A, B, SELF_COL, POS_COL, LSE0, LSE1, G0, G1, COL_LSE, G_COL, DA,
                         M, C, D, stride_a, stride_b, stride_da, scale, split,
                         EXCLUDE_POS: tl.constexpr, SPLIT: tl.constexpr, COL_GRAD: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         GRAD_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    self_col = tl.load(SELF_COL + rows, mask=row_ok, other=-1)
    pos_col = tl.load(POS_COL + rows, mask=row_ok, other=-1)
    lse0 = tl.load(LSE0 + rows, mask=row_ok, other=0.0)
    g0 = tl.load(G0 + rows, mask=row_ok, other=0.0)
    lse1 = lse0
    g1 = g0
    if SPLIT:
        lse1 = tl.load(LSE1 + rows, mask=row_ok, other=0.0)
        g1 = tl.load(G1 + rows, mask=row_ok, other=0.0)
    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_out_ok = d_out < D

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    for start_n in range(0, C, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        x = _logits_tile(A, B, rows, cols, row_ok, col_ok, D, stride_a, stride_b, scale,
                         BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        ok = _unmasked(rows, cols, row_ok, col_ok, self_col, pos_col, EXCLUDE_POS)
        col_lse = tl.zeros((BLOCK_N,), tl.float32)
        g_col = tl.zeros((BLOCK_N,), tl.float32)
        if COL_GRAD:
            col_lse = tl.load(COL_LSE + cols, mask=col_ok, other=0.0)
            g_col = tl.load(G_COL + cols, mask=col_ok, other=0.0)
        dx = _lse_logit_grad(x, ok, cols, split, lse0, g0, lse1, g1, col_lse, g_col,
                             SPLIT, COL_GRAD)
        b = tl.load(B + cols.to(tl.int64)[:, None] * stride_b + d_out[None, :],
                    mask=col_ok[:, None] & d_out_ok[None, :], other=0.0)
        acc = tl.dot(dx, b.to(tl.float32), acc, input_precision=GRAD_PRECISION)
    tl.store(DA + rows.to(tl.int64)[:, None] * stride_da + d_out[None, :],
             (acc * scale).to(DA.dtype.element_ty), mask=row_ok[:, None] & d_out_ok[None, :])


@triton.jit
def _lse_bwd_cols_kernel(A, B, SELF_COL, POS_COL, LSE0, LSE1, G0, G1, COL_LSE, G_COL, DB,
                         M, C, D, stride_a, stride_b, stride_db, scale, split,
                         EXCLUDE_POS: tl.constexpr, SPLIT: tl.constexpr, COL_GRAD: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         GRAD_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    col_lse = tl.zeros((BLOCK_N,), tl.float32)
    g_col = tl.zeros((BLOCK_N,), tl.float32)
    if COL_GRAD:
        col_lse = tl.load(COL_LSE + cols, mask=col_ok, other=0.0)
        g_col = tl.load(G_COL + cols, mask=col_ok, other=0.0)
    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_out_ok = d_out < D

    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    for start_m in range(0, M, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        self_col = tl.load(SELF_COL + rows, mask=row_ok, other=-1)
        pos_col = tl.load(POS_COL + rows, mask=row_ok, other=-1)
        lse0 = tl.load(LSE0 + rows, mask=row_ok, other=0.0)
        g0 = tl.load(G0 + rows, mask=row_ok, other=0.0)
        lse1 = lse0
        g1 = g0
        if SPLIT:
            lse1 = tl.load(LSE1 + rows, mask=row_ok, other=0.0)
            g1 = tl.load(G1 + rows, mask=row_ok, other=0.0)
        x = _logits_tile(A, B, rows, cols, row_ok, col_ok, D, stride_a, stride_b, scale,
                         BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        ok = _unmasked(rows, cols, row_ok, col_ok, self_col, pos_col, EXCLUDE_POS)
        dx = _lse_logit_grad(x, ok, cols, split, lse0, g0, lse1, g1, col_lse, g_col,
                             SPLIT, COL_GRAD)
        a = tl.load(A + rows.to(tl.int64)[:, None] * stride_a + d_out[None, :],
                    mask=row_ok[:, None] & d_out_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(dx), a.to(tl.float32), acc, input_precision=GRAD_PRECISION)
    tl.store(DB + cols.to(tl.int64)[:, None] * stride_db + d_out[None, :],
             (acc * scale).to(DB.dtype.element_ty), mask=col_ok[:, None] & d_out_ok[None, :])


# ----------------------------------------------------------------------------------------------
# SCE: student and teacher streamed over the same column tiles
# ----------------------------------------------------------------------------------------------

@triton.jit
def _sce_fwd_kernel(Q, K, COLS, SELF_COL, LSE_S, LSE_T, WMEAN,
                    M, C, D, stride_q, stride_k, stride_c, scale_s, scale_t,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    self_col = tl.load(SELF_COL + rows, mask=row_ok, other=-1)
    m_s = tl.full((BLOCK_M,), NEG_INF, tl.float32)
    l_s = tl.zeros((BLOCK_M,), tl.float32)
    m_t = tl.full((BLOCK_M,), NEG_INF, tl.float32)
    l_t = tl.zeros((BLOCK_M,), tl.float32)
    w_t = tl.zeros((BLOCK_M,), tl.float32)
    for start_n in range(0, C, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        x = _logits_tile(Q, COLS, rows, cols, row_ok, col_ok, D, stride_q, stride_c, scale_s,
                         BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        y = _logits_tile(K, COLS, rows, cols, row_ok, col_ok, D, stride_k, stride_c, scale_t,
                         BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        ok_s = row_ok[:, None] & col_ok[None, :]
        # The teacher never sees the key's own column (use_keys); the student sees every column.
        ok_t = ok_s & (cols[None, :] != self_col[:, None])
        m_s, l_s, _alpha_s, _p_s = _online_lse(x, ok_s, m_s, l_s)
        m_t, l_t, alpha_t, p_t = _online_lse(y, ok_t, m_t, l_t)
        w_t = w_t * alpha_t + tl.sum(p_t * tl.where(ok_t, x, 0.0), axis=1)
    l_s = tl.where(row_ok, l_s, 1.0)
    l_t = tl.where(row_ok, l_t, 1.0)
    tl.store(LSE_S + rows, m_s + tl.log(l_s), mask=row_ok)
    tl.store(LSE_T + rows, m_t + tl.log(l_t), mask=row_ok)
    tl.store(WMEAN + rows, w_t / l_t, mask=row_ok)


@triton.jit
def _sce_bwd_kernel(Q, K, COLS, SELF_COL, LSE_S, LSE_T, G_LSE, G_W, DQ,
                    M, C, D, stride_q, stride_k, stride_c, stride_dq, scale_s, scale_t,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    GRAD_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    self_col = tl.load(SELF_COL + rows, mask=row_ok, other=-1)
    lse_s = tl.load(LSE_S + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(LSE_T + rows, mask=row_ok, other=0.0)
    g_lse = tl.load(G_LSE + rows, mask=row_ok, other=0.0)
    g_w = tl.load(G_W + rows, mask=row_ok, other=0.0)
    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_out_ok = d_out < D
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    for start_n in range(0, C, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < C
        x = _logits_tile(Q, COLS, rows, cols, row_ok, col_ok, D, stride_q, stride_c, scale_s,
                         BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        y = _logits_tile(K, COLS, rows, cols, row_ok, col_ok, D, stride_k, stride_c, scale_t,
                         BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        ok_s = row_ok[:, None] & col_ok[None, :]
        ok_t = ok_s & (cols[None, :] != self_col[:, None])
        # d lse_s / dx = student softmax; d wmean / dx = teacher softmax (teacher is constant).
        dx = g_lse[:, None] * tl.exp(tl.where(ok_s, x - lse_s[:, None], NEG_INF))
        dx += g_w[:, None] * tl.exp(tl.where(ok_t, y - lse_t[:, None], NEG_INF))
        c = tl.load(COLS + cols.to(tl.int64)[:, None] * stride_c + d_out[None, :],
                    mask=col_ok[:, None] & d_out_ok[None, :], other=0.0)
        acc = tl.dot(dx, c.to(tl.float32), acc, input_precision=GRAD_PRECISION)
    tl.store(DQ + rows.to(tl.int64)[:, None] * stride_dq + d_out[None, :],
             (acc * scale_s).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_out_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Symmetric schedule (issue 25): X = scale * Z @ Z.T with symmetric masks, upper-triangle tiles
# ----------------------------------------------------------------------------------------------
#
# Schedule: one program per upper-triangle tile pair (I, J), I <= J, of square BLOCK x BLOCK
# tiles; the launcher lists the pairs (TILE_I, TILE_J). Every program does the same work (one
# tile), so the triangle needs no load balancing, and it has nb (nb + 1) / 2 programs to fill the
# GPU even at small M. Each tile serves its rows and, when I < J, its transpose's rows (the
# masks are symmetric: entry (i, j) is masked exactly when (j, i) is), and both sides go to
# global accumulators through atomic adds that the launcher zeroes: the forward adds BLOCK
# numbers per side per tile, the backward BLOCK x BLOCK_DO per side per feature chunk. The
# alternative (a program per row block walking J >= I, the row side in registers) halves the
# backward's atomics but leaves the first row block nb tiles and the last one.
#
# Forward shift. A running max cannot be merged by atomics, so the sums use a shift known before
# the pass: c = |scale| * max_k |z_k|^2 >= every |X_ij| (Cauchy-Schwarz), one number for all
# rows, so one exp serves X_ij's row (i) and its transpose's row (j). For L2-normalised rows
# c = |scale|, the bound the logits reach. A row whose sum of exp(X_ij - c) falls below
# exp(-LOG_RANGE) (small norm against the largest, temperature 0.01 on large norms) could have
# lost terms to underflow: the launcher flags it on the device and two fallback passes run (they
# exit at once when no row is flagged, so no host synchronisation): the exact row maxima
# (atomic max), then the sums shifted by each row's own maximum (two exps per entry).
#
# Backward. With P_ij = exp(X_ij - lse_i) and G_ij = g_i P_ij, dz = scale (G + G^T) z; the
# tile H_IJ = G_IJ + (G_JI)^T is what both sides need: dz_I += scale H_IJ z_J and
# dz_J += scale H_IJ^T z_I (the diagonal tile once). Writing P_ij = exp(X_ij - c) exp(c - lse_i)
# gives H_ij = exp(X_ij - c) (u_i + u_j), u = g exp(c - lse): one exp per entry, used where
# every row of the tile has c - lse <= LOG_RANGE (else two exps, exact for any row).
#
# Cross mode (symmetric InfoNCE, z = [q; k], cross = B): only the pairs across row `cross` are
# entries, (i < cross) != (j < cross); the same-side pairs are masked like a self_col entry. The
# tile table keeps the upper-triangle tiles that hold a cross pair (I0 < cross < J1): for cross a
# multiple of the tile edge, exactly the q-rows x k-columns block, a quarter of the square, and
# each tile serves q -> k through its rows and k -> q through its transpose's. The shift c and the
# underflow fallback are unchanged (Cauchy-Schwarz bounds every pair, masked or not).

@triton.jit
def _gram_tile(Z, rows, cols, row_ok, col_ok, D, stride_z, scale,
               BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """scale * Z[rows] @ Z[cols].T for one (BLOCK, BLOCK) tile in ACC, looping over D."""
    acc = tl.zeros((BLOCK, BLOCK), dtype=ACC)
    a_ptr = Z + rows.to(tl.int64)[:, None] * stride_z
    b_ptr = Z + cols.to(tl.int64)[:, None] * stride_z
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        a = tl.load(a_ptr + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(b_ptr + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's bfloat16 dot (see _dot)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION, out_dtype=ACC)
    return acc * scale


@triton.jit
def _gram_unmasked(rows, cols, row_ok, col_ok, self_col, pos_col, cross,
                   EXCLUDE_POS: tl.constexpr):
    """_unmasked, and in cross mode (cross > 0) only the pairs across row cross: (i < cross) !=
    (j < cross). cross = 0 makes the column side all True against an all-False row side, so the
    test passes every pair with no branch (one runtime argument serves both modes)."""
    ok = _unmasked(rows, cols, row_ok, col_ok, self_col, pos_col, EXCLUDE_POS)
    side_r = rows < cross
    side_c = (cols < cross) | (cross == 0)
    return ok & (side_r[:, None] != side_c[None, :])


# cross stays a plain 32-bit argument (no specialisation on 1 or multiples of 16): the off mode
# (0) and every split share one binary.
@triton.jit(do_not_specialize=["cross"])
def _gram_fwd_kernel(Z, TILE_I, TILE_J, SELF_COL, POS_COL, SHIFT, FLAG, S, W,
                     D, M, stride_z, scale, cross,
                     EXCLUDE_POS: tl.constexpr, WEIGHTED: tl.constexpr, ROW_SHIFT: tl.constexpr,
                     ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """S_i += sum_j exp(X_ij - c_i) (and W_i += the same weighted by X_ij) over one tile and its
    transpose. ROW_SHIFT False: c = SHIFT[0] for every row; True: the fallback pass, c_i =
    SHIFT[i] (the row's maximum), run only when FLAG is set."""
    if ROW_SHIFT:
        if tl.load(FLAG) == 0:
            return
    pid = tl.program_id(0)
    bi = tl.load(TILE_I + pid)
    bj = tl.load(TILE_J + pid)
    rows = bi * BLOCK + tl.arange(0, BLOCK)
    cols = bj * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < M
    col_ok = cols < M
    self_col = tl.load(SELF_COL + rows, mask=row_ok, other=-1)
    pos_col = tl.load(POS_COL + rows, mask=row_ok, other=-1)
    x = _gram_tile(Z, rows, cols, row_ok, col_ok, D, stride_z, scale,
                   BLOCK, BLOCK_D, ACC, PRECISION, UPCAST)
    ok = _gram_unmasked(rows, cols, row_ok, col_ok, self_col, pos_col, cross, EXCLUDE_POS)
    if ROW_SHIFT:
        c_row = tl.load(SHIFT + rows, mask=row_ok, other=0.0)
        c_col = tl.load(SHIFT + cols, mask=col_ok, other=0.0)
        # An empty row (every column masked) has maximum -inf and no terms.
        c_row = tl.where(c_row == NEG_INF, 0.0, c_row)
        c_col = tl.where(c_col == NEG_INF, 0.0, c_col)
        e_row = tl.exp(tl.where(ok, x - c_row[:, None], NEG_INF))
        e_col = tl.exp(tl.where(ok, x - c_col[None, :], NEG_INF))
    else:
        c = tl.load(SHIFT)
        e_row = tl.exp(tl.where(ok, x - c, NEG_INF))
        e_col = e_row
    tl.atomic_add(S + rows, tl.sum(e_row, axis=1), mask=row_ok)
    if WEIGHTED:
        x0 = tl.where(ok, x, 0.0)
        tl.atomic_add(W + rows, tl.sum(e_row * x0, axis=1), mask=row_ok)
    if bi != bj:  # the transpose's rows; the diagonal tile holds both (i, j) and (j, i) already
        tl.atomic_add(S + cols, tl.sum(e_col, axis=0), mask=col_ok)
        if WEIGHTED:
            tl.atomic_add(W + cols, tl.sum(e_col * x0, axis=0), mask=col_ok)


@triton.jit(do_not_specialize=["cross"])
def _gram_max_kernel(Z, TILE_I, TILE_J, SELF_COL, POS_COL, FLAG, ROW_MAX,
                     D, M, stride_z, scale, cross,
                     EXCLUDE_POS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """The fallback's first pass: ROW_MAX_i = max over the unmasked j of X_ij (atomic max, which
    merges across programs where a running sum could not), only when FLAG is set."""
    if tl.load(FLAG) == 0:
        return
    pid = tl.program_id(0)
    bi = tl.load(TILE_I + pid)
    bj = tl.load(TILE_J + pid)
    rows = bi * BLOCK + tl.arange(0, BLOCK)
    cols = bj * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < M
    col_ok = cols < M
    self_col = tl.load(SELF_COL + rows, mask=row_ok, other=-1)
    pos_col = tl.load(POS_COL + rows, mask=row_ok, other=-1)
    x = _gram_tile(Z, rows, cols, row_ok, col_ok, D, stride_z, scale,
                   BLOCK, BLOCK_D, ACC, PRECISION, UPCAST)
    ok = _gram_unmasked(rows, cols, row_ok, col_ok, self_col, pos_col, cross, EXCLUDE_POS)
    xm = tl.where(ok, x, NEG_INF)
    tl.atomic_max(ROW_MAX + rows, tl.max(xm, axis=1), mask=row_ok)
    if bi != bj:
        tl.atomic_max(ROW_MAX + cols, tl.max(xm, axis=0), mask=col_ok)


@triton.jit(do_not_specialize=["cross"])
def _gram_bwd_kernel(Z, TILE_I, TILE_J, SELF_COL, POS_COL, SHIFT, LSE, G, DZ,
                     D, M, stride_z, stride_dz, scale, log_range, cross,
                     EXCLUDE_POS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                     GRAD_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """dz_I += scale H_IJ z_J and (I < J) dz_J += scale H_IJ^T z_I for one upper-triangle tile,
    H_ij = g_i P_ij + g_j P_ji recomputed from the saved lse."""
    pid = tl.program_id(0)
    bi = tl.load(TILE_I + pid)
    bj = tl.load(TILE_J + pid)
    rows = bi * BLOCK + tl.arange(0, BLOCK)
    cols = bj * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < M
    col_ok = cols < M
    self_col = tl.load(SELF_COL + rows, mask=row_ok, other=-1)
    pos_col = tl.load(POS_COL + rows, mask=row_ok, other=-1)
    c = tl.load(SHIFT)
    # Padding rows read lse = c (so c - lse = 0 keeps the tile's one-exp test) and g = 0.
    lse_r = tl.load(LSE + rows, mask=row_ok, other=c)
    lse_c = tl.load(LSE + cols, mask=col_ok, other=c)
    g_r = tl.load(G + rows, mask=row_ok, other=0.0)
    g_c = tl.load(G + cols, mask=col_ok, other=0.0)
    x = _gram_tile(Z, rows, cols, row_ok, col_ok, D, stride_z, scale,
                   BLOCK, BLOCK_D, ACC, PRECISION, UPCAST)
    ok = _gram_unmasked(rows, cols, row_ok, col_ok, self_col, pos_col, cross, EXCLUDE_POS)
    r_r = c - lse_r
    r_c = c - lse_c
    if tl.maximum(tl.max(r_r, axis=0), tl.max(r_c, axis=0)) <= log_range:
        # exp(c - lse) <= exp(log_range) stays finite: one exp per entry for both sides.
        u_r = g_r * tl.exp(r_r)
        u_c = g_c * tl.exp(r_c)
        h = tl.exp(tl.where(ok, x - c, NEG_INF)) * (u_r[:, None] + u_c[None, :])
    else:
        # A row whose sums underflowed at the shift c (forward's fallback rows): exact, two exps.
        h = (g_r[:, None] * tl.exp(tl.where(ok, x - lse_r[:, None], NEG_INF))
             + g_c[None, :] * tl.exp(tl.where(ok, x - lse_c[None, :], NEG_INF)))
    h = h * scale
    for d0 in range(0, D, BLOCK_DO):
        d = d0 + tl.arange(0, BLOCK_DO)
        d_ok = d < D
        z_j = tl.load(Z + cols.to(tl.int64)[:, None] * stride_z + d[None, :],
                      mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        part = tl.dot(h, z_j.to(ACC), input_precision=GRAD_PRECISION, out_dtype=ACC)
        tl.atomic_add(DZ + rows.to(tl.int64)[:, None] * stride_dz + d[None, :], part,
                      mask=row_ok[:, None] & d_ok[None, :])
        if bi != bj:
            z_i = tl.load(Z + rows.to(tl.int64)[:, None] * stride_z + d[None, :],
                          mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            part_t = tl.dot(tl.trans(h), z_i.to(ACC), input_precision=GRAD_PRECISION,
                            out_dtype=ACC)
            tl.atomic_add(DZ + cols.to(tl.int64)[:, None] * stride_dz + d[None, :], part_t,
                          mask=col_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Configuration: the one place that picks tiles, warps and stages (bench/static.py compiles
# exactly what the launchers below launch, through this function)
# ----------------------------------------------------------------------------------------------

KERNELS = ("lse_fwd", "lse_bwd_rows", "lse_bwd_cols", "sce_fwd", "sce_bwd",
           "gram_fwd", "gram_max", "gram_bwd")


def config(kernel: str, dtype: torch.dtype, d: int, cc: int | None) -> dict:
    """Launch configuration of one kernel of this family: the tile constexprs plus num_warps and
    num_stages, for compute capability ``cc`` (None: the CPU interpreter) and inputs of
    ``dtype`` with feature dimension ``d``.

    Precision: bfloat16 / float16 operands go to the tensor cores as they are; float32 operands
    use them too, through tf32x3 (three TF32 products, the float32-level error of the
    float32 reference). The backward keeps dX in float32 (g * softmax underflows float16 at large
    N) and multiplies it by the operands upcast to float32: TF32 for bf16/fp16 inputs (their
    values are exact in TF32), tf32x3 for float32.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel.startswith("gram_"):
        return _gram_config(kernel, dtype, d, cc)
    f32 = dtype == torch.float32
    precision = "tf32x3" if f32 else "tf32"  # "tf32" is ignored by bf16/fp16 dots
    grad_precision = "tf32x3" if f32 else "tf32"
    if cc is None:
        # The interpreter: every element is Python, so small tiles; the interpreter's bfloat16
        # dot multiplies raw bits (triton 3.9), so bfloat16 operands are widened first there.
        block_d = min(max(16, triton.next_power_of_2(d)), 64)
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, BLOCK_DO=block_d,
                    PRECISION=precision, GRAD_PRECISION=grad_precision,
                    UPCAST=dtype == torch.bfloat16, num_warps=4, num_stages=1)
    # GPU: feature chunks of 64 (32 for float32 with its three-product split), masks cover any d.
    # float32 keeps two more register copies of each operand (tf32x3's high and low parts),
    # so its tiles are narrower where ptxas would otherwise spill (bench/results/static).
    block_d = 32 if f32 else 64
    block_do = 32 if f32 else 64
    hopper = cc >= 90
    if kernel in ("lse_fwd", "sce_fwd"):
        # Flash-style forward: 128 rows x 64 columns; Hopper's wgmma wants 128-row tiles on
        # two warpgroups (8 warps). SCE streams two logit tiles (student and teacher).
        bm, bn = 128, 64
        if kernel == "sce_fwd" and f32 and not hopper:
            bn = 32
        warps = 8
        stages = 3 if hopper else 2
    else:
        # Backward: the logit tile plus a (rows x BLOCK_DO) float32 accumulator per program.
        # float32 takes sm_80's 64 x 32 tile on 4 warps on Hopper too: tf32x3's split operands
        # beside a 128-row tile reached 255 registers and spilled (lse_bwd_cols, sce_bwd) under
        # Triton's own ptxas options (bench/results/static, triton 3.6 and 3.9).
        bm, bn = ((128, 64) if hopper else (64, 64)) if not f32 else (64, 32)
        warps = 8 if hopper and not f32 else 4
        stages = 2
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DO=block_do,
                PRECISION=precision, GRAD_PRECISION=grad_precision, UPCAST=False,
                num_warps=warps, num_stages=stages)


def _gram_config(kernel: str, dtype: torch.dtype, d: int, cc: int | None) -> dict:
    """The symmetric schedule's square tiles (row block I and column block J index one
    partition). Products as in config(); float64 keeps exact (ieee) float64 products."""
    f64 = dtype == torch.float64
    f32 = dtype == torch.float32
    precision = "ieee" if f64 else ("tf32x3" if f32 else "tf32")
    acc = tl.float64 if f64 else tl.float32
    if cc is None:
        # The interpreter: 16-wide tiles and feature chunks, so small M and D span several.
        return dict(BLOCK=16, BLOCK_D=16, BLOCK_DO=16, ACC=acc, PRECISION=precision,
                    GRAD_PRECISION=precision, UPCAST=dtype == torch.bfloat16,
                    num_warps=4, num_stages=1)
    hopper = cc >= 90
    # Figures from Triton's own ptxas run (triton 3.9 and 3.6, M = 2048, D = 256).
    if f64:
        # A double takes two registers and has no wgmma (mma.sync on both targets): 32 x 32 on
        # 4 warps. The forward on sm_90 spilled 8 bytes at 2 stages under triton 3.6 (96
        # registers): one stage there, as kernels/dino.py found.
        block, block_d, block_do, warps = 32, 32, 32, 4
        stages = 2 if kernel == "gram_bwd" else 1
    elif kernel != "gram_bwd":
        # One tile per program: 128 x 128 on two warpgroups. float32 (tf32x3's split operands)
        # on sm_80 spilled 2000 bytes with 32-wide feature chunks, none with 16.
        block, warps = 128, 8
        block_d = 64 if not f32 else (32 if hopper else 16)
        block_do = block_d
        stages = 3 if hopper else 2
    else:
        # The recomputed tile H stays live across the feature loop beside one product per side:
        # 128-row tiles reached 255 registers and spilled (bf16 128-688 bytes on sm_90, float32
        # 48-1120), so 64 (float32 on sm_80: 32) on 8 warps.
        block = 32 if f32 and not hopper else 64
        block_d = block_do = 32 if f32 else 64
        warps = 4 if block == 32 else 8
        stages = 2
    return dict(BLOCK=block, BLOCK_D=block_d, BLOCK_DO=block_do, ACC=acc, PRECISION=precision,
                GRAD_PRECISION=precision, UPCAST=False, num_warps=warps, num_stages=stages)


def _pick(cfg: dict, *names: str) -> dict:
    return {k: cfg[k] for k in names + ("num_warps", "num_stages")}


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_IDX = (torch.int32, torch.int64)


def _check_operands(names, tensors) -> None:
    """Row-major 2-D operands of one floating dtype, one device and one feature dimension."""
    first = tensors[0]
    for name, t in zip(names, tensors):
        check_tensor(name, t, dim=2, dtypes=_DTYPES)  # float64: "use the torch backend"
        if t.dtype != first.dtype:
            raise UnsupportedDtype(f"{name} must have the dtype of {names[0]} ({first.dtype}), got "
                            f"{t.dtype} (use the torch backend for float64)")
        if t.device != first.device:
            raise ValueError(f"{name} must be on {first.device}, got {t.device}")
        if t.shape[1] != first.shape[1]:
            raise ValueError(f"{name} must have {first.shape[1]} columns like {names[0]}, got "
                             f"shape {tuple(t.shape)}")


def _check_vec(name: str, t, length: int, device) -> None:
    check_tensor(name, t, dim=1, device=device, shape=(length,),
                 dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16))


def lse_forward(a, b, self_col, pos_col, scale: float, split: int, exclude_pos: bool,
                weighted: bool, col_stats: bool):
    """Row statistics of X = scale * a @ b.T; see the module docstring. Returns
    (lse0, lse1, wmean, col_lse), float32, with the unused ones empty."""
    _check_operands(("a", "b"), (a, b))
    m, c, d = a.shape[0], b.shape[0], a.shape[1]
    # self_col / pos_col are only compared with column numbers, never used as addresses.
    check_tensor("self_col", self_col, dim=1, dtypes=_IDX, device=a.device, shape=(m,))
    check_tensor("pos_col", pos_col, dim=1, dtypes=_IDX, device=a.device, shape=(m,))
    check_range("split", split, 0, c)
    a, b = a.contiguous(), b.contiguous()
    self_col, pos_col = self_col.contiguous(), pos_col.contiguous()
    cfg = config("lse_fwd", a.dtype, d, target(a.device))
    has_split = split < c
    f32 = dict(dtype=torch.float32, device=a.device)
    lse0 = torch.empty(m, **f32)
    lse1 = torch.empty(m if has_split else 0, **f32)
    wmean = torch.empty(m if weighted else 0, **f32)
    n_col_tiles = triton.cdiv(c, cfg["BLOCK_N"])
    col_m = torch.full((c if col_stats else 1,), float("-inf"), **f32)
    col_l = torch.zeros(c if col_stats else 1, **f32)
    lock = torch.zeros(n_col_tiles if col_stats else 1, dtype=torch.int32, device=a.device)
    launch(_lse_fwd_kernel, (triton.cdiv(m, cfg["BLOCK_M"]),),
           a, b, self_col, pos_col, lse0, lse1 if has_split else lse0,
           wmean if weighted else lse0, col_m, col_l, lock,
           m, c, d, a.stride(0), b.stride(0), scale, split,
           EXCLUDE_POS=exclude_pos, SPLIT=has_split, WEIGHTED=weighted, COL_STATS=col_stats,
           **_pick(cfg, "PRECISION", "UPCAST", "BLOCK_M", "BLOCK_N", "BLOCK_D"))
    col_lse = (col_m + col_l.log()) if col_stats else torch.empty(0, **f32)
    return lse0, lse1, wmean, col_lse


def lse_backward(a, b, self_col, pos_col, scale: float, split: int, exclude_pos: bool,
                 lse0, lse1, col_lse, g0, g1, g_col, need_da: bool = True, need_db: bool = True):
    """(da, db) of the statistics' incoming gradients (g0 for lse0, g1 for lse1, g_col for
    col_lse), recomputing the tiles; no M x C buffer."""
    _check_operands(("a", "b"), (a, b))
    m, c, d = a.shape[0], b.shape[0], a.shape[1]
    check_tensor("self_col", self_col, dim=1, dtypes=_IDX, device=a.device, shape=(m,))
    check_tensor("pos_col", pos_col, dim=1, dtypes=_IDX, device=a.device, shape=(m,))
    check_range("split", split, 0, c)
    has_split = split < c
    col_grad = col_lse.numel() > 0
    _check_vec("lse0", lse0, m, a.device)
    _check_vec("g0", g0, m, a.device)
    if has_split:
        _check_vec("lse1", lse1, m, a.device)
        _check_vec("g1", g1, m, a.device)
    if col_grad:
        _check_vec("col_lse", col_lse, c, a.device)
        _check_vec("g_col", g_col, c, a.device)
    a, b = a.contiguous(), b.contiguous()
    self_col, pos_col = self_col.contiguous(), pos_col.contiguous()
    lse0 = lse0.contiguous().float()
    g0 = g0.contiguous().float()
    g1 = g1.contiguous().float() if has_split else g0
    lse1 = lse1.contiguous().float() if has_split else lse0
    g_col = g_col.contiguous().float() if col_grad else g0
    col_lse = col_lse.contiguous().float() if col_grad else lse0
    cc = target(a.device)
    flags = dict(EXCLUDE_POS=exclude_pos, SPLIT=has_split, COL_GRAD=col_grad)
    names = ("PRECISION", "UPCAST", "GRAD_PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DO")
    da = db = None
    if need_da:
        cfg = config("lse_bwd_rows", a.dtype, d, cc)
        da = torch.empty_like(a)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_DO"]))
        launch(_lse_bwd_rows_kernel, grid,
               a, b, self_col, pos_col, lse0, lse1, g0, g1, col_lse, g_col, da,
               m, c, d, a.stride(0), b.stride(0), da.stride(0), scale, split, **flags,
               **_pick(cfg, *names))
    if need_db:
        cfg = config("lse_bwd_cols", a.dtype, d, cc)
        db = torch.empty_like(b)
        grid = (triton.cdiv(c, cfg["BLOCK_N"]), triton.cdiv(d, cfg["BLOCK_DO"]))
        launch(_lse_bwd_cols_kernel, grid,
               a, b, self_col, pos_col, lse0, lse1, g0, g1, col_lse, g_col, db,
               m, c, d, a.stride(0), b.stride(0), db.stride(0), scale, split, **flags,
               **_pick(cfg, *names))
    return da, db


def sce_forward(q, k, cols, self_col, scale_s: float, scale_t: float):
    """(lse_student, lse_teacher, teacher-weighted mean of the student logits), float32."""
    _check_operands(("q", "k", "cols"), (q, k, cols))
    m, c, d = q.shape[0], cols.shape[0], q.shape[1]
    if k.shape[0] != m:
        raise ValueError(f"k must have the {m} rows of q, got shape {tuple(k.shape)}")
    check_tensor("self_col", self_col, dim=1, dtypes=_IDX, device=q.device, shape=(m,))
    q, k, cols, self_col = q.contiguous(), k.contiguous(), cols.contiguous(), self_col.contiguous()
    cfg = config("sce_fwd", q.dtype, d, target(q.device))
    f32 = dict(dtype=torch.float32, device=q.device)
    lse_s, lse_t, wmean = (torch.empty(m, **f32) for _ in range(3))
    launch(_sce_fwd_kernel, (triton.cdiv(m, cfg["BLOCK_M"]),),
           q, k, cols, self_col, lse_s, lse_t, wmean, m, c, d,
           q.stride(0), k.stride(0), cols.stride(0), scale_s, scale_t,
           **_pick(cfg, "PRECISION", "UPCAST", "BLOCK_M", "BLOCK_N", "BLOCK_D"))
    return lse_s, lse_t, wmean


def sce_backward(q, k, cols, self_col, scale_s: float, scale_t: float, lse_s, lse_t, g_lse, g_w):
    _check_operands(("q", "k", "cols"), (q, k, cols))
    m, c, d = q.shape[0], cols.shape[0], q.shape[1]
    if k.shape[0] != m:
        raise ValueError(f"k must have the {m} rows of q, got shape {tuple(k.shape)}")
    check_tensor("self_col", self_col, dim=1, dtypes=_IDX, device=q.device, shape=(m,))
    for name, t in (("lse_s", lse_s), ("lse_t", lse_t), ("g_lse", g_lse), ("g_w", g_w)):
        _check_vec(name, t, m, q.device)
    q, k, cols, self_col = q.contiguous(), k.contiguous(), cols.contiguous(), self_col.contiguous()
    cfg = config("sce_bwd", q.dtype, d, target(q.device))
    dq = torch.empty_like(q)
    launch(_sce_bwd_kernel, (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_DO"])),
           q, k, cols, self_col, lse_s.contiguous().float(), lse_t.contiguous().float(),
           g_lse.contiguous().float(), g_w.contiguous().float(),
           dq, m, c, d, q.stride(0), k.stride(0), cols.stride(0), dq.stride(0), scale_s, scale_t,
           **_pick(cfg, "PRECISION", "UPCAST", "GRAD_PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_D",
                   "BLOCK_DO"))
    return dq


_GRAM_DTYPES = _DTYPES + (torch.float64,)
# Largest c - lse (c the shift, lse a row's log-sum-exp) at which the shifted sums keep every
# term that matters: a term exp(X_ij - c) underflows below exp(-87) (float32) / exp(-708)
# (float64), i.e. its share exp(X_ij - lse_i) < exp(-87 + LOG_RANGE); with 40 that is e^-47
# per term, under float32's rounding for any M < 2^60 terms (e^-308 for float64 at 400).
_LOG_RANGE = {torch.float32: 40.0, torch.float64: 400.0}
_GRAM_NAMES = ("ACC", "PRECISION", "UPCAST", "BLOCK", "BLOCK_D")


def _check_cross(cross, m: int) -> int:
    """cross: 0 (every pair an entry) or 0 < cross < m (only the pairs across it)."""
    # an integer (bool is not a row count), any integer type (Python, NumPy, 0-dim tensor)
    value = None
    if not isinstance(cross, bool) and hasattr(cross, "__index__"):
        try:
            value = cross.__index__()
        except TypeError:  # e.g. a floating 0-dim tensor
            pass
    if value is None or not (value == 0 or 0 < value < m):
        raise ValueError(f"cross: expected 0 or 0 < cross < {m}, got {cross!r}")
    return value


def _gram_args(z, self_col, pos_col, cross):
    check_tensor("z", z, dim=2, dtypes=_GRAM_DTYPES)
    m = z.shape[0]
    cross = _check_cross(cross, m)
    # self_col / pos_col are only compared with column numbers, never used as addresses.
    check_tensor("self_col", self_col, dim=1, dtypes=_IDX, device=z.device, shape=(m,))
    check_tensor("pos_col", pos_col, dim=1, dtypes=_IDX, device=z.device, shape=(m,))
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    return z.contiguous(), self_col.contiguous(), pos_col.contiguous(), acc, cross


def _upper_tiles(m: int, block: int, device, cross: int = 0):
    """(TILE_I, TILE_J): the upper-triangle tile pairs I <= J of an m x m matrix, int32; in
    cross mode only those holding a pair across ``cross``: rows I0 < cross (I < cdiv(cross,
    block)) and columns J1 > cross (J >= cross // block)."""
    nb = triton.cdiv(m, block)
    i_end, j_start = (triton.cdiv(cross, block), cross // block) if cross else (nb, 0)
    return _upper_tile_table(nb, i_end, j_start, torch.device(device))


@functools.lru_cache(maxsize=64)
def _upper_tile_table(nb: int, i_end: int, j_start: int, device: torch.device):
    # built once per (tile count, cross block, device): the forward and backward of every step
    # reuse it (read only) instead of an index kernel and two allocations per launch
    if (i_end, j_start) == (nb, 0):
        ij = torch.triu_indices(nb, nb, device=device, dtype=torch.int32)
    else:
        # selected on the host (the meta device of bench.static has no values to select by)
        ij = torch.triu_indices(nb, nb, dtype=torch.int32)
        ij = ij[:, (ij[0] < i_end) & (ij[1] >= j_start)].to(device)
    return ij[0].contiguous(), ij[1].contiguous()


def _gram_shift(z, scale: float, acc):
    """c = |scale| max_k |z_k|^2 >= |X_ij| for every pair, as a 1-element device tensor (no host
    synchronisation); |scale| for L2-normalised rows."""
    norm = torch.linalg.vector_norm(z, dim=1, dtype=acc).amax()
    return (abs(scale) * norm * norm).reshape(1)


def _deterministic(z) -> bool:
    """Under torch.use_deterministic_algorithms the gram launches' float atomics (last bits vary
    between runs) give way to the row-block kernels, which sum in a fixed order (float64 has no
    row-block kernel and keeps the gram launches)."""
    return torch.are_deterministic_algorithms_enabled() and z.dtype != torch.float64


def _cross_blocks(z, pos_col, cross: int):
    """Deterministic mode in cross mode: the two rectangular blocks X_qk = scale q k^T (rows
    < cross) and X_kq as operands of the row-block kernels, with pos_col renumbered to each
    block's columns (a same-side position becomes negative: no column; self_col never points
    across, so it is all -1)."""
    q, k = z[:cross], z[cross:]
    pos_q, pos_k = pos_col[:cross] - cross, pos_col[cross:]
    none = torch.full_like(pos_col, -1)
    return q, k, none[:cross], pos_q, none[cross:], pos_k


def gram_lse_forward(z, self_col, pos_col, scale: float, exclude_pos: bool, weighted: bool,
                     cross: int = 0):
    """(lse, wmean) of the rows of X = scale * z @ z.T with symmetric masks (self_col[i] in
    (i, -1); pos_col[pos_col[i]] = i), wmean empty unless weighted; float32 (float64 for
    float64 z). Upper-triangle tiles (see "Symmetric schedule" above). cross > 0: only the
    pairs (i < cross) != (j < cross) are entries (symmetric InfoNCE on z = [q; k])."""
    z, self_col, pos_col, acc, cross = _gram_args(z, self_col, pos_col, cross)
    m, d = z.shape
    if _deterministic(z) and cross:
        # q -> k rows over k's columns, k -> q rows over q's: the cross blocks only, each row
        # block summed in a fixed order (no column statistics: those merge under a lock)
        q, k, sc_q, pos_q, sc_k, pos_k = _cross_blocks(z, pos_col, cross)
        lse_q, _, w_q, _ = lse_forward(q, k, sc_q, pos_q, scale, m - cross, exclude_pos,
                                       weighted, False)
        lse_k, _, w_k, _ = lse_forward(k, q, sc_k, pos_k, scale, cross, exclude_pos, weighted,
                                       False)
        return torch.cat([lse_q, lse_k]), torch.cat([w_q, w_k])
    if _deterministic(z):
        lse, _, wmean, _ = lse_forward(z, z, self_col, pos_col, scale, m, exclude_pos, weighted,
                                       False)
        return lse, wmean
    opts = dict(dtype=acc, device=z.device)
    if m == 0:
        return torch.empty(0, **opts), torch.empty(0, **opts)
    cfg = config("gram_fwd", z.dtype, d, target(z.device))
    tile_i, tile_j = _upper_tiles(m, cfg["BLOCK"], z.device, cross)
    grid = (tile_i.numel(),)
    shift = _gram_shift(z, scale, acc)
    flag = torch.zeros(1, dtype=torch.int32, device=z.device)
    s = torch.zeros(m, **opts)
    w = torch.zeros(m if weighted else 1, **opts)
    args = (z, tile_i, tile_j, self_col, pos_col)
    sizes = (d, m, z.stride(0), scale, cross)
    launch(_gram_fwd_kernel, grid, *args, shift, flag, s, w, *sizes,
           EXCLUDE_POS=exclude_pos, WEIGHTED=weighted, ROW_SHIFT=False,
           **_pick(cfg, *_GRAM_NAMES))
    # Rows whose shifted sum may have lost terms to underflow: exact fallback, on the device.
    flag = (s < math.exp(-_LOG_RANGE[acc])).any().to(torch.int32).reshape(1)
    row_max = torch.full((m,), float("-inf"), **opts)
    cfg_max = config("gram_max", z.dtype, d, target(z.device))
    launch(_gram_max_kernel, grid, *args, flag, row_max, *sizes, EXCLUDE_POS=exclude_pos,
           **_pick(cfg_max, *_GRAM_NAMES))
    s2 = torch.zeros(m, **opts)
    w2 = torch.zeros(m if weighted else 1, **opts)
    launch(_gram_fwd_kernel, grid, *args, row_max, flag, s2, w2, *sizes,
           EXCLUDE_POS=exclude_pos, WEIGHTED=weighted, ROW_SHIFT=True,
           **_pick(cfg, *_GRAM_NAMES))
    use_max = flag.bool()
    lse = torch.where(use_max, row_max + s2.log(), shift + s.log())
    wmean = torch.where(use_max, w2 / s2, w / s) if weighted else torch.empty(0, **opts)
    return lse, wmean


def gram_lse_backward(z, self_col, pos_col, scale: float, exclude_pos: bool, lse, g,
                      cross: int = 0):
    """dz = scale * (G + G^T) z, G_ij = g_i softmax(X)_ij over the entries (cross > 0: the
    pairs across it only), in z's dtype: each upper-triangle tile recomputed once for its rows
    and its transpose's (float32 / float64 atomic accumulation, so the last bits may vary
    between runs)."""
    z, self_col, pos_col, acc, cross = _gram_args(z, self_col, pos_col, cross)
    m, d = z.shape
    _check_vec("lse", lse, m, z.device)
    _check_vec("g", g, m, z.device)
    if m == 0:
        return torch.zeros_like(z)
    if _deterministic(z) and cross:
        # dz_q = scale (G_qk + G_kq^T) k and dz_k = scale (G_kq + G_qk^T) q: one row-block pass
        # over X_qk with the k rows' softmax as its column term, dq row-parallel, dk
        # column-parallel (no atomics)
        q, k, sc_q, pos_q, _, _ = _cross_blocks(z, pos_col, cross)
        empty = lse[:0]
        dq, dk = lse_backward(q, k, sc_q, pos_q, scale, m - cross, exclude_pos, lse[:cross],
                              empty, lse[cross:], g[:cross], empty, g[cross:])
        return torch.cat([dq, dk]).to(z.dtype)
    if _deterministic(z):
        empty = lse[:0]
        dz, _ = lse_backward(z, z, self_col, pos_col, scale, m, exclude_pos, lse, empty, lse, g,
                             empty, g, need_da=True, need_db=False)
        return dz.to(z.dtype)
    cfg = config("gram_bwd", z.dtype, d, target(z.device))
    tile_i, tile_j = _upper_tiles(m, cfg["BLOCK"], z.device, cross)
    dz = torch.zeros(m, d, dtype=acc, device=z.device)
    launch(_gram_bwd_kernel, (tile_i.numel(),), z, tile_i, tile_j, self_col, pos_col,
           _gram_shift(z, scale, acc), lse.contiguous().to(acc), g.contiguous().to(acc), dz,
           d, m, z.stride(0), dz.stride(0), scale, _LOG_RANGE[acc], cross,
           EXCLUDE_POS=exclude_pos,
           **_pick(cfg, *_GRAM_NAMES, "GRAD_PRECISION", "BLOCK_DO"))
    return dz.to(z.dtype)


class TritonContrastive:
    """The triton entry of the family's table (fastssl/backends/interfaces.py): the launches
    above; no same-pass methods (dB from every row block would need atomics across programs);
    the symmetric schedule's gram methods (which do accumulate through atomics)."""
    lse_forward = staticmethod(lse_forward)
    lse_backward = staticmethod(lse_backward)
    sce_forward = staticmethod(sce_forward)
    sce_backward = staticmethod(sce_backward)
    gram_lse_forward = staticmethod(gram_lse_forward)
    gram_lse_backward = staticmethod(gram_lse_backward)
