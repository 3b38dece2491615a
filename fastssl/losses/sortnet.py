"""sortnet family modules: GroCoLoss and SoftSortNet (a drop-in for diffsort.DiffSortNet)."""
from __future__ import annotations

import torch

from fastssl import functional
from fastssl._checks import check_sort_args
from fastssl._validation import check_flag, check_int


class GroCoLoss(torch.nn.Module):
    """GroCo (learning by sorting) as a module; see :func:`fastssl.functional.groco`.

    Args:
        topk_neg: int >= 1. steepness: float > 0. n_pos_views: int >= 2 or None.
        network: "odd_even" or "bitonic". distribution: one of the sorting distributions.
        gather_distributed: bool, as in the functional loss (gather across ranks, global-batch value, DDP-exact gradient).

    ``forward(views)``: a list of >= 2 (B, D) raw embeddings. Returns a 0-dim float32 tensor
    (float64 for float64).

    Example::

        >>> loss = fastssl.losses.GroCoLoss(topk_neg=10)([z1, z2])
    """

    def __init__(self, topk_neg=10, steepness=1.0, n_pos_views=None, network="odd_even",
                 distribution="cauchy", gather_distributed=False):
        super().__init__()
        check_int("topk_neg", topk_neg, minimum=1)
        if n_pos_views is not None:
            check_int("n_pos_views", n_pos_views, minimum=2)
        self.steepness = check_sort_args(network, steepness, distribution, 0.25)
        self.topk_neg = topk_neg
        self.n_pos_views = n_pos_views
        self.network = network
        self.distribution = distribution
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)

    def forward(self, views):
        return functional.groco(views, topk_neg=self.topk_neg, steepness=self.steepness,
                       n_pos_views=self.n_pos_views, network=self.network,
                       distribution=self.distribution,
                       gather_distributed=self.gather_distributed)

    def extra_repr(self):
        return (f"topk_neg={self.topk_neg}, steepness={self.steepness}, n_pos_views="
                f"{self.n_pos_views}, network={self.network!r}, distribution={self.distribution!r}")


class SoftSortNet(torch.nn.Module):
    """Differentiable sorting network as a module, a drop-in for
    ``diffsort.DiffSortNet``: ``forward(x (B, size)) -> (sorted, P)`` with sorted == x @ P
    (row = input, column = rank); see :func:`fastssl.functional.soft_sort`. The network is
    kept as comparator lists, so ``.to()``/``.cuda()`` need nothing special. No distributed
    behaviour (row-wise).

    Args:
        network: "odd_even" or "bitonic". size: int >= 2, the row length n.
        steepness: float > 0. distribution: "cauchy", "reciprocal", "optimal", "logistic",
            "logistic_phi" or "gaussian". art_lambda: finite float >= 0.
        interpolation_type: diffsort's deprecated alias of `distribution`.

    Returns (forward): sorted (B, size) and P (B, size, size) in x's dtype.

    Example::

        >>> sorter = fastssl.losses.SoftSortNet("bitonic", 32, steepness=10.0)
        >>> y, P = sorter(x)
    """

    def __init__(self, network, size, steepness=10.0, distribution="cauchy", art_lambda=0.25, *,
                 interpolation_type=None):
        super().__init__()
        if interpolation_type is not None:
            if distribution not in (None, "cauchy", interpolation_type):
                raise ValueError(f"interpolation_type: {interpolation_type!r} conflicts with "
                                 f"distribution={distribution!r}")
            distribution = interpolation_type
        self.size = check_int("size", size, minimum=2)
        self.steepness = check_sort_args(network, steepness, distribution, art_lambda)
        self.network = network
        self.sorting_network_type = network
        self.distribution = distribution
        self.art_lambda = float(art_lambda)

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a (B, {self.size}) tensor, got {shape}")
        return functional.soft_sort(x, network=self.network, steepness=self.steepness,
                           distribution=self.distribution, art_lambda=self.art_lambda)

    def extra_repr(self):
        return (f"network={self.network!r}, size={self.size}, steepness={self.steepness}, "
                f"distribution={self.distribution!r}, art_lambda={self.art_lambda}")
