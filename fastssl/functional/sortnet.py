"""sortnet family: GroCo loss and the diffsort-compatible soft sort (docs/api.md)."""
from __future__ import annotations

import torch

from fastssl import distributed as dist_utils
from fastssl._backend import public_loss
from fastssl._checks import check_groco_args, check_soft_sort
from fastssl._validation import accumulation_dtype, normalize_rows
from fastssl.ops import sortnet as ops
from fastssl.reference import sortnet as _reference


def _normalize(x: torch.Tensor) -> torch.Tensor:
    # upstream's cosine: a / max(||a||, 1e-8) (nn.CosineSimilarity and the all-to-all alike)
    return normalize_rows(x, 1e-8)


@public_loss("groco", "sortnet", ops.TABLE, _reference.groco)
def groco(views, *, topk_neg=10, steepness=1.0, n_pos_views=None, network="odd_even",
          distribution="cauchy", gather_distributed=False, backend):
    """GroCo (learning by sorting) loss, as upstream, fused per anchor view.

    Each view is the anchor in turn (rows L2-normalised with max(norm, 1e-8), as upstream's
    cosine); its positives are the other views among the first n_pos_views (detached), its
    negatives the same view of the other images of the (gathered) batch (detached, the
    top-k hardest). The row [negatives ascending | positives ascending] is soft-sorted and
    the probability that each element lands in the positive block is scored with a BCE.
    Mean over views and rows.

    Args:
        views: list or tuple of >= 2 (B, D) raw embeddings (same shape, dtype and device).
        topk_neg: int >= 1; the global batch needs at least topk_neg + 1 rows.
        steepness: float > 0. n_pos_views: int in [2, len(views)] or None (all views).
        network: "odd_even" or "bitonic". distribution: "cauchy", "reciprocal", "optimal",
            "logistic", "logistic_phi" or "gaussian".
        gather_distributed: bool. Across W > 1 ranks, the global batch (N = B * W) with
            the value and gradient promises of docs/api.md ("gather_distributed").
            The negatives are gathered (no gradient).

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.functional.groco([z1, z2], topk_neg=10, steepness=1.0)
    """
    views, steepness, n_pos_views, dist_on = check_groco_args(
        views, topk_neg, steepness, n_pos_views, network, distribution, gather_distributed)
    acc = accumulation_dtype(views[0])
    views = [v.to(acc) for v in views]
    n_views = len(views)
    b = views[0].shape[0]
    detached = [_normalize(v.detach()) for v in views]
    total = None
    for i, view in enumerate(views):
        anchor = _normalize(view)
        positives = torch.stack([detached[j] for j in range(n_pos_views) if j != i])
        if dist_on:
            negatives = dist_utils.gather_no_grad(detached[i], name=f"views[{i}]")
            offset = dist_utils.row_offset(b)
        else:
            negatives, offset = detached[i], 0
        rows = ops.groco_view_rows(anchor, negatives, positives, offset, topk_neg, network,
                                   distribution, steepness, backend)
        total = rows.sum() if total is None else total + rows.sum()
    # this rank's share of (1/V) sum_views mean over the global batch
    share = total / (n_views * b * (dist_utils.world_size() if dist_on else 1))
    return dist_utils.reduce_loss(share) if dist_on else share


@public_loss("soft_sort", "sortnet", ops.TABLE, _reference.soft_sort)
def soft_sort(x, *, network="odd_even", steepness=10.0, distribution="cauchy", art_lambda=0.25,
              return_permutation=True, backend):
    """Differentiable sorting network on the rows of x, diffsort-compatible.

    Returns the soft-sorted values (ascending) and the relaxed permutation P with
    sorted == x @ P (row = input position, column = rank). Not normalised. The network is
    run comparator by comparator: P is never built from dense layer matrices.

    Args:
        x: (B, n) float tensor, n >= 2.
        network: "odd_even" or "bitonic". steepness: float > 0.
        distribution: "cauchy", "reciprocal", "optimal", "logistic", "logistic_phi" or
            "gaussian". art_lambda: finite float >= 0 (logistic_phi's exponent).
        return_permutation: bool; False returns (sorted, None) and skips P.

    Returns:
        (sorted (B, n), P (B, n, n) or None), in x's dtype (half inputs run in float32).
        No distributed behaviour (row-wise).

    Example::

        >>> y, P = fastssl.functional.soft_sort(x, network="bitonic", steepness=10.0)
    """
    steepness = check_soft_sort(x, network, steepness, distribution, art_lambda,
                                return_permutation)
    return ops.soft_sort(x, network=network, steepness=steepness, distribution=distribution,
                         art_lambda=float(art_lambda), return_permutation=return_permutation,
                         backend=backend)
