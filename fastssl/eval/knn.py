"""Weighted k-NN evaluation of a frozen backbone on a data folder (InstDisc / DINO protocol; the
rules are fastssl.models.knn's).

Library: :func:`knn_accuracy` (backbone + data -> top-1/top-5 per k); the k-NN on tensors
(:func:`knn_predict`, :func:`knn_eval_features`, :func:`topk_correct`) and
:func:`extract_features` are fastssl.models.knn's and fastssl.models.features', named here too.
Command line: ``python -m fastssl.eval.knn --checkpoint CKPT --data DIR|demo``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from fastssl import distributed as D
from fastssl.data import build_eval_loader
from fastssl.eval import _cli
from fastssl.models.features import extract_features, gather_rows
from fastssl.models.knn import (BLOCK_ELEMENTS, knn_eval_features, knn_loader_accuracy,
                                knn_predict, topk_correct)

__all__ = ["extract_features", "gather_rows", "knn_accuracy", "knn_eval_features",
           "knn_predict", "main", "topk_correct"]


def knn_accuracy(backbone: torch.nn.Module, data, *, k=(20, 200), temperature: float = 0.07,
                 batch_size: int = 128, device=None, block_size: int | None = None,
                 bank_device=None, size: int | None = None, num_threads: int = 2,
                 amp: bool | None = None, channels_last: bool = False,
                 train_loader=None, val_loader=None) -> dict:
    """Weighted k-NN accuracy of `backbone` on `data` (an ImageFolder root or "demo").

    Features of centre crops of the train split (the bank) and of the val split come from
    fastssl.data.build_eval_loader (or from the given `train_loader` / `val_loader`), then
    :func:`fastssl.models.knn.knn_loader_accuracy` (torchrun, bank_device, the backbone's mode
    restored). Returns {k: {"top1": percent, "top5": percent}} for each k.
    """
    if device is None:
        device = next(backbone.parameters()).device
    device = torch.device(device)
    if train_loader is None or val_loader is None:
        size = _cli.default_size(data, size)
        kwargs = dict(device=device, rank=D.rank(), world_size=D.world_size(),
                      num_threads=num_threads)
        if size is not None:
            kwargs["size"] = size
        if train_loader is None:
            train_loader = build_eval_loader(data, "train", batch_size, **kwargs)
        if val_loader is None:
            val_loader = build_eval_loader(data, "val", batch_size, **kwargs)
    return knn_loader_accuracy(backbone, train_loader, val_loader, k=k, temperature=temperature,
                               device=device, block_size=block_size, bank_device=bank_device,
                               amp=amp, channels_last=channels_last)


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastssl.eval.knn",
        description="Weighted k-NN accuracy (InstDisc/DINO protocol: cosine similarity of "
                    "L2-normalised features, top-k neighbours weighted by exp(sim/T)) of a "
                    "frozen backbone. Multi-GPU: torchrun --nproc_per_node=G -m "
                    "fastssl.eval.knn ...")
    _cli.add_common_args(p)
    p.add_argument("--k", type=_cli.positive_int, nargs="+", default=[20, 200],
                   help="numbers of neighbours (default: 20 200)")
    p.add_argument("--temperature", type=_cli.positive_float, default=0.07,
                   help="vote weight exp(sim/T) temperature (default: 0.07)")
    p.add_argument("--block-size", type=_cli.positive_int, default=None,
                   help="test rows per similarity block (default: about %d similarities per "
                        "block)" % BLOCK_ELEMENTS)
    p.add_argument("--bank-device", default=None,
                   help="device holding the feature bank and computing the similarities "
                        "(e.g. cpu for a bank that does not fit on the GPU; default: --device)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _cli.cli_errors():
        _cli.check_output(args.output)
        device = _cli.setup_device(args.device, args.dist_timeout)
        backbone, arch = _cli.load_frozen_backbone(args.checkpoint, args.arch, device,
                                                   args.trust_checkpoint)
        res = knn_accuracy(backbone, _cli.resolve_data(args.data), k=args.k,
                           temperature=args.temperature, batch_size=args.batch_size,
                           device=device, block_size=args.block_size,
                           bank_device=args.bank_device, size=args.size,
                           num_threads=args.num_threads, amp=_cli.amp_flag(args, device),
                           channels_last=device.type == "cuda")
        if D.rank() == 0:
            for v in args.k:
                print(f"k-NN k={v} T={args.temperature}: top-1 {res[v]['top1']:.2f}%  "
                      f"top-5 {res[v]['top5']:.2f}%")
            _cli.write_json(args.output, {"checkpoint": args.checkpoint, "arch": arch,
                                          "data": args.data, "temperature": args.temperature,
                                          "knn": {str(v): res[v] for v in args.k}})
        _cli.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
