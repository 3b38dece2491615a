"""sortnet family modules: GroCoLoss and SoftSortNet (a drop-in for diffsort.DiffSortNet)."""
from __future__ import annotations

import torch

from fastssl import functional
from fastssl._checks import DISTRIBUTIONS, NETWORKS, check_sort_args
from fastssl._validation import check_choice, check_flag, check_int
from fastssl.backends.networks import comparator_layers


class GroCoLoss(torch.nn.Module):
    """GroCo (learning by sorting) as a module; see :func:`fastssl.functional.groco`.

    Args:
        topk_neg: int >= 1. steepness: float > 0. n_pos_views: int >= 2 or None.
        network: "odd_even" or "bitonic". distribution: one of the sorting distributions.
        gather_distributed: bool, as in the functional loss (gather across ranks, global-batch
            value, DDP-exact gradient).

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


def _dense_network(network: str, n: int, device) -> list[list[torch.Tensor]]:
    """diffsort's dense layer matrices ``[split_a (k, n), split_b (k, n), combine_min (n, k),
    combine_max (n, k)]`` (float32), in diffsort's comparator order with its identity slots (a
    wire no comparator touches is split to both sides and recombined with weight 0.5 each)."""
    layers = []

    def layer_of(slots):
        k = len(slots)
        split_a, split_b = torch.zeros(k, n), torch.zeros(k, n)
        comb_min, comb_max = torch.zeros(n, k), torch.zeros(n, k)
        for c, (a, b, dmin, dmax, w) in enumerate(slots):
            split_a[c, a] = 1.0
            split_b[c, b] = 1.0
            comb_min[dmin, c] = w
            comb_max[dmax, c] = w
        return [t.to(device) for t in (split_a, split_b, comb_min, comb_max)]

    for comps in comparator_layers(network, n, identity_slots=True):
        layers.append(layer_of([(a, b, dmin, dmax, 0.5 if a == b else 1.0)
                                for a, b, dmin, dmax in comps]))
    return layers


def _check_device(device):
    if device is None:
        return None
    if isinstance(device, torch.device):
        return device
    if isinstance(device, (str, int)) and not isinstance(device, bool):
        try:
            return torch.device(device)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"device: expected a torch.device or a device string such as "
                             f"'cpu' or 'cuda:0', got {device!r}") from e
    hint = (" (the third positional argument is `device`, as in diffsort.DiffSortNet; pass "
            "steepness=... by keyword)" if isinstance(device, (int, float)) else "")
    raise TypeError(f"device: expected a torch.device, a device string or None, got "
                    f"{type(device).__name__} {device!r}{hint}")


class SoftSortNet(torch.nn.Module):
    """Differentiable sorting network as a module, a drop-in for ``diffsort.DiffSortNet``: the
    same constructor (positional order and keywords), the same attributes and the same outputs,
    ``forward(x (B, size)) -> (sorted, P)`` with sorted == x @ P (row = input, column = rank);
    see :func:`fastssl.functional.soft_sort`. No distributed behaviour (row-wise).

    Args:
        sorting_network_type: "odd_even" or "bitonic". size: int >= 2, the row length n.
        device: where the module lives, as in diffsort (``sorting_network``'s tensors are
            built there and ``forward`` expects x there); ``None`` (the default) follows the
            input. ``.to()`` / ``.cuda()`` move it (diffsort's module needs a hand-written
            ``.to()`` for that). diffsort's default is ``'cpu'``.
        steepness: float > 0. art_lambda: finite float >= 0 (logistic_phi's exponent).
        interpolation_type: diffsort's deprecated alias of `distribution` (overrides it).
        distribution: "cauchy", "reciprocal", "optimal", "logistic", "logistic_phi" or
            "gaussian".

    Attributes as in diffsort: ``sorting_network_type``, ``size``, ``steepness``,
    ``art_lambda``, ``distribution`` and ``sorting_network`` (diffsort's dense per-layer
    matrices, built on first access only: the forward pass runs the comparator network and
    never reads them, so editing them changes nothing).

    Returns (forward): sorted (B, size) and P (B, size, size) in x's dtype.

    diffsort's README example with only the import changed. Example::

        >>> from fastssl.losses import SoftSortNet as DiffSortNet
        >>> sorter = DiffSortNet('bitonic', 16, steepness=5)
        >>> sorted_vectors, permutation_matrices = sorter(vectors)
    """

    def __init__(self, sorting_network_type, size, device=None, steepness=10.0, art_lambda=0.25,
                 interpolation_type=None, distribution="cauchy"):
        super().__init__()
        check_choice("sorting_network_type", sorting_network_type, NETWORKS)
        self.size = check_int("size", size, minimum=2)
        self.device = _check_device(device)
        if interpolation_type is not None:
            check_choice("interpolation_type", interpolation_type, DISTRIBUTIONS)
            if distribution not in (None, "cauchy", interpolation_type):
                raise ValueError(f"interpolation_type: {interpolation_type!r} conflicts with "
                                 f"distribution={distribution!r} (interpolation_type is "
                                 f"diffsort's deprecated name of distribution: set one)")
            distribution = interpolation_type
        self.steepness = check_sort_args(sorting_network_type, steepness, distribution,
                                         art_lambda)
        self.sorting_network_type = sorting_network_type
        self.distribution = distribution
        self.art_lambda = float(art_lambda)
        self._dense = None

    @property
    def network(self) -> str:
        """fastssl's name of ``sorting_network_type``."""
        return self.sorting_network_type

    @property
    def sorting_network(self) -> list[list[torch.Tensor]]:
        if self._dense is None:
            self._dense = _dense_network(self.sorting_network_type, self.size,
                                         self.device or "cpu")
        return self._dense

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.cpu() reach here: find the new device by applying fn to a probe, as
        # nn.Module does to its buffers; the dense matrices are rebuilt there on next access
        # (a dtype cast leaves them float32, as diffsort's are).
        if self.device is not None:
            on_meta = self.device.type == "meta"  # (a meta tensor cannot be copied out)
            new = fn(torch.empty(0, device="cpu" if on_meta else self.device)).device
            if on_meta and new.type == "cpu":
                new = self.device  # a dtype cast only, or .cpu()/.to_empty(): keep meta
            if new != self.device:
                self.device, self._dense = new, None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a (B, {self.size}) tensor, got {shape}")
        if self.device is not None and x.device != self.device and not (
                x.device.type == self.device.type and self.device.index is None):
            raise ValueError(f"x: expected a tensor on {self.device} (the device this "
                             f"SoftSortNet was built for; move it with .to()), got {x.device}")
        return functional.soft_sort(x, network=self.sorting_network_type,
                                    steepness=self.steepness, distribution=self.distribution,
                                    art_lambda=self.art_lambda)

    def extra_repr(self):
        return (f"sorting_network_type={self.sorting_network_type!r}, size={self.size}, "
                f"device={self.device}, steepness={self.steepness}, "
                f"art_lambda={self.art_lambda}, distribution={self.distribution!r}")
