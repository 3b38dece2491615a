"""sortnet family: GroCo loss and the diffsort-compatible soft sort (api.md)."""
from __future__ import annotations

import torch

from fastssl import distributed as D
from fastssl._validation import accumulation_dtype, check_embeddings
from fastssl.ops import sortnet as ops
from fastssl.reference.sortnet import check_groco_args, check_sort_args


def _normalise(x: torch.Tensor) -> torch.Tensor:
    # upstream's cosine: a / max(||a||, 1e-8) (nn.CosineSimilarity and the all-to-all alike)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)


def groco(views, *, topk_neg=10, steepness=1.0, n_pos_views=None, network="odd_even",
          distribution="cauchy", gather_distributed=False):
    """GroCo exactly as upstream (see fastssl.reference.sortnet.groco), fused per anchor view.

    Each view is the anchor in turn; its positives are the other views among the first
    n_pos_views (detached), its negatives the same view of the other images of the (gathered)
    global batch (detached, top-k hardest). Returns a float32 scalar (float64 for float64 input).
    """
    dist_on = bool(gather_distributed) and D.is_distributed()
    views, steepness, n_pos_views = check_groco_args(views, topk_neg, steepness, n_pos_views,
                                                     network, distribution, dist_on)
    acc = accumulation_dtype(views[0])
    views = [v.to(acc) for v in views]
    n_views = len(views)
    b = views[0].shape[0]
    detached = [_normalise(v.detach()) for v in views]
    total = None
    for i, view in enumerate(views):
        anchor = _normalise(view)
        positives = torch.stack([detached[j] for j in range(n_pos_views) if j != i])
        if dist_on:
            negatives = D.gather_no_grad(detached[i], name=f"views[{i}]")
            offset = D.row_offset(b)
        else:
            negatives, offset = detached[i], 0
        rows = ops.groco_view_rows(anchor, negatives, positives, offset, topk_neg, network,
                                   distribution, steepness)
        total = rows.sum() if total is None else total + rows.sum()
    # this rank's share of (1/V) sum_views mean over the global batch
    share = total / (n_views * b * (D.world_size() if dist_on else 1))
    return D.reduce_loss(share) if dist_on else share


def soft_sort(x, *, network="odd_even", steepness=10.0, distribution="cauchy", art_lambda=0.25,
              return_permutation=True):
    """diffsort-compatible soft sort of the rows of x (B, n): (sorted ascending, P or None),
    with sorted == x @ P (row = input, column = rank)."""
    check_embeddings("x", x)
    if x.shape[1] < 2:
        raise ValueError(f"x: expected at least 2 columns to sort, got shape {tuple(x.shape)}")
    steepness = check_sort_args(network, steepness, distribution, art_lambda)
    return ops.soft_sort(x, network=network, steepness=steepness, distribution=distribution,
                         art_lambda=float(art_lambda), return_permutation=bool(return_permutation))
