"""The results file: one JSON object per line, one line per (op, provider, mode, shape, dtype).

Fields: op, family, provider, mode, shape (dict), x (the batch size plotted), x_key, dtype,
device ("cpu"/"cuda"), device_name, status ("ok", "skipped", "not_implemented", "unsupported",
"oom", "error"), note (why, when not ok), p20_ms / p50_ms / p80_ms, reps, peak_mem_mb
(peak above the memory allocated before the call; see bench/harness.py), mem_method,
loadavg_1m (1-minute load average when measured: a loaded machine shows here), and the run's
environment: fastssl_version, git_commit, torch_version, triton_version, num_threads, timestamp.
The trainer's records add images_per_s, loss_ms and loss_share.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import torch

import fastssl

from .common import cpu_model_name, git_commit, slug


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def device_dir_name(device: torch.device) -> str:
    """Directory name for a device's results: cpu-<cpu model> or the GPU's name."""
    if device.type == "cuda":
        return slug(device_name(device))
    return "cpu-" + slug(cpu_model_name())


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "device_name": device_name(device),
        "fastssl_version": fastssl.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


class ResultWriter:
    """Appends records (with the run's environment merged in) to a JSON-lines file, flushing
    each line so that a crash loses nothing already measured."""

    def __init__(self, path: Path, env: dict, *, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.env = env
        self._f = open(self.path, "a" if append else "w")

    def write(self, record: dict) -> dict:
        full = {**record, **{k: v for k, v in self.env.items() if k not in record}}
        self._f.write(json.dumps(full, sort_keys=False) + "\n")
        self._f.flush()
        return full

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: Path | str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
