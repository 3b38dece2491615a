"""SwAV family: sinkhorn (codes, forward only) and the swav loss, in float32, bfloat16 and
float16 on CPU. Prototype scores (B, K): K = 3000 (SwAV ImageNet), 16384 and 65536; 3
iterations, epsilon 0.05 (and 0.01, where the peers overflow); swav: 2 or 8 crops, codes for 2."""
from __future__ import annotations

import torch

import fastssl.functional as fast
import fastssl.reference as ref

from .harness import FULL, MODES, STANDARD_PROVIDERS, OpSpec, Prepared, Size, \
    baseline_providers, embeddings, resolve_op


def _scores(b, k, dtype, device, seed, requires_grad):
    # Prototype scores are cosine similarities in [-1, 1].
    x = embeddings(b, k, torch.float32, device, seed=seed, requires_grad=False)
    return torch.tanh(x).to(dtype).requires_grad_(requires_grad)


def _sinkhorn_build(provider, shape, dtype, device):
    fn = resolve_op(provider, "sinkhorn", fast.sinkhorn, ref.sinkhorn, device)
    eps, scores = shape.get("eps", 0.05), _scores(shape["B"], shape["K"], dtype, device, 1, False)
    # Whether the codes are finite (the peers overflow at small eps and in float16).
    return Prepared(forward=lambda: fn(scores, epsilon=eps), extras=lambda rec, cfg: {
        "finite": bool(torch.isfinite(fn(scores, epsilon=eps)).all())})


def _sinkhorn_sizes(dev, quick):
    if quick:
        return [Size({"B": 16, "K": 12}), Size({"B": 32, "K": 12})]
    if dev == "cpu":
        return ([Size({"B": b, "K": 3000}) for b in (1024, 2048, 4096)]
                + [Size({"B": b, "K": 16384}) for b in (256, 512, 1024)]
                + [Size({"B": b, "K": 3000, "eps": 0.01}) for b in (1024, 2048, 4096)])
    return [Size({"B": b, "K": 3000}) for b in (1024, 4096, 16384)] + [Size({"B": 1024,
                                                                          "K": 65536})]


def _swav_build(provider, shape, dtype, device):
    fn = resolve_op(provider, "swav", fast.swav, ref.swav, device)
    crops = [_scores(shape["B"], shape["K"], dtype, device, 1 + c, True)
             for c in range(shape["crops"])]
    return Prepared(forward=lambda: fn(crops, n_assign_crops=2), backward=torch.Tensor.backward,
                    leaves=crops)


def _swav_sizes(dev, quick):
    if quick:
        return [Size({"B": 16, "K": 12, "crops": 2}), Size({"B": 32, "K": 12, "crops": 2}, FULL)]
    if dev == "cpu":  # each crop count at three batch sizes
        return ([Size({"B": 256, "K": 3000, "crops": 2}, MODES)]
                + [Size({"B": b, "K": 3000, "crops": 2}, FULL) for b in (512, 1024)]
                + [Size({"B": b, "K": 3000, "crops": 8}, FULL) for b in (128, 256, 512)])
    return ([Size({"B": b, "K": 3000, "crops": 2}) for b in (1024, 4096)]
            + [Size({"B": 4096, "K": 3000, "crops": 8}, FULL)])


def _dtypes(dev, quick):
    if quick:
        return (torch.float32,)
    return (torch.float32, torch.bfloat16, torch.float16) if dev == "cpu" else (
        torch.bfloat16, torch.float32)


SPECS = [
    OpSpec("sinkhorn", "swav", _sinkhorn_build, _sinkhorn_sizes, modes=("forward",),
           providers=STANDARD_PROVIDERS + baseline_providers("sinkhorn"),
           dtypes=lambda dev, quick: (torch.float32,) if quick else (
               torch.float32, torch.bfloat16, torch.float16)),
    OpSpec("swav", "swav", _swav_build, _swav_sizes, dtypes=_dtypes,
           providers=STANDARD_PROVIDERS + baseline_providers("swav")),
]
