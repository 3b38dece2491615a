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
import struct

import torch

from fastssl._backend import choose
from fastssl._validation import accumulation_dtype
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


_net_cache: dict = {}


def network_tensor(network: str, n: int, device: torch.device) -> torch.Tensor:
    """(4, C) int32 comparator table, cached per (network, n, device)."""
    key = (network, n, str(device), "flat")
    t = _net_cache.get(key)
    if t is None:
        comps = [c for layer in comparator_layers(network, n) for c in layer]
        t = torch.tensor(comps, dtype=torch.int32).reshape(-1, 4).T.contiguous().to(device)
        _net_cache[key] = t
    return t


def network_layers(network: str, n: int, device: torch.device):
    """Per layer (a, b, dmin, dmax) int64 index tensors for the vectorised torch path."""
    key = (network, n, str(device), "layers")
    t = _net_cache.get(key)
    if t is None:
        t = []
        for layer in comparator_layers(network, n):
            if layer:
                idx = torch.tensor(layer, dtype=torch.int64).T.contiguous().to(device)
                t.append(tuple(idx))
        _net_cache[key] = t
    return t


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


@torch.library.custom_op("fastssl::soft_sort", mutates_args=())
def soft_sort_op(x: torch.Tensor, backend: str, network: str, distribution: str,
                  steepness: float, art_lambda: float, want_p: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    net = network_tensor(network, x.shape[1], x.device)
    y, P, d = TABLE[backend].soft_sort_forward(x.contiguous(), net, DIST_IDS[distribution],
                                               steepness, art_lambda, sigma_bwd(steepness), want_p)
    return y, P, d


@soft_sort_op.register_fake
def _(x, backend, network, distribution, steepness, art_lambda, want_p):
    B, n = x.shape
    C = sum(len(layer) for layer in comparator_layers(network, n))
    P = x.new_empty((B, n, n)) if want_p else x.new_empty(0)
    # the cpp forward saves (d | alpha | dalpha/dd) so its backward evaluates no f(d) again
    saved = 3 * C if backend == "cpp" else C
    return x.new_empty((B, n)), P, x.new_empty((B, saved))


@torch.library.custom_op("fastssl::soft_sort_backward", mutates_args=())
def soft_sort_backward(gy: torch.Tensor, gP: torch.Tensor, d: torch.Tensor, n: int, backend: str,
                  network: str, distribution: str, steepness: float, art_lambda: float
                  ) -> torch.Tensor:
    net = network_tensor(network, n, d.device)
    return TABLE[backend].soft_sort_backward(gy.contiguous(), gP.contiguous(), d.contiguous(),
                                             net, DIST_IDS[distribution], steepness, art_lambda,
                                             sigma_bwd(steepness), n)


@soft_sort_backward.register_fake
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
def groco_rows_op(sims: torch.Tensor, k: int, backend: str, network: str, distribution: str,
                  steepness: float) -> torch.Tensor:
    net = network_tensor(network, sims.shape[1], sims.device)
    args = (DIST_IDS[distribution], steepness, 0.25, sigma_bwd(steepness))
    return TABLE[backend].groco_rows_forward(sims.contiguous(), k, net, *args)


@groco_rows_op.register_fake
def _(sims, k, backend, network, distribution, steepness):
    return sims.new_empty((sims.shape[0],))


@torch.library.custom_op("fastssl::groco_rows_backward", mutates_args=())
def groco_rows_backward(grow: torch.Tensor, sims: torch.Tensor, k: int, backend: str, network: str,
                   distribution: str, steepness: float) -> torch.Tensor:
    net = network_tensor(network, sims.shape[1], sims.device)
    args = (DIST_IDS[distribution], steepness, 0.25, sigma_bwd(steepness))
    grow, sims = grow.contiguous(), sims.contiguous()
    return TABLE[backend].groco_rows_backward(grow, sims, k, net, *args)


@groco_rows_backward.register_fake
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
def _(anchor, negatives, positives, self_offset, k, network, distribution, steepness):
    B, n = anchor.shape[0], k + positives.shape[0]
    return (anchor.new_empty((B,)), anchor.new_empty((B, n)),
            anchor.new_empty((B, n), dtype=torch.int64))


@torch.library.custom_op("fastssl::groco_fused_backward", mutates_args=())
def groco_fused_backward(grow: torch.Tensor, sims: torch.Tensor, index: torch.Tensor,
                    negatives: torch.Tensor, positives: torch.Tensor, k: int, network: str,
                    distribution: str, steepness: float) -> torch.Tensor:
    net = network_tensor(network, sims.shape[1], sims.device)
    return TABLE["cpp"].groco_fused_backward(grow.contiguous(), sims, index, negatives.contiguous(),
                                       positives.contiguous(), k, net, DIST_IDS[distribution],
                                       steepness, 0.25, sigma_bwd(steepness))


@groco_fused_backward.register_fake
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
    return TABLE[backend].groco_view(anchor_hat, negatives_hat.detach(), positives_hat.detach(),
                                     self_offset, topk, network, distribution, steepness)


def groco_rows(sims: torch.Tensor, topk: int, network: str = "odd_even",
               distribution: str = "cauchy", steepness: float = 1.0,
               backend: str | None = None) -> torch.Tensor:
    """Row losses of pre-ordered rows [negs asc | pos asc] (tests, benchmarks)."""
    if backend is None:
        backend = backend_for("groco_rows", sims.device)
    return TABLE[backend].groco_rows(sims, topk, network, distribution, steepness)
