"""DINO family ops: ``torch.ops.fastssl.dino_teacher_softmax`` (DINO's centered teacher
targets) and ``torch.ops.fastssl.koleo_nearest`` (KoLeo's nearest-neighbour search), each
with the family's one backend table.

The rest of the family's arithmetic reuses the SwAV ops (fastssl/ops/swav.py): the
Sinkhorn-Knopp targets are ``fastssl::sinkhorn`` at epsilon = teacher_temp, and each student
crop's cross-entropy against the sum of its paired targets is ``fastssl::swav_cross_entropy``
(one log-sum-exp pass per row and the closed-form gradient, no log-softmax copy).

One interface (``TABLE[backend].method``, no dispatch by name below the table):

    teacher_softmax(teacher (B, K), center (K,) accumulation dtype, teacher_temp: float)
        -> (B, K) softmax((teacher - center) / teacher_temp) in the accumulation dtype
    nearest_neighbor(x (N, D), x_all (M, D), offset: int)
        -> (N,) int64: for each row i the index of its largest inner product in x_all,
           row offset + i (itself) excluded, the first among ties

Neither has a gradient: the teacher carries none, and an index is piecewise constant (KoLeo's
gradient flows through the distance of the chosen pair, computed by the caller).
"""
from __future__ import annotations

import torch

from fastssl._backend import choose
from fastssl._validation import accumulation_dtype
from fastssl.backends import LazyBackend
from fastssl.backends.torch.dino import TorchDino
from fastssl.ops._entry import check_count, entry

_METHODS = ("teacher_softmax", "nearest_neighbor")

# The family's backend table: name -> namespace with the methods above.
TABLE = {
    "torch": TorchDino,
    "cpp": LazyBackend("fastssl.backends.ext.dino", "CppDino", _METHODS),
    "triton": LazyBackend("fastssl.kernels.dino", "TritonDino", _METHODS),
}
_BACKENDS = tuple(TABLE)


def backend_for(op: str, device: torch.device) -> str:
    """The backend that serves the DINO family's `op` on `device` now (chosen once by the
    public function and passed to every op it calls)."""
    return choose(op, device, TABLE, family="dino")


def _teacher_limits(args) -> None:
    K = args["teacher"].shape[1]
    if args["center"].shape[0] != K:
        raise ValueError(f"center: expected shape ({K},) (one value per prototype of teacher), "
                         f"got {tuple(args['center'].shape)} (fastssl::dino_teacher_softmax)")


_SOFTMAX_SPEC = dict(ranks={"teacher": 2, "center": 1}, backends=_BACKENDS,
                     limits=_teacher_limits)


@torch.library.custom_op("fastssl::dino_teacher_softmax", mutates_args=())
@entry("dino_teacher_softmax", **_SOFTMAX_SPEC)
def _teacher_softmax_op(teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float,
                        backend: str) -> torch.Tensor:
    acc = accumulation_dtype(teacher)
    return TABLE[backend].teacher_softmax(teacher, center.to(acc), float(teacher_temp))


@_teacher_softmax_op.register_fake
@entry("dino_teacher_softmax", **_SOFTMAX_SPEC)
def _teacher_softmax_fake(teacher, center, teacher_temp, backend):
    return teacher.new_empty(teacher.shape, dtype=accumulation_dtype(teacher))


def teacher_softmax(teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float,
                    backend: str) -> torch.Tensor:
    """(B, K) targets softmax((teacher - center) / teacher_temp), no gradient."""
    return torch.ops.fastssl.dino_teacher_softmax(teacher.detach(), center.detach(),
                                                  float(teacher_temp), backend)


def _nearest_limits(args) -> None:
    x, x_all = args["x"], args["x_all"]
    if x_all.shape[1] != x.shape[1]:
        raise ValueError(f"x_all: expected {x.shape[1]} columns (as x), got shape "
                         f"{tuple(x_all.shape)} (fastssl::koleo_nearest)")
    if x.dtype != x_all.dtype or x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x_all: expected x and x_all both float32 or both float64, got "
                        f"{x.dtype} and {x_all.dtype} (fastssl::koleo_nearest)")
    if x_all.shape[0] < 2:
        raise ValueError(f"x_all: expected at least 2 rows (a neighbour other than the row "
                         f"itself), got shape {tuple(x_all.shape)} (fastssl::koleo_nearest)")
    check_count("koleo_nearest", "offset", args["offset"], minimum=0,
                maximum=x_all.shape[0] - x.shape[0],
                why=" (x's rows inside x_all)")


_NEAREST_SPEC = dict(ranks={"x": 2, "x_all": 2}, backends=_BACKENDS, limits=_nearest_limits)


@torch.library.custom_op("fastssl::koleo_nearest", mutates_args=())
@entry("koleo_nearest", **_NEAREST_SPEC)
def _nearest_op(x: torch.Tensor, x_all: torch.Tensor, offset: int,
                backend: str) -> torch.Tensor:
    return TABLE[backend].nearest_neighbor(x, x_all, int(offset))


@_nearest_op.register_fake
@entry("koleo_nearest", **_NEAREST_SPEC)
def _nearest_fake(x, x_all, offset, backend):
    return x.new_empty((x.shape[0],), dtype=torch.int64)


def nearest_neighbor(x: torch.Tensor, x_all: torch.Tensor, offset: int,
                     backend: str) -> torch.Tensor:
    """(N,) int64 index in x_all of each row's nearest other row by inner product."""
    return torch.ops.fastssl.koleo_nearest(x.detach(), x_all.detach(), int(offset), backend)
