"""The distributed layer: all-gather with an exact backward, and the loss scaling for DDP.

The promises of docs/api.md for ``gather_distributed=True`` with world size W:

1. The returned loss equals, on every rank, the single-process loss over the global batch.
2. Each rank's input gradient divided by W equals the single-process gradient of its rows, so
   DDP's gradient average gives the single-process parameter gradient.

A loss gets both by computing its rows against the gathered columns with :func:`gather`
(whose backward sums the gathered gradient over ranks and returns the local slice), taking its
local share of the global mean, and passing that share through :func:`reduce_loss`.
Everything here works without an initialised process group (W = 1): then every function is the
identity, and on gloo (CPU) and NCCL (GPU) alike.
"""
from __future__ import annotations

import contextlib
import math
import re
import threading

import torch
import torch.distributed as dist

# (local shape checked, process group) pairs already found equal on every rank: the check is an
# all-gather plus a host read (a device sync on NCCL), so it runs at the first call with a shape,
# not at every gather of every step.
_checked_shapes: set = set()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def reset_batch_checks() -> None:
    """Forget the shapes already checked (the next gather of each shape checks again)."""
    _checked_shapes.clear()


def _shape_key(x: torch.Tensor, group) -> tuple:
    # the group object is hashable and unique per group; None is the default (WORLD) group
    return (tuple(x.shape[:2]), x.device.type, group, id(dist.GroupMember.WORLD))


def check_equal_batch(name: str, x: torch.Tensor, group=None) -> None:
    """Raise ValueError on every rank when the local (batch, dim) differ (instead of a hang).

    The exchange (an all-gather of two integers and a host read) runs once per local shape and
    process group: the first step, and again only when the shape changes. Every rank changes
    shape at the same step in a training loop (same batch size, drop_last), so the ranks agree
    on when to exchange. Under torch.compile the check is not traced (it would be a
    data-dependent graph break); the eager warm-up step, or any earlier eager gather of that
    shape, has made it.
    """
    if not is_distributed():
        return
    if torch.compiler.is_compiling():
        return
    key = _shape_key(x, group)
    if key in _checked_shapes:
        return
    sizes = _exchange_shapes(x, group)
    if len(set(sizes)) != 1:
        raise ValueError(f"{name}: gather_distributed needs the same local shape on every rank, "
                         f"got (batch, dim) per rank {sizes}")
    _checked_shapes.add(key)


def _exchange_shapes(x: torch.Tensor, group=None) -> list[tuple]:
    w = dist.get_world_size(group)
    mine = torch.tensor([x.shape[0]] + list(x.shape[1:2]), device=x.device, dtype=torch.int64)
    sizes = [torch.empty_like(mine) for _ in range(w)]
    dist.all_gather(sizes, mine, group=group)
    return [tuple(s.tolist()) for s in sizes]


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return _all_gather_cat(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on this rank's rows through the gather: sum the gathered
        # gradient over ranks and keep our slice (SogCLR issue #1 kept only the local term).
        grad = grad.contiguous()
        b = ctx.rows
        if dist.get_backend() == "nccl":
            out = torch.empty((b,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)
        r = rank()
        return grad[r * b:(r + 1) * b]


def gather(x: torch.Tensor, *, name: str = "input") -> torch.Tensor:
    """All-gather the rows of `x` from every rank (rank order), with the exact backward."""
    if not is_distributed():
        return x
    check_equal_batch(name, x)
    if x.requires_grad:
        return _GatherWithGrad.apply(x)
    return _all_gather_cat(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor, *, name: str = "input") -> torch.Tensor:
    """All-gather without gradient (momentum keys, indices, state updates)."""
    if not is_distributed():
        return x
    check_equal_batch(name, x)
    return _all_gather_cat(x)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place and returned (no gradient: Sinkhorn's normalisers)."""
    if is_distributed():
        dist.all_reduce(x)
    return x


@torch.no_grad()
def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


_value_mode = threading.local()


@contextlib.contextmanager
def per_rank_values():
    """Within this context :func:`reduce_loss` returns W times the rank's share: the mean over
    the rank's own rows, the value lightly's losses (and open_clip's local_loss) return on each
    rank, instead of the global value. The gradient is the same either way (W times the
    share's), so DDP's average is still exact; no collective is run for the value."""
    previous = getattr(_value_mode, "per_rank", False)
    _value_mode.per_rank = True
    try:
        yield
    finally:
        _value_mode.per_rank = previous


def reduce_loss(local_share: torch.Tensor) -> torch.Tensor:
    """Turn this rank's share of the global loss into the value and gradient docs/api.md promises.

    `local_share` is the sum of this rank's terms of the global mean (so the shares of all
    ranks add up to the single-process loss). The result's value is that sum on every rank;
    its gradient is W times the share's gradient, so that after DDP divides by W each
    parameter gets the single-process gradient.
    """
    if not is_distributed():
        return local_share
    w = world_size()
    if getattr(_value_mode, "per_rank", False):
        return local_share * w
    total = all_reduce_sum(local_share.detach().clone())
    scaled = local_share * w
    return scaled + (total - scaled).detach()


def row_offset(local_rows: int) -> int:
    """Index of this rank's first row in the gathered (rank-ordered) batch."""
    return rank() * local_rows


# --- the process group's timeout (the CLIs' --dist-timeout) ---------------------------------------
DEFAULT_TIMEOUT_S = 600.0


def parse_timeout(text: str) -> float:
    """``--dist-timeout``: seconds (``600``, ``600s``) or minutes (``10m``, ``10min``), > 0.
    ValueError naming the accepted forms otherwise (argparse turns it into a usage error)."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(s|sec|m|min)?\s*", text)
    if not found:
        raise ValueError(f"expected seconds (600, 600s) or minutes (10m, 10min), got {text!r}")
    value = float(found.group(1)) * (60.0 if (found.group(2) or "s").startswith("m") else 1.0)
    if not (0 < value < math.inf):
        raise ValueError(f"expected a duration > 0, got {text!r}")
    return value


def is_timeout_error(error: BaseException) -> bool:
    """Whether `error` is a collective or store wait of an initialised multi-rank group that ran
    out of time (gloo: "Timed out waiting ... for recv"; NCCL's watchdog, the store: "timeout")."""
    # torch's own errors only (gloo raises a plain RuntimeError, NCCL and the store DistError
    # subclasses): a library error whose message merely names a file "timeout.jpg" is not one
    torch_error = type(error) is RuntimeError or isinstance(error, getattr(dist, "DistError", ()))
    if not (torch_error and is_distributed()):
        return False
    text = str(error).lower()
    return "timed out" in text or "timeout" in text
