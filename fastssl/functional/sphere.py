"""SFRIK (MMD with rotation-invariant Gegenbauer kernels) and AUH (alignment & uniformity).

Single process: the pair sums run over the N x N Gram of the batch with the symmetric ops.
gather_distributed with W > 1 ranks: the local rows x (B) meet the gathered rows G = gather(x)
(N = B*W) in a rectangular op; this rank's share of the global loss goes through
``reduce_loss``, so the value is the single-process value on the global batch on every rank
and each rank's gradient / W is the single-process gradient of its rows (api.md).
"""
from __future__ import annotations

import math

import torch

from fastssl import distributed as D
from fastssl._validation import (accumulation_dtype, check_embeddings, check_nonnegative,
                                 check_pair, check_positive, check_weights)
from fastssl.ops import sphere as ops
from fastssl.reference.sphere import check_sphere_dim


def _world(gather_distributed: bool) -> int:
    return D.world_size() if gather_distributed and D.is_distributed() else 1


def _mmd_share(z: torch.Tensor, weights, world: int, name: str) -> torch.Tensor:
    """This rank's share of mean_{i,j} psi(<ẑ_i, ẑ_j>) over the global batch."""
    n = z.shape[0] * world
    if world == 1:
        return ops.series_sum(z, weights=weights) / (n * n)
    return ops.series_sum(z, D.gather(z, name=name), weights=weights) / (n * n)


def _mse_share(z1: torch.Tensor, z2: torch.Tensor, world: int) -> torch.Tensor:
    """This rank's share of the global mse(x, y) over N*D elements, x, y the normalised rows."""
    acc = accumulation_dtype(z1)
    x = torch.nn.functional.normalize(z1.to(acc), dim=1)
    y = torch.nn.functional.normalize(z2.to(acc), dim=1)
    return (x - y).pow(2).sum() / (z1.numel() * world)


def sfrik_mmd(z, *, weights=(1.0, 40.0, 40.0), gather_distributed=False):
    check_embeddings("z", z)
    weights = check_weights("weights", weights)
    check_sphere_dim("z", z)
    world = _world(gather_distributed)
    share = _mmd_share(z, weights, world, "z")
    return D.reduce_loss(share) if world > 1 else share


def sfrik(z1, z2, *, weights=(1.0, 40.0, 40.0), sim_coeff=4000.0, mmd_coeff=1.0,
          gather_distributed=False):
    check_pair("z1", z1, "z2", z2)
    weights = check_weights("weights", weights)
    check_sphere_dim("z1", z1)
    sim_coeff = check_nonnegative("sim_coeff", sim_coeff)
    mmd_coeff = check_nonnegative("mmd_coeff", mmd_coeff)
    world = _world(gather_distributed)
    mmd = (_mmd_share(z1, weights, world, "z1") + _mmd_share(z2, weights, world, "z2")) / 2
    share = sim_coeff * _mse_share(z1, z2, world) + mmd_coeff * mmd
    return D.reduce_loss(share) if world > 1 else share


def _uniformity_share(z: torch.Tensor, scale: float, world: int, name: str) -> torch.Tensor:
    """This rank's share of log mean_{i != j} exp(2s(<ẑ_i, ẑ_j> - 1)) over the global batch."""
    n = z.shape[0] * world
    log_pairs = math.log(n * (n - 1))
    if world == 1:
        return ops.gauss_lse(z, scale=scale) - log_pairs
    # log of a global sum: this rank's rows give lse_r; the total is the logsumexp over ranks.
    # share_r = exp(lse_r - lse) + (U - 1)/W sums to U over ranks and has gradient d lse_r *
    # exp(lse_r - lse) = d S_r / S, the rank's part of dU (lse_r <= lse: no overflow).
    local = ops.gauss_lse(z, D.gather(z, name=name), scale=scale,
                          diag_offset=D.row_offset(z.shape[0]))
    total = torch.logsumexp(D.gather_no_grad(local.detach().reshape(1)), dim=0)
    unif = total - log_pairs
    return torch.exp(local - total) + (unif - 1) / world


def auh(z1, z2, *, sim_coeff=3000.0, unif_coeff=1.0, scale=2.5, gather_distributed=False):
    check_pair("z1", z1, "z2", z2)
    sim_coeff = check_nonnegative("sim_coeff", sim_coeff)
    unif_coeff = check_nonnegative("unif_coeff", unif_coeff)
    scale = check_positive("scale", scale)
    world = _world(gather_distributed)
    if z1.shape[0] * world < 2:
        raise ValueError(f"z1: the uniformity term needs a global batch of at least 2 rows, "
                         f"got shape {tuple(z1.shape)} on {world} rank(s)")
    unif = (_uniformity_share(z1, scale, world, "z1")
            + _uniformity_share(z2, scale, world, "z2")) / 2
    share = sim_coeff * _mse_share(z1, z2, world) + unif_coeff * unif
    return D.reduce_loss(share) if world > 1 else share
