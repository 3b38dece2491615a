"""python -m bench.gpu_run: everything GPU-only, proved and measured in one command under 8 minutes.

    python -m bench.gpu_run --out DIR              # on a GPU machine (H100/H200): build, test, measure
    python -m bench.gpu_run --dry-run --out DIR    # the same code path on CPU at tiny sizes (CI)

Made for a bare, short-lived GPU machine without network: it needs only the working tree and the
machine's torch/triton/pytest (diffsort, if wanted, travels as a wheel in .whl/). The run is a
sequence of *parts*, each a subprocess with its own time cap, so a slow or crashing part (a
hang, an illegal memory access) cannot eat the others' time; the caps and the allowance for a
cold machine start add up to at most 8 minutes and are printed first. Every part writes its
results as it goes (results.jsonl, tests.jsonl, *.json), so a part cut off at its cap still
leaves what it measured. At the end: plots, summary.md (the bench summary plus a GPU-run
section), readme_table.md, and, when $OUT is set, a copy of the main files and an archive of the
whole directory in $OUT (refreshed after every part).

Parts (the caps are in PARTS below): build (fastssl._C with its CUDA part, CPU-only fallback),
cuda_tests (pytest over tests/ops and tests/losses, the CUDA-parametrised cases: every GPU
backend against the reference, values and gradients), roofline (an 8192^3 bf16 matmul: the
device's bf16 peak for the TFLOP/s fractions, and a device copy), the headline benchmarks
(bench_contrastive, max_n, bench_sce_sphere, bench_sortnet, bench_swav: against eager PyTorch,
torch.compile of it and the upstream-style reference), trainer (one ResNet-50 training step per
method), checkpoint (a fastssl ResNet-50 state dict loads into torchvision's resnet50), and,
with time left and only if bench/static.py exists, static (python -m bench.static).
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
TOTAL_BUDGET_S = 480.0                       # 8 minutes, everything included
COLD_START_S = 90.0                          # machine start and working-tree transfer (not ours)
REPORT_S = 10.0                              # plots, summary, copies to $OUT
STATIC_MAX_S = 60.0                          # the optional static part: leftover time, at most this
MAX_N_BUDGET_GIB = 16.0                      # the fixed memory budget of the largest-N search (GPU)
MAX_N_BUDGET_DRY_MIB = 4.0                   # ... and of the dry run (CPU, tiny sizes)


@dataclass(frozen=True)
class Part:
    name: str
    cap_s: float       # GPU run
    dry_cap_s: float   # dry run: a generous bound for tiny sizes on a loaded 2-core machine
    what: str


PARTS = (
    Part("build", 80, 60, "build fastssl._C with its CUDA part (FASTSSL_BUILD_CUDA=1), else CPU-only"),
    Part("cuda_tests", 70, 60, "pytest tests/ops tests/losses: CUDA cases, every GPU backend vs reference"),
    Part("roofline", 10, 60, "8192^3 bf16 matmul (device peak) and a device-to-device copy"),
    Part("bench_contrastive", 60, 60, "nt_xent, symmetric info_nce 2x32768 D=128 bf16 fwd+bwd"),
    Part("max_n", 25, 60, f"largest nt_xent N in {MAX_N_BUDGET_GIB:.0f} GiB: fastssl and eager"),
    Part("bench_sce_sphere", 25, 60, "sce B=1024 K=65536; sfrik_mmd B=2048 D=8192"),
    Part("bench_sortnet", 30, 60, "soft_sort B=1024 n=16/32/1024 (vs diffsort); groco B=4096"),
    Part("bench_swav", 25, 60, "sinkhorn B=4096 K=3000; swav loss 2+6 crops"),
    Part("trainer", 45, 60, "ResNet-50 B=256 bf16 channels-last step per method: images/s, loss share"),
    Part("checkpoint", 10, 60, "fastssl ResNet-50 state dict loads into torchvision resnet50"),
)
PART_NAMES = tuple(p.name for p in PARTS)
OPTIONAL_PARTS = ("static",)


def budget_table(caps: dict[str, float]) -> list[tuple[str, float, str]]:
    rows = [("cold start", COLD_START_S, "machine start, tree transfer (allowance, not enforced here)")]
    rows += [(p.name, caps[p.name], p.what) for p in PARTS]
    rows.append(("report", REPORT_S, "plots, summary.md, copies to $OUT"))
    rows.append(("static", 0.0, f"optional: only if bench/static.py exists, in leftover time (<= {STATIC_MAX_S:.0f} s)"))
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


def child_env(dry_run: bool, deadline: float) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.pop("FASTSSL_BACKEND", None)
    paths = [str(REPO)]
    site = REPO / ".whl" / "site"
    if site.is_dir():
        paths.append(str(site))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if dry_run:
        env.setdefault("TRITON_INTERPRET", "1")
    env[DEADLINE_ENV] = f"{deadline:.3f}"
    return env


def part_command(name: str, out: Path, dry_run: bool, stall: str | None) -> tuple[list[str], dict]:
    """(argv, extra environment) of a part's subprocess."""
    if name == "cuda_tests":
        return tests_command(out, dry_run)
    if name == "static":
        return [sys.executable, "-m", "bench.static"], {}
    cmd = [sys.executable, "-m", "bench.gpu_run", "--part", name, "--out", str(out)]
    if dry_run:
        cmd.append("--dry-run")
    if stall:
        cmd += ["--stall", stall]
    return cmd, {}


def tests_command(out: Path, dry_run: bool) -> tuple[list[str], dict]:
    import importlib.util
    cmd = [sys.executable, "-m", "pytest", "-p", "bench.gpu_pytest", "-p", "no:cacheprovider", "-q", "-rfE",
           "--junitxml", str(out / "tests_junit.xml")]
    if dry_run:
        # A small slice on CPU (Triton through its interpreter): the selection, the per-test log
        # and the cap are what is tested.
        files = ["tests/ops/test_swav_ops.py"]
        env = {"FASTSSL_TESTS_DEVICE": "cpu", "FASTSSL_TESTS_BACKENDS": "reference,torch,triton"}
    else:
        files = ["tests/ops", "tests/losses"]
        env = {"FASTSSL_TESTS_DEVICE": "cuda"}
        if importlib.util.find_spec("xdist") is not None:
            # Triton compiles per process: a few workers share the GPU and the compile time.
            cmd += ["-n", str(max(1, min(6, (os.cpu_count() or 2) // 2)))]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "120"]
    env["FASTSSL_TESTS_LOG"] = str(out / "tests.jsonl")
    return cmd + files, env


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
        try:
            rc = proc.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            status = "timeout"
            _kill_group(proc)
            rc = proc.returncode
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
            return f"{t['passed']} passed, {t['failed']} failed, {t['error']} errors, {t['skipped']} skipped"
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


def run_all(args) -> int:
    out = (args.out or default_out(args.dry_run)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    for stale in ("results.jsonl", "parts.jsonl", "tests.jsonl", "gpu_run.log", "tests_junit.xml",
                  "build.json", "roofline.json", "checkpoint.json", "max_n.json"):
        (out / stale).unlink(missing_ok=True)
    log = Log(out / "gpu_run.log")
    caps = parse_caps(args.cap, args.dry_run)
    selected = [p.name for p in PARTS if (not args.only or p.name in args.only)
                and p.name not in (args.skip or ())]

    log(f"fastssl GPU run{' (DRY RUN: CPU, tiny sizes)' if args.dry_run else ''}: out {out}")
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
        log(f"  {'total':<18} {total:6.0f}  (limit {TOTAL_BUDGET_S:.0f})")
    if not args.dry_run and total > TOTAL_BUDGET_S:
        log(f"WARNING: the caps add up to {total:.0f} s, over the {TOTAL_BUDGET_S:.0f} s budget")

    started = time.monotonic()
    records = []
    with open(out / "parts.jsonl", "a") as parts_file:
        def record(rec):
            records.append(rec)
            parts_file.write(json.dumps(rec) + "\n")
            parts_file.flush()

        for name in selected:
            cap = caps[name]
            cmd, extra_env = part_command(name, out, args.dry_run, args.stall)
            env = {**child_env(args.dry_run, time.time() + cap), **extra_env}
            log(f"[{time.monotonic() - started:6.1f} s] {name}: start (cap {cap:.0f} s)")
            rec = run_part(name, cmd, env, cap, out / "logs" / f"{name}.log")
            rec["note"] = "; ".join(x for x in (rec["note"], part_note(name, out)) if x)
            record(rec)
            log(f"[{time.monotonic() - started:6.1f} s] {name}: {rec['status']} in {rec['seconds']:.1f} s"
                + (f" ({rec['note']})" if rec["note"] else ""))
            if rec["status"] != "ok":
                for line in tail(out / "logs" / f"{name}.log"):
                    log(f"    | {line[:200]}")
            publish(out, log, quiet=True)

        # Optional: the static checks, only if their module exists, in the time left over.
        budget_left = TOTAL_BUDGET_S - COLD_START_S - REPORT_S - (time.monotonic() - started)
        static_ok = ((REPO / "bench" / "static.py").is_file() and not args.dry_run and not args.only
                     and "static" not in (args.skip or ()))
        if static_ok and budget_left >= 15:
            cap = min(STATIC_MAX_S, budget_left)
            cmd, _ = part_command("static", out, args.dry_run, None)
            log(f"[{time.monotonic() - started:6.1f} s] static: start (cap {cap:.0f} s, leftover time)")
            rec = run_part("static", cmd, child_env(args.dry_run, time.time() + cap), cap,
                           out / "logs" / "static.log")
            record(rec)
            log(f"[{time.monotonic() - started:6.1f} s] static: {rec['status']} in {rec['seconds']:.1f} s")
        elif static_ok:
            record({"part": "static", "status": "skipped", "rc": None, "seconds": 0.0, "cap_s": 0.0,
                    "note": f"only {max(budget_left, 0):.0f} s left of the budget"})

    try:
        from bench import gpu_report
        gpu_report.write_reports(out, records, log, update_readme=args.update_readme)
    except Exception:  # noqa: BLE001 - the measured files stand without the report
        import traceback
        log("the report failed (the result files are complete):\n" + traceback.format_exc())
        records.append({"part": "report", "status": "error"})
    publish(out, log, quiet=False)
    log(f"total {time.monotonic() - started:.1f} s (+ cold start); results in {out}")
    bad = [r["part"] for r in records if r["status"] not in ("ok", "skipped") and r["part"] not in OPTIONAL_PARTS]
    return 0 if not bad else 1


PUBLISHED = ("summary.md", "results.jsonl", "parts.jsonl", "tests.jsonl", "gpu_run.log")


def publish(out: Path, log, *, quiet: bool) -> None:
    """Copy the main files and an archive of everything to $OUT (at most 8 files, flat, plain
    names: what the device machine hands back)."""
    dest = os.environ.get("OUT")
    if not dest:
        return
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for name in PUBLISHED:
            if (out / name).is_file():
                shutil.copyfile(out / name, dest / name)
        archive = dest / ("gpu_run_" + re.sub(r"[^A-Za-z0-9._-]+", "-", out.name) + ".tar.gz")
        tmp = dest / (archive.name + ".part")
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(out, arcname=out.name)
        os.replace(tmp, archive)
        if not quiet:
            log(f"copied {', '.join(PUBLISHED)} and {archive.name} to {dest}")
    except OSError as exc:
        log(f"could not copy to $OUT ({dest}): {exc}")


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (default bench/results/<gpu name>/; dry run: a temporary one)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no CUDA build: tests the run itself")
    p.add_argument("--cap", action="append", metavar="PART=SECONDS", help="override a part's time cap")
    p.add_argument("--only", action="append", choices=PART_NAMES, help="run only these parts")
    p.add_argument("--skip", action="append", choices=PART_NAMES + OPTIONAL_PARTS, help="skip these parts")
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
