"""Sphere family: sfrik, sfrik_mmd, auh.

SFRIK's ImageNet recipe is a global batch of 2048 with a 32768-wide projector (8192 in the
smaller recipes), so D is large here and the Gram matrix B x B is the cost: GPU sizes B up to
8192 at D = 8192, and B = 2048 at D = 32768; CPU sizes B up to 2048 at D = 1024.
"""
from __future__ import annotations

import fastssl.functional as fast
import fastssl.reference as ref
from .harness import (STANDARD_PROVIDERS, OpSpec, Prepared, Size, baseline_providers, embeddings,
                           resolve_op, scalar_backward)

ALL_MODES = ("forward", "backward", "forward+backward")
FULL = ("forward+backward",)


def _pair_build(op, fast_fn, ref_fn):
    def build(provider, shape, dtype, device):
        fn = resolve_op(provider, op, fast_fn, ref_fn, device)
        z1 = embeddings(shape["B"], shape["D"], dtype, device, seed=1)
        z2 = embeddings(shape["B"], shape["D"], dtype, device, seed=2)
        return Prepared(forward=lambda: fn(z1, z2), backward=scalar_backward, leaves=(z1, z2))
    return build


def _mmd_build(provider, shape, dtype, device):
    fn = resolve_op(provider, "sfrik_mmd", fast.sfrik_mmd, ref.sfrik_mmd, device)
    z = embeddings(shape["B"], shape["D"], dtype, device, seed=1)
    return Prepared(forward=lambda: fn(z), backward=scalar_backward, leaves=(z,))


def _sizes(dev, quick):
    if quick:  # two sizes: every plot shows a line, not a lone point
        return [Size({"B": 16, "D": 8}), Size({"B": 32, "D": 8}, modes=FULL)]
    if dev == "cpu":
        return [
            Size({"B": 512, "D": 1024}, modes=ALL_MODES),
            Size({"B": 2048, "D": 1024}, modes=FULL),
            Size({"B": 4096, "D": 1024}, modes=FULL, providers=("fastssl", "eager")),
        ]
    return ([Size({"B": b, "D": 8192}) for b in (2048, 4096, 8192)]
            + [Size({"B": 2048, "D": 32768}, modes=FULL)])


SPECS = [
    OpSpec("sfrik", "sphere", _pair_build("sfrik", fast.sfrik, ref.sfrik), _sizes,
           providers=STANDARD_PROVIDERS + baseline_providers("sfrik")),
    OpSpec("sfrik_mmd", "sphere", _mmd_build, _sizes,
           providers=STANDARD_PROVIDERS + baseline_providers("sfrik_mmd")),
    OpSpec("auh", "sphere", _pair_build("auh", fast.auh, ref.auh), _sizes,
           providers=STANDARD_PROVIDERS + baseline_providers("auh")),
]
