"""Checkpoints: atomic save (temp file, fsync, os.replace), RNG state capture and restore."""
from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

CHECKPOINT_VERSION = 1
LAST_NAME = "checkpoint_last.pth"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict, path: str) -> None:
    """Write to a temp file in the same directory, then os.replace: a reader (or a crash) never
    sees a half-written checkpoint, and the previous one survives a failed save."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pth", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path!r}")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION or "model" not in ckpt:
        raise ValueError(f"--resume: {path!r} is not a fastssl training checkpoint "
                         f"(version {CHECKPOINT_VERSION} with 'model', 'optimizer', ...)")
    return ckpt


def resolve_resume(resume: str | None, out_dir: str) -> str | None:
    """``auto`` = the last checkpoint in out_dir if there is one (else start fresh)."""
    if not resume:
        return None
    if resume == "auto":
        path = os.path.join(out_dir, LAST_NAME)
        return path if os.path.isfile(path) else None
    return resume
