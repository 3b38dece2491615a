"""Reference SFRIK / AUH (valeoai/sfrik ``src/sfrik/ssl.py``), full N x N Gram matrices.

Follows the upstream steps: normalise, local MSE, gather the normalised embeddings (all-gather
whose backward sums over ranks, like upstream's FullGatherLayer), one full Gram per view,
a kernel of the Gram, a mean. The only departure is the MSE term under gather_distributed:
upstream keeps it local and lets DDP average it; here its global mean goes through
``reduce_loss`` so that the returned value is the single-process value on the global batch
(docs/api.md promise 1) with the same DDP gradient.

Low precision follows upstream AMP: normalisation, kernel and means in float32, the Gram
matmul in the input dtype (autocast's fp16/bf16 GEMM).
"""
from __future__ import annotations

import math

import torch

from fastssl import distributed as dist_utils
from fastssl._checks import check_auh, check_sfrik, check_sfrik_mmd, check_sphere_dim  # noqa: F401
from fastssl._validation import accumulation_dtype, normalize_rows


def gegenbauer(t: torch.Tensor, degree: int, dim: int) -> torch.Tensor:
    """Normalised Gegenbauer polynomial P_degree(t) on S^(dim-1), with P_k(1) = 1.

    Three-term recurrence (Legendre polynomials in `dim` dimensions):
    P_{k+1} = (2k+dim-2)/(k+dim-2) * t * P_k - k/(k+dim-2) * P_{k-1}, P_0 = 1, P_1 = t.
    """
    if dim < 2:
        raise ValueError(f"dim: expected >= 2, got {dim}")
    if degree < 0:
        raise ValueError(f"degree: expected >= 0, got {degree}")
    p_prev, p = torch.ones_like(t), t
    if degree == 0:
        return p_prev
    for k in range(1, degree):
        p_prev, p = p, ((2 * k + dim - 2) / (k + dim - 2)) * t * p - (k / (k + dim - 2)) * p_prev
    return p


def gegenbauer_closed_form(t: torch.Tensor, degree: int, dim: int) -> torch.Tensor:
    """Upstream's explicit P1..P4 (``legendre_polynomial``), for testing the recurrence."""
    q = dim
    if degree == 1:
        return t
    if degree == 2:
        return (1 + 1 / (q - 1)) * t ** 2 - 1 / (q - 1)
    if degree == 3:
        return (1 + 3 / (q - 1)) * t ** 3 - 3 / (q - 1) * t
    if degree == 4:
        c = q ** 2 - 1
        return (q + 2) * (q + 4) / c * t ** 4 - 6 * (q + 2) / c * t ** 2 + 3 / c
    raise ValueError(f"degree: closed forms exist for 1..4, got {degree}")


def kernel_series(t: torch.Tensor, weights, dim: int) -> torch.Tensor:
    """psi(t) = sum_k w_k P_k(t), k = 1..len(weights)."""
    return sum(w * gegenbauer(t, k, dim) for k, w in enumerate(weights, start=1))


def _normalize(z: torch.Tensor) -> torch.Tensor:
    return normalize_rows(z.to(accumulation_dtype(z)))  # no overflow at |z| ~ 1e20


def _gram(emb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """emb @ emb.T with the matmul in `dtype` (the input dtype, as autocast does)."""
    low = emb.to(dtype)
    return (low @ low.T).to(emb.dtype)


def _gather(emb: torch.Tensor, gather_distributed: bool, name: str) -> torch.Tensor:
    if gather_distributed and dist_utils.is_distributed():
        return dist_utils.gather(emb, name=name)
    return emb


def _mmd_full(emb: torch.Tensor, weights, dim: int, dtype: torch.dtype) -> torch.Tensor:
    return kernel_series(_gram(emb, dtype), weights, dim).mean()


def _mse_global(x: torch.Tensor, y: torch.Tensor, gather_distributed: bool) -> torch.Tensor:
    """Mean of (x - y)^2 over the global batch's N*D elements, as this rank's reduced share."""
    w = dist_utils.world_size() if gather_distributed and dist_utils.is_distributed() else 1
    share = (x - y).pow(2).sum() / (x.numel() * w)
    return dist_utils.reduce_loss(share) if w > 1 else share


def _out(loss: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return loss.to(accumulation_dtype(z))


def sfrik_mmd(z, *, weights=(1.0, 40.0, 40.0), gather_distributed=False):
    weights = check_sfrik_mmd(z, weights, gather_distributed)
    dim = z.shape[1]
    emb = _gather(_normalize(z), gather_distributed, "z")
    return _out(_mmd_full(emb, weights, dim, z.dtype), z)


def sfrik(z1, z2, *, weights=(1.0, 40.0, 40.0), sim_coeff=4000.0, mmd_coeff=1.0,
          gather_distributed=False):
    weights, sim_coeff, mmd_coeff = check_sfrik(z1, z2, weights, sim_coeff, mmd_coeff,
                                                gather_distributed)
    dim = z1.shape[1]
    x, y = _normalize(z1), _normalize(z2)
    repr_loss = _mse_global(x, y, gather_distributed)
    x, y = _gather(x, gather_distributed, "z1"), _gather(y, gather_distributed, "z2")
    mmd = (_mmd_full(x, weights, dim, z1.dtype) + _mmd_full(y, weights, dim, z2.dtype)) / 2
    return _out(sim_coeff * repr_loss + mmd_coeff * mmd, z1)


def _uniformity(emb: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """log mean_{i != j} exp(-2 s (1 - <e_i, e_j>)), via log-sum-exp so it stays finite."""
    n = emb.shape[0]
    logits = 2 * scale * (_gram(emb, dtype) - 1)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=emb.device)
    return torch.logsumexp(logits[off_diagonal], dim=0) - math.log(n * (n - 1))


def auh(z1, z2, *, sim_coeff=3000.0, unif_coeff=1.0, scale=2.5, gather_distributed=False):
    sim_coeff, unif_coeff, scale = check_auh(z1, z2, sim_coeff, unif_coeff, scale,
                                             gather_distributed)
    x, y = _normalize(z1), _normalize(z2)
    repr_loss = _mse_global(x, y, gather_distributed)
    x, y = _gather(x, gather_distributed, "z1"), _gather(y, gather_distributed, "z2")
    unif = (_uniformity(x, scale, z1.dtype) + _uniformity(y, scale, z2.dtype)) / 2
    return _out(sim_coeff * repr_loss + unif_coeff * unif, z1)
