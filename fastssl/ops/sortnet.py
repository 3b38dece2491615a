"""sortnet ops: diffsort-compatible soft sort and the GroCo per-view row loss.

The networks are comparator tables (fastssl/backends/networks.py), never diffsort's dense layer
matrices. Ops and the backends that serve them (one table, ``TABLE``, each entry the family's
interface, fastssl/backends/interfaces.py; chosen once by the public function through
:func:`backend_for`, the name passed down to forward and backward; docs/design.md):

* ``soft_sort(x, ...) -> (sorted, P)``: torch (per-layer gather/scatter with autograd,
  fastssl/backends/torch/sortnet.py), cpp, triton, cuda (per-comparator kernels with explicit
  backward, registered as ``fastssl::soft_sort`` / ``fastssl::soft_sort_backward``).
* ``groco_view_rows(anchor_hat, negatives_hat, positives_hat, self_offset, ...) -> (B,)`` row
  losses of one anchor view: torch (blocked top-k + per-layer vector form), cpp (fully fused:
  cosine + running top-k + network + BCE, ``fastssl::groco_fused``), triton / cuda (blocked
  torch top-k + the row-network kernel, ``fastssl::groco_rows``).

The reference (diffsort) is not a backend here: the public functions choose it
(``fastssl._backend.public_loss``).
"""
from __future__ import annotations

import os

import torch

from fastssl._backend import check_backend_name, choose
from fastssl._validation import accumulation_dtype
from fastssl.backends import LazyBackend
from fastssl.backends.networks import (DIST_IDS, MAX_SORT_N, NETWORKS,  # noqa: F401 (API)
                                       _layer_count, comparator_count, network_tensor,
                                       sigma_bwd)
from fastssl.backends.torch.sortnet import TorchSortnet, blocked_sims
from fastssl.ops._entry import check_count, entry


# Working sets below this are not checked against free memory (the probe costs /proc reads or
# a driver call per call; an allocation this small that fails is torch's own OOM error).
_PROBE_BYTES = 64 << 20


def _available_bytes(device: torch.device) -> int:
    """Memory a new allocation on `device` can take: the free GPU memory, or on the CPU the
    kernel's MemAvailable, capped by an address-space limit (RLIMIT_AS) where one is set."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "meta":
        return 1 << 62
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:  # /proc, not the resource module: no import inside a function (test_import_graph)
        with open("/proc/self/limits") as f:
            soft = next((line.split()[3] for line in f
                         if line.startswith("Max address space")), "unlimited")
        if soft != "unlimited":
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            avail = min(avail, max(0, int(soft) - used))
    except (OSError, ValueError, IndexError):
        pass
    return avail


def soft_sort_bytes(network: str, n: int, rows: int, elem: int, backend: str,
                    want_p: bool) -> int:
    """Estimated peak bytes of one soft sort of (rows, n) with `backend` (elem: bytes per
    value): the comparator table and the per-comparator saved values of the kernels; the
    per-layer copies of the torch path's autograd."""
    c = comparator_count(network, n)
    layers = _layer_count(network, n)
    out = rows * n * elem + (rows * n * n * elem if want_p else 0)
    if backend == "torch":  # autograd keeps each layer's mixed copies
        per_layer = rows * n * elem * 6 + (rows * n * n * elem * 2 if want_p else 0)
        return out + 8 * 4 * c + layers * per_layer
    return out + 16 * c + rows * c * elem * (3 if backend == "cpp" else 1)


def check_sort_size(op: str, name: str, network: str, n: int, rows: int, elem: int,
                    backend: str, want_p: bool, device: torch.device) -> None:
    """Rows of at most MAX_SORT_N entries, and a working set that fits the device's free
    memory: refused before anything is built, the estimate in the message."""
    if n > MAX_SORT_N:
        raise ValueError(f"{name}: rows of at most {MAX_SORT_N} entries can be soft-sorted "
                         f"(the {network} network of n has up to n(n-1)/2 comparators), got "
                         f"n={n} ({op})")
    need = soft_sort_bytes(network, n, rows, elem, backend, want_p)
    if need <= _PROBE_BYTES:  # the usual step: no /proc reads, no cudaMemGetInfo per call
        return
    have = _available_bytes(device)
    if need > have:
        raise ValueError(f"{name}: a soft sort of {rows} row(s) of n={n} with the {network} "
                         f"network ({comparator_count(network, n)} comparators, backend "
                         f"{backend!r}{', with P' if want_p else ''}) needs about "
                         f"{need / 2**30:.2f} GiB, more than the {have / 2**30:.2f} GiB "
                         f"available on {device} ({op})")



# ----------------------------------------------------------------------------------------------
# the entry check of each registered op (fastssl/ops/_entry.py): devices, ranks, backend and
# choice strings, and the sizes (k, n, self_offset) before a network or an output is built

_KERNEL_BACKENDS = ("cpp", "triton", "cuda")
_SORT_CHOICES = {"network": NETWORKS, "distribution": tuple(DIST_IDS)}


def _soft_sort_limits(args):
    x = args["x"]
    check_sort_size("fastssl::soft_sort", "x", args["network"], x.shape[1], x.shape[0],
                    x.element_size(), args["backend"], bool(args["want_p"]), x.device)


def _soft_sort_backward_limits(args):
    op = "soft_sort_backward"
    n, d = args["n"], args["d"]
    check_count(op, "n", n, minimum=0, maximum=MAX_SORT_N, why=" (the sorted rows' length)")
    c = comparator_count(args["network"], n)
    if d.shape[1] not in (c, 3 * c):
        raise ValueError(f"d: expected the forward's saved (B, {c}) or (B, {3 * c}) tensor "
                         f"for n={n} ({c} comparators), got shape {tuple(d.shape)} "
                         f"(fastssl::{op})")


def _rows_limits(op):
    def limits(args):
        n = args["sims"].shape[1]
        if n > MAX_SORT_N:
            raise ValueError(f"sims: rows of at most {MAX_SORT_N} entries can be soft-sorted, "
                             f"got shape {tuple(args['sims'].shape)} (fastssl::{op})")
        check_count(op, "k", args["k"], minimum=1, maximum=max(1, n - 1),
                    why=f" (n - 1 with n={n}, sims' row length)")
        if n < 2:
            raise ValueError(f"sims: expected rows of at least 2 entries, got shape "
                             f"{tuple(args['sims'].shape)} (fastssl::{op})")
    return limits


def _fused_limits(args):
    op = "groco_fused"
    b, n_neg, p = args["anchor"].shape[0], args["negatives"].shape[0], args["positives"].shape[0]
    # bounds as differences of sizes: no sum of a huge argument and a size can overflow
    check_count(op, "k", args["k"], minimum=1, maximum=min(n_neg - 1, MAX_SORT_N - p),
                why=f" (N - 1 with N={n_neg} negatives, and k + {p} views <= {MAX_SORT_N})")
    check_count(op, "self_offset", args["self_offset"], minimum=0, maximum=n_neg - b,
                why=f" (N - B with N={n_neg} negatives, B={b} anchors)")


def _fused_backward_limits(args):
    op = "groco_fused_backward"
    n, p = args["sims"].shape[1], args["positives"].shape[0]
    if n > MAX_SORT_N:
        raise ValueError(f"sims: rows of at most {MAX_SORT_N} entries can be soft-sorted, "
                         f"got shape {tuple(args['sims'].shape)} (fastssl::{op})")
    check_count(op, "k", args["k"], minimum=1, maximum=max(1, n - p),
                why=f" (sims' row length {n} minus {p} positive views)")


_SOFT_SORT_SPEC = dict(ranks={"x": 2}, backends=_KERNEL_BACKENDS, choices=_SORT_CHOICES,
                       limits=_soft_sort_limits)
_SOFT_SORT_BWD_SPEC = dict(ranks={"gy": (1, 2), "gP": (1, 3), "d": 2}, backends=_KERNEL_BACKENDS,
                           choices=_SORT_CHOICES, limits=_soft_sort_backward_limits)
_ROWS_SPEC = dict(ranks={"sims": 2}, backends=_KERNEL_BACKENDS, choices=_SORT_CHOICES,
                  limits=_rows_limits("groco_rows"))
_ROWS_BWD_SPEC = dict(ranks={"grow": 1, "sims": 2}, backends=_KERNEL_BACKENDS,
                      choices=_SORT_CHOICES, limits=_rows_limits("groco_rows_backward"))
_FUSED_SPEC = dict(ranks={"anchor": 2, "negatives": 2, "positives": 3}, choices=_SORT_CHOICES,
                   limits=_fused_limits)
_FUSED_BWD_SPEC = dict(ranks={"grow": 1, "sims": 2, "index": 2, "negatives": 2,
                              "positives": 3}, choices=_SORT_CHOICES,
                       limits=_fused_backward_limits)


@torch.library.custom_op("fastssl::soft_sort", mutates_args=())
@entry("soft_sort", **_SOFT_SORT_SPEC)
def soft_sort_op(x: torch.Tensor, backend: str, network: str, distribution: str,
                  steepness: float, art_lambda: float, want_p: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    net = network_tensor(network, x.shape[1], x.device)
    y, P, d = TABLE[backend].soft_sort_forward(x.contiguous(), net, DIST_IDS[distribution],
                                               steepness, art_lambda, sigma_bwd(steepness), want_p)
    return y, P, d


@soft_sort_op.register_fake
@entry("soft_sort", **_SOFT_SORT_SPEC)
def _(x, backend, network, distribution, steepness, art_lambda, want_p):
    B, n = x.shape
    C = comparator_count(network, n)
    P = x.new_empty((B, n, n)) if want_p else x.new_empty(0)
    # the cpp forward saves (d | alpha | dalpha/dd) so its backward evaluates no f(d) again
    saved = 3 * C if backend == "cpp" else C
    return x.new_empty((B, n)), P, x.new_empty((B, saved))


@torch.library.custom_op("fastssl::soft_sort_backward", mutates_args=())
@entry("soft_sort_backward", **_SOFT_SORT_BWD_SPEC)
def soft_sort_backward(gy: torch.Tensor, gP: torch.Tensor, d: torch.Tensor, n: int, backend: str,
                  network: str, distribution: str, steepness: float, art_lambda: float
                  ) -> torch.Tensor:
    net = network_tensor(network, n, d.device)
    return TABLE[backend].soft_sort_backward(gy.contiguous(), gP.contiguous(), d.contiguous(),
                                             net, DIST_IDS[distribution], steepness, art_lambda,
                                             sigma_bwd(steepness), n)


@soft_sort_backward.register_fake
@entry("soft_sort_backward", **_SOFT_SORT_BWD_SPEC)
def _(gy, gP, d, n, backend, network, distribution, steepness, art_lambda):
    return d.new_empty((d.shape[0], n))


def _soft_sort_setup(ctx, inputs, output):
    x, backend, network, distribution, steepness, art_lambda, want_p = inputs
    ctx.save_for_backward(output[2])
    ctx.args = (x.shape[1], backend, network, distribution, steepness, art_lambda)


def _soft_sort_backward(ctx, gy, gP, gd):
    (d,) = ctx.saved_tensors
    gy = gy if gy is not None else d.new_empty(0)
    gP = gP if gP is not None and gP.numel() else d.new_empty(0)
    gx = soft_sort_backward(gy, gP, d, *ctx.args)
    return gx, None, None, None, None, None, None


soft_sort_op.register_autograd(_soft_sort_backward, setup_context=_soft_sort_setup)


def soft_sort(x: torch.Tensor, *, network: str = "odd_even", steepness: float = 10.0,
              distribution: str = "cauchy", art_lambda: float = 0.25,
              return_permutation: bool = True, backend: str | None = None):
    """Soft sort of the rows of x (validated by the caller); (sorted, P or None), x's dtype.
    `backend`: a name chosen by :func:`backend_for` (None: choose now)."""
    if backend is None:
        backend = backend_for("soft_sort", x.device)
    check_backend_name("fastssl.ops.sortnet.soft_sort", backend, TABLE)
    check_sort_size("soft_sort", "x", network, x.shape[1], x.shape[0],
                    torch.empty((), dtype=accumulation_dtype(x)).element_size(), backend,
                    bool(return_permutation), x.device)
    xw = x.to(accumulation_dtype(x))  # half inputs run in float32 (diffsort upcasts only alpha)
    impl = TABLE[backend]
    if hasattr(impl, "soft_sort"):  # the torch entry: autograd, no registered op
        y, P = impl.soft_sort(xw, network, steepness, distribution, art_lambda,
                              return_permutation)
    else:
        y, P, _ = soft_sort_op(xw, backend, network, distribution, float(steepness),
                               float(art_lambda), bool(return_permutation))
        P = P if return_permutation else None
    return y.to(x.dtype), (P.to(x.dtype) if P is not None else None)


@torch.library.custom_op("fastssl::groco_rows", mutates_args=())
@entry("groco_rows", **_ROWS_SPEC)
def groco_rows_op(sims: torch.Tensor, k: int, backend: str, network: str, distribution: str,
                  steepness: float) -> torch.Tensor:
    net = network_tensor(network, sims.shape[1], sims.device)
    args = (DIST_IDS[distribution], steepness, 0.25, sigma_bwd(steepness))
    return TABLE[backend].groco_rows_forward(sims.contiguous(), k, net, *args)


@groco_rows_op.register_fake
@entry("groco_rows", **_ROWS_SPEC)
def _(sims, k, backend, network, distribution, steepness):
    return sims.new_empty((sims.shape[0],))


@torch.library.custom_op("fastssl::groco_rows_backward", mutates_args=())
@entry("groco_rows_backward", **_ROWS_BWD_SPEC)
def groco_rows_backward(grow: torch.Tensor, sims: torch.Tensor, k: int, backend: str, network: str,
                   distribution: str, steepness: float) -> torch.Tensor:
    net = network_tensor(network, sims.shape[1], sims.device)
    args = (DIST_IDS[distribution], steepness, 0.25, sigma_bwd(steepness))
    grow, sims = grow.contiguous(), sims.contiguous()
    return TABLE[backend].groco_rows_backward(grow, sims, k, net, *args)


@groco_rows_backward.register_fake
@entry("groco_rows_backward", **_ROWS_BWD_SPEC)
def _(grow, sims, k, backend, network, distribution, steepness):
    return torch.empty_like(sims)


def _groco_rows_setup(ctx, inputs, output):
    sims, k, backend, network, distribution, steepness = inputs
    ctx.save_for_backward(sims)
    ctx.args = (k, backend, network, distribution, steepness)


def _groco_rows_backward(ctx, grow):
    (sims,) = ctx.saved_tensors
    return groco_rows_backward(grow, sims, *ctx.args), None, None, None, None, None


groco_rows_op.register_autograd(_groco_rows_backward, setup_context=_groco_rows_setup)


# fused CPU op: anchor_hat (B, D) with grad; negatives_hat (N, D), positives_hat (P, B, D) detached

@torch.library.custom_op("fastssl::groco_fused", mutates_args=())
@entry("groco_fused", **_FUSED_SPEC)
def groco_fused(anchor: torch.Tensor, negatives: torch.Tensor, positives: torch.Tensor,
                self_offset: int, k: int, network: str, distribution: str, steepness: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = k + positives.shape[0]
    net = network_tensor(network, n, anchor.device)
    loss, sims, index = TABLE["cpp"].groco_fused_forward(
        anchor.contiguous(), negatives.contiguous(), positives.contiguous(), self_offset, k, net,
        DIST_IDS[distribution], steepness, 0.25, sigma_bwd(steepness))
    return loss, sims, index


@groco_fused.register_fake
@entry("groco_fused", **_FUSED_SPEC)
def _(anchor, negatives, positives, self_offset, k, network, distribution, steepness):
    B, n = anchor.shape[0], k + positives.shape[0]
    return (anchor.new_empty((B,)), anchor.new_empty((B, n)),
            anchor.new_empty((B, n), dtype=torch.int64))


@torch.library.custom_op("fastssl::groco_fused_backward", mutates_args=())
@entry("groco_fused_backward", **_FUSED_BWD_SPEC)
def groco_fused_backward(grow: torch.Tensor, sims: torch.Tensor, index: torch.Tensor,
                    negatives: torch.Tensor, positives: torch.Tensor, k: int, network: str,
                    distribution: str, steepness: float) -> torch.Tensor:
    net = network_tensor(network, sims.shape[1], sims.device)
    return TABLE["cpp"].groco_fused_backward(grow.contiguous(), sims, index, negatives.contiguous(),
                                       positives.contiguous(), k, net, DIST_IDS[distribution],
                                       steepness, 0.25, sigma_bwd(steepness))


@groco_fused_backward.register_fake
@entry("groco_fused_backward", **_FUSED_BWD_SPEC)
def _(grow, sims, index, negatives, positives, k, network, distribution, steepness):
    return negatives.new_empty((sims.shape[0], negatives.shape[1]))


def _groco_fused_setup(ctx, inputs, output):
    anchor, negatives, positives, self_offset, k, network, distribution, steepness = inputs
    ctx.save_for_backward(output[1], output[2], negatives, positives)
    ctx.args = (k, network, distribution, steepness)


def _groco_fused_backward(ctx, grow, gsims, gindex):
    sims, index, negatives, positives = ctx.saved_tensors
    ga = groco_fused_backward(grow, sims, index, negatives, positives, *ctx.args)
    return ga, None, None, None, None, None, None, None


groco_fused.register_autograd(_groco_fused_backward, setup_context=_groco_fused_setup)



# ----------------------------------------------------------------------------------------------
# The family's backend table (docs/design.md): name -> the family's interface. The kernel
# entries serve the registered ops above (soft_sort_forward/_backward, groco_rows_forward/
# _backward; cpp also groco_fused_forward/_backward); the torch entry has the autograd forms
# (soft_sort, groco_rows) and no registered op.

_KERNEL_METHODS = ("soft_sort_forward", "soft_sort_backward", "groco_rows_forward",
                   "groco_rows_backward")

TABLE = {
    "torch": TorchSortnet,
    "cpp": LazyBackend("fastssl.backends.ext.sortnet", "CppSortnet",
                       _KERNEL_METHODS + ("groco_fused_forward", "groco_fused_backward")),
    "triton": LazyBackend("fastssl.kernels.sortnet", "TritonSortnet", _KERNEL_METHODS),
    "cuda": LazyBackend("fastssl.backends.ext.sortnet", "CudaSortnet", _KERNEL_METHODS),
}


def backend_for(op: str, device: torch.device) -> str:
    """The backend that serves `op` ("soft_sort", "groco", "groco_rows") on `device` now: the
    one dispatch point of the family; the public function calls it once and passes the name."""
    return choose(op, device, TABLE, family="sortnet")


def groco_view_rows(anchor_hat: torch.Tensor, negatives_hat: torch.Tensor,
                    positives_hat: torch.Tensor, self_offset: int, topk: int, network: str,
                    distribution: str, steepness: float, backend: str | None = None
                    ) -> torch.Tensor:
    """Row losses (B,) of one anchor view; inputs normalised, in the accumulation dtype.
    `backend`: a name chosen by :func:`backend_for` (None: choose now). The entry's methods
    say the path: the fused view where it has one, else the blocked top-k, then its autograd
    rows or the registered rows op."""
    if backend is None:
        backend = backend_for("groco", anchor_hat.device)
    check_backend_name("fastssl.ops.sortnet.groco_view_rows", backend, TABLE)
    impl = TABLE[backend]
    negatives_hat, positives_hat = negatives_hat.detach(), positives_hat.detach()
    if hasattr(impl, "groco_fused_forward"):
        loss, _, _ = groco_fused(anchor_hat, negatives_hat, positives_hat, int(self_offset),
                                 int(topk), network, distribution, float(steepness))
        return loss
    sims = blocked_sims(anchor_hat, negatives_hat, positives_hat, self_offset, topk)
    return _rows(sims, topk, network, distribution, steepness, backend)


def groco_rows(sims: torch.Tensor, topk: int, network: str = "odd_even",
               distribution: str = "cauchy", steepness: float = 1.0,
               backend: str | None = None) -> torch.Tensor:
    """Row losses of pre-ordered rows [negs asc | pos asc] (tests, benchmarks)."""
    if backend is None:
        backend = backend_for("groco_rows", sims.device)
    check_backend_name("fastssl.ops.sortnet.groco_rows", backend, TABLE)
    return _rows(sims, topk, network, distribution, steepness, backend)


def _rows(sims, topk, network, distribution, steepness, backend):
    impl = TABLE[backend]
    if hasattr(impl, "groco_rows"):  # the torch entry: autograd, no registered op
        return impl.groco_rows(sims, topk, network, distribution, steepness)
    return groco_rows_op(sims, topk, backend, network, distribution, float(steepness))
