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
import platform
import re
import subprocess
from pathlib import Path
from typing import Iterable

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def slug(text: str) -> str:
    s = re.sub(r"\(r\)|\(tm\)|processor|cpu @.*|\d+-core", "", text.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "unknown"


def device_dir_name(device: torch.device) -> str:
    """Directory name for a device's results: cpu-<cpu model> or the GPU's name."""
    if device.type == "cuda":
        return slug(device_name(device))
    return "cpu-" + slug(cpu_model_name())


def git_commit() -> str:
    """HEAD of the repository, with "+dirty" when tracked files under fastssl/, csrc/, kernels/
    or bench/ differ from it (the measured code is then not exactly that commit).
    $FASTSSL_GIT_COMMIT, when set, is the answer: the GPU run sets it (.git does not travel)."""
    if os.environ.get("FASTSSL_GIT_COMMIT"):
        return os.environ["FASTSSL_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "fastssl", "csrc", "kernels", "bench"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "unknown"
    if not head:
        return "unknown"
    return head + ("+dirty" if dirty else "")


def environment(device: torch.device) -> dict:
    try:
        import fastssl
        version = fastssl.__version__
    except Exception:
        version = "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "device_name": device_name(device),
        "fastssl_version": version,
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
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def dump(records: Iterable[dict], path: Path | str) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
