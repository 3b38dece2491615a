"""sortnet ops: diffsort-compatible soft sort and the GroCo per-view row loss.

Networks are precomputed once per (network, n, device) as comparator lists (wire a, wire b,
soft-min destination, soft-max destination), never as diffsort's dense layer matrices.

Ops and the backends that serve them (one table, ``TABLE``, chosen once by the public function
through :func:`backend_for`, the name passed down to forward and backward; docs/design.md):

* ``soft_sort(x, ...) -> (sorted, P)``: reference (diffsort), torch (per-layer gather/scatter
  with autograd), cpp, triton, cuda (per-comparator kernels with explicit backward, registered
  as ``fastssl::soft_sort`` / ``fastssl::soft_sort_backward``).
* ``groco_view_rows(anchor_hat, negatives_hat, positives_hat, self_offset, ...) -> (B,)`` row
  losses of one anchor view: reference (dense sims + diffsort), torch (blocked top-k + per-layer
  vector form), cpp (fully fused: cosine + running top-k + network + BCE, ``fastssl::groco_fused``),
  triton / cuda (blocked torch top-k + the row-network kernel, ``fastssl::groco_rows``).
"""
from __future__ import annotations

import math
import os
import struct

import torch

from fastssl._backend import check_backend_name, choose
from fastssl._validation import accumulation_dtype
from fastssl.ops._entry import check_count, entry
from fastssl.reference import sortnet as _reference

NETWORKS = ("odd_even", "bitonic")
DIST_IDS = {"logistic": 0, "logistic_phi": 1, "gaussian": 2, "reciprocal": 3, "cauchy": 4,
            "optimal": 5}


# ----------------------------------------------------------------------------------------------
# networks


def comparator_layers(network: str, n: int, identity_slots: bool = False
                      ) -> list[list[tuple[int, int, int, int]]]:
    """diffsort's network as layers of comparators (a, b, dmin, dmax). With identity_slots,
    also diffsort's identity slots (a == b == dmin == dmax: a wire the layer leaves alone,
    split to both sides and recombined), at diffsort's positions, for its dense matrices."""
    layers = []
    if network == "odd_even":
        for layer in range(n):
            shifted = layer % 2 == 1
            comps = [(i, i + 1, i, i + 1) for i in range(int(shifted), n - 1, 2)]
            if identity_slots and n % 2 == 0 and shifted:
                comps += [(0, 0, 0, 0), (n - 1, n - 1, n - 1, n - 1)]
            elif identity_slots and n % 2 == 1:
                w = 0 if shifted else n - 1
                comps.append((w, w, w, w))
            layers.append(comps)
    elif network == "bitonic":
        blocks = max(1, math.ceil(math.log2(n)))
        width = 2 ** blocks
        pad = width - n  # the lowest `pad` wires are padding and are dropped
        for block in range(blocks):
            for layer in range(block + 1):
                m = 2 ** (block - layer)
                comps = []
                for i in range(0, width, 2 * m):
                    for j in range(m):
                        a, b = i + j, i + j + m
                        if a < pad:  # both padded: skipped; against a dropped wire: identity on b
                            if identity_slots and b >= pad:
                                comps.append((b - pad,) * 4)
                            continue
                        desc = (a // 2 ** (block + 1)) % 2 == 1
                        dmin, dmax = (b, a) if desc else (a, b)
                        comps.append((a - pad, b - pad, dmin - pad, dmax - pad))
                layers.append(comps)
    else:
        raise ValueError(f"network: expected one of {NETWORKS}, got {network!r}")
    return layers


# The longest row a network sorts (csrc/sortnet_cpu.cpp's kMaxSortWidth): odd-even's
# n (n - 1) / 2 comparators stay below 2^31, where the int32 wire tables and counts end.
MAX_SORT_N = 65536


def _layer_indices(network: str, n: int):
    """diffsort's network, one (4, c) int64 tensor (a, b, dmin, dmax) per layer, built with
    tensor arithmetic: O(layers) Python objects, never a list of O(n^2) comparator tuples
    (a 16384-wide odd-even network has 134M comparators)."""
    if network == "odd_even":
        for layer in range(n):
            a = torch.arange(layer % 2, n - 1, 2, dtype=torch.int64)
            yield torch.stack([a, a + 1, a, a + 1])
    elif network == "bitonic":
        blocks = max(1, math.ceil(math.log2(n)))
        width = 2 ** blocks
        pad = width - n  # the lowest `pad` wires are padding and are dropped
        wires = torch.arange(width, dtype=torch.int64)
        for block in range(blocks):
            for layer in range(block + 1):
                m = 2 ** (block - layer)
                a = wires[((wires & m) == 0) & (wires >= pad)]
                b = a + m
                desc = ((a >> (block + 1)) & 1) == 1
                yield torch.stack([a, b, torch.where(desc, b, a), torch.where(desc, a, b)]) - pad
    else:
        raise ValueError(f"network: expected one of {NETWORKS}, got {network!r}")


def _count_clear_bit(end: int, m: int) -> int:
    """How many integers in [0, end) have bit m (a power of two) clear."""
    return (end // (2 * m)) * m + min(end % (2 * m), m)


def comparator_count(network: str, n: int) -> int:
    """The number of comparators of the network sorting n wires, in closed form (the fake
    kernels and the size checks need it without building the network)."""
    if network == "odd_even":
        return ((n + 1) // 2) * (n // 2) + (n // 2) * ((n - 1) // 2)
    if network == "bitonic":
        blocks = max(1, math.ceil(math.log2(max(n, 1))))
        width = 2 ** blocks
        pad = width - n
        return sum(_count_clear_bit(width, 2 ** (block - layer))
                   - _count_clear_bit(pad, 2 ** (block - layer))
                   for block in range(blocks) for layer in range(block + 1))
    raise ValueError(f"network: expected one of {NETWORKS}, got {network!r}")


def _layer_count(network: str, n: int) -> int:
    if network == "odd_even":
        return n
    blocks = max(1, math.ceil(math.log2(max(n, 1))))
    return blocks * (blocks + 1) // 2


_net_cache: dict = {}


def network_tensor(network: str, n: int, device: torch.device) -> torch.Tensor:
    """(4, C) int32 comparator table, cached per (network, n, device)."""
    key = (network, n, str(device), "flat")
    t = _net_cache.get(key)
    if t is None:
        layers = [idx.to(torch.int32) for idx in _layer_indices(network, n)]
        t = (torch.cat(layers, dim=1) if layers else torch.zeros(4, 0, dtype=torch.int32))
        t = t.contiguous().to(device)
        _net_cache[key] = t
    return t


def network_layers(network: str, n: int, device: torch.device):
    """Per layer (a, b, dmin, dmax) int64 index tensors for the vectorised torch path."""
    key = (network, n, str(device), "layers")
    t = _net_cache.get(key)
    if t is None:
        t = [tuple(idx.to(device)) for idx in _layer_indices(network, n) if idx.shape[1]]
        _net_cache[key] = t
    return t


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
    per-layer copies of the torch path's autograd; diffsort's dense layer matrices."""
    c = comparator_count(network, n)
    layers = _layer_count(network, n)
    out = rows * n * elem + (rows * n * n * elem if want_p else 0)
    if backend == "reference":  # diffsort: two dense n x n matrices per layer, X per layer
        return out + layers * n * n * 4 * 2 + layers * rows * n * n * elem * (2 if want_p else 0)
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


def sigma_bwd(steepness: float) -> float:
    # diffsort's NormalCDF saves sigma = 1/steepness as a float32 tensor for its backward: the
    # same float32 rounding, on the host without a tensor (no tensor read in the step)
    return struct.unpack("f", struct.pack("f", 1.0 / steepness))[0]


# ----------------------------------------------------------------------------------------------
# torch path: alpha with diffsort's formulas (autograd), per-layer gather/scatter


class _NormalCDF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, d, steepness, sb):
        ctx.save_for_backward(d)
        ctx.sb = sb
        return 0.5 + 0.5 * torch.erf(d / (1.0 / steepness) / math.sqrt(2))

    @staticmethod
    def backward(ctx, g):
        (d,) = ctx.saved_tensors
        sb = ctx.sb
        return g / sb / math.sqrt(math.pi * 2) * torch.exp(-0.5 * (d / sb) ** 2), None, None


def alpha_torch(d: torch.Tensor, distribution: str, steepness: float, art_lambda: float):
    s = steepness
    if distribution == "logistic":
        return torch.sigmoid(d * s)
    if distribution == "logistic_phi":
        return torch.sigmoid(d * s / (d.abs() + 1e-10).pow(art_lambda))
    if distribution == "gaussian":
        return _NormalCDF.apply(d, s, sigma_bwd(s))
    v = s * d
    if distribution == "reciprocal":
        return 0.5 * (v / (2 + v.abs()) + 1)
    if distribution == "cauchy":
        return torch.atan(v) / math.pi + 0.5
    if distribution == "optimal":
        side = (v > 0.25).to(v.dtype) - (v < -0.25).to(v.dtype)
        return v.clamp(-0.25, 0.25) + 0.5 + side * (0.25 - 1 / 16 / (v.abs() + 1e-10))
    raise ValueError(f"distribution: unknown {distribution!r}")


def _mix(t: torch.Tensor, al: torch.Tensor, a, b, dmin, dmax, dim: int) -> torch.Tensor:
    ta, tb = t.index_select(dim, a), t.index_select(dim, b)
    lo = al * ta + (1 - al) * tb
    hi = (1 - al) * ta + al * tb
    return t.index_copy(dim, dmin, lo).index_copy(dim, dmax, hi)


def _soft_sort_torch(x, network, steepness, distribution, art_lambda, want_p):
    B, n = x.shape
    X = torch.eye(n, dtype=x.dtype, device=x.device).expand(B, n, n) if want_p else None
    for a, b, dmin, dmax in network_layers(network, n, x.device):
        al = alpha_torch(x[:, b] - x[:, a], distribution, steepness, art_lambda)
        if want_p:
            X = _mix(X, al.unsqueeze(1), a, b, dmin, dmax, 2)
        x = _mix(x, al, a, b, dmin, dmax, 1)
    return x, X


# ----------------------------------------------------------------------------------------------
# kernel backends for soft sort (explicit forward/backward)


def _cpp():
    from fastssl import _C
    return _C


def _triton():
    from fastssl.kernels import sortnet as K
    return K


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
    if backend == "reference":
        return TABLE[backend].soft_sort(x, network, steepness, distribution, art_lambda,
                                        return_permutation)
    xw = x.to(accumulation_dtype(x))  # half inputs run in float32 (diffsort upcasts only alpha)
    y, P = TABLE[backend].soft_sort(xw, network, steepness, distribution, art_lambda,
                                    return_permutation)
    return y.to(x.dtype), (P.to(x.dtype) if P is not None else None)


# ----------------------------------------------------------------------------------------------
# GroCo rows: loss of pre-ordered rows [negs asc | pos asc]


def _bce_rows(q_pos, q_neg, k):
    n = q_pos.shape[1]
    t = (torch.arange(n, device=q_pos.device) >= k).to(q_pos.dtype).expand_as(q_pos)
    bce = torch.nn.functional.binary_cross_entropy
    lp = bce(q_pos.clamp(0, 1), t, reduction="none")
    ln = bce(q_neg.clamp(0, 1), 1 - t, reduction="none")
    return (lp + ln).sum(1) / (2 * n)


def groco_rows_torch(sims, k, network, distribution, steepness, art_lambda=0.25):
    """Vector form with autograd: q = M_1(...(M_C v)), per layer, P never formed."""
    B, n = sims.shape
    layers = network_layers(network, n, sims.device)
    x = sims
    alphas = []
    for a, b, dmin, dmax in layers:
        al = alpha_torch(x[:, b] - x[:, a], distribution, steepness, art_lambda)
        alphas.append(al)
        x = _mix(x, al, a, b, dmin, dmax, 1)
    idx = torch.arange(n, device=sims.device)
    w = torch.stack([(idx >= k), (idx < k)]).to(sims.dtype).unsqueeze(1).expand(2, B, n)
    for (a, b, dmin, dmax), al in zip(reversed(layers), reversed(alphas)):
        # (M w)[a] = al w[dmin] + (1-al) w[dmax]: the transposed mix
        w = _mix(w, al, dmin, dmax, a, b, 2)
    return _bce_rows(w[0], w[1], k)


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


def _blocked_sims(anchor, negatives, positives, self_offset, k):
    """Rows [negs asc | pos asc] with autograd into the anchor only.

    The top-k runs under no_grad over row blocks (no B x N matrix kept for backward); the k
    selected similarities are then recomputed with a gradient.
    """
    B = anchor.shape[0]
    N = negatives.shape[0]
    rows_per_block = max(1, min(B, (1 << 22) // max(N, 1)))
    idx_blocks = []
    with torch.no_grad():
        for r0 in range(0, B, rows_per_block):
            a = anchor[r0:r0 + rows_per_block]
            s = a @ negatives.T
            r = torch.arange(a.shape[0], device=a.device)
            s[r, r + r0 + self_offset] = float("-inf")
            idx_blocks.append(s.topk(k, dim=1).indices.flip(1))
    idx = torch.cat(idx_blocks)
    neg = (anchor.unsqueeze(1) * negatives[idx]).sum(-1)
    pos = (anchor.unsqueeze(0) * positives).sum(-1).T.sort(dim=1).values
    return torch.cat([neg, pos], dim=1)


def _groco_view_torch(anchor, negatives, positives, self_offset, k, network, distribution,
                      steepness):
    sims = _blocked_sims(anchor, negatives, positives, self_offset, k)
    return groco_rows_torch(sims, k, network, distribution, steepness)


def _groco_view_reference(anchor, negatives, positives, self_offset, k, network, distribution,
                          steepness):
    B = anchor.shape[0]
    sims_all = anchor @ negatives.T
    r = torch.arange(B, device=anchor.device)
    mask = torch.zeros_like(sims_all, dtype=torch.bool)
    mask[r, r + self_offset] = True
    neg = sims_all.masked_fill(mask, float("-inf")).topk(k, dim=1).values.flip(1)
    pos = (anchor.unsqueeze(0) * positives).sum(-1).T.sort(dim=1).values
    sims = torch.cat([neg, pos], dim=1)
    return _groco_rows_reference(sims, k, network, distribution, steepness)


def _groco_rows_reference(sims, k, network, distribution, steepness):
    sorter = _reference._sorter(network, sims.shape[1], steepness, distribution, 0.25, sims.device)
    _, P = sorter(sims)
    return _bce_rows(P[:, :, k:].sum(-1), P[:, :, :k].sum(-1), k)


def _soft_sort_reference(x, network, steepness, distribution, art_lambda, want_p):
    return _reference.soft_sort(x, network=network, steepness=steepness,
                                distribution=distribution, art_lambda=art_lambda,
                                return_permutation=want_p)


# ----------------------------------------------------------------------------------------------
# The family's backend table (docs/design.md): name -> namespace, the same three entry points
# in each (soft_sort, groco_view, groco_rows). The kernel backends run them through the
# registered ops with their own name as the op's `backend` argument; those ops' forward and
# backward call the kernel methods (soft_sort_forward/_backward, groco_rows_forward/_backward,
# and on cpp groco_fused_forward/_backward) of the same entry, so a spy on an entry sees both.


class _ReferenceSortnet:
    soft_sort = staticmethod(_soft_sort_reference)
    groco_view = staticmethod(_groco_view_reference)
    groco_rows = staticmethod(_groco_rows_reference)


class _TorchSortnet:
    soft_sort = staticmethod(_soft_sort_torch)
    groco_view = staticmethod(_groco_view_torch)
    groco_rows = staticmethod(groco_rows_torch)


class _KernelSortnet:
    """cpp, triton or cuda: the registered ops with this backend's kernels."""

    def __init__(self, name: str):
        self.name = name

    def soft_sort(self, x, network, steepness, distribution, art_lambda, want_p):
        y, P, _ = soft_sort_op(x, self.name, network, distribution, float(steepness),
                               float(art_lambda), bool(want_p))
        return y, (P if want_p else None)

    def groco_view(self, anchor, negatives, positives, self_offset, k, network, distribution,
                   steepness):
        sims = _blocked_sims(anchor, negatives, positives, self_offset, k)
        return groco_rows_op(sims, k, self.name, network, distribution, float(steepness))

    def groco_rows(self, sims, k, network, distribution, steepness):
        return groco_rows_op(sims, k, self.name, network, distribution, float(steepness))

    # kernel methods, called by the registered ops' forward and backward
    def soft_sort_forward(self, x, net, dist, s, lam, sb, want_p):
        if self.name == "cpp":
            return tuple(_cpp().soft_sort_forward(x, net, dist, s, lam, sb, want_p))
        if self.name == "cuda":
            return tuple(_cpp().soft_sort_forward_cuda(x, net, dist, s, lam, sb, want_p))
        return _triton().soft_sort_forward(x, net, dist, s, lam, sb, want_p)

    def soft_sort_backward(self, gy, gP, d, net, dist, s, lam, sb, n):
        if self.name == "cpp":
            return _cpp().soft_sort_backward(gy, gP, d, net, dist, s, lam, sb)
        if self.name == "cuda":
            return _cpp().soft_sort_backward_cuda(gy, gP, d, net, dist, s, lam, sb, n)
        return _triton().soft_sort_backward(gy, gP, d, net, dist, s, lam, sb, n)

    def groco_rows_forward(self, sims, k, net, *args):
        if self.name == "cpp":
            return _cpp().groco_rows_forward(sims, k, net, *args)
        if self.name == "cuda":
            return _cpp().groco_rows_forward_cuda(sims, k, net, *args)
        return _triton().groco_rows_forward(sims, k, net, *args)

    def groco_rows_backward(self, grow, sims, k, net, *args):
        if self.name == "cpp":
            return _cpp().groco_rows_backward(grow, sims, k, net, *args)
        if self.name == "cuda":
            return _cpp().groco_rows_backward_cuda(grow, sims, k, net, *args)
        return _triton().groco_rows_backward(grow, sims, k, net, *args)


class _CppSortnet(_KernelSortnet):
    """cpp's GroCo view is the fully fused op (cosine + running top-k + network + BCE)."""

    def groco_view(self, anchor, negatives, positives, self_offset, k, network, distribution,
                   steepness):
        loss, _, _ = groco_fused(anchor, negatives, positives, int(self_offset), int(k), network,
                                 distribution, float(steepness))
        return loss

    def groco_fused_forward(self, *args):
        return _cpp().groco_fused_forward(*args)

    def groco_fused_backward(self, *args):
        return _cpp().groco_fused_backward(*args)


TABLE = {
    "reference": _ReferenceSortnet(),
    "torch": _TorchSortnet(),
    "cpp": _CppSortnet("cpp"),
    "triton": _KernelSortnet("triton"),
    "cuda": _KernelSortnet("cuda"),
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
    `backend`: a name chosen by :func:`backend_for` (None: choose now)."""
    if backend is None:
        backend = backend_for("groco", anchor_hat.device)
    check_backend_name("fastssl.ops.sortnet.groco_view_rows", backend, TABLE)
    return TABLE[backend].groco_view(anchor_hat, negatives_hat.detach(), positives_hat.detach(),
                                     self_offset, topk, network, distribution, steepness)


def groco_rows(sims: torch.Tensor, topk: int, network: str = "odd_even",
               distribution: str = "cauchy", steepness: float = 1.0,
               backend: str | None = None) -> torch.Tensor:
    """Row losses of pre-ordered rows [negs asc | pos asc] (tests, benchmarks)."""
    if backend is None:
        backend = backend_for("groco_rows", sims.device)
    check_backend_name("fastssl.ops.sortnet.groco_rows", backend, TABLE)
    return TABLE[backend].groco_rows(sims, topk, network, distribution, steepness)
