"""python -m bench: measure every op and loss of docs/api.md and the training step.

    python -m bench                          # full suite on the default device (CUDA if present)
    python -m bench --op nt_xent --op groco  # selected ops (or families: contrastive, sphere, ...)
    python -m bench --op input               # the host input path on JPEG files (bench/input.py)
    python -m bench --device cpu --quick     # tiny sizes, few calls (what the test suite runs)
    python -m bench --report-only --out DIR  # redo plots / summary from DIR/results.jsonl
    python -m bench --update-readme          # also rewrite README.md's benchmark block (the
                                             # same block as python -m bench.compare --update-readme)

Outputs under --out (default bench/results/<device name>/; quick runs default to a temporary
directory so that they never overwrite committed results): results.jsonl, one PNG per op and
shape family, summary.md.

Full GPU runs measure each (op, provider) in a fresh subprocess (--isolate, the default there):
a crash or a hang of one provider (an illegal memory access, a timeout) is recorded and the run
goes on, and no allocator state leaks from one provider into another's memory figures. A provider that raises (NotImplementedError, out of memory, a forced backend that does
not serve the op) is recorded with its status and the run goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

# On a shared CPU, libgomp's default spin-waiting at barriers collapses when other processes
# compete for the cores (a ResNet-18 step measured 20x slower with 2 threads under load);
# passive waiting is the honest setting there and costs nothing on an idle machine. libgomp
# reads this when torch loads it, so it is set before the import; export it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

RECORD_PREFIX = "BENCH-RECORD "
# The module the isolated workers run: `bench` in a checkout; the installed `fastssl-bench`
# (fastssl/bench_cli.py, where this folder is fastssl.bench) sets its own.
WORKER_MODULE = os.environ.get("FASTSSL_BENCH_MODULE", "bench")


def _results_root() -> Path:
    """bench/results/ in a checkout (the committed results); ./fastssl-bench-results when
    installed (never inside site-packages)."""
    here = Path(__file__).resolve().parent
    if (here.parent / "setup.py").exists():
        return here / "results"
    return Path.cwd() / "fastssl-bench-results"
FAMILY_MODULES = ("contrastive", "sphere", "sortnet", "swav", "trainer")


def all_specs():
    return select_specs(None)


def select_specs(names: list[str] | None):
    """Specs named by --op: an op name selects that op; a family or module name (contrastive,
    sphere, sortnet, swav/sinkhorn, trainer) selects its ops unless it is also an op name
    (``sinkhorn`` is the op, ``swav`` the family)."""
    import importlib

    module_of = {}
    specs = []
    for mod in FAMILY_MODULES:
        for s in importlib.import_module(f"bench.{mod}").SPECS:
            module_of[s.name] = mod
            specs.append(s)
    if not names:
        return specs
    wanted = {n.strip() for arg in names for n in arg.split(",") if n.strip()}
    op_names = {s.name for s in specs}
    known = op_names | {s.family for s in specs} | set(FAMILY_MODULES)
    unknown = sorted(wanted - known)
    if unknown:
        raise SystemExit(f"--op: unknown op or family {unknown}; known: {sorted(known)}")
    groups = wanted - op_names
    return [s for s in specs if s.name in wanted or s.family in groups or module_of[s.name] in groups]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", action="append", help="op or family to run (repeatable, or comma-separated)")
    p.add_argument("--provider", action="append",
                   help="provider(s) to run, e.g. fastssl, fastssl:cpp, reference, diffsort (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device (default: cuda when available, else cpu)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few calls (smoke test)")
    p.add_argument("--out", type=Path, default=None, help="output directory")
    p.add_argument("--dtype", action="append", choices=("float32", "bfloat16", "float16"),
                   help="restrict to these dtypes")
    p.add_argument("--mode", action="append", choices=("forward", "backward", "forward+backward", "step"),
                   help="restrict to these modes")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="one fresh subprocess per (op, provider) (default for full GPU runs)")
    iso.add_argument("--no-isolate", dest="isolate", action="store_false", help="run in this process")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds allowed to one (op, provider) subprocess")
    p.add_argument("--append", action="store_true", help="append to results.jsonl instead of replacing it")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rebuild plots and summary from --out/results.jsonl")
    p.add_argument("--update-readme", nargs="?", const=str(Path(__file__).resolve().parent.parent / "README.md"),
                   default=None, metavar="README", help="rewrite the benchmark block of README.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan_cases(spec, device_type: str, quick: bool, providers, dtypes, modes):
    """[(provider, size, dtype, modes)] to measure, and [(provider, note)] statically skipped."""
    from bench.harness import static_skip

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
    from bench.harness import fmt_mb, fmt_ms
    shape = ",".join(f"{k}={v}" for k, v in (rec.get("shape") or {}).items())
    line = f"{rec['op']:<10} {rec['provider']:<18} {shape:<32} {rec.get('dtype') or '-':<9} {rec.get('mode') or '-':<17}"
    if rec.get("status") == "ok":
        line += f" {fmt_ms(rec.get('p50_ms')):>10}  mem {fmt_mb(rec.get('peak_mem_mb')):>10}"
        if rec.get("images_per_s"):
            line += f"  {rec['images_per_s']:.0f} img/s"
    else:
        # shortened at a word boundary, never mid-word
        line += f" [{rec.get('status')}] " + textwrap.shorten(str(rec.get("note", "")), 100,
                                                             placeholder=" ...")
    print(line, file=sys.stderr, flush=True)


def run_in_process(specs, args, device, cfg, emit):
    from bench.harness import Size, run_case

    for spec in specs:
        cases, skipped = plan_cases(spec, device.type, args.quick, args.provider, args.dtype, args.mode)
        if not args.worker:
            for provider, note in skipped:
                emit({"op": spec.name, "family": spec.family, "provider": provider, "mode": "-",
                      "shape": None, "x": None, "dtype": None, "device": device.type,
                      "status": "skipped", "note": note})
        for provider, size, dt, modes in cases:
            for rec in run_case(spec, provider, Size(size.shape, modes, size.providers), dt, device, cfg):
                emit(rec)


def run_isolated(specs, args, device, emit):
    """One subprocess per (op, provider); cases a crashed or timed-out worker did not report
    are recorded as errors."""
    for spec in specs:
        cases, skipped = plan_cases(spec, device.type, args.quick, args.provider, args.dtype, args.mode)
        for provider, note in skipped:
            emit({"op": spec.name, "family": spec.family, "provider": provider, "mode": "-",
                  "shape": None, "x": None, "dtype": None, "device": device.type,
                  "status": "skipped", "note": note})
        providers = list(dict.fromkeys(c[0] for c in cases))
        for provider in providers:
            expected = {}
            for prov, size, dt, modes in cases:
                if prov != provider:
                    continue
                for m in modes:
                    key = _case_key(spec.name, prov, size.shape, str(dt).replace("torch.", ""), m)
                    expected[key] = (size, dt, m)
            cmd = [sys.executable, "-m", WORKER_MODULE, "--worker", "--no-isolate", "--op", spec.name,
                   "--provider", provider, "--device", device.type]
            if args.quick:
                cmd.append("--quick")
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            for d in args.dtype or ():
                cmd += ["--dtype", d]
            for m in args.mode or ():
                cmd += ["--mode", m]
            seen = set()
            failure = None
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True,
                                        cwd=Path(__file__).resolve().parent.parent)
                deadline = time.monotonic() + args.timeout
                import selectors
                sel = selectors.DefaultSelector()
                sel.register(proc.stdout, selectors.EVENT_READ)
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        proc.kill()
                        failure = f"timeout: the worker ran past {args.timeout:.0f} s"
                        break
                    if not sel.select(timeout=min(remaining, 5.0)):
                        if proc.poll() is not None:
                            break
                        continue
                    line = proc.stdout.readline()
                    if not line:
                        break
                    if line.startswith(RECORD_PREFIX):
                        rec = json.loads(line[len(RECORD_PREFIX):])
                        seen.add(_case_key(rec["op"], rec["provider"], rec["shape"], rec["dtype"], rec["mode"]))
                        emit(rec)
                rc = proc.wait()
                if failure is None and rc != 0:
                    failure = f"worker exited with code {rc}"
            except Exception as exc:  # noqa: BLE001
                failure = f"could not run the worker: {exc}"
            for key, (size, dt, m) in expected.items():
                if key not in seen:
                    emit({"op": spec.name, "family": spec.family, "provider": provider,
                          "shape": dict(size.shape), "x": size.shape.get(spec.x_key), "x_key": spec.x_key,
                          "dtype": str(dt).replace("torch.", ""), "device": device.type, "mode": m,
                          "status": "error", "note": failure or "the worker did not report this case"})


# Benchmarks outside the op harness, run by --op NAME with their own options after it:
# python -m bench --op input [--threads 1,2 --out DIR ...] is python -m bench.input [...].
STANDALONE = {"input": "bench.input"}


def main(argv=None) -> int:
    import gc
    import importlib

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "--op" and args[1] in STANDALONE:
        return importlib.import_module(STANDALONE[args[1]]).main(args[2:])

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
        from bench.harness import BenchConfig
        specs = select_specs(args.op)
        cfg = BenchConfig.for_run(args.quick)

        def emit_stdout(rec):
            print(RECORD_PREFIX + json.dumps(rec), flush=True)
        run_in_process(specs, args, device, cfg, emit_stdout)
        return 0

    from bench import plots, results, summary
    from bench.harness import BenchConfig

    if args.out is None:
        if args.quick:
            args.out = Path(tempfile.gettempdir()) / "fastssl-bench-quick" / results.device_dir_name(device)
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
        isolate = (device.type == "cuda" and not args.quick) if args.isolate is None else args.isolate
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
        print(f"README benchmark block {'updated' if changed else 'unchanged'}: {args.update_readme}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
