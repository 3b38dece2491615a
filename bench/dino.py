"""DINO family benchmark: ``dino`` and ``koleo``, forward+backward, providers interleaved.

    python -m bench.dino [--quick] [--device cpu|cuda] [--dtypes float32,bfloat16] [--reps N]
                         [--ops dino,koleo] [--out FILE.json]

dino (issue 28): K = 65,536, B = 256, 2 + 10 crops and K = 262,144, B = 64, 2 + 6 crops;
koleo: N = 8,192, D = 256; ``--quick``: the same crop counts at small K, B, N. Providers, in
turn within each repetition: ``fastssl`` (``fastssl.functional``), ``eager`` (PyTorch as
lightly writes DINOLoss: stacked crops, softmax / log-softmax copies, one einsum; KoLeo as
DINOv2: N x N similarity, max, PairwiseDistance) and ``lightly`` (its DINOLoss / KoLeoLoss,
loaded from their files where lightly is importable; its DINOLoss also updates its centre).
Per case: median, p20/p80 (ms), ratio to fastssl (> 1: fastssl faster) and the peak memory
growth of one call beyond the inputs and the student gradient (CUDA: max_memory_allocated;
CPU: the RSS high-water mark, reset via /proc/self/clear_refs after gc and malloc_trim).
Self-contained: imports nothing from bench's other modules.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

import fastssl.functional as fast

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


# --- peers -------------------------------------------------------------------------------------
def eager_dino(student, teacher, center):
    """lightly's DINOLoss arithmetic (ignore the diagonal, mean over pairs and rows)."""
    t = F.softmax((torch.stack(teacher) - center) / TEACHER_TEMP, dim=-1)
    s = F.log_softmax(torch.stack(student) / STUDENT_TEMP, dim=-1)
    loss = -torch.einsum("tbk,sbk->ts", t, s)
    loss.fill_diagonal_(0)
    n_terms = loss.numel() - loss.diagonal().numel()
    return loss.sum() / (n_terms * t.shape[1])


def eager_koleo(z, eps=1e-8):
    """DINOv2's KoLeo: normalise, nearest other row by inner product, -mean log distance."""
    x = F.normalize(z, p=2, dim=-1, eps=eps)
    with torch.no_grad():
        sim = x @ x.t()
        sim.fill_diagonal_(-1)
        idx = sim.max(dim=1).indices
    dist = torch.nn.PairwiseDistance(2, eps=eps)(x, x[idx])
    return -torch.log(dist + eps).mean()


def _load_lightly(module: str):
    """lightly.<module> from its file, parent packages as empty stubs (their inits import
    torchvision, which the losses do not need). None where lightly is not installed."""
    if "lightly" in sys.modules and getattr(sys.modules["lightly"], "__path__", None):
        root = list(sys.modules["lightly"].__path__)[0]
    else:
        spec = importlib.util.find_spec("lightly")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = list(spec.submodule_search_locations)[0]
    parts = module.split(".")
    for i in range(len(parts)):
        name = ".".join(["lightly"] + parts[:i])
        if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(root, *parts[:i])]
            sys.modules[name] = pkg
    if module == "loss.dino_loss":
        _load_lightly("models.modules.center")
    full = "lightly." + module
    path = os.path.join(root, *parts) + ".py"
    mod_spec = importlib.util.spec_from_file_location(full, path)
    mod = importlib.util.module_from_spec(mod_spec)
    sys.modules[full] = mod
    mod_spec.loader.exec_module(mod)
    return mod


def lightly_providers(device):
    try:
        dino_mod = _load_lightly("loss.dino_loss")
        koleo_mod = _load_lightly("loss.koleo_loss")
    except Exception as e:  # noqa: BLE001 - a peer that fails to load is reported, not fatal
        print(f"lightly: not importable ({type(e).__name__}: {e})")
        return None, None
    if dino_mod is None:
        print("lightly: not installed; its rows are left out")
        return None, None
    return dino_mod.DINOLoss, koleo_mod.KoLeoLoss


# --- memory and timing -------------------------------------------------------------------------
def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def peak_growth(call, device) -> int | None:
    """Peak bytes allocated by one call above what was allocated before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                       # the high-water mark restarts at the current RSS
    except OSError:
        return None
    rss0 = _status_kb("VmRSS")
    call()
    return (_status_kb("VmHWM") - rss0) * 1024


def bench_case(providers: dict, leaves, reps: int, device) -> dict:
    """providers: name -> callable returning the scalar loss; leaves get their .grad reset."""
    def step(fn):
        for x in leaves:
            x.grad = None
        fn().backward()
        return [x.grad for x in leaves]      # the gradient stays alive to the end of the call

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(fn)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    grad_bytes = sum(x.numel() * x.element_size() for x in leaves)
    rows, failed = {}, {}
    for name, fn in list(providers.items()):  # warm-up, and the memory of one call
        try:
            for _ in range(2):
                step(fn)
        except (RuntimeError, ValueError, TypeError) as e:   # a peer that cannot run this case
            failed[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            del providers[name]
            continue
        for x in leaves:
            x.grad = None
        mem = peak_growth(lambda: step(fn), device)
        rows[name] = {"times_ms": [], "peak_beyond_grad_mb":
                      None if mem is None else max(0, mem - grad_bytes) / 2**20}
    for _ in range(reps):                    # interleaved
        for name, fn in providers.items():
            rows[name]["times_ms"].append(timed(fn))
    for name, row in rows.items():
        ts = sorted(row["times_ms"])
        q = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) > 1 else [ts[0]] * 4
        row.update(median_ms=statistics.median(ts), p20_ms=q[0], p80_ms=q[3])
    base = rows["fastssl"]["median_ms"]
    for row in rows.values():
        row["ratio_to_fastssl"] = row["median_ms"] / base
    return {**rows, **failed}


# --- cases ---------------------------------------------------------------------------------------
def dino_sizes(quick):
    if quick:
        return [dict(K=4096, B=64, n_global=2, n_local=10),
                dict(K=16384, B=16, n_global=2, n_local=6)]
    return [dict(K=65536, B=256, n_global=2, n_local=10),
            dict(K=262144, B=64, n_global=2, n_local=6)]


def koleo_sizes(quick):
    return [dict(N=1024, D=256)] if quick else [dict(N=8192, D=256)]


def dino_case(size, dtype, device, lightly_dino):
    g = torch.Generator().manual_seed(0)
    K, B, crops = size["K"], size["B"], size["n_global"] + size["n_local"]

    def logits(requires_grad):
        x = torch.randn(B, K, generator=g).mul_(2.0).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)
    student = [logits(True) for _ in range(crops)]
    teacher = [logits(False) for _ in range(size["n_global"])]
    center = torch.randn(1, K, generator=g).mul_(0.1).to(device=device, dtype=dtype)
    providers = {
        "fastssl": lambda: fast.dino(student, teacher, center=center, student_temp=STUDENT_TEMP,
                                     teacher_temp=TEACHER_TEMP),
        "eager": lambda: eager_dino(student, teacher, center),
    }
    if lightly_dino is not None:
        mod = lightly_dino(K, warmup_teacher_temp=TEACHER_TEMP, teacher_temp=TEACHER_TEMP,
                           student_temp=STUDENT_TEMP).to(device=device, dtype=dtype)
        providers["lightly"] = lambda: mod(teacher, student)
    return providers, student


def koleo_case(size, dtype, device, lightly_koleo):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(size["N"], size["D"], generator=g).to(device=device, dtype=dtype)
    z.requires_grad_(True)
    providers = {"fastssl": lambda: fast.koleo(z), "eager": lambda: eager_koleo(z)}
    if lightly_koleo is not None:
        mod = lightly_koleo()
        providers["lightly"] = lambda: mod(z)
    return providers, [z]


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
    lightly_dino, lightly_koleo = lightly_providers(device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average before {load}")
    results = []
    for op in args.ops.split(","):
        sizes, make = ((dino_sizes, dino_case) if op == "dino" else (koleo_sizes, koleo_case))
        peer = lightly_dino if op == "dino" else lightly_koleo
        for size in sizes(args.quick):
            for dtype_name in args.dtypes.split(","):
                dtype = getattr(torch, dtype_name)
                providers, leaves = make(size, dtype, device, peer)
                rows = bench_case(providers, leaves, reps, device)
                results.append({"op": op, "size": size, "dtype": dtype_name, "rows": rows,
                                "mode": "forward+backward"})
                shape = ", ".join(f"{k}={v}" for k, v in size.items())
                for name, r in rows.items():
                    if "error" in r:
                        print(f"{op:5s} {shape:40s} {dtype_name:8s} {name:8s} failed: {r['error']}")
                        continue
                    mem = r["peak_beyond_grad_mb"]
                    print(f"{op:5s} {shape:40s} {dtype_name:8s} {name:8s} "
                          f"median {r['median_ms']:10.2f} ms (p20 {r['p20_ms']:.2f}, p80 "
                          f"{r['p80_ms']:.2f})  x{r['ratio_to_fastssl']:.2f} of fastssl  "
                          f"peak beyond grad {'n/a' if mem is None else f'{mem:.1f} MB'}",
                          flush=True)
                del providers, leaves
                # after every case: a run cut off at its cap keeps what it measured
                _write(args.out, results, device, args.quick, reps, load, lightly_dino)
    meta = _write(args.out, results, device, args.quick, reps, load, lightly_dino)
    print(f"load average after {meta['load_after']}")
    return 0


def _write(path, results, device, quick, reps, load, lightly_dino) -> dict:
    meta = {"device": str(device), "torch": torch.__version__, "quick": quick,
            "threads": torch.get_num_threads(), "reps": reps, "load_before": load,
            "load_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "lightly": lightly_dino is not None}
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return meta


if __name__ == "__main__":
    sys.exit(main())
