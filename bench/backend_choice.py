"""python -m bench.backend_choice --out DIR: which backend `auto` should prefer on CUDA tensors,
per family, from a measurement on this GPU (docs/design.md, "auto").

    python -m bench.backend_choice --out DIR            # on a GPU: tests, timings, the choice
    python -m bench.backend_choice --dry-run --out DIR  # the same code path on CPU, tiny sizes

For sortnet and swav (CUDA and Triton kernels both): each backend's CUDA-device tests (pytest
-k), `cuda` against `triton` timed interleaved at the benchmark sizes, and the choice: `cuda`
only if its tests all passed, every case was timed and it is faster by more than MARGIN
(geometric mean), else `triton`, printed as fastssl/_backend.py AUTO_CUDA_ORDER entries. Writes
backend_choice.json (after every step), backend_choice_tests.json and backend_choice.md. No
CUDA device: says so, exits 0; --dry-run times `cpp`/`torch` standing in on CPU. Honours
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
from .harness import BenchConfig, Size, run_group

MARGIN = 1.05  # cuda must be this much faster (geometric mean): smaller gaps are within noise
# family -> (test files, {backend: -k expression selecting its CUDA-device cases}, bench ops)
FAMILIES = {
    "sortnet": (("tests/ops/test_soft_sort.py", "tests/ops/test_groco_ops.py"),
                {"cuda": "cuda-cuda", "triton": "triton-cuda"}, ("soft_sort", "groco")),
    "swav": (("tests/ops/test_swav_ops.py",),
             {"cuda": "test_cuda_backends_match_fp64 and cuda]",
              "triton": "test_cuda_backends_match_fp64 and triton]"}, ("sinkhorn",)),
}
BACKENDS = ("cuda", "triton")
DRY_STANDIN = {"cuda": "fastssl:cpp", "triton": "fastssl:torch"}   # --dry-run on CPU


def run_tests(family: str, backend: str, out: Path, deadline: float) -> dict:
    """The family's CUDA-device test cases of one backend; counts from pytest's junit xml."""
    files, kexpr, _ = FAMILIES[family]
    xml, left = out / f"junit_{family}_{backend}.xml", deadline - time.time()
    if left < 10:
        return {"status": "not run (time cap)", "passed": 0, "failed": 0, "skipped": 0}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", kexpr[backend],
           "--junitxml", str(xml), *files]
    env = {k: v for k, v in os.environ.items() if k != "FASTSSL_BACKEND"}
    with tempfile.TemporaryFile("w+") as log:
        rc, secs = run_capped(cmd, log, None if math.isinf(left) else left, env=env)
        log.seek(0)
        tail = log.read()[-2000:] if rc != "timeout" else "cut off at the time cap"
    rc = None if rc == "timeout" else rc
    res = {"command": " ".join(cmd[1:]), "rc": rc, "seconds": round(secs, 1), "passed": 0,
           "failed": 0, "skipped": 0, "failures": []}
    for case in ET.parse(xml).getroot().iter("testcase") if xml.exists() else ():
        if case.find("failure") is not None or case.find("error") is not None:
            res["failed"] += 1
            res["failures"].append(f"{case.get('classname')}::{case.get('name')}")
        else:
            res["skipped" if case.find("skipped") is not None else "passed"] += 1
    # rc 5: nothing selected; counted as "no test ran", never as a pass
    res["status"] = ("passed" if rc == 0 and res["passed"] and not res["failed"]
                     else "failed" if res["failed"] or rc not in (0, 5) else "no test ran")
    if res["status"] == "failed":
        res["tail"] = tail
    return res


def time_family(family: str, device, dry_run: bool, deadline: float) -> list[dict]:
    """cuda against triton, interleaved, on the family's benchmark cases that both run."""
    specs = {s.name: s for s in (*sortnet.SPECS, *swav.SPECS)}
    cfg = BenchConfig.for_run(quick=dry_run)
    providers = DRY_STANDIN if dry_run else {b: f"fastssl:{b}" for b in BACKENDS}
    rows = []
    for op in FAMILIES[family][2]:
        spec = specs[op]
        for size in spec.sizes(device.type, dry_run):
            if size.providers is not None and "fastssl" not in size.providers:
                continue
            for dtype in spec.dtypes(device.type, dry_run):
                for mode in (m for m in size.modes or spec.modes if m != "backward"):
                    row = {"op": op, "shape": dict(size.shape), "mode": mode,
                           "dtype": str(dtype).replace("torch.", "")}
                    recs = {} if time.time() > deadline else {r["provider"]: r for r in run_group(
                        spec, tuple(providers.values()), Size(size.shape, (mode,)), dtype, device,
                        cfg)}
                    for backend, prov in providers.items():
                        rec = recs.get(prov, {"status": "not run (time cap)"})
                        row[backend] = {"status": rec["status"], "p50_ms": rec.get("p50_ms"),
                                        "provider": prov, "note": rec.get("note", "")}
                    c, t = row["cuda"], row["triton"]
                    if c["status"] == "ok" and t["status"] == "ok" and c["p50_ms"]:
                        row["triton_over_cuda"] = t["p50_ms"] / c["p50_ms"]
                    rows.append(row)
    return rows


def decide(tests: dict, timings: list[dict]) -> dict:
    """{"prefer": "cuda" | "triton", "why": ...} for one family."""
    ct = tests.get("cuda", {})
    if ct.get("status") != "passed":
        return {"prefer": "triton", "why": f"cuda tests: {ct.get('status', 'not run')} "
                f"({ct.get('passed', 0)} passed, {ct.get('failed', 0)} failed)"}
    if not timings:
        return {"prefer": "triton", "why": "no timed case"}
    if missing := [r for r in timings if "triton_over_cuda" not in r]:
        r = missing[0]
        return {"prefer": "triton", "why": f"{len(missing)} of {len(timings)} cases not timed on "
                f"both backends (e.g. {r['op']} {r['shape']} {r['dtype']}: cuda "
                f"{r['cuda'].get('status')}, triton {r['triton'].get('status')})"}
    ratios = [r["triton_over_cuda"] for r in timings]
    gm = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    return {"prefer": "cuda" if gm > MARGIN else "triton", "geomean_triton_over_cuda": gm,
            "min": min(ratios), "max": max(ratios), "cases": len(ratios),
            "why": (f"cuda tests passed ({ct['passed']}); cuda {gm:.2f}x triton's speed "
                    f"(geometric mean over {len(ratios)} cases, {min(ratios):.2f}x to "
                    f"{max(ratios):.2f}x): " + ("faster" if gm > MARGIN else
                                                f"not faster by more than {MARGIN:.2f}x"))}


def auto_order_line(family: str, prefer: str) -> str:
    order = ("cuda", "triton", "torch") if prefer == "cuda" else ("triton", "cuda", "torch")
    return f'"{family}": {order!r},'


def markdown(result: dict) -> str:
    def cell(x):
        return f"{x.get('status', '-')} ({x.get('passed', 0)}/{x.get('failed', 0)})"

    def ms(row, b):
        return f"{row[b]['p50_ms']:.3f}" if row[b].get("p50_ms") is not None else \
            row[b].get("status", "-")
    fams = result["families"].items()
    rows = [[fam, cell(r.get("tests", {}).get("cuda", {})),
             cell(r.get("tests", {}).get("triton", {})),
             "-" if (gm := r.get("decision", {}).get("geomean_triton_over_cuda")) is None
             else f"{gm:.2f}x", r.get("decision", {}).get("prefer", "-"),
             r.get("decision", {}).get("why", "-")] for fam, r in fams]
    timings = [[row["op"], row["shape"], row["dtype"], row["mode"], ms(row, "cuda"),
                ms(row, "triton"), "-" if row.get("triton_over_cuda") is None
                else f"{row['triton_over_cuda']:.2f}"]
               for _, r in fams for row in r.get("timings", [])]
    dry = "; DRY RUN (CPU stand-ins: cpp for cuda, torch for triton)" if result["dry_run"] else ""
    return "\n".join(
        ["# Backend choice for `auto` on CUDA tensors", "",
         f"Device: {result['device']}; torch {result['torch']}, triton {result['triton']}{dry}",
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
                   help=f"stop starting new steps after this long (also ${DEADLINE_ENV})")
    p.add_argument("--families", default=",".join(FAMILIES),
                   help="comma-separated subset of " + ", ".join(FAMILIES))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    families = [f for f in a.families.split(",") if f]
    if unknown := sorted(set(families) - set(FAMILIES)):
        p.error(f"--families: unknown {unknown}; choose from {list(FAMILIES)}")
    if not a.dry_run and not torch.cuda.is_available():
        note = ("bench.backend_choice needs a CUDA device (none here): nothing measured; `auto` "
                "keeps triton first on CUDA (fastssl/_backend.py AUTO_CUDA_ORDER). --dry-run "
                "runs the same code path on CPU.")
        print(note)
        (out / "backend_choice.md").write_text(f"# Backend choice\n\n{note}\n")
        return 0
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - recorded, the tests say what it means
        triton_version = None
    device = torch.device("cpu" if a.dry_run else "cuda")
    ends = [time.time() + a.max_seconds] if a.max_seconds else []
    if os.environ.get(DEADLINE_ENV):   # leave the parent time to report
        ends.append(float(os.environ[DEADLINE_ENV]) - 5.0)
    deadline = min(ends, default=math.inf)
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
