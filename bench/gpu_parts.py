"""The parts of `python -m bench.gpu_run`, each its subprocess: `python -m bench.gpu_parts --part
NAME --out DIR [--dry-run]`. Benchmark records go to DIR/results.jsonl as they come (results.py's
format, with the part's name and, for matmul-bound losses, TFLOP/s), the others to
DIR/<part>.json; a part checks its deadline before each case and records what it had no time for.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fastssl.functional as fast
from fastssl.models import backbone_state_dict, build_backbone

from . import baselines, trainer
from .common import (MAX_N_BUDGET_DRY_MIB, MAX_N_BUDGET_GIB, PART_NAMES, PKG, REPO, kill_group,
                     load_json, progress, run_capped, time_left, write_json)
from .compare import model_flop, search_max_b
from .gpu_run import install_carried_wheels
from .harness import (BenchConfig, Size, backend_forced, classify_failure, cpu_peak_growth,
                      failure_note, free_device_memory, run_case, static_skip, time_cpu,
                      time_cuda_events)
from .results import ResultWriter, environment
from .specs import select_specs

COMPILE_MIN_S = 15.0   # a torch.compile case is not started with less time than this left
STAGE = REPO / "build" / "gpu_run"   # the builds' own trees (build/ is git-ignored)
FULL = ("forward+backward",)
# Dense bf16 tensor-core peak by device name (vendor spec sheets); other devices: unknown.
SPEC_BF16_TFLOPS = (("H200", 989.0), ("H100 80GB HBM3", 989.0), ("H100 SXM", 989.0))


def _done(out: Path, name: str, info: dict) -> dict:
    write_json(out / f"{name}.json", info)
    print(json.dumps({k: v for k, v in info.items() if not k.endswith("log_tail")}), flush=True)
    return info


def _child_json(code: str, env, timeout: float = 120):
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _stage(name: str) -> Path:
    """A build tree with only what setup.py compiles (setup.py, csrc/, an empty fastssl/): no
    pyproject.toml, so an old setuptools on the machine never validates the package metadata
    (< 77 rejects its license field). Kept between calls: ninja recompiles only what changed."""
    root = STAGE / name
    (root / "fastssl").mkdir(parents=True, exist_ok=True)
    (root / "csrc").mkdir(exist_ok=True)
    shutil.copy2(REPO / "setup.py", root / "setup.py")
    for src in (REPO / "csrc").iterdir():
        dst = root / "csrc" / src.name   # an unchanged source keeps its time: ninja skips it
        if src.is_file() and (not dst.exists() or dst.read_bytes() != src.read_bytes()):
            shutil.copy2(src, dst)
    return root


def _built(root: Path) -> list[Path]:
    return sorted((root / "fastssl").glob("_C*.so"))


def part_build(out, dry_run, hook):
    """CPU-only and CUDA builds side by side, each in its own tree: the CUDA one is installed
    when it succeeds, else the CPU one; no CUDA toolkit: the CUDA build is not started."""
    info = {"dry_run": dry_run}
    with open(out / "logs" / "build_ext.log", "w") as log:
        info["wheels"] = install_carried_wheels(log)
        env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4))
        cuda_home, info["cuda_home"] = runpy.run_path(
            str(REPO / "csrc" / "build_flags.py"))["find_cuda_home"]()
        if dry_run and os.environ.get("FASTSSL_GPU_RUN_DRY_BUILD") != "1":
            info.update(status="skipped",
                        note="dry run: no build; the extension built here is used")
        elif not dry_run and (kept := _prebuilt_matches(env)):
            info.update(status="ok", note=kept)
        else:
            _build_both(out, info, env, cuda_home, dry_run, log)
    try:
        info["extension"] = ({"note": "dry run: not built"} if info["status"] == "skipped" else
                             _child_json("import json; from fastssl._backend import "
                                         "cpp_available as a, cuda_ext_available as c; print("
                                         "json.dumps({'cpp': bool(a()), 'cuda': bool(c())}))",
                                         dict(os.environ)))
    except Exception as exc:  # noqa: BLE001 - recorded: build.json is written whatever happens
        info["extension"] = {"cpp": False, "cuda": False,
                             "error": f"{type(exc).__name__}: {exc}"[:300]}
    if info["status"] not in ("ok", "skipped"):
        for kind in ("cuda", "cpu"):
            if (path := out / "logs" / f"build_{kind}.log").exists():
                lines = path.read_text(errors="replace").splitlines()
                errors = [ln for ln in lines if "error" in ln.lower()][-15:]
                info[f"{kind}_log_tail"] = [ln[:300] for ln in errors + ["..."] + lines[-10:]]
        info["log_tail"] = info.get("cuda_log_tail") or info.get("cpu_log_tail")
    _done(out, "build", info)
    hook()
    return 0 if info["status"] in ("ok", "skipped") or info["extension"].get("cpp") else 1


def _prebuilt_matches(env) -> str | None:
    """A carried fastssl/_C that imports, built against this torch with its CUDA part: kept."""
    if not list((REPO / "fastssl").glob("_C*.so")):
        return None
    with contextlib.suppress(Exception):   # no usable prebuilt: build
        same, cuda, loads, version = _child_json(
            "import json, torch; from fastssl import _build_info as b; from fastssl._backend "
            "import cuda_ext_available; print(json.dumps([b.TORCH_VERSION == torch.__version__, "
            "bool(b.WITH_CUDA), bool(cuda_ext_available()), b.TORCH_VERSION]))", env, 60)
        if same and cuda and loads:
            return f"prebuilt fastssl._C kept: built against torch {version} with its CUDA part"
    return None


def _build_both(out, info, env, cuda_home, dry_run, log) -> None:
    procs, logs, rcs = {}, {}, {}
    for kind in ("cpu",) if dry_run or cuda_home is None else ("cpu", "cuda"):
        root = _stage(kind)
        kenv = {**env, "FASTSSL_BUILD_CUDA": "1" if kind == "cuda" else "0",
                **({"CUDA_HOME": cuda_home} if kind == "cuda" else {})}
        logs[kind] = open(out / "logs" / f"build_{kind}.log", "w")
        cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
        logs[kind].write(f"$ (cd {root} && FASTSSL_BUILD_CUDA={kenv['FASTSSL_BUILD_CUDA']} "
                         f"FASTSSL_CUDA_ARCHS={kenv.get('FASTSSL_CUDA_ARCHS', '')} "
                         f"{' '.join(cmd)})\n")
        logs[kind].flush()
        procs[kind] = (subprocess.Popen(cmd, cwd=root, env=kenv, stdout=logs[kind],
                                        stderr=subprocess.STDOUT, start_new_session=True),
                       time.monotonic(), root)

    def stop(signum, frame):   # the cap (SIGTERM to this part's group) takes the builds along
        for proc, _, _ in procs.values():
            kill_group(proc, 0)
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)

    def wait(kind):
        proc, t0, root = procs[kind]
        try:
            rcs[kind] = proc.wait(timeout=max(1.0, time_left() - 5))
        except subprocess.TimeoutExpired:
            kill_group(proc, 0)
            rcs[kind] = "timeout"
        info[f"{kind}_build_rc"] = rcs[kind]
        info[f"{kind}_build_s"] = round(time.monotonic() - t0, 1)
        return rcs[kind] == 0 and _built(root)

    def install(root):
        for old in (REPO / "fastssl").glob("_C*.so"):
            old.unlink()
        for so in _built(root) + [root / "fastssl" / "_build_info.py"]:
            shutil.copy2(so, REPO / "fastssl" / so.name)

    if "cuda" in procs and wait("cuda"):
        kill_group(procs["cpu"][0], 0)
        info["cpu_build_rc"] = "stopped: the CUDA build succeeded"
        install(procs["cuda"][2])
        info.update(status="ok", note="built with the CUDA part (sm "
                                      f"{os.environ.get('FASTSSL_CUDA_ARCHS', '80,90')})")
    else:
        cpu_ok = wait("cpu")
        if cpu_ok:
            install(procs["cpu"][2])
        if dry_run:
            note = ("dry run: the CPU-only build, compiled in build/gpu_run/cpu and installed; "
                    + info["cuda_home"]) if cpu_ok else "dry run: the CPU-only build failed"
        elif "cuda" not in procs:
            note = f"CUDA part not built ({info['cuda_home']}): " + (
                "the CPU part only; the triton and torch backends run on the GPU" if cpu_ok
                else "the CPU-only build failed too: triton/torch backends only")
        else:
            note = ("the CUDA build failed: the CPU part only (built beside it); the cuda backend "
                    "is not measured" if cpu_ok else "the CUDA and the CPU-only builds failed: "
                    "triton/torch backends only")
        info.update(status=("ok" if dry_run else "fallback") if cpu_ok else "error", note=note)
    for kind, f in logs.items():
        f.close()
        log.write(f"\n===== build_{kind}.log =====\n"
                  + (out / "logs" / f"build_{kind}.log").read_text(errors="replace"))


def _median_ms(fn, cuda: bool, reps: int, warmup: int) -> float:
    """Median time of fn() over reps calls after warmup calls (harness's timing loops)."""
    for _ in range(warmup):
        fn()
    cfg = BenchConfig(min_reps=reps, max_reps=reps, min_time_s=0.0, cuda_rep_ms=0)
    return sorted((time_cuda_events if cuda else time_cpu)(lambda: None, lambda _: fn(), cfg))[
        reps // 2]


def _randn(*shape, device, dtype, seed=0, grad=False):
    # Random operands: a product of zeros runs faster than real data.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)


def _gemm(n, device, dtype) -> dict:
    a, b = (_randn(n, n, device=device, dtype=dtype, seed=s) for s in (0, 1))
    ms = _median_ms(lambda: a @ b, device.type == "cuda", 10, 3)
    return {"matmul_n": n, "matmul_ms": ms, "peak_tflops": 2 * n**3 / (ms / 1e3) / 1e12}


def part_roofline(out, dry_run, hook):
    device = _device(dry_run)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    info = {"device": device.type, "dtype": str(dtype).replace("torch.", ""),
            **({"device_name": torch.cuda.get_device_name(device)} if cuda else {}),
            **_gemm(8192 if cuda else 256, device, dtype),
            "note": "median of 10 products after 3 warm-ups, random data" if cuda
            else "CPU dry run"}
    _done(out, "roofline", info)
    hook()
    # A device copy: bytes read + written over the time (the memory-bound ceiling).
    x = torch.empty((1 << 30) // 4 if cuda else 1 << 20, device=device).uniform_()
    y = torch.empty_like(x)
    ms = _median_ms(lambda: y.copy_(x), cuda, 5, 1)
    _done(out, "roofline", dict(info, copy_bytes=2 * x.nbytes, copy_ms=ms,
                                copy_tb_s=2 * x.nbytes / (ms / 1e3) / 1e12))
    return 0


def nt_xent_roofline(out, device, dry_run) -> None:
    """Issue 25: nt_xent forward+backward on the Triton backend against the device's bf16 peak,
    the spec figure by device name and a 8192^3 GEMM measured here; DIR/nt_xent_roofline.json."""
    cuda = device.type == "cuda"
    dtype, d = (torch.bfloat16, 128) if cuda else (torch.float32, 8)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    info = {"device_name": name, "dtype": str(dtype).replace("torch.", ""), "backend": "triton",
            "spec_tflops": next((v for k, v in SPEC_BF16_TFLOPS if k in name), None),
            "gemm": _gemm(8192 if cuda else 256, device, dtype), "rows": []}
    for b in (8192, 32768) if cuda else (8, 16):
        if time_left() < 5.0:
            info["rows"].append({"B": b, "D": d, "status": "not reached: the part's cap"})
            continue
        zs = [_randn(b, d, device=device, dtype=dtype, seed=s, grad=True) for s in (0, 1)]

        def step():
            with backend_forced("triton"):
                torch.autograd.grad(fast.nt_xent(*zs), zs)
        try:
            ms = _median_ms(step, cuda, 10 if cuda else 3, 2 if cuda else 1)
        except Exception as exc:  # noqa: BLE001 - recorded, the part goes on
            info["rows"].append({"B": b, "D": d, "status": failure_note(exc)})
            continue
        tflops = model_flop("nt_xent", {"B": b, "D": d}, "forward+backward") / (ms / 1e3) / 1e12
        info["rows"].append({"B": b, "D": d, "status": "ok", "ms": ms, "tflops": tflops,
                             "pct_spec": info["spec_tflops"] and 100 * tflops / info["spec_tflops"],
                             "pct_gemm": 100 * tflops / info["gemm"]["peak_tflops"]})
        _done(out, "nt_xent_roofline", info)
        zs = None
        free_device_memory(device)
    _done(out, "nt_xent_roofline", info)


def headline_cases(part: str, dry: bool) -> list[tuple]:
    """(op, shape, dtype, modes, provider) of a benchmark part, most important first (a part cut
    off keeps the first ones); torch.compile last: each pays a compilation."""
    bf16 = "float32" if dry else "bfloat16"
    sinkhorn = (("sinkhorn", {"B": 16, "K": 12} if dry else {"B": 4096, "K": 3000}, "float32",
                 ("forward",)),)
    swav = (("swav", {"B": 16, "K": 12, "crops": 8} if dry else {"B": 4096, "K": 3000, "crops": 8},
             bf16, FULL),)
    gpu_fast = ("fastssl",) + (("fastssl:torch",) if dry else ("fastssl:cuda", "fastssl:triton"))
    groups = []   # ((op, shape, dtype, modes), providers)
    if part == "bench_contrastive":
        nt = {"B": 16, "D": 8} if dry else {"B": 32768, "D": 128}
        both = [("nt_xent", nt, bf16, FULL), ("info_nce", {**nt, "symmetric": True}, bf16, FULL)]
        groups = [(c, ("fastssl", "eager", "reference")) for c in both]
        groups += [(c, ("eager:compile",)) for c in both]
    elif part == "bench_sce_sphere":
        both = [("sce", {"B": 16, "D": 8, "K": 40} if dry else {"B": 1024, "D": 256, "K": 65536},
                 bf16, FULL), ("sfrik_mmd", {"B": 16, "D": 8} if dry else {"B": 2048, "D": 8192},
                               bf16, FULL)]
        groups = [(c, ("fastssl", "reference")) for c in both]
        groups += [(c, ("reference:compile",)) for c in both]
    elif part == "bench_sortnet":
        sort = lambda b, n, net="odd_even": ("soft_sort", {"B": b, "n": n, "network": net},  # noqa
                                             "float32", FULL)
        groco = lambda b, d: ("groco", {"B": b, "D": d, "views": 2}, bf16, FULL)  # noqa: E731
        groups = [(sort(8 if dry else 1024, n), gpu_fast + ("reference", "diffsort"))
                  for n in ((5,) if dry else (16, 32))]
        groups.append((groco(16, 8) if dry else groco(4096, 2048), ("fastssl", "reference")))
        if not dry:   # the shapes of the issue-4 targets in bench/summary.py
            groups += [(sort(4096, 32), ("fastssl", "diffsort")),
                       (groco(1024, 2048), ("fastssl", "reference"))]
        groups.append((sort(4, 16, "bitonic") if dry else sort(1024, 1024, "bitonic"),
                       ("fastssl", "diffsort")))
    elif part == "bench_swav":
        groups = [(sinkhorn[0], gpu_fast + ("reference",)), (swav[0], ("fastssl", "reference"))]
        if not dry:   # the other issue-5 target shape
            groups.append((("sinkhorn", {"B": 1024, "K": 65536}, "float32", ("forward",)),
                           ("fastssl", "reference")))
        groups += [(sinkhorn[0], ("reference:compile",)), (swav[0], ("reference:compile",))]
    else:
        raise ValueError(f"part: unknown benchmark part {part!r}")
    return [(*case, p) for case, providers in groups for p in providers]


def _device(dry_run: bool) -> torch.device:
    return torch.device("cuda" if not dry_run and torch.cuda.is_available() else "cpu")


def _writer(out: Path, device) -> ResultWriter:
    return ResultWriter(out / "results.jsonl", environment(device), append=True)


def _not_run(op, shape, dtype, mode, provider, device, part, note) -> dict:
    spec = select_specs([op])[0]
    return {"op": op, "family": spec.family, "provider": provider, "shape": dict(shape),
            "x": shape.get(spec.x_key), "x_key": spec.x_key, "dtype": dtype, "device": device.type,
            "gpu_run_part": part, "status": "skipped", "mode": mode, "note": note}


def _skip_note(provider, device, dry_run) -> str | None:
    compile_ = provider.endswith(":compile")
    if note := static_skip(provider, device.type):
        return note
    if compile_ and device.type != "cuda":
        return "torch.compile is measured on GPU only"
    if compile_ and os.environ.get("FASTSSL_GPU_RUN_COMPILE") != "1":
        return ("torch.compile left out of this run (its compilations do not fit the first "
                "call): --with-compile")
    if time_left() < (COMPILE_MIN_S if compile_ and not dry_run else 1.0):
        return f"not reached: {max(time_left(), 0):.0f} s left of the part's cap"
    return None


def part_bench(part, out, dry_run, hook):
    device = _device(dry_run)
    cfg = BenchConfig.for_run(quick=dry_run)
    roof = load_json(out / "roofline.json") or {}
    peak = roof.get("peak_tflops") if roof.get("device") == "cuda" else None
    with _writer(out, device) as writer:
        roofline_due = part == "bench_contrastive"
        for op, shape, dtype, modes, provider in headline_cases(part, dry_run):
            if roofline_due and op != "nt_xent":   # right after nt_xent's cases compiled it
                nt_xent_roofline(out, device, dry_run)
                roofline_due = False
            if note := _skip_note(provider, device, dry_run):
                for m in modes:
                    progress(writer.write(_not_run(op, shape, dtype, m, provider, device, part,
                                                   note)), sys.stdout)
                continue
            for rec in run_case(select_specs([op])[0], provider, Size(dict(shape), modes),
                                getattr(torch, dtype), device, cfg):
                rec["gpu_run_part"] = part
                flop = model_flop(op, shape, rec.get("mode"))
                if flop and rec.get("status") == "ok":
                    rec.update(model_tflop=flop / 1e12,
                               tflops=flop / (rec["p50_ms"] / 1e3) / 1e12)
                    if peak:
                        rec["peak_fraction"] = rec["tflops"] / peak
                progress(writer.write(rec), sys.stdout)
                hook()
    return 0


def _fits(provider: str, b: int, d: int, dtype, device, budget_bytes: int) -> dict:
    """One nt_xent forward+backward at B (N = 2B anchors): total peak memory (inputs included)
    and time; fits when it ran within the budget."""
    fn = baselines.eager_nt_xent if provider == "eager" else fast.nt_xent
    rec, zs = {"B": b}, ()
    try:
        zs = [_randn(b, d, device=device, dtype=dtype, seed=b + s, grad=True) for s in (0, 1)]
        with backend_forced("auto") if provider == "fastssl" else contextlib.nullcontext():
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fn(*zs).backward()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
            else:
                peak = 2 * zs[0].nbytes + (cpu_peak_growth(lambda: zs,
                                                           lambda z: fn(*z).backward()) or 0)
            rec["seconds"] = time.perf_counter() - t0
        rec.update(status="ok" if peak <= budget_bytes else "over_budget", peak_mem_mb=peak / 2**20)
    except Exception as exc:  # noqa: BLE001 - an OOM is the expected way not to fit
        rec.update(status=classify_failure(exc), note=failure_note(exc))
    zs = ()   # freed before the next probe
    free_device_memory(device)
    return rec


def part_max_n(out, dry_run, hook):
    """The largest nt_xent B within the memory budget (compare.search_max_b); every probe is a
    record."""
    device = _device(dry_run)
    d, dtype = (8, torch.float32) if dry_run else (128, torch.bfloat16)
    if device.type == "cuda":
        budget = int(MAX_N_BUDGET_GIB * 2**30)
        total = torch.cuda.get_device_properties(device).total_memory
        # The allocator refuses past the budget (its OOM is the "does not fit" answer).
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    else:
        budget = int(MAX_N_BUDGET_DRY_MIB * 2**20)
    # GPU: fastssl up to B = 2^19 (N = 1,048,576, the target); eager is quadratic in
    # memory and fails far below its bound.
    bounds = ({"fastssl": (16, 512), "eager": (16, 512)} if dry_run
              else {"fastssl": (4096, 1 << 19), "eager": (4096, 1 << 17)})
    summary = {"budget_bytes": budget, "D": d, "dtype": str(dtype).replace("torch.", ""),
               "providers": {}}
    with _writer(out, device) as writer:
        for provider, (b0, b_max) in bounds.items():
            def probe(b, provider=provider):
                rec = _fits(provider, b, d, dtype, device, budget)
                full = _not_run("nt_xent", {"B": b, "D": d, "probe": "max_n"}, summary["dtype"],
                                "forward+backward", provider, device, "max_n", "")
                full.update(probe="max_n", budget_mb=budget / 2**20, x=b, x_key="B")
                if rec["status"] == "ok":
                    ms = rec["seconds"] * 1e3
                    full.update(status="ok", p20_ms=ms, p50_ms=ms, p80_ms=ms, reps=1,
                                peak_mem_mb=rec["peak_mem_mb"],
                                mem_method="total peak, inputs included")
                else:
                    full.update(status="oom" if rec["status"] in ("oom", "over_budget")
                                else rec["status"], note=rec.get("note") or
                                f"peak {rec.get('peak_mem_mb', 0):.1f} MiB: over the budget")
                progress(writer.write(full), sys.stdout)
                hook()
                return rec["status"] == "ok", rec.get("seconds", 0.0), rec.get("peak_mem_mb")

            _fits(provider, b0, d, dtype, device, budget)   # warm-up (JIT, pools): not a probe
            res = search_max_b(probe, b0, b_max, bisect=3, time_left=time_left)
            lo = res["max_B"]
            summary["providers"][provider] = {"max_B": lo, "max_N": lo and 2 * lo,
                                              "first_fail_B": res["first_fail_B"],
                                              "bound_B": b_max, "end": res["end"]}
            write_json(out / "max_n.json", summary)
    print(json.dumps(summary), flush=True)
    return 0


def part_trainer(out, dry_run, hook):
    device = _device(dry_run)
    cfg = BenchConfig.for_run(quick=dry_run)
    # each method's own crop recipe (SwAV and multi-crop GroCo with their small crops)
    if dry_run:
        shapes, dtype = [trainer._case("simclr", "resnet18", 4, 16 / 224).shape], torch.float32
    else:
        shapes = [trainer._case(m, "resnet50", 256, 1.0).shape for m in trainer.METHODS]
        dtype = torch.bfloat16
        # No cuDNN autotuning: it searches per new shape (each method's crops) and would spend
        # the part's cap before every method had its step; a few timed steps each instead.
        torch.backends.cudnn.benchmark = False
        cfg = BenchConfig(warmup=1, min_reps=2, max_reps=3, cuda_warmup_ms=50, cuda_rep_ms=300)
    with _writer(out, device) as writer:
        for shape in shapes:
            if time_left() < (2.0 if dry_run else 4.0):
                progress(writer.write(_not_run("train_step", shape, str(dtype)[6:], "step",
                                               "fastssl", device, "trainer",
                                               "not reached: the part's cap")), sys.stdout)
                continue
            for rec in run_case(trainer.SPECS[0], "fastssl", Size(shape, ("step",)), dtype,
                                device, cfg):
                rec["gpu_run_part"] = "trainer"
                progress(writer.write(rec), sys.stdout)
                hook()
    return 0


def part_checkpoint(out, dry_run, hook):
    try:
        import torchvision   # optional: only this part needs it
    except ImportError as exc:
        _done(out, "checkpoint", {"status": "skipped",
                                  "note": f"torchvision is not installed ({exc})"})
        return 0
    # On the CPU even on the GPU machine: names and values need no GPU. The file goes outside
    # the run directory: a run cut off here must not archive a ~94 MB file.
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet50")
    with tempfile.TemporaryDirectory(prefix="fastssl-ckpt-") as tmp:
        torch.save(backbone_state_dict(backbone), Path(tmp) / "backbone.pt")
        state = torch.load(Path(tmp) / "backbone.pt", map_location="cpu", weights_only=True)
    tv = torchvision.models.resnet50(weights=None)
    res = tv.load_state_dict(state, strict=False)
    missing, unexpected = sorted(res.missing_keys), sorted(res.unexpected_keys)
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64 if dry_run else 224, 64 if dry_run else 224)
    with torch.no_grad():
        diff = (backbone.eval()(x) - tv.eval()(x)).abs().max().item()
    ok = missing == ["fc.bias", "fc.weight"] and not unexpected and diff <= 1e-4
    _done(out, "checkpoint", dict(
        status="ok" if ok else "failed", torchvision_version=torchvision.__version__,
        missing_keys=missing, unexpected_keys=unexpected, max_abs_feature_diff=diff,
        device="cpu", keys=len(state),
        note="only fc missing, same features" if ok else "mismatch: see the fields"))
    hook()
    return 0 if ok else 1


def _module_part(name, args, out, tail_n) -> int:
    """Another entry point of the package run under the part's remaining time; DIR/<name>.json."""
    log_path = out / "logs" / f"{name}_run.log"
    with open(log_path, "w") as log:
        rc, secs = run_capped([sys.executable, "-m", f"{PKG}.{name}", *args], log,
                              max(1.0, time_left() - 2), env=dict(os.environ))
    lines = log_path.read_text(errors="replace").splitlines()
    write_json(out / f"{name}.json", {
        "module": f"{PKG}.{name}", "rc": rc, "seconds": round(secs, 1),
        "status": "ok" if rc == 0 else ("timeout" if rc == "timeout" else "error"),
        "note": lines[-1][:300] if lines else "", "output_tail": lines[-tail_n:]})
    print("\n".join(lines[-tail_n:]), flush=True)
    return 0 if rc == 0 else 1


def part_backend_choice(out, dry_run, hook):
    """python -m bench.backend_choice: the cuda and triton backends' CUDA tests and times, and
    which one `auto` should prefer (the dry run: that it imports and parses)."""
    if not (REPO / "bench" / "backend_choice.py").is_file():
        _done(out, "backend_choice", {"module": f"{PKG}.backend_choice", "status": "missing",
                                      "note": "bench/backend_choice.py is not in this tree: not "
                                              "measured"})
        return 0
    (out / "backend_choice").mkdir(exist_ok=True)
    rc = _module_part("backend_choice", ["--help"] if dry_run else
                      ["--out", str(out / "backend_choice")], out, 20)
    hook()
    return rc


def part_dino(out, dry_run, hook):
    """python -m bench.dino at the issue's sizes (the dry run: that it imports and parses)."""
    rc = _module_part("dino", ["--help"] if dry_run else
                      ["--out", str(out / "dino_results.json"), "--reps", "10"], out, 30)
    hook()
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_parts", description=__doc__)
    p.add_argument("--part", choices=PART_NAMES, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--stall", help="test hook: this part hangs after its first result")
    args = p.parse_args(argv)

    def hook():
        if args.stall == args.part:
            print("stalling (test hook)", flush=True)
            time.sleep(10**6)
    fn = globals().get(f"part_{args.part}")
    return fn(args.out, args.dry_run, hook) if fn else part_bench(args.part, args.out,
                                                                   args.dry_run, hook)


if __name__ == "__main__":
    sys.exit(main())
