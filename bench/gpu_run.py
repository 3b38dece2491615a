"""python -m bench.gpu_run: everything GPU-only, proved and measured in one call of at most 10
minutes that starts cold.

    python3 -m bench.gpu_run                      # on a GPU machine: build, test, measure
    python3 -m bench.gpu_run --dry-run --out DIR  # the same code path on CPU at tiny sizes (CI)

For a bare GPU machine without network: the tree, its python3 (torch, triton, pytest) and the
carried .whl/ (`python -m bench.preflight --prepare`). Each part (common.PARTS, gpu_parts.py) is
a subprocess in its own process group under its own cap, so a hang or crash costs only its own
time; every part writes as it goes, and the report (gpu_report.py) is a subprocess too: this
parent never imports torch. With $OUT set, the main files and an archive go there after each part.
"""
from __future__ import annotations

import argparse
import importlib.util
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
from pathlib import Path

from .common import (CARRIED, COLD_START_S, COMMIT_ENV, COMPILE_EXTRA_S, DEADLINE_ENV, MARGIN_S,
                     PART_NAMES, PARTS, PKG, REPO, REPORT_S, TOTAL_BUDGET_S, VERSIONS_S, Log,
                     cpu_model_name, git_commit, load_json, run_capped, slug, stop_running,
                     tests_summary)

ARCHIVE_FILE_MAX = 4 << 20                   # files larger than this stay out of the archive
ARCHIVE_MAX = 15 << 20                       # the device hands back files up to 16 MiB
PUBLISHED = ("summary.md", "results.jsonl", "parts.jsonl", "tests.jsonl", "gpu_run.log",
             "env.json")
REPORT_CAP_S = 300.0   # a hung report is cut off; its budget line is REPORT_S
VERSION_KEYS = ("python", "torch", "torch_cuda", "triton", "numpy", "setuptools", "pytest",
                "pytest-xdist", "torchvision", "diffsort", "gpu", "capability", "nvcc",
                "git_commit")


def budget_table(caps: dict[str, float]) -> list[tuple[str, float, str]]:
    return ([("cold start", COLD_START_S, "machine start, tree transfer (allowance, not "
              "enforced here)"), ("versions", VERSIONS_S, "python3, torch, triton, numpy, "
                                  "setuptools, pytest, CUDA, GPU, commit")]
            + [(p.name, caps[p.name], p.what) for p in PARTS]
            + [("report", REPORT_S, "plots, summary.md, copies to $OUT"),
               ("margin", MARGIN_S, "parts' process starts, copies to $OUT between parts")])


def parse_caps(items: list[str] | None, dry_run: bool) -> dict[str, float]:
    caps = {p.name: (p.dry_cap_s if dry_run else p.cap_s) for p in PARTS}
    for item in items or ():
        name, _, value = item.partition("=")
        seconds = float(value) if re.fullmatch(r"\d+(\.\d*)?", value) else 0.0
        if name not in caps or seconds <= 0:
            raise SystemExit(f"--cap: expected PART=SECONDS (a positive number) with PART one of "
                             f"{list(caps)}, got {item!r}")
        caps[name] = seconds
    return caps


_VERSIONS_CODE = r"""
import importlib.metadata as md, json, os, platform, shutil, subprocess, sys, runpy
out = {"python": platform.python_version(), "executable": sys.executable,
       "ninja_on_path": shutil.which("ninja"), "cpu_count": os.cpu_count()}
for name in ("torch", "triton", "numpy", "setuptools", "pytest", "pytest-xdist", "pytest-timeout",
             "torchvision", "matplotlib", "diffsort", "ninja", "pip"):
    try:
        out[name] = md.version(name)
    except Exception:
        out[name] = None
try:
    import torch
    out["torch_cuda"], out["cuda_available"] = torch.version.cuda, torch.cuda.is_available()
    if out["cuda_available"]:
        out["gpu"], cap = torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
        out["capability"] = cap[0] * 10 + cap[1]
except Exception as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]
flags = runpy.run_path(os.path.join(sys.argv[1], "csrc", "build_flags.py"))
out["cuda_home"], out["cuda_home_note"] = flags["find_cuda_home"]()
try:
    text = subprocess.run([os.path.join(out["cuda_home"], "bin", "nvcc"), "--version"],
                          capture_output=True, text=True, timeout=20).stdout
    out["nvcc"] = (text.strip().splitlines() or [""])[-1]
except Exception as exc:
    out["nvcc"] = f"{type(exc).__name__}: {exc}" if out["cuda_home"] else None
print(json.dumps(out))
"""


def versions(env: dict, timeout: float) -> dict:
    """The machine's versions, from a child (the parent never imports torch)."""
    try:
        proc = subprocess.run([sys.executable, "-c", _VERSIONS_CODE, str(REPO)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=timeout)
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001 - the run goes on; the parts report their own errors
        info = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return dict(info, git_commit=git_commit())


def install_carried_wheels(log) -> str:
    """The wheels carried in .whl/ (diffsort), installed offline into .whl/site (on the
    children's PYTHONPATH, child_env)."""
    wheels = sorted(CARRIED.glob("*.whl"))
    if importlib.util.find_spec("diffsort") is not None:
        return "diffsort importable"
    if (CARRIED / "site" / "diffsort").is_dir():
        return "diffsort in .whl/site (installed by an earlier run)"
    if not wheels:
        return "diffsort not importable and no wheel in .whl/: the diffsort baseline is skipped"
    rc, _ = run_capped([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-compile", "--no-cache-dir", "--upgrade", "--target",
                        str(CARRIED / "site"), *map(str, wheels)], log, 60.0)
    names = ", ".join(w.name for w in wheels)
    return (f"installed {names} into .whl/site" if rc == 0
            else f"pip install of {names} failed ({rc})")


def child_env(dry_run: bool, deadline: float, extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.pop("FASTSSL_BACKEND", None)
    paths = [str(REPO)] + [str(CARRIED / "site")] * (CARRIED / "site").is_dir()
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")] * bool(
        env.get("PYTHONPATH")))   # the GPU machine sets none
    # No network on the GPU machine: pip must not try (an index lookup waits on its timeout).
    env.setdefault("PIP_NO_INDEX", "1")
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    if dry_run:
        env.setdefault("TRITON_INTERPRET", "1")
    return {**env, DEADLINE_ENV: f"{deadline:.3f}", **(extra or {})}


def part_command(name: str, out: Path, dry_run: bool, stall: str | None) -> tuple[list, dict]:
    """(argv, extra environment) of a part's subprocess."""
    if name != "cuda_tests":
        return ([sys.executable, "-m", f"{PKG}.gpu_parts", "--part", name, "--out", str(out)]
                + ["--dry-run"] * dry_run + ["--stall", stall] * bool(stall)), {}
    # --continue-on-collection-errors: a file that cannot import (a module the machine lacks)
    # is recorded (gpu_pytest.py) and the other files still run.
    cmd = [sys.executable, "-m", "pytest", "-p", f"{PKG}.gpu_pytest", "-p", "no:cacheprovider",
           "-q", "-rfEs", "--continue-on-collection-errors", "--junitxml",
           str(out / "tests_junit.xml")]
    if dry_run:   # a small slice on CPU (Triton interpreted): the selection, the log, the cap
        files = ["tests/ops/test_swav_ops.py"]
        env = {"FASTSSL_TESTS_DEVICE": "cpu", "FASTSSL_TESTS_BACKENDS": "reference,torch,triton"}
    else:
        files, env = ["tests/ops", "tests/losses"], {"FASTSSL_TESTS_DEVICE": "cuda"}
        if importlib.util.find_spec("xdist") is not None:
            # Triton compiles per process: workers share the GPU and the compile time.
            cmd += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "60"]
    return cmd + files, dict(env, FASTSSL_TESTS_LOG=str(out / "tests.jsonl"))


def run_part(name: str, cmd: list[str], env: dict, cap_s: float, out: Path) -> dict:
    """Run one part under its cap; its record for parts.jsonl."""
    log_path = out / "logs" / f"{name}.log"
    with open(log_path, "w") as logf:
        try:
            rc, seconds = run_capped(cmd, logf, cap_s, env=env)
        except OSError as exc:
            rc, seconds = f"could not start: {exc}", 0.0
    status = ("timeout" if rc == "timeout" else "ok" if rc == 0 else "failures"
              if name == "cuda_tests" and rc == 1 else "error")
    note = {"timeout": f"cut off at its cap of {cap_s:.0f} s", "error": f"exit code {rc}"}
    # What a part's own files say (the build's fallback, the test counts), after the status.
    if name == "cuda_tests":
        t = tests_summary(out)
        own = (f"{t['passed']} passed, {t['failed']} failed, {t['error']} errors, "
               f"{t['skipped']} skipped" + (f", {t['collect_errors']} files not collected"
                                            if t["collect_errors"] else ""))
    elif name in ("build", "backend_choice", "dino"):
        info = load_json(out / f"{name}.json")
        ext = (info or {}).get("extension", {})
        own = "no result file" if info is None else (
            f"{info.get('status')}: {info.get('note', '')}"[:300] + (
                f"; _C cpp={ext.get('cpp')} cuda={ext.get('cuda')}; {info.get('wheels', '')}"
                if name == "build" else ""))
    else:
        own = ""
    if name == "backend_choice" and status == "ok" and "missing" in own:
        status = "missing"
    return {"part": name, "status": status, "rc": rc if isinstance(rc, int) else None,
            "seconds": round(seconds, 2), "cap_s": cap_s,
            "note": "; ".join(x for x in (note.get(status, ""), own) if x),
            "log": f"logs/{name}.log"}


def outside_out_dir(out: Path) -> tuple[Path, str]:
    """The run directory, moved out of $OUT when it would be inside it (it would copy onto
    itself and hand back too many files)."""
    dest = Path(os.environ["OUT"]).resolve() if os.environ.get("OUT") else None
    if dest is None or (out != dest and dest not in out.parents):
        return out, ""
    moved = Path(tempfile.gettempdir()) / "fastssl-gpu-run" / (out.name if out != dest else "run")
    return moved, (f"--out {out} is inside $OUT ({dest}): the run writes to {moved} and copies "
                   "its main files and an archive to $OUT")


def run_all(args) -> int:
    started = time.monotonic()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop_running)
    out = args.out or (Path(tempfile.gettempdir()) / "fastssl-gpu-run-dry"
                       / ("cpu-" + slug(cpu_model_name())) if args.dry_run
                       else REPO / "bench" / "results" / slug(gpu_name() or "unknown-gpu"))
    out, moved_note = outside_out_dir(out.resolve())
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for stale in (*PUBLISHED, "tests_junit.xml", "build.json", "roofline.json", "checkpoint.json",
                  "max_n.json", "backend_choice.json", "dino.json", "dino_results.json"):
        (out / stale).unlink(missing_ok=True)
    log = Log(out / "gpu_run.log")
    caps = parse_caps(args.cap, args.dry_run)
    for name, extra in COMPILE_EXTRA_S.items() if args.with_compile and not args.dry_run else ():
        caps[name] += extra
    log(f"fastssl GPU run{' (DRY RUN: CPU, tiny sizes)' if args.dry_run else ''}: out {out}")
    if moved_note:
        log(moved_note)
    # The carried wheels first, so the versions include them; the versions before anything:
    # what a cut-off or failed run ran on is known from its first lines.
    with open(out / "logs" / "wheels.log", "w") as wlog:
        wheels = install_carried_wheels(wlog)
    info = versions(child_env(args.dry_run, time.time() + 4 * VERSIONS_S), 4 * VERSIONS_S)
    info.update(carried_wheels=wheels, dry_run=args.dry_run, with_compile=bool(args.with_compile),
                argv=sys.argv[1:])
    (out / "env.json").write_text(json.dumps(info, indent=1) + "\n")
    log("versions: " + ", ".join(f"{k} {info.get(k)}" for k in VERSION_KEYS))
    log(f"  python3: {info.get('executable')}; CUDA toolkit: {info.get('cuda_home_note')}; "
        f".whl/: {wheels}")
    if info.get("error") or info.get("torch_error"):
        log(f"  versions probe: {info.get('error') or info.get('torch_error')}")
    extra_env = {COMMIT_ENV: info["git_commit"]}
    if info.get("capability") and not os.environ.get("FASTSSL_CUDA_ARCHS"):
        extra_env["FASTSSL_CUDA_ARCHS"] = str(info["capability"])   # nvcc for this GPU only
    for var, on in (("FASTSSL_GPU_RUN_COMPILE", args.with_compile),
                    ("FASTSSL_GPU_RUN_DRY_BUILD", args.build and args.dry_run)):
        if on:
            extra_env[var] = "1"

    log("time budget (s):")
    rows = budget_table(caps)
    for name, secs, what in rows:
        log(f"  {name:<18} {secs:6.0f}  {what}")
    total = sum(secs for _, secs, _ in rows)
    gpu_total = sum(secs for _, secs, _ in budget_table(parse_caps(None, dry_run=False)))
    log(f"  {'total':<18} {total:6.0f}  " + (
        f"(dry-run caps; the GPU run's caps total {gpu_total:.0f}, limit {TOTAL_BUDGET_S:.0f})"
        if args.dry_run else f"(limit {TOTAL_BUDGET_S:.0f}: one device call, cold start "
        "included)"))
    if total > TOTAL_BUDGET_S and not args.dry_run:
        log(f"WARNING: the caps add up to {total:.0f} s, over the {TOTAL_BUDGET_S:.0f} s of one "
            "call")

    records = []
    for name in [n for n in PART_NAMES if (not args.only or n in args.only)
                 and n not in (args.skip or ())]:
        cmd, part_env = part_command(name, out, args.dry_run, args.stall)
        env = child_env(args.dry_run, time.time() + caps[name], {**extra_env, **part_env})
        log(f"[{time.monotonic() - started:6.1f} s] {name}: start (cap {caps[name]:.0f} s)")
        rec = run_part(name, cmd, env, caps[name], out)
        records.append(rec)
        with open(out / "parts.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        log(f"[{time.monotonic() - started:6.1f} s] {name}: {rec['status']} in "
            f"{rec['seconds']:.1f} s" + (f" ({rec['note']})" if rec["note"] else ""))
        if rec["status"] not in ("ok", "missing"):
            lines = (out / rec["log"]).read_text(errors="replace").splitlines()[-8:]
            for line in lines:
                log(f"    | {line[:200]}")
        publish(out, log, quiet=True)

    # The report: a child as well (torch, matplotlib), its output shown here last.
    report_log = out / "logs" / "report.log"
    with open(report_log, "w") as f:
        rc, _ = run_capped([sys.executable, "-m", f"{PKG}.gpu_report", "--out", str(out)]
                           + ["--update-readme"] * bool(args.update_readme), f, REPORT_CAP_S,
                           env=child_env(args.dry_run, time.time() + REPORT_CAP_S))
    for line in report_log.read_text(errors="replace").splitlines()[1:]:
        log(line)
    if rc != 0:
        log(f"the report failed ({rc}; the result files are complete): {report_log}")
        records.append({"part": "report", "status": "error"})
    publish(out, log, quiet=False)
    log(f"total {time.monotonic() - started:.1f} s (+ cold start); results in {out}")
    return int(any(r["status"] not in ("ok", "skipped", "missing") for r in records))


def gpu_name() -> str | None:
    # nvidia-smi first, else torch in a child (the parent keeps no CUDA context)
    for cmd in (["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                [sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def publish(out: Path, log, *, quiet: bool) -> None:
    """Copy the main files and an archive of everything to $OUT (at most 8 flat files with
    plain names, each under 16 MiB: what the device machine hands back)."""
    if not os.environ.get("OUT"):
        return
    dest = Path(os.environ["OUT"])
    try:
        dest.mkdir(parents=True, exist_ok=True)
        if dest.resolve() == out.resolve():
            return
        for name in PUBLISHED:
            if (out / name).is_file() and (out / name).stat().st_size <= ARCHIVE_MAX:
                shutil.copyfile(out / name, dest / name)
        archive = dest / ("gpu_run_" + re.sub(r"[^A-Za-z0-9._-]+", "-", out.name) + ".tar.gz")
        tmp = Path(tempfile.gettempdir()) / (archive.name + ".part")
        for max_file in (ARCHIVE_FILE_MAX, 256 << 10):   # still too large: the small files only
            left_out = []

            def keep(info, max_file=max_file, left_out=left_out):
                if info.isfile() and info.size > max_file:
                    left_out.append(f"{info.name} ({info.size / 2**20:.1f} MiB)")
                    return None
                return info
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(out, arcname=out.name, filter=keep)
            if tmp.stat().st_size <= ARCHIVE_MAX:
                break
        shutil.move(str(tmp), archive)
        if not quiet:
            log(f"copied {', '.join(n for n in PUBLISHED if (out / n).is_file())} and "
                f"{archive.name} ({archive.stat().st_size / 2**20:.1f} MiB) to {dest}"
                + (f"; left out of the archive: {', '.join(left_out)}" if left_out else ""))
    except OSError as exc:
        log(f"could not copy to $OUT ({dest}): {exc}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_run",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<gpu>/; "
                   "dry run: a temporary one); never inside $OUT (moved out of it if given so)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny sizes, no CUDA build: tests the run itself")
    p.add_argument("--build", action="store_true", help="dry run: also run the build part (the "
                   "CPU-only build, in build/gpu_run/cpu, installed into fastssl/)")
    p.add_argument("--with-compile", action="store_true", help="also measure torch.compile "
                   f"baselines (adds {sum(COMPILE_EXTRA_S.values())} s to the caps)")
    p.add_argument("--cap", action="append", metavar="PART=SECONDS",
                   help="override a part's time cap")
    p.add_argument("--only", action="append", choices=PART_NAMES, help="run only these parts")
    p.add_argument("--skip", action="append", choices=PART_NAMES, help="skip these parts")
    p.add_argument("--update-readme", action="store_true",
                   help="also rewrite README.md's benchmark block from bench/results/*/")
    p.add_argument("--stall", help=argparse.SUPPRESS)   # test hook: hang a part
    args = p.parse_args(argv)
    if not args.dry_run:
        probe = subprocess.run([sys.executable, "-c", "import torch; "
                                "print(torch.cuda.is_available())"], capture_output=True, text=True)
        if probe.stdout.strip() != "True":
            print("python -m bench.gpu_run: no CUDA device is visible to torch "
                  f"({(probe.stderr.strip().splitlines() or [''])[-1]}); use --dry-run to test "
                  "on CPU", file=sys.stderr)
            return 2
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
