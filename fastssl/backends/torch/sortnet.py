"""The torch backend of the sortnet family: the sorting network with diffsort's formulas for
alpha, one gather/scatter per layer, differentiated by autograd (no registered op, no explicit
kernels), and the blocked top-k that every GroCo view but the fused C++ one starts from.
"""
from __future__ import annotations

import math

import torch

from fastssl.backends.networks import network_layers, sigma_bwd


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


def soft_sort_torch(x, network, steepness, distribution, art_lambda, want_p):
    B, n = x.shape
    X = torch.eye(n, dtype=x.dtype, device=x.device).expand(B, n, n) if want_p else None
    for a, b, dmin, dmax in network_layers(network, n, x.device):
        al = alpha_torch(x[:, b] - x[:, a], distribution, steepness, art_lambda)
        if want_p:
            X = _mix(X, al.unsqueeze(1), a, b, dmin, dmax, 2)
        x = _mix(x, al, a, b, dmin, dmax, 1)
    return x, X


def _bce_rows(q_pos, q_neg, k):
    n = q_pos.shape[1]
    t = (torch.arange(n, device=q_pos.device) >= k).to(q_pos.dtype).expand_as(q_pos)
    bce = torch.nn.functional.binary_cross_entropy
    lp = bce(q_pos.clamp(0, 1), t, reduction="none")
    ln = bce(q_neg.clamp(0, 1), 1 - t, reduction="none")
    return (lp + ln).sum(1) / (2 * n)


def groco_rows_torch(sims, k, network, distribution, steepness):
    """Vector form with autograd: q = M_1(...(M_C v)), per layer, P never formed (GroCo's
    art_lambda is 0.25, as the kernels')."""
    B, n = sims.shape
    layers = network_layers(network, n, sims.device)
    x = sims
    alphas = []
    for a, b, dmin, dmax in layers:
        al = alpha_torch(x[:, b] - x[:, a], distribution, steepness, 0.25)
        alphas.append(al)
        x = _mix(x, al, a, b, dmin, dmax, 1)
    idx = torch.arange(n, device=sims.device)
    w = torch.stack([(idx >= k), (idx < k)]).to(sims.dtype).unsqueeze(1).expand(2, B, n)
    for (a, b, dmin, dmax), al in zip(reversed(layers), reversed(alphas)):
        # (M w)[a] = al w[dmin] + (1-al) w[dmax]: the transposed mix
        w = _mix(w, al, dmin, dmax, a, b, 2)
    return _bce_rows(w[0], w[1], k)


def blocked_sims(anchor, negatives, positives, self_offset, k):
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


class TorchSortnet:
    """The family's autograd methods (fastssl/backends/interfaces.py); no kernel methods."""
    soft_sort = staticmethod(soft_sort_torch)
    groco_rows = staticmethod(groco_rows_torch)
