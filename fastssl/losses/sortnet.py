"""sortnet family modules: GroCoLoss and SoftSortNet (a drop-in for diffsort.DiffSortNet)."""
from __future__ import annotations

import torch

from fastssl.functional import sortnet as F
from fastssl._validation import check_int
from fastssl.reference.sortnet import check_sort_args


class GroCoLoss(torch.nn.Module):
    """GroCo (learning by sorting) loss over a list of views; see fastssl.functional.groco."""

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
        self.gather_distributed = gather_distributed

    def forward(self, views):
        return F.groco(views, topk_neg=self.topk_neg, steepness=self.steepness,
                       n_pos_views=self.n_pos_views, network=self.network,
                       distribution=self.distribution,
                       gather_distributed=self.gather_distributed)

    def extra_repr(self):
        return (f"topk_neg={self.topk_neg}, steepness={self.steepness}, n_pos_views="
                f"{self.n_pos_views}, network={self.network!r}, distribution={self.distribution!r}")


class SoftSortNet(torch.nn.Module):
    """Differentiable sorting network: forward(x (B, size)) -> (sorted, P), sorted == x @ P.

    Same outputs as diffsort.DiffSortNet(network, size, steepness=..., art_lambda=...,
    distribution=...); the network is kept as comparator lists, so .to()/.cuda() need nothing
    special. `interpolation_type` is diffsort's deprecated alias of `distribution`.
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
        return F.soft_sort(x, network=self.network, steepness=self.steepness,
                           distribution=self.distribution, art_lambda=self.art_lambda)

    def extra_repr(self):
        return (f"network={self.network!r}, size={self.size}, steepness={self.steepness}, "
                f"distribution={self.distribution!r}, art_lambda={self.art_lambda}")
