"""Triton kernels of the DINO family (see fastssl/ops/dino.py).

* ``nearest_neighbor``: KoLeo's neighbour search. Per block of rows, a running maximum and
  argmax of the inner products with every other row, tile by tile (tl.dot over feature
  chunks): nothing N x M is written, only one index per row.
* ``teacher_softmax``: softmax((t - center) / T) per row is SwAV's row pass
  (kernels/swav.py ``rowpass``) with the prototype offsets a = -center / T, reused as it is.

Inner products in IEEE float32 (float64 for float64): a TF32 product could pick another
neighbour than the reference where two are close.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import swav as _swav
from ._launch import check_range, check_tensor, launch, target


@triton.jit
def _nearest_kernel(x_ptr, xa_ptr, out_ptr, N, M, D, offset,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    ACC: tl.constexpr):
    pid = tl.program_id(0)
    # offsets in 64 bits: N * D passes 2**31 for large gathered batches
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < N
    best = tl.full([BLOCK_M], float("-inf"), ACC)
    arg = tl.zeros([BLOCK_M], tl.int64)
    for n0 in range(0, M, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        cmask = cols < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            a = tl.load(x_ptr + rows[:, None] * D + ds[None, :],
                        mask=rmask[:, None] & dmask[None, :], other=0.0)
            b = tl.load(xa_ptr + cols[:, None] * D + ds[None, :],
                        mask=cmask[:, None] & dmask[None, :], other=0.0)
            acc += tl.dot(a, tl.trans(b), input_precision="ieee")
        own = cols[None, :] == rows[:, None] + offset
        s = tl.where(cmask[None, :] & (~own), acc, float("-inf"))
        tile_max = tl.max(s, axis=1)
        # the first column among ties (tl.argmax breaks ties to the left); strictly greater
        # across tiles keeps the earlier tile's index, as torch.argmax
        tile_arg = tl.argmax(s, axis=1).to(tl.int64) + n0
        better = tile_max > best
        arg = tl.where(better, tile_arg, arg)
        best = tl.where(better, tile_max, best)
    tl.store(out_ptr + rows, arg, mask=rmask)


KERNELS = ("nearest",)
_DTYPES = (torch.float32, torch.float64)


def config(kernel: str, dtype: torch.dtype, N: int, D: int, cc: int | None) -> dict:
    """Launch configuration of one kernel for compute capability ``cc`` (None: interpreter).

    32 rows x 64 columns of inner products per step (2,048 accumulators), the features in
    chunks of up to 64 (32 for float32 on a GPU); float64 halves the column tile."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    block_d = max(16, min(64, triton.next_power_of_2(D)))
    block_n = 32 if dtype == torch.float64 else 64
    block_m = 16 if N <= 16 else 32
    if cc is None:
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
                    num_stages=1)
    # The IEEE float32 product runs on FMAs with both operand tiles in registers: 32 x 64
    # inner products over 64-wide chunks at 4 warps took 255 registers and spilled (sm_80:
    # 328 bytes), at 8 warps with 32-wide chunks and 2 stages still 16 bytes on sm_80; one
    # stage does not spill (python -m bench.static).
    warps, stages = 4, 2
    if dtype != torch.float64 and block_m * block_n >= 2048:
        warps, stages, block_d = 8, 1, min(block_d, 32)
    elif dtype == torch.float64 and block_m > 16:
        # float64 32 x 32 over 64-wide chunks, 2 stages: 12 bytes spilled on sm_90 under
        # triton 3.6 (none under 3.9); 32-wide chunks in one stage do not spill under either.
        stages, block_d = 1, min(block_d, 32)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
                num_stages=stages)


def nearest_neighbor(x: torch.Tensor, x_all: torch.Tensor, offset: int) -> torch.Tensor:
    """For each row i of x (N, D) the index in x_all (M, D) of its largest inner product,
    row offset + i excluded; int64 (N,)."""
    check_tensor("x", x, dim=2, dtypes=_DTYPES)
    N, D = x.shape
    check_tensor("x_all", x_all, dim=2, dtypes=(x.dtype,), device=x.device, shape=(None, D))
    M = x_all.shape[0]
    check_range("x_all rows", M, 2)
    check_range("offset", offset, 0, M - N)
    x, x_all = x.contiguous(), x_all.contiguous()
    tl_acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    cfg = config("nearest", x.dtype, N, D, target(x.device))
    out = torch.empty((N,), dtype=torch.int64, device=x.device)
    launch(_nearest_kernel, (triton.cdiv(N, cfg["BLOCK_M"]),), x, x_all, out, N, M, D,
           int(offset), ACC=tl_acc, **cfg)
    return out


def teacher_softmax(teacher: torch.Tensor, center: torch.Tensor,
                    teacher_temp: float) -> torch.Tensor:
    """softmax((teacher - center) / teacher_temp) per row in the accumulation dtype: SwAV's
    row pass with a = -center / teacher_temp."""
    acc = torch.float64 if teacher.dtype == torch.float64 else torch.float32
    a = (-center.to(acc) / teacher_temp).contiguous()
    return _swav.rowpass(teacher.contiguous(), float(teacher_temp), a, True)


class TritonDino:
    """The triton entry of the DINO family's table (fastssl/ops/dino.py)."""
    teacher_softmax = staticmethod(teacher_softmax)
    nearest_neighbor = staticmethod(nearest_neighbor)
