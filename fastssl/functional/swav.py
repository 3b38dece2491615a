"""SwAV: Sinkhorn codes and the swapped-prediction loss (validation, queue, distributed).

The Sinkhorn itself is the fused op ``torch.ops.fastssl.sinkhorn`` (fastssl/ops/swav.py).
The loss needs one log_softmax per crop: with L_v = log_softmax(scores[v] / T), upstream's
sum over (assigned crop i, other crop v) of -mean_b <q_i, L_v> equals the sum over crops v of
-mean_b <sum_{i assigned, i != v} q_i, L_v>, so each crop's log_softmax is computed once
instead of once per assigned crop, inside the fused op ``torch.ops.fastssl.swav_cross_entropy``
(value and closed-form gradient in one pass over the row). The crops past the assigned ones all
predict the same summed codes, computed once and shared.

Also the two per-step helpers the SwAV trainer needs: :func:`normalize_prototypes_` and
:func:`freeze_prototypes_grad`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fastssl import distributed as dist_utils
from fastssl._backend import public_loss
from fastssl._checks import check_sinkhorn, check_swav
from fastssl._validation import accumulation_dtype, check_int
from fastssl.ops import swav as _ops
from fastssl.reference.swav import sinkhorn as _sinkhorn_reference
from fastssl.reference.swav import swav as _swav_reference


def _sinkhorn_reference_codes(scores, *, epsilon=0.05, iterations=3, gather_distributed=False):
    """The reference's codes in the accumulation dtype, as the fused path returns them."""
    codes = _sinkhorn_reference(scores, epsilon=epsilon, iterations=iterations,
                                gather_distributed=gather_distributed)
    return codes.to(accumulation_dtype(codes))


@public_loss("sinkhorn", "swav", _ops.TABLE, _sinkhorn_reference_codes, method="sinkhorn")
def sinkhorn(scores: torch.Tensor, *, epsilon: float = 0.05, iterations: int = 3,
             gather_distributed: bool = False, backend: str) -> torch.Tensor:
    """SwAV's (distributed) Sinkhorn-Knopp on (B, K) prototype scores.

    Log-domain and stable in float16/bfloat16 and for epsilon down to 0.01; the same codes as
    upstream's distributed_sinkhorn. No gradient flows (upstream detaches the scores).

    Args:
        scores: (B, K) float tensor of prototype scores (not normalised here).
        epsilon: float > 0. iterations: int >= 0 (0: upstream's initial normalisation only,
            codes = B * exp(scores / epsilon) / its total, rows not summing to 1; lightly and
            SwAV allow it).
        gather_distributed: bool. With W > 1 ranks the prototype marginals are taken over the
            rows of every rank (all-reduce of K-vectors), as upstream; each rank gets the
            codes of its own rows.

    Returns:
        (B, K) codes, each row summing to 1 (for iterations >= 1), float32 (float64 for float64
        scores).

    Example::

        >>> codes = fastssl.functional.sinkhorn(scores, epsilon=0.05, iterations=3)
    """
    check_sinkhorn(scores, epsilon, iterations, gather_distributed)
    if gather_distributed and dist_utils.is_distributed():
        # every rank must bring the same number of prototypes (a mismatch would hang)
        dist_utils.check_equal_batch("scores", scores)
    return _ops.sinkhorn(scores, epsilon, iterations, gather_distributed, backend)


@public_loss("swav", "swav", _ops.TABLE, _swav_reference, method="cross_entropy")
def swav(scores: Sequence[torch.Tensor], *, n_assign_crops: int = 2, temperature: float = 0.1,
         epsilon: float = 0.05, sinkhorn_iterations: int = 3,
         queue_scores: Sequence[torch.Tensor] | None = None,
         gather_distributed: bool = False, backend: str) -> torch.Tensor:
    """SwAV swapped-prediction loss over a list of (B, K) score tensors, one per crop.

    The first `n_assign_crops` crops get Sinkhorn codes (no gradient; `queue_scores[i]`, a
    (Q, K) tensor, is prepended before Sinkhorn and only the last B rows kept); every other
    crop predicts each code through log_softmax(scores / temperature). The value is the mean
    over assigned crops of (sum over the other crops of the cross-entropy) / (n_crops - 1).
    The scores are used as given (the caller normalises embeddings and prototypes).

    Args:
        scores: list or tuple of >= 2 (B, K) tensors, the assigned crops first.
        n_assign_crops: int in [1, len(scores)]. temperature, epsilon: floats > 0.
        sinkhorn_iterations: int >= 0 (0: the normalisation only, see :func:`sinkhorn`).
        queue_scores: None or a list of n_assign_crops (Q, K) tensors (or None entries).
        gather_distributed: bool. Sinkhorn runs over all ranks' rows and the value is the mean
            over the global batch (upstream's loss is local per rank; the gradients after
            DDP's average are the same).

    Returns:
        A 0-dim float32 tensor (float64 for float64 scores).

    Example::

        >>> loss = fastssl.functional.swav([s1, s2, s_small], n_assign_crops=2)
    """
    views, queue_scores = check_swav(scores, n_assign_crops, temperature, epsilon,
                                     sinkhorn_iterations, queue_scores, gather_distributed)
    n_crops = len(views)
    use_dist = gather_distributed and dist_utils.is_distributed()
    if use_dist:
        dist_utils.check_equal_batch("scores", views[0])
    bs = views[0].shape[0]
    acc = accumulation_dtype(views[0])
    # `backend` (chosen once by public_loss among the entries with both methods) serves the
    # Sinkhorn and the cross-entropy ops (docs/design.md)

    codes = []
    with torch.no_grad():
        for i in range(n_assign_crops):
            out = views[i].detach()
            if queue_scores is not None and queue_scores[i] is not None:
                out = torch.cat((queue_scores[i].detach().to(acc), out.to(acc)))
            codes.append(_ops.sinkhorn(out, epsilon, sinkhorn_iterations, use_dist,
                                       backend)[-bs:])

    loss = None
    summed = None  # the target of every crop past the assigned ones, summed once and shared
    for v in range(n_crops):
        # target of crop v: the codes of every assigned crop other than v
        if v < n_assign_crops:
            others = [codes[i] for i in range(n_assign_crops) if i != v]
            if not others:
                continue
            target = sum_tensors(others)
        else:
            if summed is None:
                summed = sum_tensors(codes)
            target = summed
        # sum over rows of -<target, log_softmax(scores / T)>, one fused op (closed-form backward)
        term = _ops.swav_cross_entropy(views[v], target, temperature, backend)
        loss = term if loss is None else loss + term
    loss = loss / (bs * (n_crops - 1) * n_assign_crops)
    if use_dist:
        loss = dist_utils.reduce_loss(loss / dist_utils.world_size())
    return loss


def sum_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The elementwise sum, one new tensor at most (the single tensor itself when alone)."""
    if len(tensors) == 1:
        return tensors[0]
    out = tensors[0] + tensors[1]
    for t in tensors[2:]:
        out.add_(t)
    return out


@torch.no_grad()
def normalize_prototypes_(prototypes) -> torch.nn.Module | torch.Tensor:
    """L2-normalise each prototype (row of the (K, D) weight) in place, without gradient.

    Upstream does this at the start of every iteration, before the forward pass. Accepts the
    prototype layer (an ``nn.Linear``) or its weight; returns what it was given.
    """
    weight = prototypes.weight if isinstance(prototypes, torch.nn.Module) else prototypes
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError("prototypes: expected an nn.Linear or a 2-D (K, D) weight tensor, "
                        f"got {type(prototypes).__name__}")
    weight.copy_(F.normalize(weight.detach().clone(), dim=1, p=2))
    return prototypes


def freeze_prototypes_grad(module: torch.nn.Module, iteration: int, freeze_iters: int) -> bool:
    """Drop the prototypes' gradients (``p.grad = None``) while ``iteration < freeze_iters``.

    Call after ``backward()`` and before the optimiser step, as upstream does; the optimiser
    (and LARS) then skips them. Matches parameters whose name contains "prototypes" (also
    under DDP's "module." prefix); a bare prototype layer (an ``nn.Linear``) passed directly
    is frozen whole. Returns whether the gradients were dropped.
    """
    check_int("iteration", iteration, minimum=0)
    check_int("freeze_iters", freeze_iters, minimum=0)
    if iteration >= freeze_iters:
        return False
    params = [p for name, p in module.named_parameters() if "prototypes" in name]
    if not params and isinstance(module, torch.nn.Linear):
        params = list(module.parameters())
    for p in params:
        p.grad = None
    return True
