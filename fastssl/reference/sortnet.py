"""Reference soft sort and GroCo loss: diffsort's dense sorting network, step by step as upstream.

* :func:`soft_sort` wraps ``diffsort.DiffSortNet`` (dense per-layer matrices, ~4 matmuls per
  layer on X), returning ``(sorted, P)`` with ``sorted == x @ P``.
* :func:`groco` follows ``learning_by_sorting/losses/groco.py``: each view is the anchor in turn,
  positives are the other views among the first ``n_pos_views`` (detached, cosine), negatives are
  the same view of the other images of the (gathered) global batch (detached, cosine with
  ``max(norm, 1e-8)`` normalisation, self masked to -inf, top-k hardest, ascending), the row is
  ``[negs asc | pos asc]``, soft-sorted, and the probability of landing in the positive block is
  scored with torch's BCELoss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl import distributed as dist_utils
from fastssl._checks import DISTRIBUTIONS, NETWORKS, check_groco_args, check_soft_sort  # noqa: F401
from fastssl._validation import accumulation_dtype, normalize_rows

_sorters: dict = {}


def _sorter(network: str, n: int, steepness: float, distribution: str, art_lambda: float,
            device: torch.device):
    """diffsort.DiffSortNet, cached; diffsort (the `dev` extra) is imported only here, so the
    library imports and runs without it except for this reference sorting network."""
    key = (network, n, steepness, distribution, art_lambda, str(device))
    net = _sorters.get(key)
    if net is None:
        try:
            import diffsort
        except ImportError as e:
            raise ImportError("fastssl.reference's sorting network needs diffsort "
                              "(pip install 'fastssl[dev]'); the other backends do not") from e
        net = diffsort.DiffSortNet(network, n, device=str(device), steepness=steepness,
                                   art_lambda=art_lambda, distribution=distribution)
        _sorters[key] = net
    return net


def soft_sort(x, *, network="odd_even", steepness=10.0, distribution="cauchy", art_lambda=0.25,
              return_permutation=True):
    """diffsort.DiffSortNet on (B, n) rows: (soft-sorted ascending values, P or None)."""
    steepness = check_soft_sort(x, network, steepness, distribution, art_lambda,
                                return_permutation)
    sorter = _sorter(network, x.shape[1], steepness, distribution, float(art_lambda), x.device)
    y, P = sorter(x)
    return y, (P if return_permutation else None)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    # utils.py's all-to-all cosine: a / max(||a||, 1e-8) on each side, then mm.
    return normalize_rows(x, 1e-8)  # scaled before squaring: no overflow at |x| ~ 1e20


def _bce(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(q, t)  # torch.nn.BCELoss(): mean, logs clamped at -100


def groco_anchor_rows(anchor, positives, negatives, self_offset, *, topk_neg, steepness,
                      network, distribution, art_lambda=0.25):
    """One anchor view: (mean BCE loss over its rows, sims (B, n)) as upstream computes it."""
    # upstream's nn.CosineSimilarity, a / max(|a|, 1e-8) on each side, with the norms scaled
    # before squaring (_normalize): F.cosine_similarity's squared norms overflow float32 at
    # |x| ~ 1e20 (issue 22's edge numerics hold for the reference too)
    anchor_hat = _normalize(anchor)
    pos_sims = torch.stack([(anchor_hat * _normalize(p.detach())).sum(1) for p in positives],
                           dim=1)
    neg_sims = anchor_hat @ _normalize(negatives.detach()).T
    b = anchor.shape[0]
    rows = torch.arange(b, device=anchor.device)
    mask = torch.zeros_like(neg_sims, dtype=torch.bool)
    mask[rows, rows + self_offset] = True
    neg_sims = neg_sims.masked_fill(mask, float("-inf"))
    pos_sims = pos_sims.sort(dim=1).values
    neg_sims = neg_sims.topk(topk_neg, dim=1).values.flip(1)
    sims = torch.cat([neg_sims, pos_sims], dim=1)
    n = sims.shape[1]
    sorter = _sorter(network, n, steepness, distribution, art_lambda, anchor.device)
    _, P = sorter(sims)
    k = topk_neg
    q_pos = P[:, :, k:].sum(-1).clamp(0, 1)
    q_neg = P[:, :, :k].sum(-1).clamp(0, 1)
    t_pos = (torch.arange(n, device=sims.device) >= k).to(sims.dtype).expand(b, n)
    t_neg = 1 - t_pos
    return (_bce(q_pos, t_pos) + _bce(q_neg, t_neg)) / 2, sims


def groco_rows(sims, k, network="odd_even", distribution="cauchy", steepness=1.0):
    """Row losses (B,) of pre-ordered rows [negatives asc | positives asc] (k negatives):
    diffsort's P, then per row the two BCEs of landing in the positive / negative block, summed
    over the row's n entries and divided by 2n (row i's share of groco_anchor_rows' loss times
    B). The reference of ``fastssl.ops.sortnet.groco_rows``."""
    n = sims.shape[1]
    _, P = _sorter(network, n, steepness, distribution, 0.25, sims.device)(sims)
    t = (torch.arange(n, device=sims.device) >= k).to(sims.dtype).expand(sims.shape[0], n)
    lp = F.binary_cross_entropy(P[:, :, k:].sum(-1).clamp(0, 1), t, reduction="none")
    ln = F.binary_cross_entropy(P[:, :, :k].sum(-1).clamp(0, 1), 1 - t, reduction="none")
    return (lp + ln).sum(1) / (2 * n)


def groco(views, *, topk_neg=10, steepness=1.0, n_pos_views=None, network="odd_even",
          distribution="cauchy", gather_distributed=False):
    """GroCo loss, upstream formulation; gather_distributed per docs/api.md (gather +
    reduce_loss)."""
    views, steepness, n_pos_views, dist_on = check_groco_args(
        views, topk_neg, steepness, n_pos_views, network, distribution, gather_distributed)
    acc = accumulation_dtype(views[0])
    views = [v.to(acc) for v in views]
    n_views = len(views)
    b = views[0].shape[0]
    total = 0.0
    for i, anchor in enumerate(views):
        positives = [views[j] for j in range(n_pos_views) if j != i]
        if dist_on:
            negatives = dist_utils.gather(anchor.detach(), name=f"views[{i}]")
            offset = dist_utils.row_offset(b)
        else:
            negatives, offset = anchor.detach(), 0
        loss_i, _ = groco_anchor_rows(anchor, positives, negatives, offset, topk_neg=topk_neg,
                                      steepness=steepness, network=network,
                                      distribution=distribution)
        total = total + loss_i
    loss = total / n_views
    if dist_on:
        # this rank's rows are 1/W of the global mean; reduce_loss restores value and gradient
        loss = dist_utils.reduce_loss(loss / dist_utils.world_size())
    return loss
