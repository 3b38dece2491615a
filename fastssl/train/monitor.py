"""Online k-NN monitor (fastssl.models.knn, the rules of python -m fastssl.eval.knn): a labelled
train subset as the bank, a val subset as queries. The eval loaders are built once per run and
reused every epoch; they read and decode only their subsets (evenly spread over the class-sorted
splits).

Cost rule: the images the monitor decodes (bank + queries) are at most ``max_share`` (2%) of
the training images decoded between two monitor runs (``every`` epochs), with a floor of
``min_images`` so that a small dataset (the demo) is monitored whole. On ImageNet (1,281,167
training images, about 1,281,000 trained per epoch in full batches, knn_every=1) that is about
25,600 images: about 12,800 val queries and 12,800 bank rows.
"""
from __future__ import annotations

import torch

from fastssl import distributed as D
from fastssl.data.folder import scan_image_folder
from fastssl.data.loaders import EvalLoader, _resolve_data, spread_subset
from fastssl.models.knn import knn_loader_accuracy

MAX_SHARE = 0.02
MIN_IMAGES = 2048


def monitor_budget(train_images_per_epoch: int | None, every: int, *, max_share: float = MAX_SHARE,
                   min_images: int = MIN_IMAGES) -> int | None:
    """Images the monitor may decode per run (None: no limit, the training size is unknown)."""
    if not train_images_per_epoch:
        return None
    return max(min_images, int(max_share * max(every, 1) * train_images_per_epoch))


def monitor_subsets(n_train: int, n_val: int, train_images_per_epoch: int | None, every: int = 1,
                    max_train_samples: int | None = None, *, max_share: float = MAX_SHARE,
                    min_images: int = MIN_IMAGES) -> tuple[int, int]:
    """(bank rows, query rows) of one monitor run: half the budget for the val queries, the
    rest (at most max_train_samples) for the bank; what one split cannot use goes to the other."""
    budget = monitor_budget(train_images_per_epoch, every, max_share=max_share,
                            min_images=min_images)
    bank_cap = n_train if max_train_samples is None else min(n_train, max_train_samples)
    if budget is None:
        return bank_cap, n_val
    queries = min(n_val, budget // 2)
    bank = min(bank_cap, budget - queries)
    queries = min(n_val, budget - bank)
    return bank, queries


class KNNMonitor:
    def __init__(
        self,
        data: str,
        *,
        k: int,
        device: torch.device,
        size: int,
        max_train_samples: int | None,
        batch_size: int = 128,
        num_threads: int = 2,
        train_images_per_epoch: int | None = None,
        every: int = 1,
        max_share: float = MAX_SHARE,
        min_images: int = MIN_IMAGES,
        skip_corrupt: bool = False,
        skipped=None,
    ):
        """skip_corrupt: leave unreadable images out of the bank and the queries, reported once
        in `skipped` (the run's SkippedFiles, shared with its training loader)."""
        self.k, self.device = k, device
        kwargs = dict(
            size=size,
            device=device,
            rank=D.rank(),
            world_size=D.world_size(),
            num_threads=num_threads,
            skip_corrupt=skip_corrupt,
            skipped=skipped,
        )
        train = scan_image_folder(_resolve_data(data, "train"))
        val = scan_image_folder(_resolve_data(data, "val"))
        bank, queries = monitor_subsets(len(train), len(val), train_images_per_epoch, every,
                                        max_train_samples, max_share=max_share,
                                        min_images=min_images)
        self.train_loader = EvalLoader(
            train, batch_size, subset=spread_subset(len(train), bank), **kwargs
        )
        self.val_loader = EvalLoader(
            val, batch_size, subset=spread_subset(len(val), queries), **kwargs
        )
        self.images_per_run = self.train_loader.num_samples + self.val_loader.num_samples
        self.train_images = (train_images_per_epoch or 0) * max(every, 1)

    def decoded_share(self) -> float | None:
        """Images decoded by one monitor run / training images decoded between two runs."""
        return self.images_per_run / self.train_images if self.train_images else None

    def __call__(self, backbone: torch.nn.Module) -> dict:
        """Top-1 / top-5 (%) at k; every rank must call it (the features are gathered)."""
        result = knn_loader_accuracy(backbone, self.train_loader, self.val_loader, k=(self.k,),
                                     device=self.device)
        acc = result[self.k]
        return {f"knn{self.k}_top1": acc["top1"], f"knn{self.k}_top5": acc["top5"]}
