"""A/B of the Sinkhorn codes' MADV_HUGEPAGE advice (issue 25) in a training loop's mode.

    python -m bench.sinkhorn_thp [--threads 2] [--reps 15]

Each case times the one-call C++ Sinkhorn under each page advice of its codes (none,
MADV_HUGEPAGE, MADV_POPULATE_WRITE, both) and eager PyTorch's Sinkhorn, interleaved call by
call in one process, each provider keeping its last two outputs alive as a loop that keeps its
codes does; prints the medians and the p20/p80 spread (a bimodal case shows as a wide
spread), the THP setting and the load. Not a test: its figures go into csrc/swav_cpu.cpp's
comment.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from fastssl import _C
from bench.baselines import swav_sinkhorn

CASES = [(1024, 16384), (4096, 3000), (256, 16384)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# the advice modes of fastssl._C.swav_huge_page_advice
MODES = {"none": 0, "hugepage": 1, "populate": 2, "hugepage+populate": 3}


def _thp() -> str:
    base = "/sys/kernel/mm/transparent_hugepage/"
    try:
        return " ".join(f"{n}={open(base + n).read().split('[')[1].split(']')[0]}"
                        for n in ("enabled", "defrag"))
    except (OSError, IndexError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"THP {_thp()}, threads {args.threads}, load {os.getloadavg()[0]:.2f}")
    before = _C.swav_huge_page_advice()
    try:
        for b, k in CASES:
            for dtype in DTYPES:
                g = torch.Generator().manual_seed(0)
                scores = torch.tanh(torch.randn(b, k, generator=g)).to(dtype)
                def advised(mode, scores=scores):
                    _C.swav_huge_page_advice(mode)
                    return _C.sinkhorn_cached_cpu(scores, 0.05, 3)
                providers = {name: (lambda m=mode: advised(m)) for name, mode in MODES.items()}
                providers["eager"] = lambda scores=scores: swav_sinkhorn(scores)
                kept = {n: [] for n in providers}
                times = {n: [] for n in providers}
                for rep in range(args.reps + 2):
                    for name, fn in providers.items():
                        t0 = time.perf_counter()
                        out = fn()
                        dt = time.perf_counter() - t0
                        kept[name] = (kept[name] + [out])[-2:]
                        if rep >= 2:
                            times[name].append(dt * 1e3)
                row = []
                for prov, ts in times.items():
                    ts.sort()
                    n = len(ts)
                    spread = f"[{ts[n // 5]:.1f}-{ts[4 * n // 5]:.1f}]"
                    row.append(f"{prov} {ts[n // 2]:.1f} ms {spread}")
                name = str(dtype).split(".")[-1]
                print(f"B={b} K={k} {name}: " + "; ".join(row), flush=True)
    finally:
        _C.swav_huge_page_advice(int(before))
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
