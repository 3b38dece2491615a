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
from bench.harness import (STANDARD_PROVIDERS, OpSpec, Prepared, Size, Skip, embeddings, resolve,
                           scalar_backward)

ALL_MODES = ("forward", "backward", "forward+backward")
FULL = ("forward+backward",)


# "What a user writes": the loss from its formula in a few lines of eager PyTorch, the full
# logits matrix in the input dtype and F.cross_entropy over it in float32 (as autocast runs it).
# The reference (fastssl.reference) is the upstream code's step-by-step formula; these are the
# shorter versions users copy, and "eager:compile" is torch.compile of them.
EAGER_PROVIDERS = ("eager", "eager:compile")


def _autocast_float(logits):
    # autocast runs cross_entropy in float32; float32 and float64 inputs stay as they are.
    return logits.float() if logits.element_size() < 4 else logits


def eager_nt_xent(z1, z2, temperature=0.1):
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T) / temperature
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    ar = torch.arange(b, device=z.device)
    targets = torch.cat([ar + b, ar])
    return F.cross_entropy(_autocast_float(logits), targets)


def eager_info_nce(q, k, temperature=0.1, symmetric=False):
    logits = _autocast_float(F.normalize(q, dim=1) @ F.normalize(k, dim=1).T) / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, labels))
    return loss


def resolve_eager(provider, fast_fn, ref_fn, eager_fn, device):
    """resolve() plus the eager providers (torch.compile of eager: GPU only, as reference:compile)."""
    if provider == "eager":
        return eager_fn
    if provider == "eager:compile":
        if device.type != "cuda":
            raise Skip("torch.compile of the eager loss is measured on GPU only")
        torch._dynamo.reset()
        return torch.compile(eager_fn, dynamic=False)
    return resolve(provider, fast_fn, ref_fn)


def _pair_build(fast_fn, ref_fn, eager_fn=None, **kwargs):
    def build(provider, shape, dtype, device):
        fn = (resolve(provider, fast_fn, ref_fn) if eager_fn is None
              else resolve_eager(provider, fast_fn, ref_fn, eager_fn, device))
        z1 = embeddings(shape["B"], shape["D"], dtype, device, seed=1)
        z2 = embeddings(shape["B"], shape["D"], dtype, device, seed=2)
        return Prepared(forward=lambda: fn(z1, z2, **kwargs), backward=scalar_backward, leaves=(z1, z2))
    return build


# At the largest CPU sizes a reference call takes tens of seconds on 2 cores: they are measured
# forward+backward for the automatic backend (and the C++ one) against the reference only; the
# smaller sizes cover every mode and every forced backend.
BIG_CPU = ("fastssl", "fastssl:cpp", "reference")


def _pair_sizes(cpu_bs, gpu_bs, *, cpu_d=128, gpu_d=128, gpu_probe=(), cpu_big=()):
    """cpu_bs: the CPU batch sizes, the first measured in every mode, the others (at least two
    more, so that forward+backward is a curve) in forward+backward."""
    def sizes(dev, quick):
        if quick:  # two sizes: every plot shows a line, not a lone point
            return [Size({"B": 16, "D": 8}), Size({"B": 32, "D": 8}, modes=FULL)]
        if dev == "cpu":
            out = [Size({"B": b, "D": cpu_d}, modes=ALL_MODES if i == 0 else FULL) for i, b in enumerate(cpu_bs)]
            return out + [Size({"B": b, "D": cpu_d}, modes=FULL, providers=BIG_CPU) for b in cpu_big]
        out = [Size({"B": b, "D": gpu_d}) for b in gpu_bs]
        out += [Size({"B": b, "D": gpu_d}, modes=FULL, providers=("fastssl",)) for b in gpu_probe]
        return out
    return sizes


def _info_nce_build(provider, shape, dtype, device):
    fn = resolve_eager(provider, fast.info_nce, ref.info_nce, eager_info_nce, device)
    q = embeddings(shape["B"], shape["D"], dtype, device, seed=1)
    k = embeddings(shape["B"], shape["D"], dtype, device, seed=2)
    sym = bool(shape.get("symmetric", False))
    return Prepared(forward=lambda: fn(q, k, symmetric=sym), backward=scalar_backward, leaves=(q, k))


def _info_nce_sizes(dev, quick):
    if quick:
        return [Size({"B": 16, "D": 8, "symmetric": True}),
                Size({"B": 32, "D": 8, "symmetric": True}, modes=FULL)]
    if dev == "cpu":  # each series at least three sizes in forward+backward
        return ([Size({"B": 1024, "D": 128, "symmetric": s}) for s in (False, True)]
                + [Size({"B": b, "D": 128, "symmetric": s}, modes=FULL)
                   for s in (False, True) for b in (512, 2048)]
                + [Size({"B": 4096, "D": 128, "symmetric": True}, modes=FULL, providers=BIG_CPU)])
    return [Size({"B": b, "D": 256, "symmetric": s}) for s in (False, True)
            for b in (8192, 32768, 65536)]


def _sogclr_build(provider, shape, dtype, device):
    fn = resolve(provider, fast.sogclr, ref.sogclr)
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
    fn = resolve(provider, fast.sce, ref.sce)
    b, d, k_size = shape["B"], shape["D"], shape["K"]
    q = embeddings(b, d, dtype, device, seed=1)
    k = embeddings(b, d, dtype, device, seed=2, requires_grad=False)
    queue = F.normalize(embeddings(k_size, d, torch.float32, device, seed=3, requires_grad=False),
                        dim=1).to(dtype)
    return Prepared(forward=lambda: fn(q, k, queue), backward=scalar_backward, leaves=(q,))


def _sce_sizes(dev, quick):
    if quick:
        return [Size({"B": 16, "D": 8, "K": 40}), Size({"B": 32, "D": 8, "K": 40}, modes=FULL)]
    if dev == "cpu":  # each queue size at three batch sizes
        return ([Size({"B": 256, "D": 128, "K": 4096}, modes=ALL_MODES)]
                + [Size({"B": b, "D": 128, "K": 4096}, modes=FULL) for b in (512, 1024)]
                + [Size({"B": b, "D": 128, "K": 16384}, modes=FULL) for b in (256, 512, 1024)])
    return [Size({"B": b, "D": 256, "K": k}) for k in (16384, 65536) for b in (256, 1024, 4096)]


SPECS = [
    OpSpec("nt_xent", "contrastive", _pair_build(fast.nt_xent, ref.nt_xent, eager_nt_xent),
           _pair_sizes((1024, 512, 2048), (4096, 8192, 16384, 32768), cpu_big=(8192,),
                       gpu_probe=(65536, 131072, 262144, 524288)),
           providers=STANDARD_PROVIDERS + EAGER_PROVIDERS),
    OpSpec("info_nce", "contrastive", _info_nce_build, _info_nce_sizes,
           providers=STANDARD_PROVIDERS + EAGER_PROVIDERS),
    OpSpec("dcl", "contrastive", _pair_build(fast.dcl, ref.dcl),
           _pair_sizes((1024, 512, 2048), (4096, 16384, 32768))),
    OpSpec("sogclr", "contrastive", _sogclr_build, _pair_sizes((1024, 512, 2048), (4096, 16384, 32768))),
    OpSpec("sce", "contrastive", _sce_build, _sce_sizes),
]
