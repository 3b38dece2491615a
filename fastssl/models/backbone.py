"""Backbones for pretraining and evaluation, and their checkpoint format.

A backbone is a torchvision-named ResNet whose fc is ``nn.Identity()``, so its output is the pooled
feature. Its state dict (``backbone_state_dict``) carries torchvision's names without ``fc.*``, so
it loads into ``torchvision.models.resnet50(...)`` with ``strict=False`` reporting only fc missing,
and ``load_backbone`` reads either a fastssl checkpoint or a torchvision-format state dict.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from fastssl.models.checkpoint_io import UntrustedCheckpointError, load_checkpoint_file
from fastssl.models.resnet import ARCHS

__all__ = ["build_backbone", "backbone_state_dict", "load_backbone"]

# Wrappers whose prefixes are stripped: DDP ("module."), torch.compile ("_orig_mod."), and the
# attribute names SSL models commonly keep their encoder under.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_CANDIDATE_PREFIXES = ("module.backbone.", "backbone.", "module.encoder.", "encoder.",
                       "module._orig_mod.", "_orig_mod.", "module.", "")


def _check_arch(arch) -> str:
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"arch: expected one of {sorted(ARCHS)}, got {arch!r}")
    return arch


def build_backbone(arch: str, zero_init_residual: bool = True) -> tuple[nn.Module, int]:
    """(ResNet with fc = Identity, feature dimension): 512 for resnet18, 2048 for resnet50."""
    model = ARCHS[_check_arch(arch)](zero_init_residual=zero_init_residual)
    feat_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, feat_dim


def _unwrap(module: nn.Module) -> nn.Module:
    # DDP / DataParallel keep the model in .module, torch.compile in ._orig_mod.
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def backbone_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state dict with torchvision names: no wrapper prefix, no ``fc.*``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    state = _unwrap(module).state_dict()
    out = {}
    for k, v in state.items():
        k = _strip(k)
        if k == "fc" or k.startswith("fc."):
            continue
        out[k] = v
    return out


def _read(path_or_state, where: str, trust_checkpoint: bool = False):
    if isinstance(path_or_state, Mapping):
        return path_or_state
    if not isinstance(path_or_state, (str, os.PathLike)):
        raise TypeError(f"path_or_state: expected a path or a state dict, "
                        f"got {type(path_or_state).__name__}")
    path = os.fspath(path_or_state)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return load_checkpoint_file(path, trust_checkpoint=trust_checkpoint)
    except UntrustedCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - report which file could not be read
        raise ValueError(f"{where}: cannot read checkpoint: {type(e).__name__}: {e}") from e


def _select_state(ckpt: Mapping, arch: str, where: str) -> Mapping:
    if "backbone" in ckpt and isinstance(ckpt["backbone"], Mapping):
        ckpt_arch = ckpt.get("arch")
        if ckpt_arch is not None and ckpt_arch != arch:
            raise ValueError(f"{where}: checkpoint arch is {ckpt_arch!r}, but arch={arch!r} was "
                             f"asked for")
        return ckpt["backbone"]
    for key in ("state_dict", "model"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            return ckpt[key]
    return ckpt


def _fmt_keys(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:8])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > 8 else ''})"


def load_backbone(path_or_state, arch: str, *, trust_checkpoint: bool = False) -> nn.Module:
    """A ``build_backbone(arch)`` module with the weights of a checkpoint or state dict.

    Accepts a fastssl checkpoint (a dict with "backbone" and "arch"), a dict with "state_dict",
    or a torchvision-format state dict, optionally prefixed "module.", "module.backbone.",
    "backbone." (other keys outside the chosen prefix, e.g. a projector, are ignored); ``fc.*`` is
    ignored. Raises FileNotFoundError for a missing file and ValueError naming the checkpoint and
    the missing / unexpected / mis-shaped keys otherwise.

    A file is read with ``torch.load(weights_only=True)``: one that holds more than tensors and
    plain containers raises :class:`UntrustedCheckpointError` (a ValueError) before anything in
    it runs, unless ``trust_checkpoint=True`` (then it is unpickled, running any code inside it).
    """
    arch = _check_arch(arch)
    where = (os.fspath(path_or_state) if isinstance(path_or_state, (str, os.PathLike))
             else "state dict")
    ckpt = _read(path_or_state, where, trust_checkpoint)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{where}: expected a dict checkpoint, got {type(ckpt).__name__}")
    state = _select_state(ckpt, arch, where)
    model, _ = build_backbone(arch, zero_init_residual=False)
    expected = model.state_dict()

    # Pick the prefix under which most of the expected keys are found.
    best_prefix, best_hits = "", -1
    for prefix in _CANDIDATE_PREFIXES:
        hits = sum(1 for k in state if isinstance(k, str) and k.startswith(prefix)
                   and k[len(prefix):] in expected)
        if hits > best_hits:
            best_prefix, best_hits = prefix, hits
    found = {}
    for k, v in state.items():
        if not isinstance(k, str) or not k.startswith(best_prefix):
            continue
        k = k[len(best_prefix):]
        if k == "fc" or k.startswith("fc."):
            continue
        found[k] = v
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    if missing or unexpected:
        parts = [f"{where}: does not match a {arch} backbone"]
        if missing:
            parts.append(f"missing keys: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt_keys(unexpected)}")
        raise ValueError("; ".join(parts))
    for k, v in found.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{where}: key {k!r} holds a {type(v).__name__}, not a tensor")
        if v.shape != expected[k].shape:
            raise ValueError(f"{where}: key {k!r} has shape {tuple(v.shape)}, "
                             f"expected {tuple(expected[k].shape)} for {arch}")
    model.load_state_dict(found, strict=True)
    return model
