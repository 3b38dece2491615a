"""python -m bench.backend_choice --out DIR: which backend `auto` should prefer on CUDA tensors,
per family, from a measurement on this GPU (docs/design.md, "auto").

    python -m bench.backend_choice --out DIR            # on a GPU: tests, timings, the choice
    python -m bench.backend_choice --dry-run --out DIR  # the same code path on CPU, tiny sizes

For sortnet and swav (both have CUDA and Triton kernels): the CUDA-device tests of each backend
(pytest -k over the family's test files), `cuda` against `triton` times at the benchmark sizes
(bench/sortnet.py and bench/swav.py through run_case), and the choice: `cuda` only if its tests
all passed, every case was timed and it is faster by more than MARGIN (geometric mean), else
`triton`, printed as fastssl/_backend.py AUTO_CUDA_ORDER entries. Writes backend_choice.json
(after every step), backend_choice_tests.json and backend_choice.md. Without a CUDA device it
says so and exits 0; --dry-run times `cpp`/`torch` standing in for cuda/triton on CPU. Honours
$FASTSSL_GPU_RUN_DEADLINE and --max-seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from . import sortnet, swav
from .common import DEADLINE_ENV, run_capped, table
from .harness import BenchConfig, run_case

MARGIN = 1.05  # cuda must be this much faster (geometric mean): smaller gaps are within noise

# family -> (test files, {backend: -k expression selecting its CUDA-device cases}, bench ops)
FAMILIES = {
    "sortnet": (("tests/ops/test_soft_sort.py", "tests/ops/test_groco_ops.py"),
                {"cuda": "cuda-cuda", "triton": "triton-cuda"},
                ("soft_sort", "groco")),
    "swav": (("tests/ops/test_swav_ops.py",),
             {"cuda": "test_cuda_backends_match_fp64 and cuda]",
              "triton": "test_cuda_backends_match_fp64 and triton]"},
             ("sinkhorn",)),
}
BACKENDS = ("cuda", "triton")
# --dry-run on CPU: the providers standing in for cuda and triton (same code path, CPU backends)
DRY_STANDIN = {"cuda": "fastssl:cpp", "triton": "fastssl:torch"}


def _deadline(max_seconds: float | None) -> float:
    ends = [time.time() + max_seconds] if max_seconds else []
    if os.environ.get(DEADLINE_ENV):
        ends.append(float(os.environ[DEADLINE_ENV]) - 5.0)  # leave the parent time to report
    return min(ends) if ends else math.inf


# ----------------------------------------------------------------------------------------------
# tests


def run_tests(family: str, backend: str, out: Path, deadline: float) -> dict:
    """The family's CUDA-device test cases of one backend; counts from pytest's junit xml."""
    files, kexpr, _ = FAMILIES[family]
    xml = out / f"junit_{family}_{backend}.xml"
    left = deadline - time.time()
    if left < 10:
        return {"status": "not run (time cap)", "passed": 0, "failed": 0, "skipped": 0}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", kexpr[backend],
           "--junitxml", str(xml), *files]
    env = dict(os.environ)
    env.pop("FASTSSL_BACKEND", None)
    with tempfile.TemporaryFile("w+") as log:
        rc, secs = run_capped(cmd, log, None if math.isinf(left) else left, env=env)
        log.seek(0)
        tail = log.read()[-2000:] if rc != "timeout" else "cut off at the time cap"
    rc = None if rc == "timeout" else rc
    res = {"command": " ".join(cmd[1:]), "rc": rc, "seconds": round(secs, 1),
           "passed": 0, "failed": 0, "skipped": 0, "failures": []}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                res["failed"] += 1
                res["failures"].append(name)
            elif case.find("skipped") is not None:
                res["skipped"] += 1
            else:
                res["passed"] += 1
    # rc 5: nothing selected; counted as "no test ran", never as a pass
    res["status"] = ("passed" if rc == 0 and res["passed"] and not res["failed"]
                     else "failed" if res["failed"] or rc not in (0, 5) else "no test ran")
    if res["status"] == "failed":
        res["tail"] = tail
    return res


# ----------------------------------------------------------------------------------------------
# timings


def time_family(family: str, device, dry_run: bool, deadline: float) -> list[dict]:
    """cuda against triton on the family's benchmark cases: one row per (op, size, dtype, mode)
    with both backends' p50."""
    specs = {s.name: s for s in (*sortnet.SPECS, *swav.SPECS)}
    cfg = BenchConfig.for_run(quick=dry_run)
    providers = (DRY_STANDIN if dry_run else {b: f"fastssl:{b}" for b in BACKENDS})
    rows = []
    for op in FAMILIES[family][2]:
        spec = specs[op]
        for size in spec.sizes(device.type, dry_run):
            # Only the cases that both backends run: the fastssl providers of the full output.
            if size.providers is not None and "fastssl" not in size.providers:
                continue
            for dtype in spec.dtypes(device.type, dry_run):
                for mode in (size.modes or spec.modes):
                    if mode == "backward":  # forward+backward covers it
                        continue
                    row = {"op": op, "shape": dict(size.shape),
                           "dtype": str(dtype).replace("torch.", ""), "mode": mode}
                    for backend, provider in providers.items():
                        if time.time() > deadline:
                            row[backend] = {"status": "not run (time cap)"}
                            continue
                        one = type(size)(size.shape, modes=(mode,), providers=size.providers)
                        recs = list(run_case(spec, provider, one, dtype, device, cfg))
                        rec = next((r for r in recs if r["mode"] == mode), recs[0])
                        row[backend] = {"status": rec["status"], "p50_ms": rec.get("p50_ms"),
                                        "provider": provider, "note": rec.get("note", "")}
                    c, t = row["cuda"], row["triton"]
                    if c.get("status") == "ok" and t.get("status") == "ok" and c["p50_ms"]:
                        row["triton_over_cuda"] = t["p50_ms"] / c["p50_ms"]
                    rows.append(row)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# the choice


def decide(tests: dict, timings: list[dict]) -> dict:
    """{"prefer": "cuda" | "triton", "why": ...} for one family."""
    ct = tests.get("cuda", {})
    if ct.get("status") != "passed":
        return {"prefer": "triton", "why": f"cuda tests: {ct.get('status', 'not run')} "
                f"({ct.get('passed', 0)} passed, {ct.get('failed', 0)} failed)"}
    if not timings:
        return {"prefer": "triton", "why": "no timed case"}
    missing = [r for r in timings if "triton_over_cuda" not in r]
    if missing:
        r = missing[0]
        return {"prefer": "triton", "why": f"{len(missing)} of {len(timings)} cases not timed on "
                f"both backends (e.g. {r['op']} {r['shape']} {r['dtype']}: cuda "
                f"{r['cuda'].get('status')}, triton {r['triton'].get('status')})"}
    ratios = [r["triton_over_cuda"] for r in timings]
    gm = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    faster = gm > MARGIN
    return {"prefer": "cuda" if faster else "triton", "geomean_triton_over_cuda": gm,
            "min": min(ratios), "max": max(ratios), "cases": len(ratios),
            "why": (f"cuda tests passed ({ct['passed']}); cuda {gm:.2f}x triton's speed "
                    f"(geometric mean over {len(ratios)} cases, {min(ratios):.2f}x to "
                    f"{max(ratios):.2f}x): " + ("faster" if faster else
                                                f"not faster by more than {MARGIN:.2f}x"))}


def auto_order_line(family: str, prefer: str) -> str:
    order = ("cuda", "triton", "torch") if prefer == "cuda" else ("triton", "cuda", "torch")
    return f'"{family}": {order!r},'


def markdown(result: dict) -> str:
    cell = lambda x: f"{x.get('status', '-')} ({x.get('passed', 0)}/{x.get('failed', 0)})"  # noqa: E731
    fams = result["families"].items()
    rows = []
    for fam, r in fams:
        t, d = r.get("tests", {}), r.get("decision", {})
        gm = d.get("geomean_triton_over_cuda")
        rows.append([fam, cell(t.get("cuda", {})), cell(t.get("triton", {})),
                     "-" if gm is None else f"{gm:.2f}x", d.get("prefer", "-"), d.get("why", "-")])
    ms = lambda row, b: (f"{row[b]['p50_ms']:.3f}" if row[b].get("p50_ms") is not None  # noqa: E731
                         else row[b].get("status", "-"))
    timings = [[row["op"], row["shape"], row["dtype"], row["mode"], ms(row, "cuda"),
                ms(row, "triton"), "-" if row.get("triton_over_cuda") is None
                else f"{row['triton_over_cuda']:.2f}"]
               for _, r in fams for row in r.get("timings", [])]
    return "\n".join(
        ["# Backend choice for `auto` on CUDA tensors", "",
         f"Device: {result['device']}; torch {result['torch']}, triton {result['triton']}"
         + ("; DRY RUN (CPU stand-ins: cpp for cuda, torch for triton)"
            if result["dry_run"] else ""),
         ""] + table(["family", "cuda tests", "triton tests", "triton/cuda p50 (geomean)",
                      "auto should prefer", "why"], rows)
        + ["", "Tests: status (passed/failed). Timings (p50 ms):", ""]
        + table(["op", "shape", "dtype", "mode", "cuda", "triton", "triton/cuda"], timings)
        + ["", "AUTO_CUDA_ORDER entries (fastssl/_backend.py) this run supports:", "", "```"]
        + [auto_order_line(f, r["decision"]["prefer"]) for f, r in fams if "decision" in r]
        + ["```", ""])


def _write(out: Path, result: dict) -> None:
    (out / "backend_choice.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "backend_choice_tests.json").write_text(json.dumps(
        {f: r.get("tests", {}) for f, r in result["families"].items()}, indent=1) + "\n")
    (out / "backend_choice.md").write_text(markdown(result))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for backend_choice.{json,md}")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny sizes, cpp/torch standing in for cuda/triton")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop starting new steps after this long (also $%s)" % DEADLINE_ENV)
    p.add_argument("--families", default=",".join(FAMILIES),
                   help="comma-separated subset of " + ", ".join(FAMILIES))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    families = [f for f in a.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        p.error(f"--families: unknown {unknown}; choose from {list(FAMILIES)}")
    if not a.dry_run and not torch.cuda.is_available():
        note = ("bench.backend_choice needs a CUDA device (none here): nothing measured; "
                "`auto` keeps triton first on CUDA (fastssl/_backend.py AUTO_CUDA_ORDER). "
                "--dry-run runs the same code path on CPU.")
        print(note)
        (out / "backend_choice.md").write_text(f"# Backend choice\n\n{note}\n")
        return 0
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - recorded, the tests say what it means
        triton_version = None
    device = torch.device("cpu" if a.dry_run else "cuda")
    deadline = _deadline(a.max_seconds)
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "triton": triton_version, "dry_run": a.dry_run,
              "margin": MARGIN, "families": {f: {} for f in families}}
    for fam in families:
        r = result["families"][fam]
        r["tests"] = {b: run_tests(fam, b, out, deadline) for b in BACKENDS}
        _write(out, result)
        r["timings"] = time_family(fam, device, a.dry_run, deadline)
        r["decision"] = decide(r["tests"], r["timings"])
        _write(out, result)
    for fam, r in result["families"].items():
        print(f"{fam}: auto should prefer {r['decision']['prefer']} on this device "
              f"({r['decision']['why']})")
    print("AUTO_CUDA_ORDER entries:", " ".join(auto_order_line(f, r["decision"]["prefer"])
                                               for f, r in result["families"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
