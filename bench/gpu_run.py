"""python -m bench.gpu_run: everything GPU-only, proved and measured in one call of at most 10
minutes that starts cold.

    python3 -m bench.gpu_run                        # on a GPU machine (H100/H200): build, test, measure
    python3 -m bench.gpu_run --dry-run --out DIR    # the same code path on CPU at tiny sizes (CI)
    python3 -m bench.preflight                      # here: the dry run on the GPU machine's versions

Made for a bare, short-lived GPU machine without network: it needs only the working tree, the
machine's python3 (torch, triton, pytest) and the carried folder .whl/ (diffsort's wheel,
installed offline into .whl/site, and git_commit.txt: the commit, since .git does not travel),
both written here by `python -m bench.preflight --prepare`. The run is a sequence of *parts*,
each a subprocess with its own time cap, so a slow or crashing part (a hang, an illegal memory
access) cannot eat the others' time; the caps, the cold start and the report add up to the
10-minute call and are printed first, after the versions (python, torch, triton, numpy,
setuptools, pytest, CUDA toolkit, GPU, commit). Every part writes its results as it goes
(results.jsonl, tests.jsonl, *.json), so a part cut off at its cap still leaves what it
measured. At the end: plots, summary.md (the bench summary plus a GPU-run section),
readme_table.md; when $OUT is set, a copy of the main files and an archive of the run directory
(no file over 4 MiB in it, the archive under 16 MiB) in $OUT, refreshed after every part. The
run directory itself is never inside $OUT (at most 8 files come back from there).

Parts (the caps are in PARTS below): build (fastssl._C: the CPU-only and the CUDA build side by
side in build/gpu_run/, the CUDA one for this GPU's compute capability only; the CPU one is
used if the CUDA one fails; a prebuilt _C whose build info matches this torch is kept),
cuda_tests (pytest over tests/ops and tests/losses, the CUDA-parametrised cases: every GPU
backend against the reference, values and gradients), roofline (an 8192^3 bf16 matmul: the
device's bf16 peak for the TFLOP/s fractions, and a device copy), the headline benchmarks
(bench_contrastive, max_n, bench_sce_sphere, bench_sortnet, bench_swav: against eager PyTorch
and the upstream-style reference; torch.compile of them only with --with-compile, since its
compilations do not fit the first call), trainer (one ResNet-50 training step per method, each
method its share of the cap), backend_choice (python -m bench.backend_choice: cuda vs triton,
which `auto` should prefer; recorded as missing where that module is not in the tree), and
checkpoint (a fastssl ResNet-50 state dict loads into torchvision's resnet50). The static
compile check (python -m bench.static) is not part of it: it needs no GPU and runs here.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEADLINE_ENV = "FASTSSL_GPU_RUN_DEADLINE"   # wall-clock time (time.time()) a part must end by
COMMIT_ENV = "FASTSSL_GIT_COMMIT"            # the commit measured (bench/results.py reads it)
CARRIED = REPO / ".whl"                      # what travels beside the tree: wheels, git_commit.txt
TOTAL_BUDGET_S = 600.0                       # one device call: 10 minutes, the cold start inside
COLD_START_S = 180.0                         # machine start and tree transfer: 1 to 3 minutes
VERSIONS_S = 15.0                            # the versions probe (python3 importing torch, triton)
REPORT_S = 15.0                              # plots, summary, copies to $OUT
MARGIN_S = 10.0                              # unplanned: part starts, copies between parts
ARCHIVE_FILE_MAX = 4 << 20                   # files larger than this stay out of the archive
ARCHIVE_MAX = 15 << 20                       # the device hands back files up to 16 MiB
MAX_N_BUDGET_GIB = 16.0                      # the fixed memory budget of the largest-N search (GPU)
MAX_N_BUDGET_DRY_MIB = 4.0                   # ... and of the dry run (CPU, tiny sizes)


@dataclass(frozen=True)
class Part:
    name: str
    cap_s: float       # GPU run
    dry_cap_s: float   # dry run: a generous bound for tiny sizes on a loaded 2-core machine
    what: str


# Caps (s) from the costs measured or estimated for an H100 with 16 cores (README, "Running the
# GPU suite"): build = the slower of the two side-by-side builds (4 CPU sources at ~25 s each
# with -g0, in parallel; 2 .cu files for one architecture); the benchmarks at their case
# counts; torch.compile out (--with-compile adds its cases to the caps below).
PARTS = (
    Part("build", 75, 60, "fastssl._C: CPU-only and CUDA builds side by side (sm of this GPU), CUDA preferred"),
    Part("cuda_tests", 90, 60, "pytest tests/ops tests/losses: CUDA cases, every GPU backend vs reference"),
    Part("roofline", 10, 60, "8192^3 bf16 matmul (device peak) and a device-to-device copy"),
    Part("bench_contrastive", 30, 60, "nt_xent, symmetric info_nce 2x32768 D=128 bf16 fwd+bwd"),
    Part("max_n", 25, 60, f"largest nt_xent N in {MAX_N_BUDGET_GIB:.0f} GiB: fastssl and eager"),
    Part("bench_sce_sphere", 20, 60, "sce B=1024 K=65536; sfrik_mmd B=2048 D=8192"),
    Part("bench_sortnet", 25, 60, "soft_sort B=1024 n=16/32/1024 (vs diffsort); groco B=4096"),
    Part("bench_swav", 20, 60, "sinkhorn B=4096 K=3000; swav loss 2+6 crops"),
    Part("trainer", 50, 60, "ResNet-50 B=256 bf16 channels-last step, 8 methods, a few timed steps each"),
    Part("backend_choice", 25, 60, "python -m bench.backend_choice: cuda vs triton, what `auto` prefers"),
    Part("checkpoint", 10, 60, "fastssl ResNet-50 state dict loads into torchvision resnet50"),
)
PART_NAMES = tuple(p.name for p in PARTS)
COMPILE_EXTRA_S = {"bench_contrastive": 60, "bench_sce_sphere": 60, "bench_swav": 45}   # --with-compile


def budget_table(caps: dict[str, float]) -> list[tuple[str, float, str]]:
    rows = [("cold start", COLD_START_S, "machine start, tree transfer (allowance, not enforced here)"),
            ("versions", VERSIONS_S, "python3, torch, triton, numpy, setuptools, pytest, CUDA, GPU, commit")]
    rows += [(p.name, caps[p.name], p.what) for p in PARTS]
    rows.append(("report", REPORT_S, "plots, summary.md, copies to $OUT"))
    rows.append(("margin", MARGIN_S, "parts' process starts, copies to $OUT between parts"))
    return rows


# ----------------------------------------------------------------------------------------------
# the parent: runs each part under its cap


class Log:
    """Prints to stdout and to DIR/gpu_run.log."""

    def __init__(self, path: Path):
        self.f = open(path, "a")

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        self.f.write(msg + "\n")
        self.f.flush()


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        name = out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 else ""
        if name:
            return name
    except Exception:  # no nvidia-smi: ask torch in a child (the parent keeps no CUDA context)
        pass
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"],
                             capture_output=True, text=True, timeout=120)
        return out.stdout.strip() or None
    except Exception:
        return None


def default_out(dry_run: bool) -> Path:
    from bench.results import cpu_model_name, slug
    if dry_run:
        return Path(tempfile.gettempdir()) / "fastssl-gpu-run-dry" / ("cpu-" + slug(cpu_model_name()))
    return REPO / "bench" / "results" / slug(gpu_name() or "unknown-gpu")


def git_commit() -> str:
    """The commit measured: $FASTSSL_GIT_COMMIT, else .whl/git_commit.txt (written here by
    `python -m bench.preflight --prepare`: .git does not travel to the GPU machine), else git."""
    value = os.environ.get(COMMIT_ENV, "").strip()
    if value:
        return value
    try:
        value = (CARRIED / "git_commit.txt").read_text().split()[0]
        if value:
            return value
    except (OSError, IndexError):
        pass
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "fastssl",
                                "csrc", "kernels", "bench", ":(exclude)bench/results"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


_VERSIONS_CODE = r"""
import importlib, importlib.metadata as md, json, os, platform, shutil, subprocess, sys, runpy
out = {"python": platform.python_version(), "executable": sys.executable}
def ver(name):
    try:
        return md.version(name)
    except Exception:
        return None
for name in ("torch", "triton", "numpy", "setuptools", "pytest", "pytest-xdist", "pytest-timeout",
             "torchvision", "matplotlib", "diffsort", "ninja", "pip"):
    out[name] = ver(name)
try:
    import torch
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        out["gpu"] = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        out["capability"] = major * 10 + minor
except Exception as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]
flags = runpy.run_path(os.path.join(sys.argv[1], "csrc", "build_flags.py"))
out["cuda_home"], out["cuda_home_note"] = flags["find_cuda_home"]()
nvcc = os.path.join(out["cuda_home"], "bin", "nvcc") if out["cuda_home"] else None
if nvcc:
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
        out["nvcc"] = (text.strip().splitlines() or [""])[-1]
    except Exception as exc:
        out["nvcc"] = f"{type(exc).__name__}: {exc}"
out["ninja_on_path"] = shutil.which("ninja")
out["cpu_count"] = os.cpu_count()
print(json.dumps(out))
"""


def versions(env: dict, timeout: float) -> dict:
    """The machine's versions, from a child (the parent never imports torch: no CUDA context)."""
    try:
        proc = subprocess.run([sys.executable, "-c", _VERSIONS_CODE, str(REPO)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001 - the run goes on; the parts report their own errors
        info = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    info["git_commit"] = git_commit()
    return info


def child_env(dry_run: bool, deadline: float, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.pop("FASTSSL_BACKEND", None)
    paths = [str(REPO)]
    site = CARRIED / "site"
    if site.is_dir():
        paths.append(str(site))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # No network on the GPU machine: pip must not try (an index lookup waits on its timeout).
    env.setdefault("PIP_NO_INDEX", "1")
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    if dry_run:
        env.setdefault("TRITON_INTERPRET", "1")
    env[DEADLINE_ENV] = f"{deadline:.3f}"
    env.update(extra or {})
    return env


def part_command(name: str, out: Path, dry_run: bool, stall: str | None) -> tuple[list[str], dict]:
    """(argv, extra environment) of a part's subprocess."""
    if name == "cuda_tests":
        return tests_command(out, dry_run)
    cmd = [sys.executable, "-m", "bench.gpu_run", "--part", name, "--out", str(out)]
    if dry_run:
        cmd.append("--dry-run")
    if stall:
        cmd += ["--stall", stall]
    return cmd, {}


def tests_command(out: Path, dry_run: bool) -> tuple[list[str], dict]:
    import importlib.util
    # --continue-on-collection-errors: a file that cannot import (a module the machine lacks)
    # is recorded (bench/gpu_pytest.py) and the other files still run.
    cmd = [sys.executable, "-m", "pytest", "-p", "bench.gpu_pytest", "-p", "no:cacheprovider", "-q", "-rfEs",
           "--continue-on-collection-errors", "--junitxml", str(out / "tests_junit.xml")]
    if dry_run:
        # A small slice on CPU (Triton through its interpreter): the selection, the per-test log
        # and the cap are what is tested.
        files = ["tests/ops/test_swav_ops.py"]
        env = {"FASTSSL_TESTS_DEVICE": "cpu", "FASTSSL_TESTS_BACKENDS": "reference,torch,triton"}
    else:
        files = ["tests/ops", "tests/losses"]
        env = {"FASTSSL_TESTS_DEVICE": "cuda"}
        if importlib.util.find_spec("xdist") is not None:
            # Triton compiles per process: workers share the GPU and the compile time.
            cmd += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "60"]
    env["FASTSSL_TESTS_LOG"] = str(out / "tests.jsonl")
    return cmd + files, env


_RUNNING: list = []   # the part in progress: a parent stopped by a signal takes it along


def _on_signal(signum, frame):
    # A part runs in its own session (so its group can be killed at the cap); without this a
    # parent killed from outside (the device call's time limit) would leave it running.
    for proc in list(_RUNNING):
        _kill_group(proc)
    raise SystemExit(128 + signum)


def run_part(name: str, cmd: list[str], env: dict, cap_s: float, log_path: Path) -> dict:
    """Run one part in its own process group; kill the group at the cap. Returns its record."""
    t0 = time.monotonic()
    status, rc = "ok", None
    with open(log_path, "w") as logf:
        try:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as exc:
            return {"part": name, "status": "error", "rc": None, "seconds": 0.0, "cap_s": cap_s,
                    "note": f"could not start: {exc}"}
        _RUNNING.append(proc)
        try:
            rc = proc.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            status = "timeout"
            _kill_group(proc)
            rc = proc.returncode
        finally:
            _RUNNING.remove(proc)
    seconds = time.monotonic() - t0
    if status == "ok" and rc != 0:
        status = "failures" if name == "cuda_tests" and rc == 1 else "error"
    note = f"cut off at its cap of {cap_s:.0f} s" if status == "timeout" else ""
    if status == "error":
        note = f"exit code {rc}"
    return {"part": name, "status": status, "rc": rc, "seconds": round(seconds, 2), "cap_s": cap_s,
            "note": note, "log": str(log_path.relative_to(log_path.parent.parent))}


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def part_note(name: str, out: Path) -> str:
    """What a part's own files say in one line (the build's fallback, the test counts)."""
    try:
        if name == "build":
            info = json.loads((out / "build.json").read_text())
            ext = info.get("extension", {})
            return (f"{info.get('status')}: {info.get('note', '')}; _C cpp={ext.get('cpp')} "
                    f"cuda={ext.get('cuda')}; {info.get('wheels', '')}")
        if name == "cuda_tests":
            from bench.gpu_report import tests_summary
            t = tests_summary(out)
            return (f"{t['passed']} passed, {t['failed']} failed, {t['error']} errors, {t['skipped']} skipped"
                    + (f", {t['collect_errors']} files not collected" if t["collect_errors"] else ""))
        if name == "backend_choice":
            info = json.loads((out / "backend_choice.json").read_text())
            return f"{info.get('status')}: {info.get('note', '')}"[:300]
    except (OSError, ValueError):
        return "no result file"
    return ""


def tail(path: Path, n: int = 8) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def parse_caps(items: list[str] | None, dry_run: bool) -> dict[str, float]:
    caps = {p.name: (p.dry_cap_s if dry_run else p.cap_s) for p in PARTS}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or name not in caps:
            raise SystemExit(f"--cap: expected PART=SECONDS with PART one of {list(caps)}, got {item!r}")
        try:
            caps[name] = float(value)
        except ValueError:
            raise SystemExit(f"--cap: {item!r}: SECONDS must be a number") from None
        if caps[name] <= 0:
            raise SystemExit(f"--cap: {item!r}: SECONDS must be positive")
    return caps


def outside_out_dir(out: Path) -> tuple[Path, str]:
    """The run directory, moved out of $OUT when it would be inside it: $OUT receives the
    copies (publish), and a run directory there would copy onto itself and hand back more files
    than the device returns (8)."""
    dest = os.environ.get("OUT")
    if not dest:
        return out, ""
    dest_p = Path(dest).resolve()
    if out == dest_p or dest_p in out.parents:
        moved = Path(tempfile.gettempdir()) / "fastssl-gpu-run" / (out.name if out != dest_p else "run")
        return moved, (f"--out {out} is inside $OUT ({dest_p}): the run writes to {moved} and copies "
                       f"its main files and an archive to $OUT")
    return out, ""


def run_all(args) -> int:
    t_start = time.monotonic()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    out = (args.out or default_out(args.dry_run)).resolve()
    out, moved_note = outside_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    for stale in ("results.jsonl", "parts.jsonl", "tests.jsonl", "gpu_run.log", "tests_junit.xml", "env.json",
                  "build.json", "roofline.json", "checkpoint.json", "max_n.json", "backend_choice.json"):
        (out / stale).unlink(missing_ok=True)
    log = Log(out / "gpu_run.log")
    caps = parse_caps(args.cap, args.dry_run)
    if args.with_compile and not args.dry_run:
        for name, extra in COMPILE_EXTRA_S.items():
            caps[name] += extra
    selected = [p.name for p in PARTS if (not args.only or p.name in args.only)
                and p.name not in (args.skip or ())]

    log(f"fastssl GPU run{' (DRY RUN: CPU, tiny sizes)' if args.dry_run else ''}: out {out}")
    if moved_note:
        log(moved_note)
    # What travelled in .whl/ (diffsort) installed offline first, so the versions include it.
    from bench.gpu_parts import install_carried_wheels
    with open(out / "logs" / "wheels.log", "w") as wlog:
        wheels = install_carried_wheels(wlog)
    # The versions first: what a cut-off or failed run ran on is known from its first lines.
    env0 = child_env(args.dry_run, time.time() + 4 * VERSIONS_S)
    info = versions(env0, timeout=4 * VERSIONS_S)
    info["carried_wheels"] = wheels
    info.update(dry_run=args.dry_run, with_compile=bool(args.with_compile), argv=sys.argv[1:])
    (out / "env.json").write_text(json.dumps(info, indent=1) + "\n")
    log("versions: " + ", ".join(f"{k} {info.get(k)}" for k in (
        "python", "torch", "torch_cuda", "triton", "numpy", "setuptools", "pytest", "pytest-xdist",
        "torchvision", "diffsort", "gpu", "capability", "nvcc", "git_commit")))
    log(f"  python3: {info.get('executable')}; CUDA toolkit: {info.get('cuda_home_note')}; .whl/: {wheels}")
    if info.get("error") or info.get("torch_error"):
        log(f"  versions probe: {info.get('error') or info.get('torch_error')}")
    extra_env = {COMMIT_ENV: info["git_commit"]}
    if info.get("capability") and not os.environ.get("FASTSSL_CUDA_ARCHS"):
        extra_env["FASTSSL_CUDA_ARCHS"] = str(info["capability"])   # nvcc for this GPU only
    if args.with_compile:
        extra_env["FASTSSL_GPU_RUN_COMPILE"] = "1"
    if args.build and args.dry_run:
        extra_env["FASTSSL_GPU_RUN_DRY_BUILD"] = "1"

    log("time budget (s):")
    total = 0.0
    for name, secs, what in budget_table(caps):
        total += secs
        log(f"  {name:<18} {secs:6.0f}  {what}")
    if args.dry_run:
        gpu_total = sum(secs for _, secs, _ in budget_table(parse_caps(None, dry_run=False)))
        log(f"  {'total':<18} {total:6.0f}  (dry-run caps; the GPU run's caps total {gpu_total:.0f}, "
            f"limit {TOTAL_BUDGET_S:.0f})")
    else:
        log(f"  {'total':<18} {total:6.0f}  (limit {TOTAL_BUDGET_S:.0f}: one device call, cold start included)")
    if not args.dry_run and total > TOTAL_BUDGET_S:
        log(f"WARNING: the caps add up to {total:.0f} s, over the {TOTAL_BUDGET_S:.0f} s of one call")

    started = t_start
    records = []
    with open(out / "parts.jsonl", "a") as parts_file:
        def record(rec):
            records.append(rec)
            parts_file.write(json.dumps(rec) + "\n")
            parts_file.flush()

        for name in selected:
            cap = caps[name]
            cmd, part_env = part_command(name, out, args.dry_run, args.stall)
            env = child_env(args.dry_run, time.time() + cap, {**extra_env, **part_env})
            log(f"[{time.monotonic() - started:6.1f} s] {name}: start (cap {cap:.0f} s)")
            rec = run_part(name, cmd, env, cap, out / "logs" / f"{name}.log")
            rec["note"] = "; ".join(x for x in (rec["note"], part_note(name, out)) if x)
            if name == "backend_choice" and rec["status"] == "ok" and "missing" in rec["note"]:
                rec["status"] = "missing"
            record(rec)
            log(f"[{time.monotonic() - started:6.1f} s] {name}: {rec['status']} in {rec['seconds']:.1f} s"
                + (f" ({rec['note']})" if rec["note"] else ""))
            if rec["status"] not in ("ok", "missing"):
                for line in tail(out / "logs" / f"{name}.log"):
                    log(f"    | {line[:200]}")
            publish(out, log, quiet=True)

    try:
        from bench import gpu_report
        gpu_report.write_reports(out, records, log, update_readme=args.update_readme)
    except Exception:  # noqa: BLE001 - the measured files stand without the report
        import traceback
        log("the report failed (the result files are complete):\n" + traceback.format_exc())
        records.append({"part": "report", "status": "error"})
    publish(out, log, quiet=False)
    log(f"total {time.monotonic() - started:.1f} s (+ cold start); results in {out}")
    bad = [r["part"] for r in records if r["status"] not in ("ok", "skipped", "missing")]
    return 0 if not bad else 1


PUBLISHED = ("summary.md", "results.jsonl", "parts.jsonl", "tests.jsonl", "gpu_run.log", "env.json")


def _archive(out: Path, path: Path, max_file: int) -> list[str]:
    """Write the run directory to path (tar.gz), leaving out files over max_file bytes; returns
    what was left out."""
    left_out = []

    def keep(info: tarfile.TarInfo):
        if info.isfile() and info.size > max_file:
            left_out.append(f"{info.name} ({info.size / 2**20:.1f} MiB)")
            return None
        return info

    with tarfile.open(path, "w:gz") as tar:
        tar.add(out, arcname=out.name, filter=keep)
    return left_out


def publish(out: Path, log, *, quiet: bool) -> None:
    """Copy the main files and an archive of everything to $OUT (at most 8 files, flat, plain
    names, each under 16 MiB: what the device machine hands back)."""
    dest = os.environ.get("OUT")
    if not dest:
        return
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        if dest.resolve() == out.resolve():
            return
        for name in PUBLISHED:
            src = out / name
            if src.is_file() and src.stat().st_size <= ARCHIVE_MAX:
                shutil.copyfile(src, dest / name)
        archive = dest / ("gpu_run_" + re.sub(r"[^A-Za-z0-9._-]+", "-", out.name) + ".tar.gz")
        tmp = Path(tempfile.gettempdir()) / (archive.name + ".part")
        left_out = _archive(out, tmp, ARCHIVE_FILE_MAX)
        if tmp.stat().st_size > ARCHIVE_MAX:   # still too large: the small files only
            left_out = _archive(out, tmp, 256 << 10)
        shutil.move(str(tmp), archive)
        if not quiet:
            log(f"copied {', '.join(n for n in PUBLISHED if (out / n).is_file())} and {archive.name} "
                f"({archive.stat().st_size / 2**20:.1f} MiB) to {dest}"
                + (f"; left out of the archive: {', '.join(left_out)}" if left_out else ""))
    except OSError as exc:
        log(f"could not copy to $OUT ({dest}): {exc}")


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (default bench/results/<gpu name>/; dry run: a temporary one); "
                        "never inside $OUT (moved out of it if given so)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no CUDA build: tests the run itself")
    p.add_argument("--build", action="store_true",
                   help="dry run: also run the build part (the CPU-only build, in build/gpu_run/cpu, installed into fastssl/)")
    p.add_argument("--with-compile", action="store_true",
                   help=f"also measure torch.compile baselines (adds {sum(COMPILE_EXTRA_S.values())} s to the caps: "
                        "not in the first call)")
    p.add_argument("--cap", action="append", metavar="PART=SECONDS", help="override a part's time cap")
    p.add_argument("--only", action="append", choices=PART_NAMES, help="run only these parts")
    p.add_argument("--skip", action="append", choices=PART_NAMES, help="skip these parts")
    p.add_argument("--update-readme", action="store_true",
                   help="also rewrite README.md's benchmark block from bench/results/*/")
    p.add_argument("--part", choices=PART_NAMES, help=argparse.SUPPRESS)       # run one part (child)
    p.add_argument("--stall", default=None, help=argparse.SUPPRESS)            # test hook: hang a part
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.part:
        from bench import gpu_parts
        return gpu_parts.run(args.part, args.out, dry_run=args.dry_run, stall=args.stall)
    if not args.dry_run:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True)
        if probe.stdout.strip() != "True":
            print("python -m bench.gpu_run: no CUDA device is visible to torch "
                  f"({(probe.stderr.strip().splitlines() or [''])[-1]}); use --dry-run to test on CPU",
                  file=sys.stderr)
            return 2
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
