"""SwAV: Sinkhorn codes and the swapped-prediction loss (validation, queue, distributed).

The Sinkhorn itself is the fused op ``torch.ops.fastssl.sinkhorn`` (fastssl/ops/swav.py).
The loss needs one log_softmax per crop: with L_v = log_softmax(scores[v] / T), upstream's
sum over (assigned crop i, other crop v) of -mean_b <q_i, L_v> equals the sum over crops v of
-mean_b <sum_{i assigned, i != v} q_i, L_v>, so each crop's log_softmax is computed once
instead of once per assigned crop, inside the fused op ``torch.ops.fastssl.swav_cross_entropy``
(value and closed-form gradient in one pass; the backward only scales the gradient).

Also the two per-step helpers the SwAV trainer needs: :func:`normalize_prototypes_` and
:func:`freeze_prototypes_grad`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fastssl import distributed as D
from fastssl._validation import (accumulation_dtype, check_embeddings, check_int, check_positive,
                                 check_same_device, check_views)
from fastssl.ops import swav as _ops


def sinkhorn(scores: torch.Tensor, *, epsilon: float = 0.05, iterations: int = 3,
             gather_distributed: bool = False) -> torch.Tensor:
    """SwAV distributed Sinkhorn-Knopp on (B, K) prototype scores.

    Returns the (B, K) codes (each row sums to 1), without gradient, in float32 (float64 for
    float64 scores). With `gather_distributed` the prototype marginals are taken over the
    rows of every rank (all-reduce of K-vectors), exactly as upstream's distributed_sinkhorn.
    """
    check_embeddings("scores", scores)
    check_positive("epsilon", epsilon)
    check_int("iterations", iterations, minimum=1)
    if gather_distributed and D.is_distributed():
        # every rank must bring the same number of prototypes (a mismatch would hang)
        D.check_equal_batch("scores", scores)
    return _ops.sinkhorn(scores, epsilon, iterations, gather_distributed)


def _check_queue_scores(queue_scores, n_assign_crops: int, ref: torch.Tensor) -> list:
    if isinstance(queue_scores, torch.Tensor) or not isinstance(queue_scores, (list, tuple)):
        raise TypeError(f"queue_scores: expected a list of (Q, K) tensors or None, "
                        f"got {type(queue_scores).__name__}")
    if len(queue_scores) != n_assign_crops:
        raise ValueError(f"queue_scores: expected {n_assign_crops} tensors (one per assigned crop), "
                         f"got {len(queue_scores)}")
    out = []
    for i, q in enumerate(queue_scores):
        if q is None:
            out.append(None)
            continue
        check_embeddings(f"queue_scores[{i}]", q)
        if q.shape[1] != ref.shape[1]:
            raise ValueError(f"queue_scores[{i}]: expected {ref.shape[1]} prototype columns (as scores), "
                             f"got shape {tuple(q.shape)}")
        check_same_device([("scores[0]", ref), (f"queue_scores[{i}]", q)])
        out.append(q)
    return out


def swav(scores: Sequence[torch.Tensor], *, n_assign_crops: int = 2, temperature: float = 0.1,
         epsilon: float = 0.05, sinkhorn_iterations: int = 3,
         queue_scores: Sequence[torch.Tensor] | None = None,
         gather_distributed: bool = False) -> torch.Tensor:
    """SwAV swapped-prediction loss over a list of (B, K) score tensors, one per crop.

    The first `n_assign_crops` crops get Sinkhorn codes (no gradient; `queue_scores[i]`, a
    (Q, K) tensor, is prepended before Sinkhorn and only the last B rows kept); every other
    crop predicts each code through log_softmax(scores / temperature). The value is the mean
    over assigned crops of (sum over the other crops of the cross-entropy) / (n_crops - 1).
    With `gather_distributed`, Sinkhorn runs over all ranks' rows and the value is the mean
    over the global batch (the loss of upstream is local per rank; its gradients, after DDP's
    average, are the same).
    """
    views = check_views("scores", scores, min_views=2)
    n_crops = len(views)
    check_int("n_assign_crops", n_assign_crops, minimum=1, maximum=n_crops)
    check_positive("temperature", temperature)
    check_positive("epsilon", epsilon)
    check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=1)
    if queue_scores is not None:
        queue_scores = _check_queue_scores(queue_scores, n_assign_crops, views[0])
    use_dist = bool(gather_distributed) and D.is_distributed()
    if use_dist:
        D.check_equal_batch("scores", views[0])
    bs = views[0].shape[0]
    acc = accumulation_dtype(views[0])

    codes = []
    with torch.no_grad():
        for i in range(n_assign_crops):
            out = views[i].detach()
            if queue_scores is not None and queue_scores[i] is not None:
                out = torch.cat((queue_scores[i].detach().to(acc), out.to(acc)))
            codes.append(_ops.sinkhorn(out, epsilon, sinkhorn_iterations, use_dist)[-bs:])

    loss = None
    for v in range(n_crops):
        # target of crop v: the codes of every assigned crop other than v
        others = [codes[i] for i in range(n_assign_crops) if i != v]
        if not others:
            continue
        target = others[0] if len(others) == 1 else torch.stack(others).sum(dim=0)
        # sum over rows of -<target, log_softmax(scores / T)>, one fused op (closed-form backward)
        term = _ops.swav_cross_entropy(views[v], target, temperature)
        loss = term if loss is None else loss + term
    loss = loss / (bs * (n_crops - 1) * n_assign_crops)
    if use_dist:
        loss = D.reduce_loss(loss / D.world_size())
    return loss


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
