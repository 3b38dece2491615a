"""Contrastive family: nt_xent, info_nce, dcl, sogclr, sce.

Sizes: B is the per-view batch (the global batch when gathered; nt_xent and dcl then have
N = 2B anchors), D the projector width (128 for SimCLR/SogCLR, 256 for MoCo-v3/SCE), K the SCE
queue. GPU sizes run up to the issue-3 targets (nt_xent N = 2 x 32768 bf16; SCE K = 65536,
B = 1024) and a max-batch probe for fastssl alone (N = 2 x 524288 anchors > 1,000,000); CPU
sizes up to the CPU target (nt_xent N = 16384 anchors, i.e. B = 8192, D = 128).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastssl.functional as fast
import fastssl.reference as ref
from . import baselines
from .harness import (STANDARD_PROVIDERS, OpSpec, Prepared, Size, baseline_providers, embeddings,
                           resolve_op, scalar_backward)

ALL_MODES = ("forward", "backward", "forward+backward")
FULL = ("forward+backward",)


# "What a user writes" (bench/baselines.py): eager_nt_xent and eager_info_nce stay importable
# from here (bench/gpu_parts.py uses them).
eager_nt_xent, eager_info_nce = baselines.eager_nt_xent, baselines.eager_info_nce


def _providers(op):
    return STANDARD_PROVIDERS + baseline_providers(op)


def _pair_build(op, fast_fn, ref_fn, **kwargs):
    def build(provider, shape, dtype, device):
        fn = resolve_op(provider, op, fast_fn, ref_fn, device)
        z1 = embeddings(shape["B"], shape["D"], dtype, device, seed=1)
        z2 = embeddings(shape["B"], shape["D"], dtype, device, seed=2)
        return Prepared(
            forward=lambda: fn(z1, z2, **kwargs), backward=scalar_backward, leaves=(z1, z2)
        )

    return build


# At the largest CPU sizes a reference call takes tens of seconds on 2 cores: they are measured
# forward+backward for the automatic backend against eager and the peers (the reference, the
# correctness anchor, at the smaller sizes); the smallest size covers every mode and backend.
BIG_CPU = ("fastssl", "eager", "peer:lightly")


def _pair_sizes(cpu_bs, gpu_bs, *, cpu_d=128, gpu_d=128, gpu_probe=(), cpu_big=()):
    """cpu_bs: the CPU batch sizes, the first measured in every mode, the others (at least two
    more, so that forward+backward is a curve) in forward+backward."""
    def sizes(dev, quick):
        if quick:  # two sizes: every plot shows a line, not a lone point
            return [Size({"B": 16, "D": 8}), Size({"B": 32, "D": 8}, modes=FULL)]
        if dev == "cpu":
            out = [
                Size({"B": b, "D": cpu_d}, modes=ALL_MODES if i == 0 else FULL)
                for i, b in enumerate(cpu_bs)
            ]
            return out + [
                Size({"B": b, "D": cpu_d}, modes=FULL, providers=BIG_CPU) for b in cpu_big
            ]
        out = [Size({"B": b, "D": gpu_d}) for b in gpu_bs]
        out += [Size({"B": b, "D": gpu_d}, modes=FULL, providers=("fastssl",)) for b in gpu_probe]
        return out
    return sizes


def _info_nce_build(provider, shape, dtype, device):
    fn = resolve_op(provider, "info_nce", fast.info_nce, ref.info_nce, device)
    q = embeddings(shape["B"], shape["D"], dtype, device, seed=1)
    k = embeddings(shape["B"], shape["D"], dtype, device, seed=2)
    sym = bool(shape.get("symmetric", False))
    return Prepared(
        forward=lambda: fn(q, k, symmetric=sym), backward=scalar_backward, leaves=(q, k)
    )


def _info_nce_sizes(dev, quick):
    if quick:
        return [Size({"B": 16, "D": 8, "symmetric": True}),
                Size({"B": 32, "D": 8, "symmetric": True}, modes=FULL)]
    if dev == "cpu":  # each series at least three sizes in forward+backward
        return ([Size({"B": 1024, "D": 128, "symmetric": s}) for s in (False, True)]
                + [Size({"B": 2048, "D": 128, "symmetric": s}, modes=FULL) for s in (False, True)]
                + [Size({"B": b, "D": 128, "symmetric": s}, modes=FULL, providers=BIG_CPU)
                   for s in (False, True) for b in (4096, 8192)])
    return [Size({"B": b, "D": 256, "symmetric": s}) for s in (False, True)
            for b in (8192, 32768, 65536)]


def _sogclr_build(provider, shape, dtype, device):
    fn = resolve_op(provider, "sogclr", fast.sogclr, ref.sogclr, device)
    b, d = shape["B"], shape["D"]
    num_samples = 4 * b
    z1 = embeddings(b, d, dtype, device, seed=1)
    z2 = embeddings(b, d, dtype, device, seed=2)
    gen = torch.Generator(device="cpu").manual_seed(3)
    index = torch.randperm(num_samples, generator=gen)[:b].to(device)
    # u is updated in place by every call, as in training; after the first call the batch's
    # samples are "visited", the steady state of training.
    u = torch.zeros(num_samples, dtype=torch.float32, device=device)
    return Prepared(forward=lambda: fn(z1, z2, index, u), backward=scalar_backward, leaves=(z1, z2))


def _sce_build(provider, shape, dtype, device):
    fn = resolve_op(provider, "sce", fast.sce, ref.sce, device)
    b, d, k_size = shape["B"], shape["D"], shape["K"]
    q = embeddings(b, d, dtype, device, seed=1)
    k = embeddings(b, d, dtype, device, seed=2, requires_grad=False)
    queue = F.normalize(embeddings(k_size, d, torch.float32, device, seed=3, requires_grad=False),
                        dim=1).to(dtype)
    return Prepared(forward=lambda: fn(q, k, queue), backward=scalar_backward, leaves=(q,))


def _sce_sizes(dev, quick):
    if quick:
        return [Size({"B": 16, "D": 8, "K": 40}), Size({"B": 32, "D": 8, "K": 40}, modes=FULL)]
    if dev == "cpu":
        return [Size({"B": 256, "D": 128, "K": 4096}, modes=ALL_MODES),
                Size({"B": 512, "D": 128, "K": 4096}, modes=FULL),
                Size({"B": 1024, "D": 128, "K": 4096}, modes=FULL),
                Size({"B": 256, "D": 128, "K": 16384}, modes=FULL),
                Size({"B": 1024, "D": 128, "K": 16384}, modes=FULL),
                Size({"B": 2048, "D": 128, "K": 16384}, modes=FULL, providers=BIG_CPU),
                Size({"B": 4096, "D": 128, "K": 16384}, modes=FULL, providers=BIG_CPU)]
    return [Size({"B": b, "D": 256, "K": k}) for k in (16384, 65536) for b in (256, 1024, 4096)]


SPECS = [
    OpSpec(
        "nt_xent",
        "contrastive",
        _pair_build("nt_xent", fast.nt_xent, ref.nt_xent),
        _pair_sizes(
            (1024, 2048),
            (4096, 8192, 16384, 32768),
            cpu_big=(4096, 8192),
            gpu_probe=(65536, 131072, 262144, 524288),
        ),
        providers=_providers("nt_xent"),
    ),
    OpSpec(
        "info_nce",
        "contrastive",
        _info_nce_build,
        _info_nce_sizes,
        providers=_providers("info_nce"),
    ),
    OpSpec(
        "dcl",
        "contrastive",
        _pair_build("dcl", fast.dcl, ref.dcl),
        _pair_sizes((1024, 2048), (4096, 16384, 32768), cpu_big=(4096,)),
        providers=_providers("dcl"),
    ),
    OpSpec(
        "sogclr",
        "contrastive",
        _sogclr_build,
        _pair_sizes((1024, 2048), (4096, 16384, 32768), cpu_big=(4096,)),
        providers=_providers("sogclr"),
    ),
    OpSpec("sce", "contrastive", _sce_build, _sce_sizes, providers=_providers("sce")),
]
