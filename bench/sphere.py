"""Sphere family: sfrik, sfrik_mmd, auh. SFRIK's ImageNet recipe has a 32768-wide projector,
so D is large and the B x B Gram matrix is the cost: GPU B up to 8192 at D = 8192; CPU B up to
4096 at D = 1024 (issue 25's case: B = 512, D = 1024, forward)."""
from __future__ import annotations

import torch

import fastssl.functional as fast
import fastssl.reference as ref

from .harness import FULL, MODES, STANDARD_PROVIDERS, OpSpec, Prepared, Size, \
    baseline_providers, embeddings, resolve_op


def _build(op, n_inputs):
    def build(provider, shape, dtype, device):
        fn = resolve_op(provider, op, getattr(fast, op), getattr(ref, op), device)
        z = [embeddings(shape["B"], shape["D"], dtype, device, seed=s + 1) for s in range(n_inputs)]
        return Prepared(forward=lambda: fn(*z), backward=torch.Tensor.backward, leaves=z)
    return build


def _sizes(dev, quick):
    if quick:  # two sizes: every plot shows a line, not a lone point
        return [Size({"B": 16, "D": 8}), Size({"B": 32, "D": 8}, FULL)]
    if dev == "cpu":
        return [Size({"B": 512, "D": 1024}, MODES), Size({"B": 2048, "D": 1024}, FULL),
                Size({"B": 4096, "D": 1024}, FULL, ("fastssl", "eager"))]
    return [Size({"B": b, "D": 8192}) for b in (2048, 4096, 8192)] + [
        Size({"B": 2048, "D": 32768}, FULL)]


SPECS = [OpSpec(op, "sphere", _build(op, n), _sizes,
                providers=STANDARD_PROVIDERS + baseline_providers(op))
         for op, n in (("sfrik", 2), ("sfrik_mmd", 1), ("auh", 2))]
