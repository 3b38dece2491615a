"""Triton kernels for the SwAV Sinkhorn (log domain; see fastssl/ops/swav.py).

Two passes over the (B, K) scores, both read-only on the scores:

* ``colstats``: per block of rows and of prototypes, the column max m and sum of exp(x - m)
  (x = scores / eps), merged over row blocks into logsumexp_b x[b, k] = M + log S.
* ``rowpass``: per block of rows, the row logsumexp of x + a (online over prototype chunks),
  then either the codes softmax_k(x + a) or their per-block column sums.

and, for the loss, ``swav_cross_entropy``: per block of rows, -<q, log_softmax(s / T)> (online
logsumexp over prototype chunks) and, when asked, its gradient (softmax(s / T) sum q - q) / T.

Compute is float32 (float64 for float64 scores) whatever the input dtype; every exponent is
max-shifted, so no epsilon or input range overflows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastssl._validation import accumulation_dtype
from fastssl.backends.torch.swav import log_domain_sinkhorn, scaled

from ._launch import check_range, check_tensor, launch, target


@triton.jit
def _colstats_kernel(s_ptr, eps_ptr, m_ptr, l_ptr, B, K,
                     ROWS: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Offsets in 64 bits: B * K passes 2**31 at 2**31 scores (e.g. B = 1M, K = 3000).
    rows = (pid_r * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < B
    cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    eps = tl.load(eps_ptr).to(ACC)
    s = tl.load(s_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(ACC)
    x = tl.where(mask, s / eps, float("-inf"))
    m = tl.max(x, axis=0)
    # every valid column has at least one valid row here; padded columns get a finite shift
    m_safe = tl.where(cmask, m, 0.0)
    e = tl.where(mask, tl.exp(x - m_safe[None, :]), 0.0)
    l = tl.sum(e, axis=0)
    part = pid_r.to(tl.int64) * K
    tl.store(m_ptr + part + cols, m_safe, mask=cmask)
    tl.store(l_ptr + part + cols, l, mask=cmask)


@triton.jit
def _rowpass_kernel(s_ptr, eps_ptr, a_ptr, out_ptr, B, K,
                    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_CODES: tl.constexpr,
                    ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    eps = tl.load(eps_ptr).to(ACC)
    m = tl.full([ROWS], float("-inf"), ACC)
    l = tl.zeros([ROWS], ACC)
    # online logsumexp over prototype chunks; padded rows see finite values and are dropped below
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        mask = rmask[:, None] & cmask[None, :]
        s = tl.load(s_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(ACC)
        a = tl.load(a_ptr + cols, mask=cmask, other=0.0).to(ACC)
        x = tl.where(cmask[None, :], s / eps + a[None, :], float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(l)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        mask = rmask[:, None] & cmask[None, :]
        s = tl.load(s_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(ACC)
        a = tl.load(a_ptr + cols, mask=cmask, other=0.0).to(ACC)
        p = tl.where(mask, tl.exp(s / eps + a[None, :] - lse[:, None]), 0.0)
        if WRITE_CODES:
            tl.store(out_ptr + rows[:, None] * K + cols[None, :], p, mask=mask)
        else:
            tl.store(out_ptr + pid * K + cols, tl.sum(p, axis=0), mask=cmask)


@triton.jit
def _swav_ce_kernel(s_ptr, q_ptr, t_ptr, loss_ptr, grad_ptr, B, K,
                    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_GRAD: tl.constexpr,
                    ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    temp = tl.load(t_ptr).to(ACC)
    m = tl.full([ROWS], float("-inf"), ACC)
    l = tl.zeros([ROWS], ACC)
    q_sum = tl.zeros([ROWS], ACC)
    qz = tl.zeros([ROWS], ACC)
    # padded rows load zeros (finite, dropped at the store); padded columns are -inf
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * K + cols[None, :]
        z = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC) / temp
        q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(ACC)
        x = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
        q_sum += tl.sum(q, axis=1)
        qz += tl.sum(q * z, axis=1)
    lse = m + tl.log(l)
    # One use of the loop's q_sum (zero on padded rows, which no store keeps): triton 3.6's
    # thread-locality pass asserts on a loop-carried row sum used twice (the loss and the
    # gradient pass), and the gradient variant did not compile (bench/results/static).
    q_sum = tl.where(rmask, q_sum, 0.0)
    tl.store(loss_ptr + rows, q_sum * lse - qz, mask=rmask)
    if WRITE_GRAD:
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < K
            mask = rmask[:, None] & cmask[None, :]
            offs = rows[:, None] * K + cols[None, :]
            z = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC) / temp
            q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(ACC)
            g = (tl.exp(z - lse[:, None]) * q_sum[:, None] - q) / temp
            tl.store(grad_ptr + offs, g, mask=mask)


def _acc(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


KERNELS = ("colstats", "rowpass", "cross_entropy")
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def config(kernel: str, dtype: torch.dtype, B: int, K: int, cc: int | None) -> dict:
    """Launch configuration (ROWS, BLOCK_K, num_warps, num_stages) of one kernel of this family
    for compute capability ``cc`` (None: the CPU interpreter), scores of ``dtype`` and shape
    (B, K).

    Rows per program: enough programs to fill a GPU at SwAV's small local batches, few partial
    rows at large B. The (ROWS, BLOCK_K) tile is capped so that a thread holds at most 16 values
    of each live tile (the cross-entropy keeps scores, targets and their exponentials: 32 x 256
    tiles spilled 2 KB per thread on sm_80 and sm_90).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    block_k = max(16, min(256, triton.next_power_of_2(K)))
    if kernel == "colstats":
        rows = min(32, triton.next_power_of_2(B))
        block_k = min(128, block_k)
    else:
        rows = max(1, min(32, triton.next_power_of_2(triton.cdiv(B, 128))))
    if cc is None:
        return dict(ROWS=rows, BLOCK_K=block_k, num_warps=4, num_stages=1)
    tile_cap = 2048 if kernel == "cross_entropy" else 4096
    if dtype == torch.float64:
        tile_cap //= 2
    while rows * block_k > tile_cap and block_k > 16:
        block_k //= 2
    warps = 8 if rows * block_k >= 2048 else 4
    if kernel == "cross_entropy":
        # At most one column per thread along a row of the tile: with more (ROWS <= 4, BLOCK_K =
        # 256, 4 warps: SwAV's B = 256, K = 3000) Triton 3.6's thread-locality pass fails on the
        # gradient loop ("PassManager::run failed", sm_80 and sm_90); 3.9 compiles either.
        warps = max(warps, min(8, block_k // 32))
    return dict(ROWS=rows, BLOCK_K=block_k, num_warps=warps, num_stages=2)


def _check_scores(scores) -> None:
    check_tensor("scores", scores, dim=2, dtypes=_DTYPES)
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty (B, K) matrix, got {tuple(scores.shape)}")


def _eps_tensor(eps: float, like: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    # epsilon goes in as a tensor: a Python float argument would be rounded to float32
    return torch.full((1,), eps, dtype=acc, device=like.device)


def colstats(scores: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, S) with logsumexp_b scores[b, k] / eps = M[k] + log S[k]; M the column max."""
    _check_scores(scores)
    check_range("eps", eps, 0.0)
    scores = scores.contiguous()
    B, K = scores.shape
    tl_acc, acc = _acc(scores.dtype)
    cfg = config("colstats", scores.dtype, B, K, target(scores.device))
    n_r = triton.cdiv(B, cfg["ROWS"])
    m_part = torch.empty((n_r, K), dtype=acc, device=scores.device)
    l_part = torch.empty((n_r, K), dtype=acc, device=scores.device)
    launch(_colstats_kernel, (n_r, triton.cdiv(K, cfg["BLOCK_K"])),
           scores, _eps_tensor(eps, scores, acc), m_part, l_part, B, K, ACC=tl_acc, **cfg)
    M = m_part.amax(dim=0)
    S = (l_part * torch.exp(m_part - M)).sum(dim=0)
    return M, S


def rowpass(scores: torch.Tensor, eps: float, a: torch.Tensor, write_codes: bool) -> torch.Tensor:
    """softmax_k(scores / eps + a) per row: the (B, K) codes, or their (K,) column sums."""
    _check_scores(scores)
    check_range("eps", eps, 0.0)
    scores = scores.contiguous()
    B, K = scores.shape
    tl_acc, acc = _acc(scores.dtype)
    check_tensor("a", a, dim=1, dtypes=_DTYPES, device=scores.device, shape=(K,))
    a = a.contiguous()
    cfg = config("rowpass", scores.dtype, B, K, target(scores.device))
    n_r = triton.cdiv(B, cfg["ROWS"])
    out = torch.empty((B, K) if write_codes else (n_r, K), dtype=acc, device=scores.device)
    launch(_rowpass_kernel, (n_r,), scores, _eps_tensor(eps, scores, acc), a, out, B, K,
           WRITE_CODES=write_codes, ACC=tl_acc, **cfg)
    return out if write_codes else out.sum(dim=0)


def swav_cross_entropy(scores: torch.Tensor, targets: torch.Tensor, temperature: float,
                       compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(-sum_b <targets[b], log_softmax(scores[b] / T)>, its gradient in scores or an empty
    tensor); targets in the accumulation dtype, both contiguous (B, K)."""
    _check_scores(scores)
    B, K = scores.shape
    tl_acc, acc = _acc(scores.dtype)
    check_tensor("targets", targets, dim=2, dtypes=_DTYPES, device=scores.device, shape=(B, K))
    check_range("temperature", temperature, 0.0)
    scores, targets = scores.contiguous(), targets.contiguous()
    cfg = config("cross_entropy", scores.dtype, B, K, target(scores.device))
    n_r = triton.cdiv(B, cfg["ROWS"])
    row_loss = torch.empty((B,), dtype=acc, device=scores.device)
    grad = torch.empty((B, K) if compute_grad else (0,), dtype=acc, device=scores.device)
    launch(_swav_ce_kernel, (n_r,), scores, targets, _eps_tensor(temperature, scores, acc),
           row_loss, grad, B, K, WRITE_GRAD=compute_grad, ACC=tl_acc, **cfg)
    return row_loss.sum(), grad


class TritonSwav:
    """The triton entry of the family's table (fastssl/backends/interfaces.py): the log-domain
    Sinkhorn on the passes above, and the cross-entropy kernel."""

    @staticmethod
    def sinkhorn(scores, epsilon, iterations, distributed):
        return log_domain_sinkhorn(colstats, lambda x, e, a, w: rowpass(x, e, a.contiguous(), w),
                                   scores.contiguous(), epsilon, iterations, distributed)

    @staticmethod
    def cross_entropy(scores, targets, temperature, compute_grad, grad_scale=None):
        acc = accumulation_dtype(scores)
        loss, grad = swav_cross_entropy(scores.contiguous(), targets.to(acc).contiguous(),
                                        temperature, compute_grad)
        return loss, scaled(grad, grad_scale) if compute_grad else grad
