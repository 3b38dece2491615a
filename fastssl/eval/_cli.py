"""Command-line plumbing shared by ``python -m fastssl.eval.knn`` and ``fastssl.eval.linear``:
common options, torchrun set-up, checkpoint loading with clear errors, JSON output."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys

import torch

from fastssl import distributed as D
from fastssl.models import load_backbone
from fastssl.models.checkpoint_io import (BACKBONE_NAME, LAST_NAME, UntrustedCheckpointError,
                                          load_checkpoint_file)

DEFAULT_ARCH = "resnet50"
# Image size for the demo data (small generated images), as the demo pretraining presets'
# eval_size (fastssl.methods.presets); ImageFolder data uses the loader's default (224).
DEMO_EVAL_SIZE = 32


def default_size(data, size: int | None) -> int | None:
    if size is None and data == "demo":
        return DEMO_EVAL_SIZE
    return size


class EvalError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def number(cast, minimum: float, strict: bool, what: str):
    """An argparse `type`: parse with `cast`, reject values below `minimum` (or equal, when
    strict) and NaN, so that a bad flag is an argparse error, not a traceback later."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value > minimum if strict else value >= minimum):  # also rejects NaN
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


positive_int = number(int, 0, True, "a positive integer")
nonneg_int = number(int, 0, False, "an integer >= 0")
positive_float = number(float, 0.0, True, "a positive number")
nonneg_float = number(float, 0.0, False, "a number >= 0")


def check_output(path: str | None) -> None:
    """EvalError naming --output before any work when the JSON could not be written there."""
    if not path:
        return
    if os.path.isdir(path):
        raise EvalError(f"--output {path}: is a directory (expected a file path)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise EvalError(f"--output {path}: the directory {parent} does not exist or is a file")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path)
                                                    and not os.access(path, os.W_OK)):
        raise EvalError(f"--output {path}: not writable")


_timeout_s = [D.DEFAULT_TIMEOUT_S]       # the process group's, for the error message


def _timeout(text: str) -> float:
    try:
        return D.parse_timeout(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="fastssl checkpoint (dict with 'arch' and 'backbone') or a torchvision-"
                        "format ResNet state dict (optionally prefixed 'module.', "
                        "'module.backbone.' or 'backbone.')")
    p.add_argument("--data", default="demo",
                   help="ImageFolder root with train/ and val/, or 'demo' (default: demo)")
    p.add_argument("--arch", default=None, choices=["resnet18", "resnet50"],
                   help="backbone architecture (default: the checkpoint's 'arch', else resnet50)")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="images per feature-extraction batch and per GPU (default: 128)")
    p.add_argument("--device", default=None,
                   help="cuda, cuda:N or cpu (default: cuda if available; under torchrun "
                        "cuda:LOCAL_RANK)")
    p.add_argument("--size", type=positive_int, default=None,
                   help="centre-crop size of the evaluation images (default: the data "
                        "loader's, 224 for ImageNet)")
    p.add_argument(
        "--num-threads", type=positive_int, default=2, help="data-loading threads (default: 2)"
    )
    p.add_argument("--no-amp", action="store_true",
                   help="extract features in float32 on CUDA (default: bfloat16 autocast)")
    p.add_argument("--output", default=None, help="also write the results as JSON to this file")
    p.add_argument("--dist-timeout", type=_timeout, default=D.DEFAULT_TIMEOUT_S,
                   metavar="DURATION",
                   help="under torchrun: how long a collective waits for the other ranks before "
                        "the run ends with an error naming the timeout, in seconds (600, 600s) "
                        "or minutes (10m); default 10m")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="read --checkpoint with a full unpickle (torch.load(weights_only=False)), "
                        "which RUNS ANY CODE INSIDE THE FILE: only for a file you trust that holds "
                        "more than tensors and plain containers (e.g. from an older fastssl). "
                        "Default: weights_only=True, and such a file is refused")


def amp_flag(args, device: torch.device) -> bool:
    return device.type == "cuda" and not args.no_amp


def setup_device(device: str | None, timeout_s: float = D.DEFAULT_TIMEOUT_S) -> torch.device:
    """The device of this process; initialises the process group when run under torchrun, with
    `timeout_s` (--dist-timeout) for its collectives."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        timeout = datetime.timedelta(seconds=timeout_s)
        _timeout_s[0] = timeout_s
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            torch.distributed.init_process_group("nccl", timeout=timeout)
            return torch.device("cuda", local)
        torch.distributed.init_process_group("gloo", timeout=timeout)
        return torch.device("cpu")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: CUDA is not available on this machine")
    return dev


def teardown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def read_checkpoint(path: str, trust_checkpoint: bool = False):
    """The object stored in `path`, read with ``torch.load(weights_only=True)`` unless
    trust_checkpoint; an EvalError naming the file when that fails or the file is refused."""
    if not os.path.exists(path):
        raise EvalError(f"checkpoint not found: {path}{_checkpoint_hint(path)}")
    if not os.path.isfile(path):
        raise EvalError(f"checkpoint is not a file: {path}")
    try:
        return load_checkpoint_file(path, trust_checkpoint=trust_checkpoint)
    except UntrustedCheckpointError as e:
        raise EvalError(str(e)) from None
    except Exception as e:  # corrupt, truncated, not a torch file
        raise EvalError(f"checkpoint {path}: cannot be read ({type(e).__name__}: {e})") from e


def _checkpoint_hint(path: str) -> str:
    """What the user may have meant: the checkpoints beside the missing path, and the names the
    trainer writes."""
    names = f"a training run writes OUT/{LAST_NAME} and OUT/{BACKBONE_NAME}"
    directory = os.path.dirname(path) or "."
    try:
        found = sorted(n for n in os.listdir(directory) if n.endswith((".pth", ".pt")))
    except OSError:
        found = []
    if found:
        return f" ({directory} holds {', '.join(found[:6])}; {names})"
    return f" ({names})"


def checkpoint_arch(obj, arch: str | None, path: str) -> str:
    stored = obj.get("arch") if isinstance(obj, dict) and "backbone" in obj else None
    if arch is not None and stored is not None and arch != stored:
        raise EvalError(f"checkpoint {path}: --arch {arch} given but the checkpoint was "
                        f"trained with arch {stored!r}")
    return arch or stored or DEFAULT_ARCH


def load_backbone_from(path: str, arch: str | None = None, trust_checkpoint: bool = False):
    """(backbone module, arch) from a fastssl or torchvision-format checkpoint file."""
    obj = read_checkpoint(path, trust_checkpoint)
    arch = checkpoint_arch(obj, arch, path)
    if not isinstance(obj, dict):
        raise EvalError(f"checkpoint {path}: expected a dict (a fastssl checkpoint or a state "
                        f"dict), got {type(obj).__name__}")
    try:
        module = load_backbone(obj, arch)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise EvalError(f"checkpoint {path}: {e}") from e
    return module, arch


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (BN uses and keeps its running statistics) and no parameter gradients."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_frozen_backbone(path: str, arch: str | None, device: torch.device,
                         trust_checkpoint: bool = False):
    module, arch = load_backbone_from(path, arch, trust_checkpoint)
    module = freeze(module).to(device)
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    return module, arch


def resolve_data(data: str) -> str:
    if data != "demo" and not os.path.isdir(data):
        raise EvalError(f"--data {data}: no such directory (expected an ImageFolder root, or demo)")
    return data


@torch.no_grad()
def feature_dim(module: torch.nn.Module, device: torch.device, size: int = 32) -> int:
    was = module.training
    module.eval()
    out = module(torch.zeros(1, 3, size, size, device=device))
    module.train(was)
    return out.flatten(1).shape[1]


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise EvalError(f"--output {path}: cannot write ({e.strerror or e})") from None


@contextlib.contextmanager
def cli_errors():
    """Turn user-facing errors into one line on stderr and exit status 2."""
    try:
        yield
    except (EvalError, FileNotFoundError, ValueError) as e:
        # ValueError: the library's argument checks (they name the argument), e.g. an empty
        # data folder or a batch larger than the data
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except RuntimeError as e:
        if not D.is_timeout_error(e):
            raise
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        print(f"error: rank {D.rank()} of {D.world_size()}: a collective waited longer than "
              f"--dist-timeout ({_timeout_s[0]:g} s) for the other ranks: a rank is frozen, lost "
              f"or far slower ({first[:300]})", file=sys.stderr, flush=True)
        raise SystemExit(1)
