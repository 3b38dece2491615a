"""Online k-NN monitor (fastssl.eval.knn): a labelled train subset as the bank, the val split
as queries. The eval loaders are built once per run and reused every epoch."""
from __future__ import annotations

import math

import torch


class _EveryNthBatch:
    """A fixed subset of an eval loader: every n-th batch (spread over the class-sorted order)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, max(1, n)
        self.num_classes = getattr(loader, "num_classes", None)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i % self.n == 0:
                yield batch


class KNNMonitor:
    def __init__(self, data: str, *, k: int, device: torch.device, size: int, max_train_samples: int | None,
                 batch_size: int = 128, num_threads: int = 2):
        from fastssl import distributed as D
        from fastssl.data import build_eval_loader
        self.k, self.device = k, device
        kwargs = dict(size=size, device=device, rank=D.rank(), world_size=D.world_size(), num_threads=num_threads)
        train = build_eval_loader(data, "train", batch_size, **kwargs)
        n = getattr(train, "num_samples", None)
        stride = math.ceil(n / max_train_samples) if (n and max_train_samples and n > max_train_samples) else 1
        self.train_loader = _EveryNthBatch(train, stride) if stride > 1 else train
        self.val_loader = build_eval_loader(data, "val", batch_size, **kwargs)

    def __call__(self, backbone: torch.nn.Module) -> dict:
        """Top-1 / top-5 (%) at k; every rank must call it (the features are gathered)."""
        from fastssl.eval.knn import knn_accuracy
        result = knn_accuracy(backbone, None, k=(self.k,), device=self.device,
                              train_loader=self.train_loader, val_loader=self.val_loader)
        acc = result[self.k]
        return {f"knn{self.k}_top1": acc["top1"], f"knn{self.k}_top5": acc["top5"]}
