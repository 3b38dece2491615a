"""Command line of train_imagenet.py: presets + flags -> TrainConfig -> train()."""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time

from fastssl import distributed as D
from fastssl.methods import METHODS
from fastssl.methods.presets import DEFAULT_PRESET, METHOD_DEMO, PRESETS, describe, get_preset
from fastssl.models.checkpoint_io import CheckpointWriteError
from fastssl.train import loop
from fastssl.train.config import make_config
from fastssl.train.log import tensorboard_writer_class

# The headline ImageNet preset of each method, used for --method M with a real --data DIR.
METHOD_PRESET = {"groco": "groco_2views_100ep", "sce": "sce_200ep", "sogclr": "sogclr_800ep",
                 "sfrik": "sfrik_200ep", "swav": "swav_800ep_bs4096", "simclr": "simclr_200ep",
                 "auh": "auh_200ep", "dino": "dino_resnet50_100ep"}


def _number(cast, strictly_positive: bool, what: str):
    """An argparse `type` that parses with `cast` and rejects values out of range."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if not (value > 0 if strictly_positive else value >= 0):  # also rejects NaN
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


_positive_int = _number(int, True, "a positive integer")
_nonneg_int = _number(int, False, "an integer >= 0")
_positive_float = _number(float, True, "a positive number")
_nonneg_float = _number(float, False, "a number >= 0")


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _duration(text: str) -> float:
    """--dist-timeout (seconds or minutes), as an argparse type."""
    try:
        return D.parse_timeout(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _expected_type(default) -> tuple[str, object]:
    """(what a --method-arg value must be, its check), from the method's default value."""
    if default is None:                     # GroCo's n_pos_views: a count, or null for all views
        return "an integer or null", lambda v: v is None or _is_int(v)
    if isinstance(default, bool):
        return "true or false", lambda v: isinstance(v, bool)
    if isinstance(default, int):
        return "an integer", _is_int
    if isinstance(default, float):
        return "a finite number", _is_number
    if isinstance(default, (list, tuple)):
        n = len(default)
        return (f"a list of {n} finite numbers",
                lambda v: isinstance(v, list) and len(v) == n and all(map(_is_number, v)))
    if isinstance(default, str):
        return "a string", lambda v: isinstance(v, str)
    return f"a value like {default!r}", lambda v: isinstance(v, type(default))


def _shown(value) -> str:
    kind = {str: "a string", list: "a list", dict: "an object", bool: "a boolean",
            type(None): "null"}.get(type(value))
    text = (json.dumps(value) if value is None or isinstance(value, (str, list, dict, bool))
            else repr(value))
    return f"{kind} {text}" if kind and value is not None else text


# Ranges of the values the methods use themselves (the loss arguments' ranges, temperature > 0
# and so on, are the losses' own checks, raised as named ValueErrors when the method is built).
_RANGES = {"base_momentum": (0.0, 1.0), "n_prototypes": (1, None), "n_assign_crops": (1, None),
           "n_pos_views": (1, None), "epoch_queue_starts": (0, None),
           "freeze_prototypes_iters": (0, None)}


def check_method_args(method: str, args: dict) -> str | None:
    """The first problem of the --method-arg values (unknown key, wrong type, out of range), or
    None."""
    known = METHODS[method].defaults
    unknown = set(args) - set(known)
    if unknown:
        return f"unknown key(s) {sorted(unknown)} for {method}; known: {sorted(known)}"
    for key, value in args.items():
        expected, ok = _expected_type(known[key])
        if not ok(value):
            return (f"{key}: expected {expected} for {method} (default {json.dumps(known[key])}), "
                    f"got {_shown(value)}")
        low, high = _RANGES.get(key, (None, None))
        if value is not None and ((low is not None and value < low)
                                  or (high is not None and value > high)):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            return f"{key}: expected a value {bounds} for {method}, got {_shown(value)}"
    return None


_HEAD_LISTS = ("projector", "predictor")


def check_heads(heads: dict) -> str | None:
    """The first problem of the --head values, or None."""
    for key, value in heads.items():
        if key in _HEAD_LISTS:
            if not (isinstance(value, list) and value and all(_is_int(v) and v > 0 for v in value)):
                return f"{key}: expected a non-empty list of positive integers, got {_shown(value)}"
        elif key == "bn":
            if not isinstance(value, bool):
                return f"bn: expected true or false, got {_shown(value)}"
        else:
            return f"unknown key {key!r}; known: {sorted(_HEAD_LISTS + ('bn',))}"
    return None


LOADERS = ["auto", "dali", "synthetic"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_imagenet.py",
        description="Self-supervised pretraining (SimCLR, GroCo, SCE, SogCLR, SFRIK, SwAV, AUH, "
                    "DINO) with fastssl's fused losses. With no arguments: a short ResNet-18 run "
                    "on the generated demo dataset, then the k-NN accuracy of the learned "
                    "features next to a random-init network.",
        epilog="Distributed: torchrun --nproc_per_node=G train_imagenet.py ... (NCCL on GPU, "
               "gloo on CPU). Exit status: 0 finished or --max-steps reached, 1 non-finite loss "
               "or --dist-timeout expired, 2 usage or data error, 128+N stopped by signal N "
               "after a resumable checkpoint (resume with --resume auto).")
    p.add_argument("--data", default=None,
                   help="ImageFolder root (DIR or DIR/train) or 'demo' (default: demo)")
    p.add_argument("--method", choices=sorted(METHODS), default=None,
                   help="SSL method (default: the preset's)")
    p.add_argument("--preset", default=None,
                   help="named recipe (see --list-presets); default: demo_<method> on the demo "
                        "data, else the method's ImageNet preset")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as JSON and exit")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int,
                   help="global batch size (split over the ranks)")
    p.add_argument("--lr", type=_positive_float,
                   help="absolute peak learning rate (overrides --base-lr scaling)")
    p.add_argument("--base-lr", type=_positive_float)
    p.add_argument("--lr-scaling", choices=["linear", "linear32", "sqrt", "none"],
                   help="linear: base*bs/256, linear32: base*bs/32 (GroCo), sqrt: base*sqrt(bs)")
    p.add_argument("--warmup-epochs", type=_nonneg_float)
    p.add_argument("--weight-decay", type=_nonneg_float)
    p.add_argument("--optimizer", choices=["lars", "larc", "sgd"])
    p.add_argument("--arch", choices=["resnet18", "resnet50"])
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"],
                   help="autocast dtype (auto: bf16 on GPU, off on CPU); fp16 adds a GradScaler")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on for CUDA)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="SyncBatchNorm under DDP on GPU (default: on)")
    p.add_argument("--out", help="output directory (checkpoints, log.jsonl, config.json)")
    p.add_argument("--resume",
                   help="checkpoint path, or 'auto' for OUT/checkpoint_last.pth if present "
                        "(read with torch.load(weights_only=True))")
    p.add_argument("--trust-checkpoint", action="store_true", default=None,
                   help="read --resume's checkpoint with a full unpickle (torch.load("
                        "weights_only=False)), which RUNS ANY CODE INSIDE THE FILE: only for a "
                        "file you trust that holds more than tensors and plain containers (e.g. "
                        "from an older fastssl). Default: weights_only=True, and such a file is "
                        "refused")
    p.add_argument("--seed", type=_nonneg_int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--loader", choices=LOADERS, default=None,
                   help="training data loader: dali (default; auto = dali) or synthetic (random "
                        "images on the device, no --data needed: throughput runs)")
    # the data loader's flag was --backend, which everywhere else in fastssl means the kernel
    # backend (fastssl.use_backend); kept as a deprecated alias
    p.add_argument("--backend", choices=LOADERS, default=None, dest="loader_deprecated",
                   help=argparse.SUPPRESS)
    p.add_argument("--dataset-size", type=_positive_int,
                   help="--loader synthetic: number of samples")
    p.add_argument("--num-threads", type=_positive_int, help="loader threads")
    p.add_argument("--knn-every", type=_nonneg_int,
                   help="epochs between online k-NN monitors (0: off)")
    p.add_argument("--knn-k", type=_positive_int)
    p.add_argument("--knn-train-samples", type=_positive_int,
                   help="labelled subset for the k-NN monitor")
    p.add_argument("--eval-size", type=_positive_int, help="image size of the k-NN monitor")
    p.add_argument("--log-every", type=_positive_int, help="steps between progress/log lines")
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="also log step loss, lr, images/s, epoch mean loss and k-NN to "
                        "OUT/tensorboard (needs the tensorboard package)")
    p.add_argument("--max-steps", type=_positive_int,
                   help="stop with a checkpoint after this many steps")
    p.add_argument("--deterministic", action="store_true", default=None)
    p.add_argument("--dist-timeout", type=_duration, default=None, metavar="DURATION",
                   help="under torchrun: how long a collective waits for the other ranks before "
                        "the run ends with an error naming the timeout (a frozen or lost rank), "
                        "in seconds (600, 600s) or minutes (10m); default 10m")
    p.add_argument("--skip-corrupt", action="store_true", default=None,
                   help="skip unreadable images, in training and in the k-NN monitor (each "
                        "decode-checked once, reported once per run), instead of stopping with a "
                        "checkpoint and 'error: FILE: REASON'")
    p.add_argument("--method-arg", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="override a method hyperparameter (JSON value), e.g. temperature=0.2")
    p.add_argument("--head", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="override a head setting (JSON value), e.g. projector=[512,128]")
    return p


FLAG_FIELDS = ["data", "method", "epochs", "batch_size", "lr", "base_lr", "lr_scaling",
               "warmup_epochs", "weight_decay", "optimizer", "arch", "amp", "channels_last",
               "compile", "sync_bn", "out", "resume", "seed", "device", "dataset_size",
               "num_threads", "knn_every", "knn_k",
               "knn_train_samples", "eval_size", "log_every", "max_steps", "deterministic",
               "skip_corrupt", "tensorboard", "trust_checkpoint", "dist_timeout"]


def _loader(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    """--loader, or the deprecated --backend (a warning on stderr)."""
    if args.loader_deprecated is None:
        return args.loader
    if args.loader is not None and args.loader != args.loader_deprecated:
        parser.error(f"argument --backend: deprecated alias of --loader, and they disagree "
                     f"(--loader {args.loader}, --backend {args.loader_deprecated})")
    print(f"warning: --backend {args.loader_deprecated} is deprecated for the data loader; use "
          f"--loader {args.loader_deprecated} (--backend means the kernel backend elsewhere in "
          f"fastssl)", file=sys.stderr)
    return args.loader_deprecated


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    data = args.data or "demo"
    loader = _loader(args, parser)
    if args.preset is not None:
        if args.preset not in PRESETS:
            parser.error(f"argument --preset: unknown preset {args.preset!r} (see --list-presets)")
        name = args.preset
    elif args.method is not None:
        name = METHOD_DEMO[args.method] if data == "demo" else METHOD_PRESET[args.method]
    else:
        name = DEFAULT_PRESET if data == "demo" else METHOD_PRESET["simclr"]
    preset = get_preset(name)
    if args.method is not None and args.method != preset["method"]:
        parser.error(f"argument --method: {args.method!r} does not match preset {name!r} "
                     f"(method {preset['method']!r})")
    if args.data is None and "data" not in preset and loader != "synthetic":
        # an ImageNet recipe must not silently resolve against the demo data
        parser.error(f"argument --data: preset {name!r} is an ImageNet recipe; pass --data DIR "
                     f"(an ImageFolder root: DIR/train/<class>/*.JPEG, DIR/val/...), or "
                     f"--loader synthetic for a run on random images")
    overrides = {f: getattr(args, f) for f in FLAG_FIELDS}
    overrides["data"] = data
    overrides["backend"] = loader           # TrainConfig.backend is the data loader
    overrides["preset"] = name
    if args.method_arg:
        problem = check_method_args(preset["method"], dict(args.method_arg))
        if problem:
            parser.error(f"argument --method-arg: {problem}")
        preset["method_args"] = {**preset.get("method_args", {}), **dict(args.method_arg)}
    if args.head:
        problem = check_heads(dict(args.head))
        if problem:
            parser.error(f"argument --head: {problem}")
        preset["heads"] = {**preset.get("heads", {}), **dict(args.head)}
    cfg = make_config(preset, overrides)
    if cfg.data == "demo" and args.knn_every is None:
        cfg.knn_every = 0                   # the demo prints learned vs random k-NN at the end
    cfg.compare_random_init = cfg.data == "demo"
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_presets:
        for name in PRESETS:
            print(describe(name))
        return 0
    cfg = resolve_config(args, parser)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if cfg.tensorboard:
        try:
            tensorboard_writer_class()       # missing: say so before any work
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    start = time.perf_counter()
    try:
        result = loop.train(cfg)
    except (loop.NonFiniteLossError, loop.DistTimeoutError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except (ValueError, FileNotFoundError, loop.CorruptDataError, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result["status"] == "interrupted":
        # stopped by SIGTERM/SIGINT after its checkpoint: not done, so the shell's 128 + signal
        # (143, 130) tells a scheduler or retry loop to resume it
        return 128 + int(result.get("signal") or signal.SIGTERM)
    if result["status"] != "completed":
        return 0
    if cfg.compare_random_init:
        device = result["device"]
        monitor = result["monitor"] or loop.make_monitor(cfg, device,
                                                         skipped=result.get("skipped_files"))
        learned = result["knn"] or loop.run_knn(result["model"].backbone, monitor)
        rand = loop.run_knn(loop.random_init_backbone(cfg).to(device), monitor)
        if D.rank() == 0:
            key = f"knn{cfg.knn_k}_top1"
            print(f"k-NN top-1 (k={cfg.knn_k}) on the demo val split after {cfg.epochs} epochs of "
                  f"{cfg.method}: learned features {learned[key]:.1f}% vs random init "
                  f"{rand[key]:.1f}% "
                  f"(total {time.perf_counter() - start:.0f} s)")
    return 0
