"""python -m bench: measure every op and loss of docs/api.md and the training step.

    python -m bench                          # full suite on the default device (CUDA if present)
    python -m bench --op nt_xent --op groco  # selected ops (or families: contrastive, sphere, ...)
    python -m bench --op input               # the host input path on JPEG files (bench/input.py)
    python -m bench --device cpu --quick     # tiny sizes, few calls (what the test suite runs)
    python -m bench --report-only --out DIR  # redo plots / summary from DIR/results.jsonl
    python -m bench --update-readme          # also rewrite README.md's benchmark block
    python -m bench --largest --reps 5 --append --roofline --competing-load ...  # issue 25

Outputs under --out (default bench/results/<device>/; quick runs: a temporary directory):
results.jsonl, one PNG per op and shape family, summary.md, compare.md. Every provider of a
case runs in one process, interleaved (bench/harness.py); full GPU runs put each op in a fresh
subprocess (--isolate), so a crash or hang is recorded and the run goes on.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

# On a shared CPU, libgomp's spin-waiting at barriers collapses when other processes compete
# for the cores (a ResNet-18 step measured 20x slower under load); passive waiting costs nothing
# idle. libgomp reads it when torch loads it, so it is set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from . import compare, input as input_bench, plots, results, summary  # noqa: E402
from .common import PKG, README, REPO, RESULTS_ROOT, progress, run_capped  # noqa: E402
from .harness import BenchConfig, Size, run_group, static_skip  # noqa: E402
from .specs import all_specs, select_specs  # noqa: E402, F401 - all_specs: the tests' registry

RECORD_PREFIX = "BENCH-RECORD "


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--op", action="append", help="op or family to run (repeatable, or comma-separated)")
    a("--provider", action="append", help="provider(s), e.g. fastssl, fastssl:cpp, eager")
    a("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    a("--quick", action="store_true", help="tiny sizes and few calls (smoke test)")
    a("--largest", action="store_true", help="only the largest size of each series and mode")
    a("--reps", type=int, default=None, help="at least this many timed calls per provider")
    a("--out", type=Path, default=None, help="output directory")
    a("--dtype", action="append", choices=("float32", "bfloat16", "float16"))
    a("--mode", action="append", choices=("forward", "backward", "forward+backward", "step"))
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="one fresh subprocess per op (default for full GPU runs)")
    iso.add_argument("--no-isolate", dest="isolate", action="store_false")
    a("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    a("--timeout", type=float, default=1800.0, help="seconds allowed to one op's subprocess")
    a("--append", action="store_true",
      help="append to results.jsonl (the latest record of a case counts: merges with a run)")
    a("--roofline", action="store_true", help="measure the float32 GEMM roofline (CPU)")
    a("--competing-load", action="store_true",
      help="fastssl and eager interleaved under a 2-thread GEMM load (CPU)")
    a("--no-plots", action="store_true", help="skip the PNG plots")
    a("--report-only", action="store_true", help="measure nothing: rebuild the reports")
    a("--update-readme", nargs="?", const=str(README), default=None, metavar="README",
      help="rewrite the benchmark block of README.md")
    a("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan_cases(spec, device_type, quick, providers, dtypes, modes, largest=False):
    """[(provider, size, dtype, modes)] to measure, and [(provider, note)] statically skipped."""
    sizes = [s for s in spec.sizes(device_type, quick)]
    if largest:   # per (fixed shape, mode): the largest x; a size keeps the modes it is largest in
        top = {}
        for s in sizes:
            fixed = json.dumps({k: v for k, v in s.shape.items() if k != spec.x_key})
            for m in s.modes or spec.modes:
                if s.shape[spec.x_key] >= top.get((fixed, m), (0,))[0]:
                    top[(fixed, m)] = (s.shape[spec.x_key], id(s))
        keep = {}
        for (_, m), (_, i) in top.items():
            keep.setdefault(i, []).append(m)
        sizes = [Size(s.shape, tuple(keep[id(s)]), s.providers) for s in sizes if id(s) in keep]
    cases, skipped = [], []
    providers = providers and {p for arg in providers for p in arg.split(",")}
    for provider in spec.providers:
        if providers and provider not in providers:
            continue
        if note := static_skip(provider, device_type):
            skipped.append((provider, note))
            continue
        for size in sizes:
            size_modes = tuple(m for m in (size.modes or spec.modes) if not modes or m in modes)
            if size_modes and not (size.providers and provider not in size.providers):
                cases += [(provider, size, dt, size_modes) for dt in spec.dtypes(device_type, quick)
                          if not dtypes or str(dt).replace("torch.", "") in dtypes]
    return cases, skipped


def _progress(rec: dict) -> None:
    progress(rec, sys.stderr)


def _plan(spec, args, device):
    cases, skipped = plan_cases(spec, device.type, args.quick, args.provider, args.dtype,
                                args.mode, args.largest)
    groups = {}   # (shape, dtype, modes) -> providers: the unit measured interleaved
    for prov, size, dt, modes in cases:
        groups.setdefault((json.dumps(size.shape), dt, modes), []).append(prov)
    return groups, skipped


def _skipped(spec, skipped, device, emit):
    for provider, note in skipped:
        emit({"op": spec.name, "family": spec.family, "provider": provider, "mode": "-",
              "shape": None, "x": None, "dtype": None, "device": device.type,
              "status": "skipped", "note": note})


def run_in_process(specs, args, device, cfg, emit):
    for spec in specs:
        groups, skipped = _plan(spec, args, device)
        if not args.worker:
            _skipped(spec, skipped, device, emit)
        for (shape, dt, modes), provs in groups.items():
            for rec in run_group(spec, provs, Size(json.loads(shape), modes), dt, device, cfg):
                emit(rec)


def run_isolated(specs, args, device, emit):
    """One subprocess per op under --timeout; cases a crashed worker did not report are
    recorded as errors."""
    for spec in specs:
        groups, skipped = _plan(spec, args, device)
        _skipped(spec, skipped, device, emit)
        expected = {(p, shape, str(dt).replace("torch.", ""), m)
                    for (shape, dt, modes), provs in groups.items() for p in provs for m in modes}
        cmd = [sys.executable, "-m", PKG, "--worker", "--no-isolate", "--op", spec.name,
               "--device", device.type] + ["--quick"] * args.quick + ["--largest"] * args.largest
        for flag, values in (("--threads", [args.threads] if args.threads else []),
                             ("--reps", [args.reps] if args.reps else []),
                             ("--provider", args.provider or []), ("--dtype", args.dtype or []),
                             ("--mode", args.mode or [])):
            cmd += [a for v in values for a in (flag, str(v))]
        with tempfile.TemporaryFile("w+") as log:
            try:
                rc, _ = run_capped(cmd, log, args.timeout)
                failure = (f"timeout: the worker ran past {args.timeout:.0f} s" if rc == "timeout"
                           else f"worker exited with code {rc}" if rc != 0 else None)
            except OSError as exc:
                failure = f"could not run the worker: {exc}"
            log.seek(0)
            for line in log.read().splitlines()[1:]:
                if not line.startswith(RECORD_PREFIX):
                    print(line, file=sys.stderr)   # the worker's own messages
                    continue
                rec = json.loads(line[len(RECORD_PREFIX):])
                expected.discard((rec["provider"], json.dumps(rec["shape"]), rec["dtype"],
                                  rec["mode"]))
                emit(rec)
        for p, shape, dt, m in sorted(expected):
            shape = json.loads(shape)
            emit({"op": spec.name, "family": spec.family, "provider": p, "shape": shape,
                  "x": shape.get(spec.x_key), "x_key": spec.x_key, "dtype": dt,
                  "device": device.type, "mode": m, "status": "error",
                  "note": failure or "the worker did not report this case"})


# Benchmarks outside the op harness, run by --op NAME with their own options after it.
STANDALONE = {"input": input_bench.main}


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "--op" and args[1] in STANDALONE:
        return STANDALONE[args[1]](args[2:])
    # What is alive now is long-lived: freezing it keeps the gc.collect() before each memory
    # measurement from rescanning it (550 ms per call measured).
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
    cfg = BenchConfig.for_run(args.quick, args.reps)
    if args.worker:
        run_in_process(select_specs(args.op), args, device, cfg,
                       lambda rec: print(RECORD_PREFIX + json.dumps(rec), flush=True))
        return 0
    if args.out is None:   # never inside site-packages when installed
        root = (Path(tempfile.gettempdir()) / "fastssl-bench-quick" if args.quick else
                RESULTS_ROOT if (REPO / "setup.py").exists() else
                Path.cwd() / "fastssl-bench-results")
        args.out = root / results.device_dir_name(device)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    if not args.report_only:
        specs = select_specs(args.op)
        # A subprocess per op on GPU, where a kernel fault poisons the whole CUDA context.
        isolate = (device.type == "cuda" and not args.quick) if args.isolate is None \
            else args.isolate
        env = results.environment(device)
        print(f"fastssl bench on {env['device_name']} ({device.type}), commit {env['git_commit']}, "
              f"{env['num_threads']} threads, THP {env['thp_enabled']} defrag "
              f"{env['thp_defrag']}, out {args.out}", file=sys.stderr, flush=True)
        with results.ResultWriter(results_path, env, append=args.append) as writer:
            def emit(rec):
                _progress(writer.write(rec))
            if isolate:
                run_isolated(specs, args, device, emit)
            else:
                run_in_process(specs, args, device, cfg, emit)
        compare.extra_measurements(args.out, args.roofline, args.competing_load,
                                   {s.name for s in specs}, args.largest, args.quick)
    records = results.load(results_path)
    if not args.no_plots:
        made = plots.make_plots(records, args.out)
        print(f"wrote {len(made)} plot(s) to {args.out}", file=sys.stderr)
    summary.write_summary(records, args.out / "summary.md")
    compare.write_compare(args.out, records)
    print(f"wrote {results_path}, summary.md and compare.md", file=sys.stderr)
    if args.roofline or args.competing_load or args.largest:
        print("\n".join(compare.issue25_verdicts(records, args.out)), file=sys.stderr)
    if args.update_readme:
        changed = summary.update_readme(Path(args.update_readme))
        print(f"README benchmark block {'updated' if changed else 'unchanged'}: "
              f"{args.update_readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
