"""SwAV reference: distributed Sinkhorn-Knopp and the swapped-prediction loss, step by step.

Follows facebookresearch/swav ``main_swav.py`` (``distributed_sinkhorn`` and the loss in
``train``) in the input dtype's own arithmetic, so it overflows exactly where upstream does
(e.g. float16 scores, or epsilon = 0.01 in float32). Ground truth for the fast paths; never
the fast path itself.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fastssl import distributed as dist_utils
from fastssl._checks import check_sinkhorn, check_swav


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, *, epsilon: float = 0.05, iterations: int = 3,
             gather_distributed: bool = False) -> torch.Tensor:
    """Upstream ``distributed_sinkhorn`` on (B, K) scores; returns (B, K) codes, rows sum to 1
    (iterations = 0: the initial normalisation only, B exp(x) / sum exp(x), as upstream)."""
    check_sinkhorn(scores, epsilon, iterations, gather_distributed)
    use_dist = bool(gather_distributed) and dist_utils.is_distributed()

    Q = torch.exp(scores.detach() / epsilon).t()  # (K, B_local)
    B = Q.shape[1] * (dist_utils.world_size() if use_dist else 1)  # global sample count
    K = Q.shape[0]

    sum_Q = torch.sum(Q)
    if use_dist:
        dist_utils.all_reduce_sum(sum_Q)
    Q = Q / sum_Q
    for _ in range(iterations):
        # prototypes (rows): global sums, each prototype gets total mass 1/K
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        if use_dist:
            dist_utils.all_reduce_sum(sum_of_rows)
        Q = Q / sum_of_rows
        Q = Q / K
        # samples (columns): local sums, each sample gets total mass 1/B
        Q = Q / torch.sum(Q, dim=0, keepdim=True)
        Q = Q / B
    Q = Q * B  # each sample's code sums to 1
    return Q.t().contiguous()


def swav(scores: Sequence[torch.Tensor], *, n_assign_crops: int = 2, temperature: float = 0.1,
         epsilon: float = 0.05, sinkhorn_iterations: int = 3,
         queue_scores: Sequence[torch.Tensor] | None = None,
         gather_distributed: bool = False) -> torch.Tensor:
    """Upstream swapped prediction over a list of (B, K) score tensors, one per crop.

    Codes of the first `n_assign_crops` crops come from Sinkhorn (no gradient; with
    `queue_scores[i]` prepended and only the last B rows kept); each other crop predicts them
    through ``log_softmax(scores / temperature)``.
    """
    views, queue_scores = check_swav(scores, n_assign_crops, temperature, epsilon,
                                     sinkhorn_iterations, queue_scores, gather_distributed)
    n_crops = len(views)
    bs = views[0].shape[0]

    loss = 0
    for crop_id in range(n_assign_crops):
        with torch.no_grad():
            out = views[crop_id].detach()
            if queue_scores is not None and queue_scores[crop_id] is not None:
                out = torch.cat((queue_scores[crop_id].detach().to(out.dtype), out))
            q = sinkhorn(out, epsilon=epsilon, iterations=sinkhorn_iterations,
                         gather_distributed=gather_distributed)[-bs:]
        subloss = 0
        for v in range(n_crops):
            if v == crop_id:
                continue
            x = views[v] / temperature
            subloss = subloss - torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss = loss + subloss / (n_crops - 1)
    loss = loss / n_assign_crops
    if gather_distributed and dist_utils.is_distributed():
        # upstream's loss is local per rank; docs/api.md's value is the global mean
        loss = dist_utils.reduce_loss(loss / dist_utils.world_size())
    return loss
