"""Contrastive family: nt_xent, info_nce, dcl, dclw, sogclr, sce. B is the per-view batch
(nt_xent and dcl have 2B anchors), D the projector width, K the SCE queue. CPU sizes reach the
issue-25 targets (B = 8192 per view; sogclr and sce B = 4096, K = 16384); GPU sizes the issue-3
targets and a fastssl-only max-batch probe (N = 2 x 524288 anchors)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastssl.functional as fast
import fastssl.reference as ref

from . import baselines
from .harness import FULL, MODES, STANDARD_PROVIDERS, OpSpec, Prepared, Size, \
    baseline_providers, embeddings, resolve_op

eager_nt_xent, eager_info_nce = baselines.eager_nt_xent, baselines.eager_info_nce  # gpu_parts
# At the largest CPU sizes a reference call takes tens of seconds: those sizes compare the
# automatic backend with eager and the peers only.
BIG_CPU = ("fastssl", "eager", "peer:lightly")


def _build(op, make):
    """make(B, D, K, dtype, device, shape) -> (call args, leaves); args[0..1] the embeddings."""
    def build(provider, shape, dtype, device):
        fn = resolve_op(provider, op, getattr(fast, op), getattr(ref, op), device)
        args, kw, leaves = make(shape, dtype, device)
        return Prepared(forward=lambda: fn(*args, **kw), backward=torch.Tensor.backward,
                        leaves=leaves)
    return build


def _pair(shape, dtype, device):
    z = [embeddings(shape["B"], shape["D"], dtype, device, seed=s) for s in (1, 2)]
    kw = {"symmetric": bool(shape["symmetric"])} if "symmetric" in shape else {}
    return z, kw, z


def _sogclr(shape, dtype, device):
    z, _, _ = _pair(shape, dtype, device)
    gen = torch.Generator().manual_seed(3)
    index = torch.randperm(4 * shape["B"], generator=gen)[:shape["B"]].to(device)
    # u is updated in place by every call, as in training (the steady state after one call)
    u = torch.zeros(4 * shape["B"], dtype=torch.float32, device=device)
    return z + [index, u], {}, z


def _sce(shape, dtype, device):
    q = embeddings(shape["B"], shape["D"], dtype, device, seed=1)
    k = embeddings(shape["B"], shape["D"], dtype, device, seed=2, requires_grad=False)
    queue = F.normalize(embeddings(shape["K"], shape["D"], torch.float32, device, seed=3,
                                   requires_grad=False), dim=1).to(dtype)
    return [q, k, queue], {}, [q]


def _sizes(cpu, gpu, quick_extra=None, d_gpu=128, probe=()):
    """cpu: [(B, extra shape, providers)], the first in every mode, the others forward+backward."""
    def sizes(dev, quick):
        if quick:   # two sizes: every plot shows a line, not a lone point
            return [Size({"B": b, "D": 8, **(quick_extra or {})}, None if b == 16 else FULL)
                    for b in (16, 32)]
        if dev == "cpu":
            return [Size({"B": b, "D": 128, **x}, MODES if i == 0 else FULL, prov)
                    for i, (b, x, prov) in enumerate(cpu)]
        return [Size({"B": b, "D": d_gpu, **x}) for b, x in gpu] + [
            Size({"B": b, "D": d_gpu}, FULL, ("fastssl",)) for b in probe]
    return sizes


def _pair_cpu(bs, big, slow_peer=()):
    """slow_peer: sizes where the peer (lightly: 14 s a call at dcl B = 8192) is left out."""
    return [(b, {}, None) for b in bs] + [(b, {}, BIG_CPU if b not in slow_peer else BIG_CPU[:2])
                                          for b in big]


_INFO_CPU = [(b, {"symmetric": s}, None if b <= 2048 else BIG_CPU)
             for b in (1024, 2048, 4096, 8192) for s in (False, True)]
_SCE_CPU = ([(b, {"K": 4096}, None) for b in (256, 512, 1024)]
            + [(b, {"K": 16384}, None if b <= 1024 else BIG_CPU) for b in (256, 1024, 2048, 4096)])
_GPU = [(b, {}) for b in (4096, 16384, 32768)]


def _spec(op, make, sizes):
    return OpSpec(op, "contrastive", _build(op, make), sizes,
                  providers=STANDARD_PROVIDERS + baseline_providers(op))


SPECS = [
    _spec("nt_xent", _pair, _sizes(_pair_cpu((1024, 2048), (4096, 8192)),
                                   [(b, {}) for b in (4096, 8192, 16384, 32768)],
                                   probe=(65536, 131072, 262144, 524288))),
    _spec("info_nce", _pair, _sizes(_INFO_CPU, [(b, {"symmetric": s}) for s in (False, True)
                                                for b in (8192, 32768, 65536)],
                                    {"symmetric": True}, d_gpu=256)),
    _spec("dcl", _pair, _sizes(_pair_cpu((1024, 2048), (4096, 8192), (8192,)), _GPU)),
    _spec("dclw", _pair, _sizes(_pair_cpu((1024, 2048), (4096, 8192), (8192,)), _GPU)),
    _spec("sogclr", _sogclr, _sizes(_pair_cpu((1024, 2048), (4096,)), _GPU)),
    _spec("sce", _sce, _sizes(_SCE_CPU, [(b, {"K": k}) for k in (16384, 65536)
                                         for b in (256, 1024, 4096)], {"K": 40}, d_gpu=256)),
]
