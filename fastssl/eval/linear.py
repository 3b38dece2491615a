"""Linear probe on a frozen backbone, with the seeds' recipes as presets.

The backbone stays in eval mode (BatchNorm uses and keeps its running statistics) without
gradients; only a Linear(feat_dim, num_classes) head is trained, with cross-entropy, SGD or
LARS/LARC and a per-iteration cosine learning-rate schedule to 0. Two modes:

* end to end (default): training images are random-resized crops (scale 0.08-1) with a
  horizontal flip (fastssl.data.build_train_loader), validation images centre crops
  (fastssl.data.build_eval_loader); the backbone runs on every batch.
* ``--cached-features``: features of centre crops are extracted once (train and val) and the
  head is trained on them: logistic regression on frozen features, no augmentation, much
  faster (the SFRIK repository's logistic_regression.py variant).

Under torchrun: end to end, each rank loads its shard of every batch and the head is wrapped in
DDP; with cached features, the features are all-gathered and every rank trains the same head.
Reported: top-1 / top-5 (percent) on the val split.
Command line: ``python -m fastssl.eval.linear --checkpoint CKPT --data DIR|demo [--preset NAME]``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fastssl import distributed as D
from fastssl.data import CropSpec, build_eval_loader, build_train_loader
from fastssl.eval import _cli
from fastssl.models.features import collective_device, extract_features
from fastssl.optim import build_optimizer, set_lr


@dataclasses.dataclass(frozen=True)
class LinearPreset:
    """A linear-probe recipe; `lr` is the learning rate at `batch_size` (scaled linearly for
    other global batch sizes)."""
    optimizer: str          # "sgd", "larc" (apex LARC, no exclusions) or "lars" (VICReg rule)
    batch_size: int
    epochs: int
    lr: float
    weight_decay: float
    momentum: float = 0.9
    source: str = ""


PRESETS: dict[str, LinearPreset] = {
    "groco": LinearPreset(
        "larc", 4096, 90, 1.6, 0.0,
        source="GroCo linear_probing.py / eval_linear_probing.yaml: SGD lr 0.1*4096/256, momentum "
               "0.9, wd 0, LARC(trust 0.001, clip=False), cosine, 90 epochs, batch 4096"),
    "sfrik": LinearPreset(
        "sgd", 256, 100, 0.4, 1e-6,
        source="SFRIK README (VICReg evaluate.py --weights freeze): 100 epochs, batch 256, "
               "lr-head 0.4, wd 1e-6, cosine"),
    "sogclr": LinearPreset(
        "sgd", 1024, 90, 0.4, 0.0,
        source="SogCLR README: momentum SGD without weight decay, batch 1024, 90 epochs; lr "
               "0.1*bs/256 and cosine from the MoCo lincls.py it is built on (assumed)"),
    "sce": LinearPreset(
        "sgd", 1024, 90, 0.4, 0.0,
        source="SCE README: eztorch linear_classifier/mocov3 config; MoCo-v3 recipe (SGD lr "
               "0.1*bs/256, momentum 0.9, wd 0, cosine, 90 epochs, batch 1024) assumed"),
    "swav": LinearPreset(
        "sgd", 256, 100, 0.3, 1e-6,
        source="SwAV eval_linear.py defaults (not in the specs): lr 0.3, wd 1e-6, batch 8x32, "
               "100 epochs, cosine to 0"),
    "demo": LinearPreset(
        "sgd", 64, 30, 0.1, 0.0,
        source="small schedule for the demo data (a few hundred 64-px images, CPU)"),
}


def resolve_recipe(preset: str, *, batch_size=None, epochs=None, lr=None, weight_decay=None,
                   optimizer=None, momentum=None) -> LinearPreset:
    """A preset with overrides; a changed batch size scales the preset lr linearly unless an
    lr is given."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    base = PRESETS[preset]
    bs = base.batch_size if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size: expected a positive int, got {bs}")
    out = dataclasses.replace(
        base, batch_size=bs,
        epochs=base.epochs if epochs is None else int(epochs),
        lr=base.lr * bs / base.batch_size if lr is None else float(lr),
        weight_decay=base.weight_decay if weight_decay is None else float(weight_decay),
        optimizer=base.optimizer if optimizer is None else optimizer,
        momentum=base.momentum if momentum is None else float(momentum))
    if out.epochs < 1:
        raise ValueError(f"epochs: expected a positive int, got {out.epochs}")
    if out.lr <= 0:
        raise ValueError(f"lr: expected a positive value, got {out.lr}")
    if out.weight_decay < 0:
        raise ValueError(f"weight_decay: expected a non-negative value, got {out.weight_decay}")
    if out.optimizer not in ("sgd", "larc", "lars"):
        raise ValueError(
            f"optimizer: expected one of ('sgd', 'larc', 'lars'), got {out.optimizer!r}"
        )
    return out


def cosine_lr(step: int, total_steps: int, peak: float) -> float:
    """Half cosine from peak (step 0) to 0 (step total_steps), per iteration."""
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def build_head(feat_dim: int, num_classes: int, device=None) -> torch.nn.Linear:
    head = torch.nn.Linear(feat_dim, num_classes, device=device)
    # The usual linear-probe initialisation (MoCo, SwAV, VICReg): small weights, zero bias.
    torch.nn.init.normal_(head.weight, std=0.01)
    torch.nn.init.zeros_(head.bias)
    return head


def build_head_optimizer(recipe: LinearPreset, params) -> torch.optim.Optimizer:
    # apex LARC (GroCo) adapts every tensor, the bias included; the VICReg LARS skips 1-d ones.
    return build_optimizer(recipe.optimizer, params, lr=recipe.lr,
                           weight_decay=recipe.weight_decay, momentum=recipe.momentum,
                           exclude_1d=recipe.optimizer == "lars")


def logits_correct(
    logits: torch.Tensor, labels: torch.Tensor, topk=(1, 5)
) -> dict[int, torch.Tensor]:
    """Rows whose label is among the m largest logits (m clipped to the number of classes)."""
    m_max = min(max(topk), logits.shape[1])
    pred = logits.topk(m_max, dim=1).indices
    hit = pred == labels[:, None]
    return {m: hit[:, :min(m, m_max)].any(dim=1).sum() for m in topk}


def _reduce_counts(counts: torch.Tensor, reduce: bool) -> list[float]:
    if reduce and D.is_distributed():
        device = counts.device
        counts = D.all_reduce_sum(counts.to(collective_device(device))).to(device)
    return counts.tolist()


# --------------------------------------------------------------------------- cached features

def train_linear_on_features(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    num_classes: int,
    recipe: LinearPreset,
    device=None,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> tuple[torch.nn.Linear, dict]:
    """Logistic regression of a linear head on fixed features (minibatch SGD/LARS + cosine).

    Features may live on another device than `device` (e.g. a CPU-resident ImageNet bank):
    minibatches are moved over. The shuffling is deterministic in `seed` and the epoch.
    Returns (head, {"top1", "top5", "train_loss"}) with accuracies in percent on the val rows.
    """
    device = torch.device(device) if device is not None else train_feats.device
    torch.manual_seed(seed)
    head = build_head(train_feats.shape[1], num_classes, device)
    opt = build_head_optimizer(recipe, head.parameters())
    n = train_feats.shape[0]
    steps_per_epoch = max(1, n // recipe.batch_size)  # drop_last, as the image loaders do
    bs = min(recipe.batch_size, n)
    total = steps_per_epoch * recipe.epochs
    step, loss_sum = 0, torch.zeros((), device=device)
    for epoch in range(recipe.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        loss_sum.zero_()
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs].to(train_feats.device)
            x = train_feats.index_select(0, idx).to(device, non_blocking=True)
            y = train_labels.index_select(0, idx).to(device, non_blocking=True)
            set_lr(opt, cosine_lr(step, total, recipe.lr))
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            step += 1
        if log is not None and (epoch + 1 == recipe.epochs or (epoch + 1) % 10 == 0 or epoch == 0):
            log(
                f"epoch {epoch + 1}/{recipe.epochs}: train loss "
                f"{loss_sum.item() / steps_per_epoch:.4f}"
            )
    res = evaluate_head_on_features(head, val_feats, val_labels, device=device)
    res["train_loss"] = loss_sum.item() / steps_per_epoch
    return head, res


@torch.no_grad()
def evaluate_head_on_features(head, feats, labels, *, device=None, batch_size: int = 4096,
                              reduce: bool = False) -> dict:
    device = torch.device(device) if device is not None else feats.device
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for start in range(0, feats.shape[0], batch_size):
        x = feats[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        c = logits_correct(head(x), y)
        counts += torch.stack([c[1], c[5], torch.tensor(y.shape[0], device=device)]).double()
    top1, top5, total = _reduce_counts(counts, reduce)
    total = max(total, 1.0)
    return {"top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total}


# --------------------------------------------------------------------------- end to end

def _train_crops(crop_size: int):
    # Linear-probe augmentation: random-resized crop and flip only, no colour distortion.
    return [CropSpec(crop_size, (0.08, 1.0), 1, flip_p=0.5, jitter_p=0.0, gray_p=0.0,
                     blur_p=0.0, solarize_p=0.0)]


def _autocast(device: torch.device, amp: bool):
    return (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp
            else contextlib.nullcontext())


def train_linear_end_to_end(
    backbone,
    data,
    *,
    recipe: LinearPreset,
    num_classes: int,
    feat_dim: int,
    device,
    crop_size: int,
    size=None,
    seed: int = 0,
    num_threads: int = 2,
    amp: bool = False,
    channels_last: bool = False,
    log: Callable[[str], None] | None = print,
) -> tuple[torch.nn.Module, dict]:
    """The head trained on augmented crops through the frozen backbone, then evaluated on
    centre crops of the val split. Global batch = recipe.batch_size, split over the ranks."""
    world, rank = D.world_size(), D.rank()
    if recipe.batch_size % world:
        raise ValueError(f"batch_size: the global batch {recipe.batch_size} must be divisible by "
                         f"the number of ranks {world}")
    local_bs = recipe.batch_size // world
    loader = build_train_loader(data, _train_crops(crop_size), local_bs, device=device, rank=rank,
                                world_size=world, seed=seed, num_threads=num_threads,
                                channels_last=channels_last, return_index=False)
    torch.manual_seed(seed)
    head = build_head(feat_dim, num_classes, device)
    model = head
    if D.is_distributed():
        model = torch.nn.parallel.DistributedDataParallel(
            head, device_ids=[device.index] if device.type == "cuda" else None)
    opt = build_head_optimizer(recipe, head.parameters())
    backbone.eval()
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise ValueError(
            f"data {data}: fewer training images than one batch of {recipe.batch_size}"
        )
    total, step = steps_per_epoch * recipe.epochs, 0
    loss_sum = torch.zeros((), device=device)
    for epoch in range(recipe.epochs):
        loader.set_epoch(epoch)
        loss_sum.zero_()
        t0 = time.perf_counter()
        for batch in loader:
            with torch.no_grad(), _autocast(device, amp):
                feats = backbone(batch.views[0]).flatten(1)
            set_lr(opt, cosine_lr(step, total, recipe.lr))
            loss = F.cross_entropy(model(feats.float()), batch.labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            step += 1
        if log is not None and rank == 0 and (epoch + 1 == recipe.epochs or (epoch + 1) % 10 == 0
                                              or epoch == 0):
            log(f"epoch {epoch + 1}/{recipe.epochs}: train loss "
                f"{loss_sum.item() / steps_per_epoch:.4f} ({time.perf_counter() - t0:.1f}s)")
    kwargs = dict(device=device, rank=rank, world_size=world, num_threads=num_threads)
    if size is not None:
        kwargs["size"] = size
    val = build_eval_loader(data, "val", local_bs, **kwargs)
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for images, labels in val:
            images = images.to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp):
                feats = backbone(images).flatten(1)
            labels = labels.to(device)
            c = logits_correct(head(feats.float()), labels)
            counts += torch.stack(
                [c[1], c[5], torch.tensor(labels.shape[0], device=device)]
            ).double()
    top1, top5, n = _reduce_counts(counts, True)
    n = max(n, 1.0)
    return head, {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n,
                  "train_loss": loss_sum.item() / steps_per_epoch}


# --------------------------------------------------------------------------- library entry

def default_preset(data: str) -> str:
    return "demo" if data == "demo" else "sfrik"


def linear_probe(backbone: torch.nn.Module, data, *, preset: str | None = None,
                 cached_features: bool = False, epochs=None, batch_size=None, lr=None,
                 weight_decay=None, optimizer=None, momentum=None, device=None, size=None,
                 crop_size=None, seed: int = 0, num_threads: int = 2, amp: bool | None = None,
                 channels_last: bool = False, feature_batch_size: int = 128, feature_device=None,
                 log: Callable[[str], None] | None = print) -> dict:
    """Linear-probe accuracy of a frozen `backbone` on `data` (an ImageFolder root or "demo").

    preset: a key of PRESETS (default: "demo" for the demo data, else "sfrik"); the other
    keyword arguments override it (a different batch_size scales its lr linearly).
    Returns {"top1", "top5" (percent), "train_loss", "recipe": dict, "mode"}.
    The backbone is frozen (eval mode, no parameter gradients) and left so.
    """
    size = _cli.default_size(data, size)
    recipe = resolve_recipe(preset or default_preset(data), batch_size=batch_size, epochs=epochs,
                            lr=lr, weight_decay=weight_decay, optimizer=optimizer,
                            momentum=momentum)
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    if amp is None:
        amp = device.type == "cuda"
    _cli.freeze(backbone)
    kwargs = dict(device=device, rank=D.rank(), world_size=D.world_size(), num_threads=num_threads)
    if size is not None:
        kwargs["size"] = size
    if cached_features:
        train_loader = build_eval_loader(data, "train", feature_batch_size, **kwargs)
        val_loader = build_eval_loader(data, "val", feature_batch_size, **kwargs)
        num_classes = train_loader.num_classes
        fdev = feature_device if feature_device is not None else device
        tf, tl = extract_features(backbone, train_loader, device, amp=amp,
                                  channels_last=channels_last, out_device=fdev)
        vf, vl = extract_features(backbone, val_loader, device, amp=amp,
                                  channels_last=channels_last, out_device=fdev)
        _, res = train_linear_on_features(tf, tl, vf, vl, num_classes=num_classes, recipe=recipe,
                                          device=device, seed=seed,
                                          log=log if D.rank() == 0 else None)
    else:
        probe = build_eval_loader(data, "val", 1, **kwargs)
        num_classes = probe.num_classes
        if crop_size is None:
            crop_size = size if size is not None else getattr(probe, "size", 224)
        _, res = train_linear_end_to_end(
            backbone, data, recipe=recipe, num_classes=num_classes,
            feat_dim=_cli.feature_dim(backbone, device), device=device, crop_size=crop_size,
            size=size, seed=seed, num_threads=num_threads, amp=amp, channels_last=channels_last,
            log=log)
    res["recipe"] = dataclasses.asdict(recipe)
    res["mode"] = "cached-features" if cached_features else "end-to-end"
    return res


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    presets = "\n".join(
        f"  {k}: {p.optimizer}, batch {p.batch_size}, {p.epochs} epochs, lr {p.lr}, wd "
        f"{p.weight_decay} ({p.source})"
        for k, p in PRESETS.items()
    )
    p = argparse.ArgumentParser(
        prog="python -m fastssl.eval.linear",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Linear probe on a frozen backbone (eval mode, BN frozen): a linear head "
                    "trained with cross-entropy on random-resized crops + flips, evaluated on "
                    "centre crops (top-1 / top-5). Multi-GPU: torchrun --nproc_per_node=G -m "
                    "fastssl.eval.linear ...",
        epilog="presets (lr at the preset batch; scaled linearly with --batch-size):\n" + presets)
    _cli.add_common_args(p)
    p.set_defaults(batch_size=None)
    for action in p._actions:
        if action.dest == "batch_size":
            action.help = "global training batch (default: the preset's)"
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="recipe (default: demo for --data demo, else sfrik)")
    p.add_argument("--cached-features", action="store_true",
                   help="extract centre-crop features once and train the head on them "
                        "(logistic regression; no augmentation; much faster)")
    p.add_argument("--epochs", type=_cli.positive_int, default=None)
    p.add_argument("--lr", type=_cli.positive_float, default=None,
                   help="peak learning rate at the global batch")
    p.add_argument("--weight-decay", type=_cli.nonneg_float, default=None)
    p.add_argument("--momentum", type=_cli.nonneg_float, default=None)
    p.add_argument("--optimizer", choices=["sgd", "larc", "lars"], default=None)
    p.add_argument("--crop-size", type=_cli.positive_int, default=None,
                   help="training crop size (default: --size, else the eval loader's)")
    p.add_argument("--feature-batch-size", type=_cli.positive_int, default=128,
                   help="batch for feature extraction in --cached-features mode")
    p.add_argument("--feature-device", default=None,
                   help="device holding cached features (e.g. cpu for large datasets)")
    p.add_argument("--seed", type=_cli.nonneg_int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _cli.cli_errors():
        _cli.check_output(args.output)
        device = _cli.setup_device(args.device, args.dist_timeout)
        backbone, arch = _cli.load_frozen_backbone(args.checkpoint, args.arch, device,
                                                   args.trust_checkpoint)
        res = linear_probe(backbone, _cli.resolve_data(args.data), preset=args.preset,
                           cached_features=args.cached_features, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                           optimizer=args.optimizer, momentum=args.momentum, device=device,
                           size=args.size, crop_size=args.crop_size, seed=args.seed,
                           num_threads=args.num_threads, amp=_cli.amp_flag(args, device),
                           channels_last=device.type == "cuda",
                           feature_batch_size=args.feature_batch_size,
                           feature_device=args.feature_device)
        if D.rank() == 0:
            print(
                f"linear probe ({res['mode']}): top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%"
            )
            _cli.write_json(args.output, {"checkpoint": args.checkpoint, "arch": arch,
                                          "data": args.data, "linear": res})
        _cli.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
