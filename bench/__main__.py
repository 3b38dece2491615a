"""python -m bench: measure every op and loss of docs/api.md and the training step.

    python -m bench                          # full suite on the default device (CUDA if present)
    python -m bench --op nt_xent --op groco  # selected ops (or families: contrastive, sphere, ...)
    python -m bench --op input               # the host input path on JPEG files (bench/input.py)
    python -m bench --device cpu --quick     # tiny sizes, few calls (what the test suite runs)
    python -m bench --report-only --out DIR  # redo plots / summary from DIR/results.jsonl
    python -m bench --update-readme          # also rewrite README.md's benchmark block

Outputs under --out (default bench/results/<device>/; quick runs: a temporary directory):
results.jsonl, one PNG per op and shape family, summary.md. Full GPU runs measure each (op,
provider) in a fresh subprocess (--isolate): a crash or hang is recorded and the run goes on,
and no allocator state leaks between providers. A provider that raises is recorded with its
status.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

# On a shared CPU, libgomp's default spin-waiting at barriers collapses when other processes
# compete for the cores (a ResNet-18 step measured 20x slower with 2 threads under load);
# passive waiting is the honest setting there and costs nothing on an idle machine. libgomp
# reads this when torch loads it, so it is set before the import; export it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from . import input as input_bench, plots, results, summary  # noqa: E402
from .common import PKG, README, REPO, RESULTS_ROOT, progress, run_capped  # noqa: E402
from .harness import BenchConfig, Size, run_case, static_skip  # noqa: E402
from .specs import all_specs, select_specs  # noqa: E402, F401 - all_specs: the tests' registry

RECORD_PREFIX = "BENCH-RECORD "


def _results_root() -> Path:
    """bench/results/ in a checkout (the committed results); ./fastssl-bench-results when
    installed (never inside site-packages)."""
    return RESULTS_ROOT if (REPO / "setup.py").exists() else Path.cwd() / "fastssl-bench-results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--op", action="append", help="op or family to run (repeatable, or comma-separated)"
    )
    p.add_argument(
        "--provider",
        action="append",
        help="provider(s) to run, e.g. fastssl, fastssl:cpp, reference, diffsort (default: all)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device (default: cuda when available, else cpu)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few calls (smoke test)")
    p.add_argument("--out", type=Path, default=None, help="output directory")
    p.add_argument("--dtype", action="append", choices=("float32", "bfloat16", "float16"),
                   help="restrict to these dtypes")
    p.add_argument(
        "--mode",
        action="append",
        choices=("forward", "backward", "forward+backward", "step"),
        help="restrict to these modes",
    )
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="one fresh subprocess per (op, provider) (default for full GPU runs)")
    iso.add_argument(
        "--no-isolate", dest="isolate", action="store_false", help="run in this process"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: all cores)"
    )
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds allowed to one (op, provider) subprocess")
    p.add_argument(
        "--append", action="store_true", help="append to results.jsonl instead of replacing it"
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rebuild plots and summary from --out/results.jsonl")
    p.add_argument("--update-readme", nargs="?", const=str(README),
                   default=None, metavar="README", help="rewrite the benchmark block of README.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan_cases(spec, device_type: str, quick: bool, providers, dtypes, modes):
    """[(provider, size, dtype, modes)] to measure, and [(provider, note)] statically skipped."""
    cases, skipped = [], []
    spec_dtypes = spec.dtypes(device_type, quick)
    for provider in spec.providers:
        if providers and provider not in providers:
            continue
        note = static_skip(provider, device_type)
        if note:
            skipped.append((provider, note))
            continue
        for size in spec.sizes(device_type, quick):
            if size.providers and provider not in size.providers:
                continue
            size_modes = tuple(m for m in (size.modes or spec.modes) if not modes or m in modes)
            if not size_modes:
                continue
            for dt in spec_dtypes:
                if dtypes and str(dt).replace("torch.", "") not in dtypes:
                    continue
                cases.append((provider, size, dt, size_modes))
    return cases, skipped


def _case_key(op, provider, shape, dtype, mode):
    return (op, provider, json.dumps(shape, sort_keys=True), dtype, mode)


def _progress(rec: dict) -> None:
    progress(rec, sys.stderr)


def _skipped(spec, skipped, device, emit):
    for provider, note in skipped:
        emit({"op": spec.name, "family": spec.family, "provider": provider, "mode": "-",
              "shape": None, "x": None, "dtype": None, "device": device.type,
              "status": "skipped", "note": note})


def run_in_process(specs, args, device, cfg, emit):
    for spec in specs:
        cases, skipped = plan_cases(
            spec, device.type, args.quick, args.provider, args.dtype, args.mode
        )
        if not args.worker:
            _skipped(spec, skipped, device, emit)
        for provider, size, dt, modes in cases:
            for rec in run_case(
                spec, provider, Size(size.shape, modes, size.providers), dt, device, cfg
            ):
                emit(rec)


def run_isolated(specs, args, device, emit):
    """One subprocess per (op, provider), under --timeout; cases a crashed or timed-out worker
    did not report are recorded as errors."""
    for spec in specs:
        cases, skipped = plan_cases(spec, device.type, args.quick, args.provider, args.dtype,
                                    args.mode)
        _skipped(spec, skipped, device, emit)
        for provider in dict.fromkeys(c[0] for c in cases):
            expected = {
                _case_key(spec.name, provider, size.shape, str(dt).replace("torch.", ""), m): (
                    size,
                    dt,
                    m,
                )
                for prov, size, dt, modes in cases
                if prov == provider
                for m in modes
            }
            cmd = [sys.executable, "-m", PKG, "--worker", "--no-isolate", "--op", spec.name,
                   "--provider", provider, "--device", device.type] + ["--quick"] * args.quick
            cmd += ["--threads", str(args.threads)] * bool(args.threads)
            cmd += [a for d in args.dtype or () for a in ("--dtype", d)]
            cmd += [a for m in args.mode or () for a in ("--mode", m)]
            seen, failure = set(), None
            with tempfile.TemporaryFile("w+") as log:
                try:
                    rc, _ = run_capped(cmd, log, args.timeout)
                    failure = (
                        f"timeout: the worker ran past {args.timeout:.0f} s"
                        if rc == "timeout"
                        else f"worker exited with code {rc}"
                        if rc != 0
                        else None
                    )
                except OSError as exc:
                    failure = f"could not run the worker: {exc}"
                log.seek(0)
                for line in log.read().splitlines()[1:]:
                    if not line.startswith(RECORD_PREFIX):
                        print(line, file=sys.stderr)   # the worker's own messages
                        continue
                    rec = json.loads(line[len(RECORD_PREFIX):])
                    seen.add(_case_key(rec["op"], rec["provider"], rec["shape"], rec["dtype"],
                                       rec["mode"]))
                    emit(rec)
            for key, (size, dt, m) in expected.items():
                if key not in seen:
                    emit({"op": spec.name, "family": spec.family, "provider": provider,
                          "shape": dict(size.shape), "x": size.shape.get(spec.x_key),
                          "x_key": spec.x_key, "dtype": str(dt).replace("torch.", ""),
                          "device": device.type, "mode": m, "status": "error",
                          "note": failure or "the worker did not report this case"})


# Benchmarks outside the op harness, run by --op NAME with their own options after it:
# python -m bench --op input [--threads 1,2 --out DIR ...] is python -m bench.input [...].
STANDALONE = {"input": input_bench.main}


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "--op" and args[1] in STANDALONE:
        return STANDALONE[args[1]](args[2:])

    # Everything alive now (torch, triton, fastssl) is long-lived: freezing it keeps the
    # gc.collect() before each memory measurement from rescanning it (550 ms per call measured).
    gc.collect()
    gc.freeze()
    try:
        return _main(argv)
    finally:
        gc.unfreeze()


def _main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker:
        specs = select_specs(args.op)
        cfg = BenchConfig.for_run(args.quick)

        def emit_stdout(rec):
            print(RECORD_PREFIX + json.dumps(rec), flush=True)
        run_in_process(specs, args, device, cfg, emit_stdout)
        return 0

    if args.out is None:
        if args.quick:
            args.out = (
                Path(tempfile.gettempdir())
                / "fastssl-bench-quick"
                / results.device_dir_name(device)
            )
        else:
            args.out = _results_root() / results.device_dir_name(device)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"

    if not args.report_only:
        specs = select_specs(args.op)
        # Default: a subprocess per (op, provider) on GPU, where a kernel fault poisons the CUDA
        # context of the whole process; CPU runs stay in one process (its memory figures are
        # per-call VmHWM resets, see bench/harness.py), which saves an interpreter and torch
        # start per provider.
        isolate = (
            (device.type == "cuda" and not args.quick) if args.isolate is None else args.isolate
        )
        env = results.environment(device)
        print(f"fastssl bench on {env['device_name']} ({device.type}), commit {env['git_commit']}, "
              f"{env['num_threads']} threads, out {args.out}", file=sys.stderr, flush=True)
        with results.ResultWriter(results_path, env, append=args.append) as writer:
            def emit(rec):
                _progress(writer.write(rec))
            if isolate:
                run_isolated(specs, args, device, emit)
            else:
                run_in_process(specs, args, device, BenchConfig.for_run(args.quick), emit)

    records = results.load(results_path)
    if not args.no_plots:
        made = plots.make_plots(records, args.out)
        print(f"wrote {len(made)} plot(s) to {args.out}", file=sys.stderr)
    summary_path = summary.write_summary(records, args.out / "summary.md")
    print(f"wrote {results_path} and {summary_path}", file=sys.stderr)
    if args.update_readme:
        changed = summary.update_readme(Path(args.update_readme))
        print(
            f"README benchmark block {'updated' if changed else 'unchanged'}: {args.update_readme}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
