"""The results file: one JSON object per line per (op, provider, mode, shape, dtype): op, family,
provider, mode, shape, x, x_key, dtype, device, status ("ok", "skipped", "not_implemented",
"unsupported", "oom", "error"), note, p20_ms/p50_ms/p80_ms, reps, peak_mem_mb, mem_method,
loadavg_1m, and the run's environment (environment()); the trainer adds images_per_s, loss_ms
and loss_share. Older records lack the newer environment fields; readers use .get()."""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import torch

import fastssl

from .common import cpu_model_name, git_commit, load_jsonl, slug


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()


def device_dir_name(device: torch.device) -> str:
    """cpu-<cpu model> or the GPU's name."""
    return slug(device_name(device)) if device.type == "cuda" else "cpu-" + slug(cpu_model_name())


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def environment(device: torch.device) -> dict:
    """The run's versions and machine state: the THP setting the figures were taken under and
    the C++ contrastive block sizes (where the extension reports them) included."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - no triton: recorded as None
        triton_version = None
    try:
        from fastssl.backends.ext import contrastive as ext
        blocks = getattr(ext, "block_config", None)
        blocks = blocks() if blocks is not None else None
    except Exception:  # noqa: BLE001 - no extension here: nothing to record
        blocks = None
    thp = "/sys/kernel/mm/transparent_hugepage/"
    return {"device_name": device_name(device), "fastssl_version": fastssl.__version__,
            "git_commit": git_commit(), "torch_version": torch.__version__,
            "triton_version": triton_version, "num_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "thp_enabled": _read(thp + "enabled"),
            "thp_defrag": _read(thp + "defrag"), "cpp_block_config": blocks,
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


class ResultWriter:
    """Appends records (the run's environment merged in), flushing each line: a crash loses
    nothing already measured."""

    def __init__(self, path: Path, env: dict, *, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.env, self._f = env, open(self.path, "a" if append else "w")

    def write(self, record: dict) -> dict:
        full = {**record, **{k: v for k, v in self.env.items() if k not in record}}
        self._f.write(json.dumps(full, default=str) + "\n")
        self._f.flush()
        return full

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


load = load_jsonl
