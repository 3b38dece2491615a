"""A frozen network's features over a loader, gathered over the ranks under torchrun: what the
k-NN evaluation (fastssl.models.knn, the trainer's monitor) and the linear probe's cached-feature
mode read."""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn.functional as F

from fastssl import distributed as D


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader: Iterable, device=None, *,
                     amp: bool | None = None, channels_last: bool = False,
                     out_device=None, gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample of `loader` (an iterable of (images, labels)).

    The model runs in eval mode (its previous mode is restored), without gradient; the
    features come back as float32 (N, D) on `out_device` (default `device`) with int64
    labels. Under torchrun (and `gather=True`) each rank extracts its shard and the shards
    are all-gathered: rank shards may differ in size, so each is padded to the largest and the
    padding dropped after the gather. amp: bfloat16 autocast (default: on for CUDA).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    out_device = torch.device(out_device) if out_device is not None else device
    if amp is None:
        amp = device.type == "cuda"
    was_training = model.training
    model.eval()
    feats, labs = [], []
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp
                else contextlib.nullcontext())
    try:
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast:
                out = model(images)
            feats.append(out.flatten(1).float().to(out_device, non_blocking=True))
            labs.append(labels.to(out_device, dtype=torch.int64, non_blocking=True).flatten())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("loader: produced no batches, so there are no features to extract")
    if device.type == "cuda" and out_device.type == "cpu":
        # Non-blocking device-to-host copies are complete only after a synchronisation.
        torch.cuda.synchronize(device)
    features, labels = torch.cat(feats), torch.cat(labs)
    if gather and D.is_distributed():
        features, labels = gather_rows(features, labels, comm_device=device)
    return features, labels


def collective_device(fallback: torch.device) -> torch.device:
    """The device collectives run on: the current GPU under NCCL, else the CPU (gloo)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if fallback.type == "cuda" else fallback


def gather_rows(features: torch.Tensor, labels: torch.Tensor, *, comm_device=None,
                chunk_rows: int = 65536):
    """All-gather (features, labels) shards of possibly unequal sizes, in rank order.

    Equal shapes are what an all-gather needs: every shard is padded to the largest, gathered
    with fastssl.distributed.gather_no_grad, and the padded rows are dropped. The gather goes
    `chunk_rows` rows at a time, so a bank kept on the CPU never sits whole on the GPU.
    """
    if not D.is_distributed():
        return features, labels
    comm = collective_device(torch.device(comm_device) if comm_device is not None
                             else features.device)
    out_device = features.device
    w = D.world_size()
    n = torch.tensor([features.shape[0]], device=comm, dtype=torch.int64)
    counts = D.gather_no_grad(n, name="shard sizes").tolist()
    n_max = max(counts)
    pad = n_max - features.shape[0]
    f = F.pad(features, (0, 0, 0, pad))
    y = F.pad(labels, (0, pad), value=-1)
    f_parts, y_parts = [], []
    for start in range(0, n_max, chunk_rows):
        stop = min(n_max, start + chunk_rows)
        f_parts.append(D.gather_no_grad(f[start:stop].to(comm), name="features")
                       .view(w, stop - start, -1).to(out_device))
        y_parts.append(D.gather_no_grad(y[start:stop].to(comm), name="labels")
                       .view(w, stop - start).to(out_device))
    f_all = torch.cat(f_parts, dim=1)  # (W, n_max, D), rank-major
    y_all = torch.cat(y_parts, dim=1)
    keep = torch.cat([torch.arange(c) + r * n_max for r, c in enumerate(counts)]).to(out_device)
    return f_all.flatten(0, 1).index_select(0, keep), y_all.flatten().index_select(0, keep)
