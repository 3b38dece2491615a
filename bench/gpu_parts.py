"""The parts of `python -m bench.gpu_run`, each run in its own subprocess (see bench/gpu_run.py).

Every part writes as it goes: benchmark records to DIR/results.jsonl (the format of
bench/results.py, with the part's name and, for matmul-bound losses, achieved TFLOP/s), the
others to DIR/<part>.json. A part checks its deadline ($FASTSSL_GPU_RUN_DEADLINE) before each
case and records what it had no time left for, rather than be killed in the middle of it.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.gpu_run import DEADLINE_ENV, MAX_N_BUDGET_DRY_MIB, MAX_N_BUDGET_GIB, REPO

COMPILE_MIN_S = 15.0   # a torch.compile case is not started with less time than this left


def deadline() -> float:
    return float(os.environ.get(DEADLINE_ENV, "inf"))


def time_left() -> float:
    return deadline() - time.time()


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


class Stall:
    """Test hook (--stall PART): the named part hangs after its first result, so the caller's
    cap has to cut it off; what it wrote before must survive."""

    def __init__(self, part: str, stall: str | None):
        self.active = stall == part

    def after_result(self) -> None:
        if self.active:
            print("stalling (test hook)", flush=True)
            time.sleep(10**6)


def run(part: str, out: Path, *, dry_run: bool, stall: str | None) -> int:
    out = Path(out)
    hook = Stall(part, stall)
    fn = {"build": part_build, "roofline": part_roofline, "max_n": part_max_n,
          "checkpoint": part_checkpoint, "trainer": part_trainer,
          "backend_choice": part_backend_choice}.get(part)
    if fn is None:
        return part_bench(part, out, dry_run, hook)
    return fn(out, dry_run, hook)


# ----------------------------------------------------------------------------------------------
# build


def _run_logged(cmd, env, log, timeout):
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    t0 = time.monotonic()
    # Its own process group: on a timeout the compilers it started (ninja, nvcc) go too.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = "timeout"
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        log.write(f"\n[cut off after {timeout:.0f} s]\n")
    return rc, time.monotonic() - t0


def _extension_state(env) -> dict:
    code = ("import json; from fastssl._backend import cpp_available, cuda_ext_available; "
            "print(json.dumps({'cpp': bool(cpp_available()), 'cuda': bool(cuda_ext_available())}))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001
        return {"cpp": False, "cuda": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


def install_carried_wheels(log) -> str:
    """diffsort (and anything else) carried as wheels in .whl/: installed with pip, offline,
    into .whl/site, which the parent puts on the children's PYTHONPATH."""
    import importlib.util
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if importlib.util.find_spec("diffsort") is not None:
        return "diffsort importable"
    if (REPO / ".whl" / "site" / "diffsort").is_dir():
        return "diffsort in .whl/site (installed by an earlier run)"
    if not wheels:
        return "diffsort not importable and no wheel in .whl/: the diffsort baseline is skipped"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(REPO / ".whl" / "site"), *map(str, wheels)]
    rc, _ = _run_logged(cmd, os.environ, log, timeout=max(5.0, min(60.0, time_left() - 5)))
    names = ", ".join(w.name for w in wheels)
    return f"installed {names} into .whl/site" if rc == 0 else f"pip install of {names} failed ({rc})"


STAGE = REPO / "build" / "gpu_run"   # the builds' own trees (build/ is git-ignored)


def _stage(name: str) -> Path:
    """A build tree with only what setup.py compiles (setup.py, csrc/, an empty fastssl/): no
    pyproject.toml, so the machine's setuptools, whatever its version, never validates the
    package metadata (setuptools < 77 rejects its license field), and the two builds side by
    side share no file. Kept between calls: ninja then recompiles nothing that did not change."""
    root = STAGE / name
    (root / "fastssl").mkdir(parents=True, exist_ok=True)
    (root / "csrc").mkdir(exist_ok=True)
    shutil.copy2(REPO / "setup.py", root / "setup.py")
    for src in (REPO / "csrc").iterdir():
        if src.is_file():
            dst = root / "csrc" / src.name
            # copy only what changed: an unchanged source keeps its time, ninja skips it
            if not dst.exists() or dst.read_bytes() != src.read_bytes():
                shutil.copy2(src, dst)
    return root


def _built(root: Path) -> list[Path]:
    return sorted((root / "fastssl").glob("_C*.so"))


def _install(root: Path) -> None:
    for old in (REPO / "fastssl").glob("_C*.so"):
        old.unlink()
    for so in _built(root):
        shutil.copy2(so, REPO / "fastssl" / so.name)
    shutil.copy2(root / "fastssl" / "_build_info.py", REPO / "fastssl" / "_build_info.py")


def _prebuilt_matches(env) -> str | None:
    """A fastssl/_C that imports, was built against this torch and has the CUDA part (carried
    prebuilt): kept, no build. Returns the reason, or None."""
    code = ("import json, torch; from fastssl import _build_info as b; "
            "from fastssl._backend import cuda_ext_available; "
            "print(json.dumps([b.TORCH_VERSION == torch.__version__, bool(b.WITH_CUDA), "
            "bool(cuda_ext_available()), b.TORCH_VERSION]))")
    if not list((REPO / "fastssl").glob("_C*.so")):
        return None
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=60)
        same_torch, with_cuda, loads, version = json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001 - no usable prebuilt: build
        return None
    if same_torch and with_cuda and loads:
        return f"prebuilt fastssl._C kept: built against torch {version} with its CUDA part"
    return None


def _cuda_home() -> tuple[str | None, str]:
    import runpy
    return runpy.run_path(str(REPO / "csrc" / "build_flags.py"))["find_cuda_home"]()


def part_build(out, dry_run, hook):
    """CPU-only and CUDA builds side by side, each in its own tree: the CUDA one is installed
    when it succeeds, else the CPU one (no recompilation after a CUDA failure; the CPU build
    alone fits the cap). No CUDA toolkit with include/cuda_runtime.h: the CUDA build is not
    started, with the reason."""
    info = {"dry_run": dry_run}
    log_path = out / "logs" / "build_ext.log"
    with open(log_path, "w") as log:
        info["wheels"] = install_carried_wheels(log)
        env = dict(os.environ)
        env["MAX_JOBS"] = str(os.cpu_count() or 4)
        cuda_home, cuda_note = _cuda_home()
        info["cuda_home"] = cuda_note
        if dry_run and os.environ.get("FASTSSL_GPU_RUN_DRY_BUILD") != "1":
            info.update(status="skipped", note="dry run: no build; the extension built here is used")
        elif not dry_run and (kept := _prebuilt_matches(env)):
            info.update(status="ok", note=kept)
        else:
            procs = {}
            logs = {}
            for kind in ("cpu", "cuda"):
                if kind == "cuda" and (dry_run or cuda_home is None):
                    continue
                root = _stage(kind)
                kenv = {**env, "FASTSSL_BUILD_CUDA": "1" if kind == "cuda" else "0"}
                if kind == "cuda":
                    kenv["CUDA_HOME"] = cuda_home
                logs[kind] = open(out / "logs" / f"build_{kind}.log", "w")
                cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
                logs[kind].write(f"$ (cd {root} && FASTSSL_BUILD_CUDA={kenv['FASTSSL_BUILD_CUDA']} "
                                 f"FASTSSL_CUDA_ARCHS={kenv.get('FASTSSL_CUDA_ARCHS', '')} {' '.join(cmd)})\n")
                logs[kind].flush()
                procs[kind] = (subprocess.Popen(cmd, cwd=root, env=kenv, stdout=logs[kind],
                                                stderr=subprocess.STDOUT, start_new_session=True),
                               time.monotonic(), root)
            rcs = {}

            def _stop(signum, frame):   # the cap (SIGTERM to this part's group) takes the builds along
                for proc, _, _ in procs.values():
                    _kill(proc)
                raise SystemExit(128 + signum)

            signal.signal(signal.SIGTERM, _stop)

            def wait(kind):
                proc, t0, _ = procs[kind]
                try:
                    rcs[kind] = proc.wait(timeout=max(1.0, time_left() - 5))
                except subprocess.TimeoutExpired:
                    _kill(proc)
                    rcs[kind] = "timeout"
                info[f"{kind}_build_rc"] = rcs[kind]
                info[f"{kind}_build_s"] = round(time.monotonic() - t0, 1)

            if "cuda" in procs:
                wait("cuda")
            if rcs.get("cuda") == 0 and _built(procs["cuda"][2]):
                if "cpu" in procs:
                    _kill(procs["cpu"][0])
                    info["cpu_build_rc"] = "stopped: the CUDA build succeeded"
                if not dry_run:
                    _install(procs["cuda"][2])
                info.update(status="ok", note=f"built with the CUDA part (sm {os.environ.get('FASTSSL_CUDA_ARCHS', '80,90')})")
            else:
                wait("cpu")
                cpu_ok = rcs.get("cpu") == 0 and _built(procs["cpu"][2])
                if cpu_ok:
                    _install(procs["cpu"][2])
                if dry_run:
                    info.update(status="ok" if cpu_ok else "error",
                                note=("dry run: the CPU-only build, compiled in build/gpu_run/cpu and installed; "
                                      + cuda_note) if cpu_ok else "dry run: the CPU-only build failed")
                elif "cuda" not in procs:
                    info.update(status="fallback" if cpu_ok else "error",
                                note=f"CUDA part not built ({cuda_note}): "
                                + ("the CPU part only; the triton and torch backends run on the GPU"
                                   if cpu_ok else "the CPU-only build failed too: triton/torch backends only"))
                else:
                    info.update(status="fallback" if cpu_ok else "error",
                                note=("the CUDA build failed: the CPU part only (built beside it); the cuda "
                                      "backend is not measured" if cpu_ok else
                                      "the CUDA and the CPU-only builds failed: triton/torch backends only"))
            for f in logs.values():
                f.close()
            for kind in logs:
                log.write(f"\n===== build_{kind}.log =====\n")
                log.write((out / "logs" / f"build_{kind}.log").read_text(errors="replace"))
    info["extension"] = (_extension_state(dict(os.environ)) if info.get("status") != "skipped"
                         else {"note": "dry run: not built"})
    if info.get("status") not in ("ok", "skipped"):
        for kind in ("cuda", "cpu"):
            path = out / "logs" / f"build_{kind}.log"
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()
                errors = [ln for ln in lines if "error" in ln.lower()][-15:]
                info[f"{kind}_log_tail"] = [ln[:300] for ln in errors + ["..."] + lines[-10:]]
        info["log_tail"] = info.get("cuda_log_tail") or info.get("cpu_log_tail")
    write_json(out / "build.json", info)
    print(json.dumps({k: v for k, v in info.items() if not k.endswith("log_tail")}), flush=True)
    hook.after_result()
    ext = info.get("extension", {})
    return 0 if info.get("status") in ("ok", "skipped") or ext.get("cpp") else 1


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# ----------------------------------------------------------------------------------------------
# roofline


def part_roofline(out, dry_run, hook):
    import torch
    cuda = torch.cuda.is_available() and not dry_run
    device = torch.device("cuda" if cuda else "cpu")
    n = 8192 if cuda else 256
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    # Random operands: a product of zeros runs faster than real data.
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    info = {"device": device.type, "matmul_n": n, "dtype": str(dtype).replace("torch.", "")}
    if cuda:
        info["device_name"] = torch.cuda.get_device_name(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(10)]
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        for s, e in events:
            s.record()
            a @ b
            e.record()
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) for s, e in events)
    else:
        a @ b
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
    ms = times[len(times) // 2]
    info.update(matmul_ms=ms, peak_tflops=2 * n**3 / (ms / 1e3) / 1e12,
                note="median of 10 products after 3 warm-ups, random data" if cuda else "CPU dry run")
    write_json(out / "roofline.json", info)
    print(json.dumps(info), flush=True)
    hook.after_result()
    # A device copy: bytes read + written over the time (the memory-bound ceiling).
    del a, b
    numel = (1 << 30) // 4 if cuda else 1 << 20
    x = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    y.copy_(x)
    reps = []
    for _ in range(5):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            y.copy_(x)
            e.record()
            torch.cuda.synchronize()
            reps.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            y.copy_(x)
            reps.append((time.perf_counter() - t0) * 1e3)
    ms = sorted(reps)[len(reps) // 2]
    info.update(copy_bytes=2 * numel * 4, copy_ms=ms, copy_tb_s=2 * numel * 4 / (ms / 1e3) / 1e12)
    write_json(out / "roofline.json", info)
    print(json.dumps(info), flush=True)
    return 0


def device_peak_tflops(out: Path) -> float | None:
    try:
        info = json.loads((out / "roofline.json").read_text())
        return float(info["peak_tflops"]) if info.get("device") == "cuda" else None
    except Exception:  # noqa: BLE001 - no roofline: TFLOP/s without the fraction
        return None


# ----------------------------------------------------------------------------------------------
# headline benchmarks


@dataclass
class Case:
    op: str
    shape: dict
    dtype: str
    modes: tuple
    provider: str


def _model_flop(op: str, shape: dict, mode: str) -> float | None:
    """The fewest matmul FLOPs the loss needs (forward 1 product, backward 2 per product with a
    gradient): the count for achieved TFLOP/s, whatever an implementation recomputes."""
    b, d = shape.get("B"), shape.get("D")
    fwd_bwd = mode == "forward+backward"
    if op == "nt_xent":
        n = 2 * b
        return (6 if fwd_bwd else 2) * n * n * d
    if op == "info_nce":
        # One B x B product serves both directions of the symmetric loss.
        return (6 if fwd_bwd else 2) * b * b * d
    if op == "sce":
        k = shape["K"]
        # q @ queue.T (with a gradient) and k @ queue.T (without one).
        return (6 if fwd_bwd else 4) * b * k * d
    if op == "sfrik_mmd":
        return (4 if fwd_bwd else 2) * b * b * d
    return None


FULL = ("forward+backward",)


def headline_cases(part: str, dry: bool) -> list[Case]:
    """Cases of a benchmark part, most important first (a part cut off keeps the first ones).
    torch.compile providers come last: each pays a compilation."""
    bf16 = "float32" if dry else "bfloat16"
    cases: list[Case] = []

    def add(op, shape, dtype, modes, providers):
        cases.extend(Case(op, shape, dtype, modes, p) for p in providers)

    if part == "bench_contrastive":
        nt = {"B": 16, "D": 8} if dry else {"B": 32768, "D": 128}
        nce = {**nt, "symmetric": True}
        fast = ("fastssl",)
        add("nt_xent", nt, bf16, FULL, fast + ("eager", "reference"))
        add("info_nce", nce, bf16, FULL, fast + ("eager", "reference"))
        add("nt_xent", nt, bf16, FULL, ("eager:compile",))
        add("info_nce", nce, bf16, FULL, ("eager:compile",))
    elif part == "bench_sce_sphere":
        sce = {"B": 16, "D": 8, "K": 40} if dry else {"B": 1024, "D": 256, "K": 65536}
        mmd = {"B": 16, "D": 8} if dry else {"B": 2048, "D": 8192}
        add("sce", sce, bf16, FULL, ("fastssl", "reference"))
        add("sfrik_mmd", mmd, bf16, FULL, ("fastssl", "reference"))
        add("sce", sce, bf16, FULL, ("reference:compile",))
        add("sfrik_mmd", mmd, bf16, FULL, ("reference:compile",))
    elif part == "bench_sortnet":
        fast = ("fastssl", "fastssl:torch") if dry else ("fastssl", "fastssl:cuda", "fastssl:triton")
        for n in ((5,) if dry else (16, 32)):
            shape = {"B": 8 if dry else 1024, "n": n, "network": "odd_even"}
            add("soft_sort", shape, "float32", FULL, fast + ("reference", "diffsort"))
        groco = {"B": 16, "D": 8, "views": 2} if dry else {"B": 4096, "D": 2048, "views": 2}
        add("groco", groco, bf16, FULL, ("fastssl", "reference"))
        if not dry:   # the shapes of the issue-4 targets in bench/summary.py
            add("soft_sort", {"B": 4096, "n": 32, "network": "odd_even"}, "float32", FULL, ("fastssl", "diffsort"))
            add("groco", {"B": 1024, "D": 2048, "views": 2}, bf16, FULL, ("fastssl", "reference"))
        big = {"B": 4, "n": 16, "network": "bitonic"} if dry else {"B": 1024, "n": 1024, "network": "bitonic"}
        add("soft_sort", big, "float32", FULL, ("fastssl", "diffsort"))
    elif part == "bench_swav":
        sk = {"B": 16, "K": 12} if dry else {"B": 4096, "K": 3000}
        sw = {"B": 16, "K": 12, "crops": 8} if dry else {"B": 4096, "K": 3000, "crops": 8}
        fast = ("fastssl", "fastssl:torch") if dry else ("fastssl", "fastssl:cuda", "fastssl:triton")
        add("sinkhorn", sk, "float32", ("forward",), fast + ("reference",))
        add("swav", sw, bf16, FULL, ("fastssl", "reference"))
        if not dry:   # the other issue-5 target shape
            add("sinkhorn", {"B": 1024, "K": 65536}, "float32", ("forward",), ("fastssl", "reference"))
        add("sinkhorn", sk, "float32", ("forward",), ("reference:compile",))
        add("swav", sw, bf16, FULL, ("reference:compile",))
    else:
        raise ValueError(f"part: unknown benchmark part {part!r}")
    return cases


def _spec(op: str):
    from bench.__main__ import select_specs
    return select_specs([op])[0]


def _setup_device(dry_run: bool):
    import torch
    if not dry_run and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _writer(out: Path, device):
    from bench import results
    return results.ResultWriter(out / "results.jsonl", results.environment(device), append=True)


def _progress(rec: dict) -> None:
    from bench.harness import fmt_mb, fmt_ms
    shape = ",".join(f"{k}={v}" for k, v in (rec.get("shape") or {}).items())
    line = f"{rec['op']:<10} {rec['provider']:<16} {shape:<30} {rec.get('dtype') or '-':<9} {rec.get('mode') or '-':<17}"
    if rec.get("status") == "ok":
        line += f" {fmt_ms(rec.get('p50_ms')):>10} mem {fmt_mb(rec.get('peak_mem_mb')):>10}"
        if rec.get("tflops"):
            line += f" {rec['tflops']:.1f} TFLOP/s"
        if rec.get("images_per_s"):
            line += f" {rec['images_per_s']:.0f} img/s"
    else:
        line += f" [{rec.get('status')}] {str(rec.get('note', ''))[:120]}"
    print(line, flush=True)


def part_bench(part, out, dry_run, hook):
    import torch
    from bench.harness import BenchConfig, Size, run_case, static_skip

    device = _setup_device(dry_run)
    cfg = BenchConfig.for_run(quick=dry_run)
    peak = device_peak_tflops(out)
    with _writer(out, device) as writer:
        for case in headline_cases(part, dry_run):
            spec = _spec(case.op)
            base = {"op": case.op, "family": spec.family, "provider": case.provider, "shape": dict(case.shape),
                    "x": case.shape.get(spec.x_key), "x_key": spec.x_key, "dtype": case.dtype,
                    "device": device.type, "gpu_run_part": part}
            skip = static_skip(case.provider, device.type)
            if skip or (case.provider == "eager:compile" and device.type != "cuda"):
                for m in case.modes:
                    _progress(writer.write({**base, "mode": m, "status": "skipped",
                                            "note": skip or "torch.compile is measured on GPU only"}))
                continue
            if case.provider.endswith(":compile") and os.environ.get("FASTSSL_GPU_RUN_COMPILE") != "1" \
                    and device.type == "cuda":
                for m in case.modes:
                    _progress(writer.write({**base, "mode": m, "status": "skipped",
                                            "note": "torch.compile left out of this run (its compilations do "
                                                    "not fit the first call): --with-compile"}))
                continue
            needed = COMPILE_MIN_S if case.provider.endswith(":compile") and not dry_run else 1.0
            if time_left() < needed:
                for m in case.modes:
                    _progress(writer.write({**base, "mode": m, "status": "skipped",
                                            "note": f"not reached: {max(time_left(), 0):.0f} s left of the part's cap"}))
                continue
            dtype = getattr(torch, case.dtype)
            for rec in run_case(spec, case.provider, Size(dict(case.shape), case.modes), dtype, device, cfg):
                rec["gpu_run_part"] = part
                flop = _model_flop(case.op, case.shape, rec.get("mode"))
                if flop and rec.get("status") == "ok":
                    rec["model_tflop"] = flop / 1e12
                    rec["tflops"] = flop / (rec["p50_ms"] / 1e3) / 1e12
                    if peak:
                        rec["peak_fraction"] = rec["tflops"] / peak
                _progress(writer.write(rec))
                hook.after_result()
    return 0


# ----------------------------------------------------------------------------------------------
# largest N in a fixed memory budget


def _fits(provider: str, b: int, d: int, dtype, device, budget_bytes: int) -> dict:
    """One forward+backward of nt_xent at B (N = 2B anchors): total peak memory (inputs
    included) and time; fits when it ran and stayed within the budget."""
    import torch
    from bench.harness import _free_device_memory, backend_forced, classify_failure, cpu_peak_growth, failure_note
    from bench import contrastive
    import fastssl.functional as fast

    fn = contrastive.eager_nt_xent if provider == "eager" else fast.nt_xent
    rec = {"B": b}
    z1 = z2 = None
    try:
        gen = torch.Generator(device="cpu").manual_seed(b)
        z1 = torch.randn(b, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        z2 = torch.randn(b, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        inputs = 2 * z1.numel() * z1.element_size()
        ctx = backend_forced("auto") if provider == "fastssl" else _null()
        with ctx:
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fn(z1, z2).backward()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
            else:
                growth = cpu_peak_growth(lambda: None, lambda _: fn(z1, z2).backward())
                peak = inputs + (growth or 0)
            rec["seconds"] = time.perf_counter() - t0
        rec.update(status="ok" if peak <= budget_bytes else "over_budget", peak_mem_mb=peak / 2**20)
    except Exception as exc:  # noqa: BLE001 - an OOM is the expected way not to fit
        rec.update(status=classify_failure(exc), note=failure_note(exc))
    del z1, z2
    gc.collect()
    _free_device_memory(device)
    return rec


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def part_max_n(out, dry_run, hook):
    """Bounded search: double B from b0 while it fits (and the predicted next call, 4x the last
    for an O(N^2) loss, fits the time left), then halve the gap to the first failure a few
    times. Each probe is recorded as an nt_xent forward+backward record (one call)."""
    import torch

    device = _setup_device(dry_run)
    d = 8 if dry_run else 128
    dtype = torch.float32 if dry_run else torch.bfloat16
    if device.type == "cuda":
        budget = int(MAX_N_BUDGET_GIB * 2**30)
        total = torch.cuda.get_device_properties(device).total_memory
        # The allocator refuses past the budget (its OOM is the "does not fit" answer).
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    else:
        budget = int(MAX_N_BUDGET_DRY_MIB * 2**20)
    # GPU: fastssl up to B = 2^19 (N = 1,048,576 anchors, the target); eager is
    # quadratic in memory and fails far below its bound.
    bounds = {"fastssl": (16, 512), "eager": (16, 512)} if dry_run else {"fastssl": (4096, 1 << 19),
                                                                         "eager": (4096, 1 << 17)}
    summary = {"budget_bytes": budget, "D": d, "dtype": str(dtype).replace("torch.", ""), "providers": {}}
    spec = _spec("nt_xent")
    with _writer(out, device) as writer:
        def emit(provider, rec):
            full = {"op": "nt_xent", "family": spec.family, "provider": provider,
                    "shape": {"B": rec["B"], "D": d, "probe": "max_n"}, "x": rec["B"], "x_key": "B",
                    "dtype": summary["dtype"], "device": device.type, "mode": "forward+backward",
                    "gpu_run_part": "max_n", "probe": "max_n", "budget_mb": budget / 2**20}
            if rec["status"] == "ok":
                ms = rec["seconds"] * 1e3
                full.update(status="ok", note="", p20_ms=ms, p50_ms=ms, p80_ms=ms, reps=1,
                            peak_mem_mb=rec["peak_mem_mb"], mem_method="total peak, inputs included")
            else:
                note = rec.get("note") or f"peak {rec.get('peak_mem_mb', 0):.1f} MiB: over the budget"
                full.update(status="oom" if rec["status"] in ("oom", "over_budget") else rec["status"], note=note)
            _progress(writer.write(full))
            hook.after_result()

        for provider, (b0, b_max) in bounds.items():
            # Warm-up (Triton JIT, thread pools, lazily built tables): not a probe.
            _fits(provider, b0, d, dtype, device, budget)
            best, first_fail, last_s, b = None, None, 0.0, b0
            stop = "reached the bound"
            while b <= b_max:
                if time_left() < max(2.0, 4.5 * last_s):
                    stop = "stopped: the next size would not fit the part's time cap"
                    break
                rec = _fits(provider, b, d, dtype, device, budget)
                emit(provider, rec)
                if rec["status"] != "ok":
                    first_fail, stop = b, "first failure"
                    break
                best, last_s, b = b, rec["seconds"], b * 2
            # Bisection between the last fit and the first failure (3 steps: 1/8 resolution).
            lo, hi = best, first_fail
            for _ in range(3):
                if lo is None or hi is None or hi - lo <= max(8, lo // 8) or time_left() < max(2.0, 2 * last_s):
                    break
                mid = (lo + hi) // 2
                rec = _fits(provider, mid, d, dtype, device, budget)
                emit(provider, rec)
                lo, hi = (mid, hi) if rec["status"] == "ok" else (lo, mid)
            summary["providers"][provider] = {"max_B": lo, "max_N": None if lo is None else 2 * lo,
                                              "first_fail_B": hi, "bound_B": b_max, "end": stop}
            write_json(out / "max_n.json", summary)
    print(json.dumps(summary), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# training step


def part_trainer(out, dry_run, hook):
    import torch
    from bench import trainer
    from bench.harness import BenchConfig, Size, run_case

    device = _setup_device(dry_run)
    spec = trainer.SPECS[0]
    cfg = BenchConfig.for_run(quick=dry_run)
    # each method's own crop recipe (SwAV and multi-crop GroCo with their small crops)
    if dry_run:
        shapes = [trainer._case("simclr", "resnet18", 4, 16 / 224).shape]
        dtype = torch.float32
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
                _progress(writer.write({"op": spec.name, "family": spec.family, "provider": "fastssl",
                                        "shape": shape, "x": shape["B"], "x_key": "B",
                                        "dtype": str(dtype).replace("torch.", ""), "device": device.type,
                                        "mode": "step", "status": "skipped", "gpu_run_part": "trainer",
                                        "note": "not reached: the part's cap"}))
                continue
            for rec in run_case(spec, "fastssl", Size(shape, ("step",)), dtype, device, cfg):
                rec["gpu_run_part"] = "trainer"
                _progress(writer.write(rec))
                hook.after_result()
    return 0


# ----------------------------------------------------------------------------------------------
# checkpoint


def part_checkpoint(out, dry_run, hook):
    import torch
    info = {}
    try:
        import torchvision
    except ImportError as exc:
        info.update(status="skipped", note=f"torchvision is not installed ({exc})")
        write_json(out / "checkpoint.json", info)
        print(json.dumps(info), flush=True)
        hook.after_result()
        return 0
    from fastssl.models import backbone_state_dict, build_backbone

    # On the CPU even on the GPU machine: a checkpoint's names and values need no GPU, and this
    # spares the part a CUDA start.
    device = torch.device("cpu")
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet50")
    # Outside the run directory: a run cut off here must not leave a ~94 MB file in what is
    # archived and handed back (16 MiB per file).
    import tempfile
    tmpdir = tempfile.mkdtemp(prefix="fastssl-ckpt-")
    path = Path(tmpdir) / "resnet50_backbone.pt"
    torch.save(backbone_state_dict(backbone), path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    tv = torchvision.models.resnet50(weights=None)
    res = tv.load_state_dict(state, strict=False)
    missing, unexpected = sorted(res.missing_keys), sorted(res.unexpected_keys)
    tv.fc = torch.nn.Identity()
    backbone.eval().to(device)
    tv.eval().to(device)
    x = torch.randn(2, 3, 64 if dry_run else 224, 64 if dry_run else 224, device=device)
    with torch.no_grad():
        diff = (backbone(x) - tv(x)).abs().max().item()
    shutil.rmtree(tmpdir, ignore_errors=True)
    ok = missing == ["fc.bias", "fc.weight"] and not unexpected and diff <= 1e-4
    info.update(status="ok" if ok else "failed", torchvision_version=torchvision.__version__,
                missing_keys=missing, unexpected_keys=unexpected, max_abs_feature_diff=diff,
                device=device.type, keys=len(state),
                note="only fc missing, same features" if ok else "mismatch: see the fields")
    write_json(out / "checkpoint.json", info)
    print(json.dumps(info), flush=True)
    hook.after_result()
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------
# backend choice (bench/backend_choice.py: the CUDA tests of the cuda and triton backends, and
# cuda vs triton times, printing which one `auto` should prefer)


def part_backend_choice(out, dry_run, hook):
    info = {"module": "bench.backend_choice"}
    if not (REPO / "bench" / "backend_choice.py").is_file():
        info.update(status="missing", note="bench/backend_choice.py is not in this tree: not measured")
        write_json(out / "backend_choice.json", info)
        print(json.dumps(info), flush=True)
        return 0
    dest = out / "backend_choice"
    dest.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "bench.backend_choice", "--out", str(dest)]
    if dry_run:   # it needs a GPU: the dry run checks only that it imports and parses
        cmd = [sys.executable, "-m", "bench.backend_choice", "--help"]
    log_path = out / "logs" / "backend_choice_run.log"
    with open(log_path, "w") as log:
        rc, secs = _run_logged(cmd, dict(os.environ), log, timeout=max(1.0, time_left() - 2))
    lines = log_path.read_text(errors="replace").splitlines()
    info.update(status="ok" if rc == 0 else ("timeout" if rc == "timeout" else "error"), rc=rc,
                seconds=round(secs, 1), note=(lines[-1][:300] if lines else ""), output_tail=lines[-20:])
    write_json(out / "backend_choice.json", info)
    print("\n".join(lines[-20:]), flush=True)
    hook.after_result()
    return 0 if rc == 0 else 1
