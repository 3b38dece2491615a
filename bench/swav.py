"""SwAV family: sinkhorn (codes, no gradient: forward only) and the swav loss.

Scores are prototype scores (B, K): K = 3000 (SwAV ImageNet) and 65536 (DINOv2-size
prototypes); 3 Sinkhorn iterations, epsilon 0.05 (the defaults). swav uses `crops` score
tensors of (B, K): 2 (2 x 224) or 8 (2 x 224 + 6 x 96), codes for the first 2.
"""
from __future__ import annotations

import torch

import fastssl.functional as fast
import fastssl.reference as ref
from .harness import (STANDARD_PROVIDERS, OpSpec, Prepared, Size, baseline_providers, embeddings,
                           resolve_op, scalar_backward)

ALL_MODES = ("forward", "backward", "forward+backward")
FULL = ("forward+backward",)


def _scores(b, k, dtype, device, seed, requires_grad):
    # Prototype scores are cosine similarities in [-1, 1].
    x = embeddings(b, k, torch.float32, device, seed=seed, requires_grad=False)
    return torch.tanh(x).to(dtype).requires_grad_(requires_grad)


def _sinkhorn_build(provider, shape, dtype, device):
    fn = resolve_op(provider, "sinkhorn", fast.sinkhorn, ref.sinkhorn, device)
    eps = shape.get("eps", 0.05)
    scores = _scores(shape["B"], shape["K"], dtype, device, 1, False)
    # Whether the codes are finite (the peers overflow at small eps and in float16).
    return Prepared(
        forward=lambda: fn(scores, epsilon=eps),
        extras=lambda rec, cfg: {"finite": bool(torch.isfinite(fn(scores, epsilon=eps)).all())},
    )


def _sinkhorn_sizes(dev, quick):
    if quick:  # two sizes: every plot shows a line, not a lone point
        return [Size({"B": 16, "K": 12}), Size({"B": 32, "K": 12})]
    if dev == "cpu":
        # The cases: B = 4096, K = 3000 at eps 0.05 and 0.01, in every dtype.
        return ([Size({"B": b, "K": 3000}) for b in (1024, 2048, 4096)]
                + [Size({"B": b, "K": 16384}) for b in (256, 512, 1024)]
                + [Size({"B": b, "K": 3000, "eps": 0.01}) for b in (1024, 2048, 4096)])
    return [Size({"B": b, "K": 3000}) for b in (1024, 4096, 16384)] + [
        Size({"B": 1024, "K": 65536})
    ]


def _swav_build(provider, shape, dtype, device):
    fn = resolve_op(provider, "swav", fast.swav, ref.swav, device)
    crops = [
        _scores(shape["B"], shape["K"], dtype, device, 1 + c, True) for c in range(shape["crops"])
    ]
    return Prepared(
        forward=lambda: fn(crops, n_assign_crops=2), backward=scalar_backward, leaves=tuple(crops)
    )


def _swav_sizes(dev, quick):
    if quick:
        return [
            Size({"B": 16, "K": 12, "crops": 2}),
            Size({"B": 32, "K": 12, "crops": 2}, modes=FULL),
        ]
    if dev == "cpu":  # each crop count at three batch sizes
        return ([Size({"B": 256, "K": 3000, "crops": 2}, modes=ALL_MODES)]
                + [Size({"B": b, "K": 3000, "crops": 2}, modes=FULL) for b in (512, 1024)]
                + [Size({"B": b, "K": 3000, "crops": 8}, modes=FULL) for b in (128, 256, 512)])
    return ([Size({"B": b, "K": 3000, "crops": 2}) for b in (1024, 4096)]
            + [Size({"B": 4096, "K": 3000, "crops": 8}, modes=FULL)])


SPECS = [
    OpSpec(
        "sinkhorn",
        "swav",
        _sinkhorn_build,
        _sinkhorn_sizes,
        modes=("forward",),
        providers=STANDARD_PROVIDERS + baseline_providers("sinkhorn"),
        dtypes=lambda dev, quick: (
            (torch.float32,) if quick else (torch.float32, torch.bfloat16, torch.float16)
        ),
    ),
    OpSpec(
        "swav",
        "swav",
        _swav_build,
        _swav_sizes,
        providers=STANDARD_PROVIDERS + baseline_providers("swav"),
    ),
]
