"""Checkpoint files, for training (fastssl.train.checkpoint holds the save and resume policy) and
evaluation: the one safe loader (:func:`load_checkpoint_file`), atomic save (one fixed temp name
per target, fsync, os.replace), RNG state capture and restore, the names of a run's files, and a
load that names the file when it is not a readable training checkpoint.

Everything a checkpoint holds is a tensor or a plain Python value (dict, list, tuple, int, float,
str, None), so plain ``torch.load(path)`` (``weights_only=True``) reads it, and :func:`load` reads
it no other way (unless ``--trust-checkpoint``). Beside it, every save writes ``backbone.pth``
(after the checkpoint): the backbone's tensors under torchvision's names (no ``fc``), on the CPU;
a resume rewrites it when a kill between the two writes left it a save older
(:func:`backbone_file_matches`).
"""
from __future__ import annotations

import glob
import io
import os
import pickle
import random
import re
import time

import numpy as np
import torch

TRUST_FLAG = "--trust-checkpoint"


class UntrustedCheckpointError(ValueError):
    """A checkpoint file that ``torch.load(weights_only=True)`` refuses: it holds objects other
    than tensors and plain containers, and unpickling them could run code from the file."""

    def __init__(self, path: str, needs: str, what: str = "checkpoint"):
        needed = f" (it needs {needs})"
        super().__init__(
            f"{what} {path}: refused: the file holds objects other than tensors and plain "
            f"containers{needed}, and unpickling it could run code from the file. fastssl loads "
            f"checkpoints with torch.load(weights_only=True). If you wrote the file yourself or "
            f"trust its source (e.g. a checkpoint of an older fastssl), pass {TRUST_FLAG} "
            f"(trust_checkpoint=True), which unpickles it and runs any code inside it")
        self.path = path
        self.needs = needs


def load_checkpoint_file(path, *, trust_checkpoint: bool = False, map_location="cpu",
                         what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, so a file can
    never run code while it is read. A file that needs more raises
    :class:`UntrustedCheckpointError` naming it; there is no silent fallback. Only
    ``trust_checkpoint=True`` (the CLIs' ``--trust-checkpoint``) unpickles it fully, running any
    code inside it. Other read errors (truncated, not a torch file) propagate unchanged."""
    path = os.fspath(path)
    if trust_checkpoint:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message names the refused global ("GLOBAL posix.system", "GLOBAL numpy....");
        # without one the bytes are no pickle the safe loader understands (garbage): unreadable
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise
        raise UntrustedCheckpointError(path, found.group(1), what) from None


CHECKPOINT_VERSION = 1
LAST_NAME = "checkpoint_last.pth"
BACKBONE_NAME = "backbone.pth"
# Test hook (fault injection): seconds to sleep after each chunk written, so that a kill lands
# inside a write.
_SLOW_WRITE_ENV = "FASTSSL_CHECKPOINT_WRITE_DELAY"
_CHUNK = 1 << 20


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the path and the OS error. The
    previous checkpoint at that path is left as it was."""


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain values (weights_only-loadable: numpy's
    state tuple holds an ndarray, which the weights-only unpickler refuses)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, mt_state, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)},
             "python": {"version": int(version), "state": torch.tensor(mt_state, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s dict (also the numpy/python tuples of older checkpoints)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        np_state = (np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                    np_state["has_gauss"], np_state["cached_gaussian"])
    np.random.set_state(np_state)
    py_state = state["python"]
    if isinstance(py_state, dict):
        py_state = (py_state["version"], tuple(int(x) for x in py_state["state"].tolist()),
                    py_state["gauss_next"])
    random.setstate(py_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temp_path(path: str) -> str:
    """The one temporary file of a target: a killed write leaves at most this file, which the
    next save overwrites and :func:`sweep_stale_temps` removes."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp")


def sweep_stale_temps(path: str) -> list[str]:
    """Remove what killed writes of `path` left behind (also the random-named temp files of
    earlier versions); returns the removed paths."""
    directory = os.path.dirname(os.path.abspath(path))
    stale = [temp_path(path)] + glob.glob(os.path.join(glob.escape(directory), ".tmp_*.pth"))
    removed = []
    for p in stale:
        try:
            os.unlink(p)
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def _write_file(path: str, data) -> None:
    """Write `data` to `path` and fsync it. Created with mode 0666 minus the umask, like any
    file the user's tools create (mkstemp's 0600 ignored the umask)."""
    delay = float(os.environ.get(_SLOW_WRITE_ENV, "0") or 0)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        for start in range(0, len(view), _CHUNK):
            chunk = view[start:start + _CHUNK]
            while chunk:
                chunk = chunk[os.write(fd, chunk):]
            if delay:
                time.sleep(delay)
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(obj: dict, path: str) -> None:
    """Serialise in memory, write the temp file, then os.replace: a reader (or a crash) never
    sees a half-written checkpoint, and the previous one survives a failed save. An OS error
    (full disk, read-only directory) becomes CheckpointWriteError naming the path."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = temp_path(path)
    try:
        os.makedirs(directory, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        _write_file(tmp, buffer.getbuffer())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        reason = f"[Errno {e.errno}] {e.strerror}" if e.errno else str(e)
        error = CheckpointWriteError(f"cannot write checkpoint {path}: {reason}")
        error.errno = e.errno
        raise error from e
    except BaseException:
        _remove_quietly(tmp)
        raise


def save_backbone_atomic(state: dict, path: str) -> None:
    """``backbone.pth``: the given backbone state dict (torchvision names) as detached CPU
    tensors, written like a checkpoint (:func:`save_atomic`). Loads with
    ``torch.load(path, weights_only=True)`` and into ``torchvision.models.resnet50()`` with
    ``load_state_dict(sd, strict=False)`` reporting only ``fc`` missing."""
    save_atomic({k: v.detach().to("cpu", copy=True) for k, v in state.items()}, path)


def backbone_file_matches(path: str, backbone: dict) -> bool:
    """Whether `path` (backbone.pth) holds exactly these tensors (a missing or unreadable file
    does not)."""
    try:
        saved = load_checkpoint_file(path)
    except Exception:  # noqa: BLE001 - missing, truncated, foreign: all mean "rewrite it"
        return False
    if not isinstance(saved, dict) or saved.keys() != backbone.keys():
        return False
    for key, value in backbone.items():
        other = saved[key]
        if (not isinstance(other, torch.Tensor) or other.dtype != value.dtype
                or other.shape != value.shape or not torch.equal(other, value.detach().cpu())):
            return False
    return True


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def load(path: str, map_location="cpu", *, trust_checkpoint: bool = False) -> dict:
    """The checkpoint at `path`, read with ``torch.load(weights_only=True)`` (never code from the
    file): UntrustedCheckpointError (a ValueError naming the file) for one that holds more than
    tensors and plain containers, unless trust_checkpoint (``--trust-checkpoint``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path!r}")
    try:
        ckpt = load_checkpoint_file(path, trust_checkpoint=trust_checkpoint,
                                    map_location=map_location, what="--resume")
    except UntrustedCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated zip, garbage pickle, ...: all mean unreadable
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"--resume: {path!r} is not a readable checkpoint (truncated or not a "
                         f"checkpoint: {type(e).__name__}: {first[:200]})") from None
    if (not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION
            or "model" not in ckpt):
        raise ValueError(f"--resume: {path!r} is not a fastssl training checkpoint "
                         f"(version {CHECKPOINT_VERSION} with 'model', 'optimizer', ...)")
    return ckpt
