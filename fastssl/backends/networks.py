"""The sorting networks of the sortnet family as comparator tables: built once per (network,
n, device) as (a, b, soft-min destination, soft-max destination) wires, never as diffsort's
dense layer matrices. Shared by every sortnet backend (the torch path walks the layers, the
kernels read the flat table) and by the ops' size checks.
"""
from __future__ import annotations

import math
import struct

import torch

NETWORKS = ("odd_even", "bitonic")
DIST_IDS = {"logistic": 0, "logistic_phi": 1, "gaussian": 2, "reciprocal": 3, "cauchy": 4,
            "optimal": 5}


def comparator_layers(network: str, n: int, identity_slots: bool = False
                      ) -> list[list[tuple[int, int, int, int]]]:
    """diffsort's network as layers of comparators (a, b, dmin, dmax). With identity_slots,
    also diffsort's identity slots (a == b == dmin == dmax: a wire the layer leaves alone,
    split to both sides and recombined), at diffsort's positions, for its dense matrices."""
    layers = []
    if network == "odd_even":
        for layer in range(n):
            shifted = layer % 2 == 1
            comps = [(i, i + 1, i, i + 1) for i in range(int(shifted), n - 1, 2)]
            if identity_slots and n % 2 == 0 and shifted:
                comps += [(0, 0, 0, 0), (n - 1, n - 1, n - 1, n - 1)]
            elif identity_slots and n % 2 == 1:
                w = 0 if shifted else n - 1
                comps.append((w, w, w, w))
            layers.append(comps)
    elif network == "bitonic":
        blocks = max(1, math.ceil(math.log2(n)))
        width = 2 ** blocks
        pad = width - n  # the lowest `pad` wires are padding and are dropped
        for block in range(blocks):
            for layer in range(block + 1):
                m = 2 ** (block - layer)
                comps = []
                for i in range(0, width, 2 * m):
                    for j in range(m):
                        a, b = i + j, i + j + m
                        if a < pad:  # both padded: skipped; against a dropped wire: identity on b
                            if identity_slots and b >= pad:
                                comps.append((b - pad,) * 4)
                            continue
                        desc = (a // 2 ** (block + 1)) % 2 == 1
                        dmin, dmax = (b, a) if desc else (a, b)
                        comps.append((a - pad, b - pad, dmin - pad, dmax - pad))
                layers.append(comps)
    else:
        raise ValueError(f"network: expected one of {NETWORKS}, got {network!r}")
    return layers


# The longest row a network sorts (csrc/sortnet_cpu.cpp's kMaxSortWidth): odd-even's
# n (n - 1) / 2 comparators stay below 2^31, where the int32 wire tables and counts end.
MAX_SORT_N = 65536


def _layer_indices(network: str, n: int):
    """diffsort's network, one (4, c) int64 tensor (a, b, dmin, dmax) per layer, built with
    tensor arithmetic: O(layers) Python objects, never a list of O(n^2) comparator tuples
    (a 16384-wide odd-even network has 134M comparators)."""
    if network == "odd_even":
        for layer in range(n):
            a = torch.arange(layer % 2, n - 1, 2, dtype=torch.int64)
            yield torch.stack([a, a + 1, a, a + 1])
    elif network == "bitonic":
        blocks = max(1, math.ceil(math.log2(n)))
        width = 2 ** blocks
        pad = width - n  # the lowest `pad` wires are padding and are dropped
        wires = torch.arange(width, dtype=torch.int64)
        for block in range(blocks):
            for layer in range(block + 1):
                m = 2 ** (block - layer)
                a = wires[((wires & m) == 0) & (wires >= pad)]
                b = a + m
                desc = ((a >> (block + 1)) & 1) == 1
                yield torch.stack([a, b, torch.where(desc, b, a), torch.where(desc, a, b)]) - pad
    else:
        raise ValueError(f"network: expected one of {NETWORKS}, got {network!r}")


def _count_clear_bit(end: int, m: int) -> int:
    """How many integers in [0, end) have bit m (a power of two) clear."""
    return (end // (2 * m)) * m + min(end % (2 * m), m)


def comparator_count(network: str, n: int) -> int:
    """The number of comparators of the network sorting n wires, in closed form (the fake
    kernels and the size checks need it without building the network)."""
    if network == "odd_even":
        return ((n + 1) // 2) * (n // 2) + (n // 2) * ((n - 1) // 2)
    if network == "bitonic":
        blocks = max(1, math.ceil(math.log2(max(n, 1))))
        width = 2 ** blocks
        pad = width - n
        return sum(_count_clear_bit(width, 2 ** (block - layer))
                   - _count_clear_bit(pad, 2 ** (block - layer))
                   for block in range(blocks) for layer in range(block + 1))
    raise ValueError(f"network: expected one of {NETWORKS}, got {network!r}")


def _layer_count(network: str, n: int) -> int:
    if network == "odd_even":
        return n
    blocks = max(1, math.ceil(math.log2(max(n, 1))))
    return blocks * (blocks + 1) // 2


_net_cache: dict = {}


def network_tensor(network: str, n: int, device: torch.device) -> torch.Tensor:
    """(4, C) int32 comparator table, cached per (network, n, device)."""
    key = (network, n, str(device), "flat")
    t = _net_cache.get(key)
    if t is None:
        layers = [idx.to(torch.int32) for idx in _layer_indices(network, n)]
        t = (torch.cat(layers, dim=1) if layers else torch.zeros(4, 0, dtype=torch.int32))
        t = t.contiguous().to(device)
        _net_cache[key] = t
    return t


def network_layers(network: str, n: int, device: torch.device):
    """Per layer (a, b, dmin, dmax) int64 index tensors for the vectorised torch path."""
    key = (network, n, str(device), "layers")
    t = _net_cache.get(key)
    if t is None:
        t = [tuple(idx.to(device)) for idx in _layer_indices(network, n) if idx.shape[1]]
        _net_cache[key] = t
    return t


# Working sets below this are not checked against free memory (the probe costs /proc reads or


def sigma_bwd(steepness: float) -> float:
    # diffsort's NormalCDF saves sigma = 1/steepness as a float32 tensor for its backward: the
    # same float32 rounding, on the host without a tensor (no tensor read in the step)
    return struct.unpack("f", struct.pack("f", 1.0 / steepness))[0]
