"""Drop-in for diffsort's ``DiffSortNet`` (diffsort 0.2.0): ``from fastssl.compat.diffsort
import DiffSortNet`` instead of ``from diffsort import DiffSortNet``."""
from __future__ import annotations

from fastssl.losses.sortnet import SoftSortNet

__all__ = ["DiffSortNet"]


class DiffSortNet(SoftSortNet):
    """diffsort 0.2.0's ``DiffSortNet(sorting_network_type, size, device='cpu', steepness=10.0,
    art_lambda=0.25, interpolation_type=None, distribution='cauchy')``, ``forward(vectors)
    -> (sorted_vectors, permutation_matrices)``, on fastssl's fused sorting network
    (:class:`fastssl.losses.SoftSortNet` with diffsort's default ``device='cpu'``).

    Same values, permutation matrices and gradients as diffsort (float rounding), same
    attributes (``sorting_network_type``, ``size``, ``steepness``, ``art_lambda``,
    ``distribution``, ``sorting_network``).

    Deliberate differences: ``.to()`` / ``.cuda()`` move the module (diffsort's keeps its
    network on the constructor's device); bad arguments raise ``ValueError`` / ``TypeError``
    naming the argument where diffsort fails an ``assert`` (``AssertionError``); an input on
    another device than the module's raises ``ValueError`` (diffsort: a matmul device error).

    diffsort's README usage, with only the import changed::

        >>> from fastssl.compat.diffsort import DiffSortNet
        >>> sorter = DiffSortNet('bitonic', 16, steepness=5)
        >>> sorted_vectors, permutation_matrices = sorter(vectors)
    """

    def __init__(self, sorting_network_type: str, size: int, device: str = "cpu",
                 steepness: float = 10.0, art_lambda: float = 0.25,
                 interpolation_type: str | None = None, distribution: str = "cauchy"):
        super().__init__(sorting_network_type, size, device=device, steepness=steepness,
                         art_lambda=art_lambda, interpolation_type=interpolation_type,
                         distribution=distribution)
