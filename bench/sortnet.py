"""Sorting-network family: soft_sort (against diffsort, the library it replaces) and groco.

soft_sort: B problems of size n; the backward runs from random cotangents on both outputs
(sorted values and P), since GroCo and diffsort users differentiate through both. The sizes
with ``output="values"`` measure fastssl's values path (return_permutation=False, backward from
the values' cotangent alone) against torchsort (``peer:torchsort``), which returns values only
and relaxes the sort differently (bench/baselines.py): a timing comparison, not the same loss.
groco: B = global batch, D = projector width, `views` views of (B, D), default
hyperparameters (topk_neg = 10, so each sorted group has n_pos + 10 entries).
"""
from __future__ import annotations

import torch

import fastssl.functional as fast
import fastssl.reference as ref
from . import baselines
from .harness import (STANDARD_PROVIDERS, OpSpec, Prepared, Size, Skip, cotangent_backward,
                           embeddings, resolve_op, scalar_backward)

ALL_MODES = ("forward", "backward", "forward+backward")
FULL = ("forward+backward",)


def _diffsort_fn(network: str, n: int, steepness: float, distribution: str, device: torch.device):
    try:
        import diffsort
    except ImportError as e:
        raise Skip(f"diffsort is not installed ({e})") from None
    net = diffsort.DiffSortNet(
        network, n, device=str(device), steepness=steepness, distribution=distribution
    )
    return net


def _soft_sort_build(provider, shape, dtype, device):
    b, n = shape["B"], shape["n"]
    network = shape.get("network", "odd_even")
    steepness, distribution = 10.0, "cauchy"
    x = embeddings(b, n, dtype, device, seed=1)
    # Drawn on the device: the cotangent of P is B n^2 values (4 GiB at B = n = 1024).
    gen = torch.Generator(device=device).manual_seed(2)
    g_sorted = torch.randn(b, n, generator=gen, device=device).to(dtype)
    if shape.get("output") == "values":
        return _soft_sort_values(provider, x, g_sorted, network, steepness, distribution)
    g_perm = torch.randn(b, n, n, generator=gen, device=device).to(dtype)
    if provider == "diffsort":
        net = _diffsort_fn(network, n, steepness, distribution, device)
        forward = lambda: net(x)  # noqa: E731
    else:
        fn = resolve_op(provider, None, fast.soft_sort, ref.soft_sort)
        forward = lambda: fn(x, network=network, steepness=steepness, distribution=distribution)  # noqa: E731

    def backward(out):
        sorted_x, perm = out
        cotangent_backward((sorted_x, perm), (g_sorted.to(sorted_x.dtype),
                                              None if perm is None else g_perm.to(perm.dtype)))
    return Prepared(forward=forward, backward=backward, leaves=(x,))


def _soft_sort_values(provider, x, g_sorted, network, steepness, distribution):
    if provider == "peer:torchsort":
        try:
            fn = baselines.peer("soft_sort", "torchsort")
        except baselines.PeerMissing as e:
            raise Skip(str(e)) from None
        forward = lambda: fn(x)  # noqa: E731
    elif provider.startswith("fastssl"):
        forward = lambda: fast.soft_sort(x, network=network, steepness=steepness,  # noqa: E731
                                         distribution=distribution, return_permutation=False)[0]
    else:
        raise Skip(
            f"the values-only soft_sort cases compare fastssl with torchsort, not {provider}"
        )
    return Prepared(
        forward=forward, backward=lambda y: y.backward(g_sorted.to(y.dtype)), leaves=(x,)
    )


# Who measures what: the full output (values and P) against diffsort and the reference, the
# values alone against torchsort.
FULL_PROVIDERS = STANDARD_PROVIDERS + ("diffsort",)
VALUES_PROVIDERS = ("fastssl", "peer:torchsort")


def _soft_sort_sizes(dev, quick):
    if quick:  # two sizes: every plot shows a line, not a lone point
        return [
            Size({"B": 8, "n": 5, "network": "odd_even"}, providers=FULL_PROVIDERS),
            Size({"B": 16, "n": 5, "network": "odd_even"}, modes=FULL, providers=FULL_PROVIDERS),
        ] + [
            Size(
                {"B": b, "n": 5, "network": "odd_even", "output": "values"},
                modes=FULL,
                providers=VALUES_PROVIDERS,
            )
            for b in (8, 16)
        ]
    if dev == "cpu":
        return (
            [
                Size({"B": b, "n": 16, "network": "odd_even"}, providers=FULL_PROVIDERS)
                for b in (256, 1024, 4096)
            ]
            + [
                Size({"B": b, "n": 32, "network": "odd_even"}, modes=FULL, providers=FULL_PROVIDERS)
                for b in (256, 1024, 4096)
            ]
            + [
                Size({"B": b, "n": 16, "network": "bitonic"}, modes=FULL, providers=FULL_PROVIDERS)
                for b in (256, 1024, 4096)
            ]
            + [
                Size(
                    {"B": b, "n": n, "network": "odd_even", "output": "values"},
                    modes=FULL,
                    providers=VALUES_PROVIDERS,
                )
                for n in (16, 32)
                for b in (256, 1024, 4096)
            ]
        )
    return [
        Size({"B": b, "n": 32, "network": "odd_even"}, providers=FULL_PROVIDERS)
        for b in (1024, 4096, 16384)
    ] + [
        Size({"B": 4096, "n": 32, "network": "bitonic"}, modes=FULL, providers=FULL_PROVIDERS),
        Size({"B": 256, "n": 1024, "network": "bitonic"}, modes=FULL, providers=FULL_PROVIDERS),
    ]


def _groco_build(provider, shape, dtype, device):
    fn = resolve_op(provider, None, fast.groco, ref.groco)
    views = [
        embeddings(shape["B"], shape["D"], dtype, device, seed=1 + v) for v in range(shape["views"])
    ]
    return Prepared(forward=lambda: fn(views), backward=scalar_backward, leaves=tuple(views))


def _groco_sizes(dev, quick):
    if quick:  # two sizes: every plot shows a line, not a lone point
        return [
            Size({"B": 16, "D": 8, "views": 2}),
            Size({"B": 32, "D": 8, "views": 2}, modes=FULL),
        ]
    if dev == "cpu":
        return ([Size({"B": b, "D": 256, "views": 2}, modes=ALL_MODES if b <= 128 else FULL)
                 for b in (128, 256, 512)])
    return ([Size({"B": b, "D": 2048, "views": 2}) for b in (1024, 2048, 4096)]
            + [Size({"B": 1024, "D": 2048, "views": 4}, modes=FULL)])


SPECS = [
    OpSpec("soft_sort", "sortnet", _soft_sort_build, _soft_sort_sizes,
           providers=FULL_PROVIDERS + ("peer:torchsort",), x_label="number of problems B",
           # Sort keys are float32 in GroCo (it sorts float similarities) and in diffsort's use.
           dtypes=lambda dev, quick: (torch.float32,)),
    OpSpec("groco", "sortnet", _groco_build, _groco_sizes, x_label="global batch B"),
]
