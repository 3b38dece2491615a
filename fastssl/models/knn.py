"""Weighted k-NN evaluation of a frozen backbone (InstDisc / DINO protocol).

For every test image: cosine similarity of its L2-normalised feature to every L2-normalised
feature of the training set (the bank), the k most similar bank rows, each voting for its
class with weight exp(sim / T), votes summed per class; top-1 / top-5 = the true class is
among the 1 / 5 best-scored classes.

Precise rules (the tests hold the implementation to them):

* Neighbours are ordered by similarity, then by bank index: a tie at the k-th place goes to
  the lower bank index (what a stable descending sort of the row would pick). The prefix of
  the top-k_max list is therefore the top-k list for every smaller k, so several k share one
  top-k pass.
* k larger than the bank is clipped to the bank size (with a warning).
* Classes are ranked by score, ties going to the lower class index; a class with no vote is
  never a prediction, so a test row whose class got no vote is wrong at every top-m.
* The similarity matrix is never materialised whole: test rows go in blocks of
  `block_size` against the whole bank, on the bank's device (keep the bank on the CPU for
  banks that do not fit on the GPU).

Here: :func:`knn_predict` (votes on tensors), :func:`knn_eval_features` (accuracy on given
features) and :func:`knn_loader_accuracy` (a backbone and two eval loaders -> top-1/top-5 per k),
which the trainer's online monitor (fastssl.train.monitor) and ``python -m fastssl.eval.knn``
(fastssl.eval.knn, which builds the loaders from a data folder) share.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

from fastssl import distributed as D
from fastssl._validation import check_int, check_positive, check_tensor
from fastssl.models.features import collective_device, extract_features

# Similarities held at once per block (float32 elements): 2^25 = 128 MiB, plus a bool mask
# of the same shape for the tie check.
BLOCK_ELEMENTS = 1 << 25
_MAX_AUTO_BLOCK = 4096


def auto_block_size(bank_rows: int) -> int:
    """Test rows per block so that a block of similarities holds about BLOCK_ELEMENTS values."""
    return max(1, min(_MAX_AUTO_BLOCK, BLOCK_ELEMENTS // max(1, bank_rows)))


def _as_k_list(k) -> tuple[list[int], bool]:
    if isinstance(k, bool):
        raise TypeError(f"k: expected a positive int or a sequence of them, got {k!r}")
    if isinstance(k, int):
        return [check_int("k", k, minimum=1)], True
    try:
        ks = list(k)
    except TypeError:
        raise TypeError(f"k: expected a positive int or a sequence of them, got {type(k).__name__}")
    if not ks:
        raise ValueError("k: expected at least one value, got an empty sequence")
    return [check_int("k", v, minimum=1) for v in ks], False


def topk_neighbours(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of `sim`, by value descending then column ascending.

    torch.topk alone leaves ties at the k-th place to chance; rows with such a tie are redone
    with a stable sort (rare with real features, so the cost is a mask pass over the block).
    """
    n = sim.shape[1]
    vals, idx = sim.topk(k, dim=1, largest=True, sorted=True)
    if k < n:
        n_candidates = (sim >= vals[:, -1:]).sum(dim=1)
        tied = (n_candidates > k).nonzero().squeeze(1)  # one sync per block: eval only
        if tied.numel():
            v, i = torch.sort(sim.index_select(0, tied), dim=1, descending=True, stable=True)
            vals[tied] = v[:, :k]
            idx[tied] = i[:, :k]
    # Order equal values by bank index so that every prefix follows the same tie rule.
    order = idx.argsort(dim=1)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = vals.argsort(dim=1, descending=True, stable=True)
    return vals.gather(1, order), idx.gather(1, order)


def _vote(vals: torch.Tensor, nb_labels: torch.Tensor, k: int, temperature: float,
          num_classes: int) -> torch.Tensor:
    sims = vals[:, :k].float()
    # exp(sim/T) overflows float32 for sim/T > 88; sims are cosines (<= 1), so for T < 1/80 the
    # weights are taken relative to exp(1/T): the same ranking, a constant factor per call.
    shift = 1.0 if 1.0 / temperature > 80.0 else 0.0
    weights = ((sims - shift) / temperature).exp()
    scores = torch.zeros(vals.shape[0], num_classes, dtype=torch.float32, device=vals.device)
    return scores.scatter_add_(1, nb_labels[:, :k], weights)


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1, p=2)


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                *, k, temperature: float = 0.07, num_classes: int | None = None,
                block_size: int | None = None, normalize: bool = True):
    """Class votes of the weighted k-NN classifier for every test row.

    train_feats: (N, D) bank; train_labels: (N,) int64 in [0, num_classes); test_feats: (M, D).
    k: an int, or a sequence of ints (one top-k pass serves them all). normalize: L2-normalise
    both sides (pass False for features already normalised, which saves a copy of the bank).
    The work runs on the bank's device, `block_size` test rows at a time (default: about
    BLOCK_ELEMENTS similarities per block).
    Returns the (M, num_classes) float32 votes sum_{j in top-k} exp(sim_j / T) [class_j == c]
    on the bank's device (a dict {k: votes} when k is a sequence); the prediction is the
    argmax (see :func:`topk_correct` for the tie rule).
    """
    ks, single = _as_k_list(k)
    check_tensor("train_feats", train_feats, ndim=2)
    check_tensor("test_feats", test_feats, ndim=2, min_rows=0)
    if test_feats.shape[1] != train_feats.shape[1]:
        raise ValueError(f"test_feats: expected feature dimension {train_feats.shape[1]} (that of "
                         f"train_feats), got shape {tuple(test_feats.shape)}")
    if not isinstance(train_labels, torch.Tensor):
        raise TypeError(f"train_labels: expected a torch.Tensor, got {type(train_labels).__name__}")
    if train_labels.dtype.is_floating_point or train_labels.dtype == torch.bool:
        raise TypeError(f"train_labels: expected an integer dtype, got {train_labels.dtype}")
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(f"train_labels: expected shape ({train_feats.shape[0]},) (one label per "
                         f"row of train_feats), got {tuple(train_labels.shape)}")
    temperature = check_positive("temperature", temperature)
    device = train_feats.device
    labels = train_labels.to(device=device, dtype=torch.int64)
    lo, hi = int(labels.min()), int(labels.max())
    if num_classes is None:
        num_classes = hi + 1
    num_classes = check_int("num_classes", num_classes, minimum=1)
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"train_labels: expected values in [0, {num_classes}), got range "
                         f"[{lo}, {hi}]")
    n_bank = train_feats.shape[0]
    if max(ks) > n_bank:
        warnings.warn(f"k={max(ks)} exceeds the {n_bank} rows of the feature bank; "
                      f"clipping k to {n_bank}", stacklevel=2)
    ks_eff = [min(v, n_bank) for v in ks]
    k_max = max(ks_eff)
    if block_size is None:
        block_size = auto_block_size(n_bank)
    block_size = check_int("block_size", block_size, minimum=1)

    bank = _normalize_rows(train_feats) if normalize else train_feats
    out = {v: torch.empty(test_feats.shape[0], num_classes, dtype=torch.float32, device=device)
           for v in ks_eff}
    for start in range(0, test_feats.shape[0], block_size):
        block = test_feats[start:start + block_size].to(device=device, dtype=bank.dtype,
                                                        non_blocking=True)
        if normalize:
            block = _normalize_rows(block)
        sim = block @ bank.T
        vals, idx = topk_neighbours(sim, k_max)
        del sim
        nb_labels = labels[idx]
        for v in set(ks_eff):
            out[v][start:start + block.shape[0]] = _vote(vals, nb_labels, v, temperature,
                                                         num_classes)
    if single:
        return out[ks_eff[0]]
    return {v: out[min(v, n_bank)] for v in ks}


def topk_correct(scores: torch.Tensor, labels: torch.Tensor,
                 topk: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """Number of rows whose true class is among the m best-scored classes, for m in `topk`.

    Classes are ranked by score, ties going to the lower class index; a class with score 0
    (no vote) is never counted as predicted. m larger than the number of classes is clipped.
    Returns {m: int64 scalar tensor} on the scores' device (no host sync).
    """
    labels = labels.to(device=scores.device, dtype=torch.int64)
    true = scores.gather(1, labels[:, None])
    cls = torch.arange(scores.shape[1], device=scores.device)
    rank = (scores > true).sum(1) + ((scores == true) & (cls[None, :] < labels[:, None])).sum(1)
    voted = true.squeeze(1) > 0
    return {m: ((rank < m) & voted).sum() for m in topk}


def knn_eval_features(train_feats, train_labels, test_feats, test_labels, *, k=(20, 200),
                      temperature: float = 0.07, num_classes: int | None = None,
                      block_size: int | None = None, normalize: bool = True,
                      reduce: bool = True) -> dict:
    """Top-1/top-5 accuracy (percent) per k of the weighted k-NN on given features.

    Returns {k: {"top1": float, "top5": float}}. With reduce=True under torchrun, the
    correct counts of the ranks' test rows (each rank holding its own shard of the test set
    and the whole bank) are summed, so every rank gets the accuracy over the whole test set.
    """
    ks, _ = _as_k_list(k)
    if num_classes is None:
        # A bank subset may miss classes that the test rows have: count both.
        test_max = int(test_labels.max()) if test_labels.numel() else -1
        num_classes = max(int(train_labels.max()), test_max) + 1
    votes = knn_predict(train_feats, train_labels, test_feats, k=ks, temperature=temperature,
                        num_classes=num_classes, block_size=block_size, normalize=normalize)
    counts = []
    for v in ks:
        c = topk_correct(votes[v], test_labels, (1, 5))
        counts += [c[1], c[5]]
    counts.append(torch.tensor(test_feats.shape[0], device=counts[0].device))
    stacked = torch.stack(counts).to(torch.float64)
    if reduce and D.is_distributed():
        device = stacked.device
        stacked = D.all_reduce_sum(stacked.to(collective_device(device))).to(device)
    values = stacked.tolist()
    total = max(values[-1], 1.0)
    return {v: {"top1": 100.0 * values[2 * i] / total, "top5": 100.0 * values[2 * i + 1] / total}
            for i, v in enumerate(ks)}


def knn_loader_accuracy(backbone: torch.nn.Module, train_loader, val_loader, *, k=(20, 200),
                        temperature: float = 0.07, device=None, block_size: int | None = None,
                        bank_device=None, amp: bool | None = None,
                        channels_last: bool = False) -> dict:
    """Weighted k-NN accuracy of `backbone`: `train_loader`'s images are the bank, `val_loader`'s
    the queries (iterables of (images, labels)).

    Under torchrun every rank extracts its shard; the bank is all-gathered and each rank
    classifies its own val rows, the counts being summed. bank_device="cpu" keeps the bank (and
    the similarity blocks) on the CPU for banks that do not fit on the GPU. The backbone's
    train/eval mode is restored afterwards.
    Returns {k: {"top1": percent, "top5": percent}} for each k.
    """
    if device is None:
        device = next(backbone.parameters()).device
    device = torch.device(device)
    bank_device = torch.device(bank_device) if bank_device is not None else device
    num_classes = getattr(train_loader, "num_classes", None)
    train_feats, train_labels = extract_features(backbone, train_loader, device, amp=amp,
                                                 channels_last=channels_last,
                                                 out_device=bank_device)
    test_feats, test_labels = extract_features(backbone, val_loader, device, amp=amp,
                                               channels_last=channels_last,
                                               out_device=bank_device, gather=False)
    # Normalised in place: the bank is the largest tensor of the run, so no second copy.
    train_feats.div_(train_feats.norm(dim=1, keepdim=True).clamp_min_(1e-12))
    test_feats.div_(test_feats.norm(dim=1, keepdim=True).clamp_min_(1e-12))
    return knn_eval_features(train_feats, train_labels, test_feats, test_labels, k=k,
                             temperature=temperature, num_classes=num_classes,
                             block_size=block_size, normalize=False)
