"""DINO family benchmark: ``dino`` and ``koleo``, forward+backward, providers interleaved.

    python -m bench.dino [--quick] [--device cpu|cuda] [--dtypes float32,bfloat16] [--reps N]
                         [--ops dino,koleo] [--out FILE.json]

dino (issue 28): K = 65,536, B = 256, 2 + 10 crops and K = 262,144, B = 64, 2 + 6 crops; koleo:
N = 8,192, D = 256; ``--quick``: the same crop counts at small sizes. Providers: ``fastssl``,
``eager`` (lightly's DINOLoss arithmetic: stacked crops, softmax / log-softmax, one einsum;
KoLeo as DINOv2: N x N similarity, max, PairwiseDistance) and ``lightly`` (its DINOLoss /
KoLeoLoss where importable). Per case: median, p20/p80 (ms), ratio to fastssl (> 1: fastssl
faster) and the peak memory growth of one call beyond the inputs and the student gradient.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import fastssl.functional as fast

from .baselines import PeerMissing, _lightly_module
from .harness import BenchConfig, _interleaved, cpu_alloc_peak, cuda_peak_growth

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


def eager_dino(student, teacher, center):
    """lightly's DINOLoss arithmetic (ignore the diagonal, mean over pairs and rows)."""
    t = F.softmax((torch.stack(teacher) - center) / TEACHER_TEMP, dim=-1)
    s = F.log_softmax(torch.stack(student) / STUDENT_TEMP, dim=-1)
    loss = -torch.einsum("tbk,sbk->ts", t, s)
    loss.fill_diagonal_(0)
    return loss.sum() / ((loss.numel() - loss.diagonal().numel()) * t.shape[1])


def eager_koleo(z, eps=1e-8):
    """DINOv2's KoLeo: normalise, nearest other row by inner product, -mean log distance."""
    x = F.normalize(z, p=2, dim=-1, eps=eps)
    with torch.no_grad():
        sim = x @ x.t()
        sim.fill_diagonal_(-1)
        idx = sim.max(dim=1).indices
    return -torch.log(torch.nn.PairwiseDistance(2, eps=eps)(x, x[idx]) + eps).mean()


def lightly_providers():
    """lightly's DINOLoss and KoLeoLoss classes, or (None, None) with the reason printed."""
    try:
        return (_lightly_module("dino_loss").DINOLoss, _lightly_module("koleo_loss").KoLeoLoss)
    except (PeerMissing, AttributeError) as e:
        print(f"lightly: not importable ({e}); its rows are left out")
        return None, None


def bench_case(providers: dict, leaves, reps: int, device) -> dict:
    """providers: name -> callable returning the scalar loss; interleaved calls."""
    def step(fn):
        return fn().backward()
    grad_bytes = sum(x.numel() * x.element_size() for x in leaves)
    rows, steps = {}, {}
    for name, fn in list(providers.items()):   # warm-up, and the memory of one call
        def setup():
            for x in leaves:
                x.grad = None
        try:
            for _ in range(2):
                setup(), step(fn)
        except (RuntimeError, ValueError, TypeError) as e:   # a peer that cannot run this case
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        mem = cuda_peak_growth(setup, lambda _, fn=fn: step(fn)) if device.type == "cuda" \
            else cpu_alloc_peak(setup, lambda _, fn=fn: step(fn))[0]
        rows[name] = {"peak_beyond_grad_mb": None if mem is None
                      else max(0, mem - grad_bytes) / 2**20}
        steps[name] = (setup, lambda _, fn=fn: step(fn))
    cfg = BenchConfig(min_reps=reps, max_reps=reps, min_time_s=0.0, cuda_rep_ms=0)
    times = _interleaved(steps, device, cfg, {n: leaves for n in steps}) if steps else {}
    for name, ts in times.items():
        ts = sorted(ts)
        q = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) > 1 else [ts[0]] * 4
        rows[name].update(times_ms=ts, median_ms=statistics.median(ts), p20_ms=q[0], p80_ms=q[3],
                          ratio_to_fastssl=statistics.median(ts) / statistics.median(
                              times["fastssl"]))
    return rows


def dino_case(size, dtype, device, lightly_dino):
    g = torch.Generator().manual_seed(0)
    k, b = size["K"], size["B"]

    def logits(requires_grad):
        x = torch.randn(b, k, generator=g).mul_(2.0).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)
    student = [logits(True) for _ in range(size["n_global"] + size["n_local"])]
    teacher = [logits(False) for _ in range(size["n_global"])]
    center = torch.randn(1, k, generator=g).mul_(0.1).to(device=device, dtype=dtype)
    providers = {"fastssl": lambda: fast.dino(student, teacher, center=center,
                                              student_temp=STUDENT_TEMP, teacher_temp=TEACHER_TEMP),
                 "eager": lambda: eager_dino(student, teacher, center)}
    if lightly_dino is not None:
        mod = lightly_dino(k, warmup_teacher_temp=TEACHER_TEMP, teacher_temp=TEACHER_TEMP,
                           student_temp=STUDENT_TEMP).to(device=device, dtype=dtype)
        providers["lightly"] = lambda: mod(teacher, student)
    return providers, student


def koleo_case(size, dtype, device, lightly_koleo):
    z = torch.randn(size["N"], size["D"], generator=torch.Generator().manual_seed(0))
    z = z.to(device=device, dtype=dtype).requires_grad_(True)
    providers = {"fastssl": lambda: fast.koleo(z), "eager": lambda: eager_koleo(z)}
    if lightly_koleo is not None:
        mod = lightly_koleo()
        providers["lightly"] = lambda: mod(z)
    return providers, [z]


SIZES = {"dino": ([dict(K=65536, B=256, n_global=2, n_local=10),
                   dict(K=262144, B=64, n_global=2, n_local=6)],
                  [dict(K=4096, B=64, n_global=2, n_local=10),
                   dict(K=16384, B=16, n_global=2, n_local=6)]),
         "koleo": ([dict(N=8192, D=256)], [dict(N=1024, D=256)])}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.dino", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a check that it runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--reps", type=int, default=None, help="timed calls per provider")
    p.add_argument("--ops", default="dino,koleo")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    reps = args.reps or (5 if args.quick or device.type == "cpu" else 20)
    peers = dict(zip(("dino", "koleo"), lightly_providers()))
    load = os.getloadavg()
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average before {load}")
    results = []
    meta = {"device": str(device), "torch": torch.__version__, "quick": args.quick,
            "threads": torch.get_num_threads(), "reps": reps, "load_before": load,
            "lightly": peers["dino"] is not None}
    for op in args.ops.split(","):
        for size in SIZES[op][args.quick]:
            for dtype_name in args.dtypes.split(","):
                make = dino_case if op == "dino" else koleo_case
                providers, leaves = make(size, getattr(torch, dtype_name), device, peers[op])
                rows = bench_case(providers, leaves, reps, device)
                results.append({"op": op, "size": size, "dtype": dtype_name, "rows": rows,
                                "mode": "forward+backward"})
                shape = ", ".join(f"{k}={v}" for k, v in size.items())
                for name, r in rows.items():
                    mem = r.get("peak_beyond_grad_mb")
                    print(f"{op:5s} {shape:40s} {dtype_name:8s} {name:8s} " + (
                        f"failed: {r['error']}" if "error" in r else
                        f"median {r['median_ms']:10.2f} ms (p20 {r['p20_ms']:.2f}, p80 "
                        f"{r['p80_ms']:.2f})  x{r['ratio_to_fastssl']:.2f} of fastssl  peak "
                        f"beyond grad {'n/a' if mem is None else f'{mem:.1f} MB'}"), flush=True)
                del providers, leaves
                meta["load_after"] = os.getloadavg()
                if args.out:   # after every case: a run cut off at its cap keeps what it measured
                    with open(args.out, "w") as f:
                        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"load average after {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
