"""SFRIK (MMD with rotation-invariant Gegenbauer kernels) and AUH (alignment & uniformity).

Single process: the pair sums run over the N x N Gram of the batch with the symmetric ops.
gather_distributed with W > 1 ranks: the local rows x (B) meet the gathered rows G = gather(x)
(N = B*W) in a rectangular op; this rank's share of the global loss goes through
``reduce_loss``, so the value is the single-process value on the global batch on every rank
and each rank's gradient / W is the single-process gradient of its rows (docs/api.md).

SFRIK and AUH normalise each view once: the mse term's rows are divided by the norms
(ops.norms) whose reciprocals the pair ops then take as they are (x_inv_norm), instead of
each term normalising the raw rows again (issue 25: the forward at B = 512, D = 1024 was 0.89x of
eager with the rows normalised twice per view).
"""
from __future__ import annotations

import math

import torch

from fastssl import distributed as dist_utils
from fastssl._backend import public_loss
from fastssl._checks import check_auh, check_sfrik, check_sfrik_mmd
from fastssl.ops import sphere as ops
from fastssl.reference import sphere as _reference


def _world(gather_distributed: bool) -> int:
    return dist_utils.world_size() if gather_distributed and dist_utils.is_distributed() else 1


def _mmd_share(z: torch.Tensor, weights, world: int, name: str, backend: str,
               r: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's share of mean_{i,j} psi(<ẑ_i, ẑ_j>) over the global batch (r: z's inverse
    norms where the caller has them)."""
    n = z.shape[0] * world
    if world == 1:
        return ops.series_sum(z, weights=weights, backend=backend, x_inv_norm=r) / (n * n)
    return ops.series_sum(z, dist_utils.gather(z, name=name), weights=weights,
                          backend=backend, x_inv_norm=r) / (n * n)


def _mse_share(z1: torch.Tensor, z2: torch.Tensor, n1: torch.Tensor, n2: torch.Tensor,
               world: int) -> torch.Tensor:
    """This rank's share of the global mse(x, y) over N*D elements, x, y the rows divided by
    their norms n1, n2 (ops.norms: differentiable, so autograd carries the mse's gradient
    through the normalisation; a division, whose gradient stays exact at |z| ~ 1e20)."""
    d = z1.to(n1.dtype) / n1[:, None] - z2.to(n2.dtype) / n2[:, None]
    # d * d, not pow(2) (2x slower on CPU) nor a BLAS dot (its float32 sum is 20x less
    # accurate than torch's, amplified by sim_coeff)
    return (d * d).sum() / (z1.numel() * world)


@public_loss("sfrik_mmd", "sphere", ops.TABLE, _reference.sfrik_mmd)
def sfrik_mmd(z, *, weights=(1.0, 40.0, 40.0), gather_distributed=False, backend):
    """SFRIK's uniformity term alone: the mean over all N * N pairs (diagonal
    included) of sum_k w_k P_k(<z_i, z_j>), z L2-normalised, P_k the normalised Gegenbauer
    polynomials in dimension D.

    Args:
        z: (B, D) raw embeddings, D >= 2.
        weights: non-empty sequence of finite floats (any number of degrees).
        gather_distributed: bool. Across W > 1 ranks, the global batch (N = B * W) with
            the value and gradient promises of docs/api.md ("gather_distributed").

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs).

    Example::

        >>> mmd = fastssl.functional.sfrik_mmd(z, weights=(1.0, 40.0, 40.0))
    """
    weights = check_sfrik_mmd(z, weights, gather_distributed)
    world = _world(gather_distributed)
    share = _mmd_share(z, weights, world, "z", backend)
    return dist_utils.reduce_loss(share) if world > 1 else share


@public_loss("sfrik", "sphere", ops.TABLE, _reference.sfrik)
def sfrik(z1, z2, *, weights=(1.0, 40.0, 40.0), sim_coeff=4000.0, mmd_coeff=1.0,
          gather_distributed=False, backend):
    """SFRIK: sim_coeff * mse(x, y) + mmd_coeff * (mmd(x) + mmd(y)) / 2.

    x, y are z1, z2 L2-normalised; mse is the mean over the N * D elements; mmd(x) is the mean
    over all N * N pairs (diagonal included) of psi(<x_i, x_j>), psi = sum_k w_k P_k with P_k
    the normalised Gegenbauer polynomials in dimension D. The pair sums are reduced tile by
    tile: no N x N matrix is stored.

    Args:
        z1, z2: (B, D) raw embeddings, D >= 2 (same shape, dtype and device).
        weights: non-empty sequence of finite floats w_1..w_K (degree 1..K).
        sim_coeff, mmd_coeff: finite floats >= 0.
        gather_distributed: bool. Across W > 1 ranks, the global batch (N = B * W) with
            the value and gradient promises of docs/api.md ("gather_distributed").

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.functional.sfrik(z1, z2, weights=(1.0, 40.0, 40.0))
    """
    weights, sim_coeff, mmd_coeff = check_sfrik(z1, z2, weights, sim_coeff, mmd_coeff,
                                                gather_distributed)
    world = _world(gather_distributed)
    n1, n2 = ops.norms(z1), ops.norms(z2)  # once per view, shared by both terms
    r1, r2 = n1.detach().reciprocal(), n2.detach().reciprocal()  # the ops' inverse norms
    mmd = (_mmd_share(z1, weights, world, "z1", backend, r1)
           + _mmd_share(z2, weights, world, "z2", backend, r2)) / 2
    share = sim_coeff * _mse_share(z1, z2, n1, n2, world) + mmd_coeff * mmd
    return dist_utils.reduce_loss(share) if world > 1 else share


def _uniformity_share(z: torch.Tensor, scale: float, world: int, name: str,
                      backend: str, r: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's share of log mean_{i != j} exp(2s(<ẑ_i, ẑ_j> - 1)) over the global batch
    (r: z's inverse norms where the caller has them)."""
    n = z.shape[0] * world
    log_pairs = math.log(n * (n - 1))
    if world == 1:
        return ops.gauss_lse(z, scale=scale, backend=backend, x_inv_norm=r) - log_pairs
    # log of a global sum: this rank's rows give lse_r; the total is the logsumexp over ranks.
    # share_r = exp(lse_r - lse) + (U - 1)/W sums to U over ranks and has gradient d lse_r *
    # exp(lse_r - lse) = d S_r / S, the rank's part of dU (lse_r <= lse: no overflow).
    local = ops.gauss_lse(z, dist_utils.gather(z, name=name), scale=scale,
                          diag_offset=dist_utils.row_offset(z.shape[0]), backend=backend,
                          x_inv_norm=r)
    total = torch.logsumexp(dist_utils.gather_no_grad(local.detach().reshape(1)), dim=0)
    unif = total - log_pairs
    return torch.exp(local - total) + (unif - 1) / world


@public_loss("auh", "sphere", ops.TABLE, _reference.auh)
def auh(z1, z2, *, sim_coeff=3000.0, unif_coeff=1.0, scale=2.5, gather_distributed=False,
        backend):
    """Alignment and uniformity on the hypersphere (AUH, as in the SFRIK repository):
    sim_coeff * mse(x, y) + unif_coeff * (U(x) + U(y)) / 2, with x, y the L2-normalised views
    and U(x) = log mean_(i != j) exp(-2 scale (1 - <x_i, x_j>)) (a stable log-sum-exp, tile by
    tile, no N x N matrix).

    Args:
        z1, z2: (B, D) raw embeddings (same shape, dtype and device); the global batch needs
            at least 2 rows.
        sim_coeff, unif_coeff: finite floats >= 0. scale: float > 0.
        gather_distributed: bool. Across W > 1 ranks, the global batch (N = B * W) with
            the value and gradient promises of docs/api.md ("gather_distributed").

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.functional.auh(z1, z2, sim_coeff=3000.0, scale=2.5)
    """
    sim_coeff, unif_coeff, scale = check_auh(z1, z2, sim_coeff, unif_coeff, scale,
                                             gather_distributed)
    world = _world(gather_distributed)
    n1, n2 = ops.norms(z1), ops.norms(z2)  # once per view, shared by both terms
    r1, r2 = n1.detach().reciprocal(), n2.detach().reciprocal()  # the ops' inverse norms
    unif = (_uniformity_share(z1, scale, world, "z1", backend, r1)
            + _uniformity_share(z2, scale, world, "z2", backend, r2)) / 2
    share = sim_coeff * _mse_share(z1, z2, n1, n2, world) + unif_coeff * unif
    return dist_utils.reduce_loss(share) if world > 1 else share
