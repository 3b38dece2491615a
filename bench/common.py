"""What the benchmark modules share, importing nothing heavy (no torch) and no other module of
the package (so the package has no import circle): paths, the GPU run's parts and budget,
provider vocabulary, formats, JSON files, one markdown table writer, one capped subprocess."""
from __future__ import annotations

import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

PKG = __package__ or "bench"                 # "bench" in a checkout, "fastssl.bench" installed
REPO = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO / "bench" / "results"
README = REPO / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# The GPU run (python -m bench.gpu_run)
DEADLINE_ENV = "FASTSSL_GPU_RUN_DEADLINE"   # wall-clock time (time.time()) a part must end by
COMMIT_ENV = "FASTSSL_GIT_COMMIT"            # the commit measured (.git does not travel)
CARRIED = REPO / ".whl"                      # what travels beside the tree: wheels, git_commit.txt
TOTAL_BUDGET_S = 600.0                       # one device call: 10 minutes, the cold start inside
COLD_START_S = 180.0                         # machine start and tree transfer: 1 to 3 minutes
VERSIONS_S = 15.0                            # the versions probe (python3 importing torch, triton)
REPORT_S = 15.0                              # plots, summary, copies to $OUT
MARGIN_S = 10.0                              # unplanned: part starts, copies between parts
MAX_N_BUDGET_GIB = 16.0                      # the fixed memory budget of the largest-N search (GPU)
MAX_N_BUDGET_DRY_MIB = 4.0                   # ... and of the dry run (CPU, tiny sizes)


@dataclass(frozen=True)
class Part:
    name: str
    cap_s: float       # GPU run
    dry_cap_s: float   # dry run: a generous bound for tiny sizes on a loaded 2-core machine
    what: str


# Caps (s) from the costs measured or estimated for an H100 with 16 cores (README, "Running the
# GPU suite"); torch.compile out (--with-compile adds COMPILE_EXTRA_S to three caps).
PARTS = tuple(Part(n, c, 60, w) for n, c, w in (
    ("build", 75, "fastssl._C: CPU-only and CUDA builds side by side (sm of this GPU), CUDA "
                  "preferred"),
    ("cuda_tests", 90, "pytest tests/ops tests/losses: CUDA cases, every GPU backend vs reference"),
    ("roofline", 10, "8192^3 bf16 matmul (device peak) and a device-to-device copy"),
    ("bench_contrastive", 30, "nt_xent, symmetric info_nce 2x32768 D=128 bf16 fwd+bwd"),
    ("max_n", 20, f"largest nt_xent N in {MAX_N_BUDGET_GIB:.0f} GiB: fastssl and eager"),
    ("bench_sce_sphere", 20, "sce B=1024 K=65536; sfrik_mmd B=2048 D=8192"),
    ("bench_sortnet", 25, "soft_sort B=1024 n=16/32/1024 (vs diffsort); groco B=4096"),
    ("bench_swav", 20, "sinkhorn B=4096 K=3000; swav loss 2+6 crops"),
    ("dino", 15, "python -m bench.dino: dino K=65536 B=256 2+10 crops, K=262144 B=64 2+6, koleo "
                 "N=8192 (fp32, bf16; eager, lightly)"),
    ("trainer", 40, "ResNet-50 B=256 bf16 channels-last step, 8 methods, a few timed steps each"),
    ("backend_choice", 25, "python -m bench.backend_choice: cuda vs triton, what `auto` prefers"),
    ("checkpoint", 10, "fastssl ResNet-50 state dict loads into torchvision resnet50")))
PART_NAMES = tuple(p.name for p in PARTS)
COMPILE_EXTRA_S = {"bench_contrastive": 60, "bench_sce_sphere": 60, "bench_swav": 45}

# Providers: fastssl (automatic, then each backend forced), the reference (the correctness
# anchor), and what users would otherwise run (eager PyTorch, the peers). BASELINES and
# PROVIDER_ORDER: the reports' column order.
STANDARD_PROVIDERS = ("fastssl", "fastssl:torch", "fastssl:cpp", "fastssl:triton", "fastssl:cuda",
                      "reference", "reference:compile")
EAGER_PROVIDERS = ("eager", "eager:compile")
BASELINES = ("eager", "eager:compile", "peer:lightly", "peer:torchsort", "diffsort", "reference",
             "reference:compile")
PROVIDER_ORDER = ("fastssl", "fastssl:cuda", "fastssl:triton", "fastssl:cpp", "fastssl:torch",
                  *BASELINES)


def is_peer(provider: str) -> bool:
    return provider.startswith("peer:") or provider == "diffsort"


def is_baseline(provider: str) -> bool:
    return provider in BASELINES or is_peer(provider)


def provider_order(p: str):
    if p in PROVIDER_ORDER:
        return (PROVIDER_ORDER.index(p), p)
    return (len(PROVIDER_ORDER) - 2 if is_peer(p) else len(PROVIDER_ORDER), p)


def fmt_ms(ms: float | None) -> str:
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return "-"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms" if ms >= 0.1 else f"{ms * 1000:.1f} us"


def fmt_mb(mb: float | None) -> str:
    if mb is None:
        return "-"
    if mb >= 1024:
        return f"{mb / 1024:.2f} GiB"
    return f"{mb:.1f} MiB" if mb >= 1 else f"{mb * 1024:.0f} KiB"


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def shape_str(shape: dict | None, sep: str = ", ", skip: tuple = ()) -> str:
    return sep.join(f"{k}={v}" for k, v in (shape or {}).items() if k not in skip) or "-"


def table(head: list[str], rows: list[list]) -> list[str]:
    """A markdown table: the header, its rule and one line per row."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def progress(rec: dict, file=sys.stderr) -> None:
    """One console line per record; a note is shortened at a word, never mid-word."""
    line = (f"{rec['op']:<10} {rec['provider']:<18} {shape_str(rec.get('shape'), ','):<32} "
            f"{rec.get('dtype') or '-':<9} {rec.get('mode') or '-':<17}")
    if rec.get("status") == "ok":
        line += f" {fmt_ms(rec.get('p50_ms')):>10}  mem {fmt_mb(rec.get('peak_mem_mb')):>10}"
        line += f"  {rec['tflops']:.1f} TFLOP/s" if rec.get("tflops") else ""
        line += f"  {rec['images_per_s']:.0f} img/s" if rec.get("images_per_s") else ""
    else:
        line += f" [{rec.get('status')}] " + textwrap.shorten(str(rec.get("note", "")), 100,
                                                             placeholder=" ...")
    print(line, file=file, flush=True)


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):   # a part that did not get this far
        return None


def load_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a line cut off by a killed writer is skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def slug(text: str) -> str:
    s = re.sub(r"\(r\)|\(tm\)|processor|cpu @.*|\d+-core", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "unknown"


def git_commit() -> str:
    """The commit measured: $FASTSSL_GIT_COMMIT, else git_head() in a checkout, else
    .whl/git_commit.txt (.git does not travel to the GPU machine; a checkout's own .whl may
    hold a stale one from an earlier carry)."""
    value = os.environ.get(COMMIT_ENV, "").strip()
    if value:
        return value
    if (REPO / ".git").exists():
        return git_head()
    try:
        return (CARRIED / "git_commit.txt").read_text().split()[0]
    except (OSError, IndexError):
        return git_head()


def git_head() -> str:
    """HEAD, with "+dirty" when tracked files under fastssl/, csrc/, kernels/ or bench/ (not
    bench/results/) differ from it."""
    try:
        git = dict(cwd=REPO, timeout=10, capture_output=True, text=True)
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], **git).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "fastssl", "csrc", "kernels", "bench", ":(exclude)bench/results"],
                               **git).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


class Log:
    """Prints to stdout and to a log file."""

    def __init__(self, path: Path, mode: str = "a"):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, mode)

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        self.f.write(msg + "\n")
        self.f.flush()


def time_left() -> float:
    return float(os.environ.get(DEADLINE_ENV, "inf")) - time.time()


def kill_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM to the process's group, SIGKILL after grace_s: what it started goes too."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


RUNNING: list[subprocess.Popen] = []   # in progress: a parent stopped by a signal takes them


def run_capped(cmd: list[str], log, cap_s: float, *, cwd=REPO, env=None) -> tuple[object, float]:
    """Run cmd in its own process group (a kill reaches what it started), output to the open
    file log, killed at cap_s. Returns (exit code or "timeout", seconds)."""
    log.write(f"$ {' '.join(map(str, cmd))}\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    RUNNING.append(proc)
    try:
        rc = proc.wait(timeout=cap_s)
    except subprocess.TimeoutExpired:
        rc = "timeout"
        kill_group(proc)
        log.write(f"\n[cut off after {cap_s:.0f} s]\n")
    except BaseException:   # Ctrl-C: its own session would not receive it
        kill_group(proc, 1.0)
        raise
    finally:
        RUNNING.remove(proc)
    return rc, time.monotonic() - t0


def stop_running(signum, frame):
    """Signal handler: a parent killed from outside must not leave its group running."""
    for proc in list(RUNNING):
        kill_group(proc, grace_s=1.0)
    raise SystemExit(128 + signum)


def tests_summary(out: Path) -> dict:
    """Counts of DIR/tests.jsonl (written by bench/gpu_pytest.py)."""
    recs = load_jsonl(out / "tests.jsonl")
    counts = {k: sum(r["outcome"] == k for r in recs) for k in ("passed", "failed", "error",
                                                                "skipped")}
    reasons: dict[str, int] = {}
    for r in recs:
        if r["outcome"] == "skipped":
            why = r.get("message", "")[:160]
            reasons[why] = reasons.get(why, 0) + 1
    return {"total": len(recs), **counts,
            "failures": [r for r in recs if r["outcome"] in ("failed", "error")],
            "collect_errors": sum(r["outcome"] == "error" and r.get("when") == "collect"
                                  for r in recs),
            "skip_reasons": sorted(reasons.items(), key=lambda kv: -kv[1])}


def case_key(r: dict) -> tuple:
    return (json.dumps(r.get("shape"), sort_keys=True), r.get("dtype"), r.get("mode"))


def latest_by_case(records: list[dict]) -> dict[tuple, dict]:
    """The last record per (op, provider, shape, dtype, mode) (results files can be appended)."""
    return {(r.get("op"), r.get("provider")) + case_key(r): r for r in records}


def device_type(records: list[dict]) -> str:
    return next((r["device"] for r in records if r.get("device")), "cpu")
