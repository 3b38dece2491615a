"""Sorting-network family: soft_sort (against diffsort, the library it replaces) and groco.
soft_sort: B problems of size n, backward from random cotangents on both outputs (values and
P: GroCo and diffsort users differentiate through both); ``output="values"`` sizes time the
values path (return_permutation=False) against torchsort, which returns values only and relaxes
the sort differently (bench/baselines.py): time compared, not the same loss. groco: B global
batch, `views` views of (B, D), default hyperparameters."""
from __future__ import annotations

import torch

import fastssl.functional as fast
import fastssl.reference as ref

from . import baselines
from .harness import FULL, MODES, STANDARD_PROVIDERS, OpSpec, Prepared, Size, Skip, \
    embeddings, resolve_op

FULL_PROVIDERS = STANDARD_PROVIDERS + ("diffsort",)   # values and P
VALUES_PROVIDERS = ("fastssl", "peer:torchsort")       # values alone
SORT = dict(steepness=10.0, distribution="cauchy")


def _soft_sort_build(provider, shape, dtype, device):
    b, n, network = shape["B"], shape["n"], shape.get("network", "odd_even")
    x = embeddings(b, n, dtype, device, seed=1)
    # Drawn on the device: P's cotangent is B n^2 values (4 GiB at B = n = 1024).
    gen = torch.Generator(device=device).manual_seed(2)
    g_sorted = torch.randn(b, n, generator=gen, device=device).to(dtype)
    if shape.get("output") == "values":
        if provider == "peer:torchsort":
            try:
                fn = baselines.peer("soft_sort", "torchsort")
            except baselines.PeerMissing as e:
                raise Skip(str(e)) from None
        elif provider.startswith("fastssl"):
            def fn(x):
                return fast.soft_sort(x, network=network, return_permutation=False, **SORT)[0]
        else:
            raise Skip(f"the values-only soft_sort cases compare fastssl with torchsort, not "
                       f"{provider}")
        return Prepared(forward=lambda: fn(x), backward=lambda y: y.backward(g_sorted.to(y.dtype)),
                        leaves=(x,))
    g_perm = torch.randn(b, n, n, generator=gen, device=device).to(dtype)
    if provider == "diffsort":
        try:
            import diffsort
        except ImportError as e:
            raise Skip(f"diffsort is not installed ({e})") from None
        net = diffsort.DiffSortNet(network, n, device=str(device), **SORT)

        def forward():
            return net(x)
    else:
        fn = resolve_op(provider, None, fast.soft_sort, ref.soft_sort)

        def forward():
            return fn(x, network=network, **SORT)

    def backward(out):
        outs = [o for o in out if o is not None]
        torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, (g_sorted, g_perm))])
    return Prepared(forward=forward, backward=backward, leaves=(x,))


def _soft_sort_sizes(dev, quick):
    def sizes(bs, n, network, modes=FULL, values=False):
        extra = {"output": "values"} if values else {}
        return [Size({"B": b, "n": n, "network": network, **extra}, modes,
                     VALUES_PROVIDERS if values else FULL_PROVIDERS) for b in bs]
    if quick:  # two sizes: every plot shows a line, not a lone point
        return (sizes((8,), 5, "odd_even", None) + sizes((16,), 5, "odd_even")
                + sizes((8, 16), 5, "odd_even", values=True))
    if dev == "cpu":
        bs = (256, 1024, 4096)
        return (sizes(bs, 16, "odd_even", None) + sizes(bs, 32, "odd_even")
                + sizes(bs, 16, "bitonic") + sizes(bs, 16, "odd_even", values=True)
                + sizes(bs, 32, "odd_even", values=True))
    return (sizes((1024, 4096, 16384), 32, "odd_even", None) + sizes((4096,), 32, "bitonic")
            + sizes((256,), 1024, "bitonic"))


def _groco_build(provider, shape, dtype, device):
    fn = resolve_op(provider, None, fast.groco, ref.groco)
    views = [embeddings(shape["B"], shape["D"], dtype, device, seed=1 + v)
             for v in range(shape["views"])]
    return Prepared(forward=lambda: fn(views), backward=torch.Tensor.backward, leaves=views)


def _groco_sizes(dev, quick):
    if quick:
        return [Size({"B": 16, "D": 8, "views": 2}), Size({"B": 32, "D": 8, "views": 2}, FULL)]
    if dev == "cpu":
        return [Size({"B": b, "D": 256, "views": 2}, MODES if b <= 128 else FULL)
                for b in (128, 256, 512)]
    return ([Size({"B": b, "D": 2048, "views": 2}) for b in (1024, 2048, 4096)]
            + [Size({"B": 1024, "D": 2048, "views": 4}, FULL)])


SPECS = [
    # Sort keys are float32 in GroCo (it sorts float similarities) and in diffsort's use.
    OpSpec("soft_sort", "sortnet", _soft_sort_build, _soft_sort_sizes,
           providers=FULL_PROVIDERS + ("peer:torchsort",), x_label="number of problems B",
           dtypes=lambda dev, quick: (torch.float32,)),
    OpSpec("groco", "sortnet", _groco_build, _groco_sizes, x_label="global batch B"),
]
