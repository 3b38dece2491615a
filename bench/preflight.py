"""python -m bench.preflight: prove the GPU run on the GPU machine's own versions, here, before a
GPU is lent (README, "Running the GPU suite"): .whl/ to carry (--prepare), an environment with
the device's versions (.device-env/, built once), then offline in a copy of the tree as a device
call sends it: the versions, pytest --collect-only, the gpu_run dry run with its build, and the
static compile under triton 3.6. Log and summary in bench/results/preflight/; exit 0 iff all pass.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import CARRIED, REPO, Log, git_head, run_capped

RESULTS = REPO / "bench" / "results" / "preflight"
MARKER = "fastssl-device-env.json"
# The GPU machine's versions (/work/.library/device/KINDS.md: python3 3.12, torch 2.11.0+cu130,
# triton 3.6.0, numpy 2.5, torchvision 0.26.0; pytest-xdist, pytest-timeout, matplotlib there).
DEVICE_PYTHON = "3.12"
DEVICE_REQUIREMENTS = ("torch==2.11.0", "triton==3.6.0", "numpy==2.5.*", "torchvision==0.26.*",
                       "pytest", "pytest-xdist", "pytest-timeout", "matplotlib", "pillow", "ninja",
                       "setuptools", "wheel")
NET_PROBE = ("import socket\ntry:\n socket.create_connection(('pypi.org', 443), 5)\n "
             "raise SystemExit('online')\nexcept OSError as e:\n print('no network:', e)")


def run(cmd, log, *, env=None, cwd=REPO, timeout=None, quiet=False):
    """cmd under timeout, its output in the log (unless quiet); (exit code, output, seconds)."""
    with tempfile.TemporaryFile("w+") as out:
        rc, secs = run_capped(list(map(str, cmd)), out, timeout, cwd=cwd, env=env)
        out.seek(0)
        lines = out.read().rstrip().splitlines()
    log(lines[0])
    for line in [] if quiet else lines[1:]:
        log(f"  | {line}")
    log(f"  -> exit {rc} in {secs:.1f} s")
    return rc, "\n".join(lines[1:]), secs


def prepare(log) -> dict:
    CARRIED.mkdir(exist_ok=True)
    if not list(CARRIED.glob("diffsort-*.whl")):
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--python-version", DEVICE_PYTHON, "-d", CARRIED, "diffsort==0.2.0"], log,
            timeout=300)
    wheels = [w.name for w in sorted(CARRIED.glob("diffsort-*.whl"))]
    commit = git_head()
    (CARRIED / "git_commit.txt").write_text(commit + "\n")
    size = sum(f.stat().st_size for f in CARRIED.rglob("*") if f.is_file()
               and "site" not in f.parts)
    log(f"prepared .whl/: {', '.join(wheels) or 'NO diffsort wheel'}; git_commit.txt = {commit}; "
        f"{size / 1024:.0f} KiB to carry (carry: [\".whl\"])")
    return {"wheels": wheels, "git_commit": commit, "carried_bytes": size}


def find_python(version: str) -> str | None:
    """The first python<version> that runs: a pyenv shim on PATH can exist and still refuse
    (exit 127) when that version is installed but not selected, so each candidate is tried."""
    cands = [shutil.which(f"python{version}")] + [
        p for root in (os.path.expanduser("~"), "/root") for p in
        sorted(glob.glob(f"{root}/.pyenv/versions/{version}.*/bin/python{version}"))[::-1]]
    return next((c for c in cands if c and subprocess.run([c, "-c", "pass"],
                                                          capture_output=True).returncode == 0),
                None)


def ensure_env(env_dir: Path, log) -> tuple[Path, dict]:
    py, marker = env_dir / "bin" / "python", env_dir / MARKER
    want = {"python": DEVICE_PYTHON, "requirements": list(DEVICE_REQUIREMENTS)}
    try:
        have = json.loads(marker.read_text())
        if py.exists() and have.get("requirements") == want["requirements"]:
            log(f"environment {env_dir}: reused (built {have.get('built')})")
            return py, have
    except (OSError, ValueError):
        pass
    if not py.exists():
        base = find_python(DEVICE_PYTHON)
        if base is None:
            raise SystemExit(f"preflight: no Python {DEVICE_PYTHON} here (python{DEVICE_PYTHON}"
                             " on PATH or ~/.pyenv/versions/): install it, or pass --env")
        if run([base, "-m", "venv", env_dir], log)[0] != 0:
            raise SystemExit("preflight: could not create the environment")
    rc = run([py, "-m", "pip", "install", "--progress-bar", "off", *DEVICE_REQUIREMENTS], log,
             timeout=3600, quiet=True)[0]
    if rc != 0:
        raise SystemExit(f"preflight: pip install of {' '.join(DEVICE_REQUIREMENTS)} failed ({rc})")
    have = {**want, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    marker.write_text(json.dumps(have, indent=1) + "\n")
    return py, have


def offline_prefix(log) -> tuple[list[str], str]:
    """`unshare -rn` (a new network namespace: nothing reachable) when the kernel allows it;
    else nothing (PIP_NO_INDEX=1 still keeps pip off the network)."""
    if shutil.which("unshare"):
        probe = subprocess.run(["unshare", "-rn", "python3", "-c", NET_PROBE],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.startswith("no network"):
            return ["unshare", "-rn"], ("unshare -rn: no network interface (a connection to the "
                                        "package index fails)")
    log("warning: unshare -rn is not available here: the checks run with PIP_NO_INDEX=1 only")
    return [], "PIP_NO_INDEX=1 only (no network namespace here)"


def copy_tree(dest: Path, log, *, fresh: bool) -> Path:
    """What a device call sends: tracked and untracked-not-ignored files and .whl/; no .git, no
    fastssl/_C built here. Its build/ is kept unless fresh, as a warm device machine keeps it."""
    if fresh:
        shutil.rmtree(dest, ignore_errors=True)
    for entry in dest.iterdir() if dest.is_dir() else ():
        if entry.name != "build":
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    kept = " (its build/ kept from the last preflight)" if (dest / "build").is_dir() else ""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    files = [(REPO / n, dest / n) for n in names if n and (REPO / n).is_file()]
    files += [(f, dest / ".whl" / f.name) for f in CARRIED.glob("*") if f.is_file()]
    for src, dst in files:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    size = sum(src.stat().st_size for src, _ in files)
    log(f"the tree as a device call sends it: {len(files)} files and .whl/, {size / 2**20:.1f} MiB"
        f" (limit 64 MiB), in {dest}{kept}")
    return dest


def checks(py: Path, log, args) -> list[dict]:
    prefix, how = offline_prefix(log)
    log(f"offline: {how}")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRITON_", "FASTSSL_", "PYTHON")) and k != "OUT"}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1",
               PATH=f"{py.parent}{os.pathsep}{env.get('PATH', '')}")   # python3 is the env's
    work = REPO / "build" / "preflight"
    tree = copy_tree(work / "tree", log, fresh=args.fresh)
    results = []

    def step(name, cmd, timeout, ok=lambda rc, text: rc == 0, step_env=None):
        log(f"\n== {name}")
        rc, text, secs = run([*prefix, *cmd], log, env=step_env or env, timeout=timeout, cwd=tree)
        passed = bool(ok(rc, text))
        results.append({"step": name, "passed": passed, "rc": rc, "seconds": round(secs, 1),
                        "command": " ".join(map(str, cmd))})
        log(f"== {name}: {'PASSED' if passed else 'FAILED'}")
        return text

    py3 = ["python3", "-c"]
    step("versions", py3 + [
        "import sys, platform, importlib.metadata as md; print('python', "
        "platform.python_version(), sys.executable); [print(n, md.version(n)) for n in "
        "('torch', 'triton', 'numpy', 'setuptools', 'pytest', 'pytest-xdist', 'torchvision')];"
        " import torch; print('torch.version.cuda', torch.version.cuda)"], 120)
    step("network is unreachable", py3 + [NET_PROBE], 60)
    step("tests collect on these versions",
         ["python3", "-m", "pytest", "--collect-only", "-qq", "-p", "no:cacheprovider",
          "--continue-on-collection-errors", "tests"], 900,
         ok=lambda rc, text: rc == 0 and not re.search(
             r"\d+ errors?\b", (text.strip().splitlines() or [""])[-1]))
    dry_out, dry_pub = work / "dry", work / "OUT"
    for old in (dry_out, dry_pub):
        shutil.rmtree(old, ignore_errors=True)
    step("gpu_run dry run", ["python3", "-m", "bench.gpu_run", "--dry-run",
                             *["--build"] * (not args.no_build),
                             *(["--cap", f"build={args.build_cap}"] if args.build_cap else []),
                             "--out", dry_out], 2400, step_env={**env, "OUT": str(dry_pub)})
    results[-1]["published"] = sorted(p.name for p in dry_pub.iterdir()) if dry_pub.is_dir() else []
    log(f"$OUT after the dry run: {results[-1]['published']}")
    for name in ("parts.jsonl", "build.json", "env.json", "logs/build_cpu.log"):
        if (dry_out / name).is_file():   # the build log: the extension built on these versions
            shutil.copyfile(dry_out / name, RESULTS / f"dry_{Path(name).name}")
    if not args.no_static:
        static_out = RESULTS / "static-triton-3.6"
        text = step("static compile (triton of this environment)",
                    ["python3", "-m", "bench.static", "--no-cuda", "--out", static_out], 1800)
        line = next((ln for ln in text.splitlines() if ln.startswith('{"triton_cases"')), None)
        results[-1]["summary"] = json.loads(line) if line else None
        jsonl = static_out / "static.jsonl"
        if jsonl.exists() and jsonl.stat().st_size > 512 << 10:
            jsonl.unlink()  # the table (static.md) is kept; the raw rows are regenerated in minutes
    for old in (dry_out, dry_pub):
        shutil.rmtree(old, ignore_errors=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.preflight",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", action="store_true",
                   help="only write .whl/ (diffsort wheel, git_commit.txt)")
    p.add_argument("--env", type=Path,
                   default=Path(os.environ.get("FASTSSL_DEVICE_ENV", REPO / ".device-env")),
                   help="the environment with the GPU machine's versions (default .device-env/)")
    p.add_argument("--no-build", action="store_true",
                   help="dry run without its CPU-only build (minutes here)")
    p.add_argument("--build-cap", type=int, default=900,
                   help="the dry run's build cap (s; 2 loaded cores here)")
    p.add_argument("--no-static", action="store_true", help="skip the static compile")
    p.add_argument("--fresh", action="store_true", help="a new copy of the tree, without the "
                   "build trees of the last preflight (a cold machine)")
    args = p.parse_args(argv)
    if args.prepare:
        prepare(lambda m: print(m, flush=True))
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = Log(RESULTS / "preflight.log", "w")
    t0 = time.monotonic()
    log(f"fastssl preflight: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    carried = prepare(log)
    py, env_info = ensure_env(args.env.resolve(), log)
    results = checks(py, log, args)
    ok = all(r["passed"] for r in results)
    summary = {"passed": ok, "seconds": round(time.monotonic() - t0, 1), "environment": env_info,
               "carried": carried, "steps": results}
    (RESULTS / "preflight.json").write_text(json.dumps(summary, indent=1) + "\n")
    log("")
    for r in results:
        log(f"{'PASSED' if r['passed'] else 'FAILED'}  {r['step']} ({r['seconds']} s)")
    log(f"preflight {'PASSED' if ok else 'FAILED'} in {summary['seconds']:.0f} s; log: "
        f"{RESULTS / 'preflight.log'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
