"""fastssl against what users would otherwise run (issues 18, 25), and the README's block.

    python -m bench.compare --out DIR [--roofline] [--max-n BUDGET_MIB]
                            [--competing-load [--competing-tiny]] [--note TEXT] [--update-readme]

writes DIR/compare.md: per op and size fastssl's ratio against eager and the fastest peer
(their time / fastssl's), its memory as a fraction of eager's, GFLOP/s and ms per GFLOP (a jump
across sizes flagged), the verdicts; roofline.json (float32 GEMM), max_n.json (largest nt_xent
B in a budget) and competing_load.json (fastssl and eager interleaved under a GEMM load).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import fastssl
import fastssl.functional as fast

from . import baselines, contrastive
from .common import (BEGIN, END, README, RESULTS_ROOT, device_type, fmt_mb, fmt_ms, git_commit,
                     is_peer, latest_by_case, load_json, load_jsonl, shape_str, table)
from .harness import BenchConfig, _interleaved, _mode_steps, _provider_ctx, _with_ctx, \
    cpu_alloc_peak, time_cpu

# CPU target (issue 18): no slower than eager at any N >= 2048, memory <= 1/8 of eager. N is
# the batch per view B (issue 18's reading); TWO_VIEW_OPS would count both views for an op.
MEMORY_TARGET_OPS = ("nt_xent", "info_nce", "dcl", "dclw", "sogclr", "sce")
MEMORY_FRACTION = 1 / 8
TARGET_MIN_N = 2048
TWO_VIEW_OPS: tuple[str, ...] = ()
JUMP = 1.5   # ms per GFLOP growing more than this from one size to the next: flagged (issue 25)

PEER_NOTES = {
    "peer:torchsort": (
        "torchsort (soft_sort, `output=values` rows) is a different relaxation: a projection onto "
        "the permutahedron (isotonic regression, O(n log n) per row, regularization_strength 1.0, "
        "l2) returning values only, no permutation matrix; fastssl is timed on its values path "
        "(return_permutation=False). The row compares time, not the same loss: the sorting "
        "network runs O(n log^2 n) relaxed comparators per row to produce P, which GroCo and "
        "diffsort users differentiate through, so a miss there is that difference in algorithm."),
    "peer:lightly": ("lightly: its own loss modules (NTXentLoss, DCLLoss, DCLWLoss, SwaVLoss, "
                     "sinkhorn), imported without lightly's package inits (bench/baselines.py)."),
    "diffsort": "diffsort: DiffSortNet, the same relaxation as fastssl.soft_sort (values and P).",
}
MODES_NOTE = (
    "Modes: `forward` is the loss evaluated under torch.no_grad() (validation, monitoring); "
    "`backward` the backward of a recorded forward; `forward+backward` a training step, the row "
    "that compares training cost. fastssl's NT-Xent, InfoNCE, SCE, SFRIK and AUH make their "
    "gradient during the recorded forward (same pass: three products like eager autograd, none "
    "recomputed), so their backward rows are short and only the step compares with eager's "
    "forward-plus-backward. Providers are timed interleaved in one process (call k of each "
    "before call k+1 of any), the previous call's outputs and gradients alive as in a loop.")


def in_target_range(row: dict) -> bool:
    """Whether a row's size is inside its op's target range (always, for ops without one)."""
    n = (2 if row["op"] in TWO_VIEW_OPS else 1) * row["shape"].get("B", 0)
    return row["op"] not in MEMORY_TARGET_OPS or n >= TARGET_MIN_N


def _below_range(op: str) -> str:
    b = TARGET_MIN_N // (2 if op in TWO_VIEW_OPS else 1)
    return f"below the target range (B < {b}, N < {TARGET_MIN_N})"


def load_note(records: list[dict]) -> str | None:
    """The machine's load while the records were measured, in words (None: no load recorded)."""
    loads = sorted(r["loadavg_1m"] for r in records if r.get("loadavg_1m") is not None)
    if not loads:
        return None
    cores = next((r.get("cpu_count") for r in records if r.get("cpu_count")), None)
    threads = next((r.get("num_threads") for r in records if r.get("num_threads")), None)
    med = loads[len(loads) // 2]
    runs = sorted({str(r["timestamp"])[:16] for r in records if r.get("timestamp")})
    text = (f"1-minute load average while measuring: median {med:.1f}, range "
            f"{loads[0]:.1f}-{loads[-1]:.1f}" + (f", on {cores} cores" if cores else "")
            + (f" ({threads} benchmark threads)" if threads else ""))
    if len(runs) > 1:
        text += (f", records from {len(runs)} runs ({', '.join(runs)} UTC; the latest record of "
                 "a case counts)")
    if cores:   # what exceeds the core count is other processes competing for the CPU
        text += (". The machine was loaded: other processes competed for the cores for most of "
                 "the run, so absolute times are inflated and noisy" if med > cores else
                 ". Partly loaded: the load exceeded the core count during part of the run "
                 "(other processes competing), so some cases carry that noise"
                 if loads[-1] > cores else
                 ". The load stayed within the core count: no sustained competition for the cores")
    return text + "."


def model_flop(op: str, shape: dict, mode: str) -> float | None:
    """The fewest matmul FLOPs the loss needs: forward one product per similarity matrix;
    forward+backward three for A B^T, two for a Gram Z Z^T (dZ = (dS + dS^T) Z)."""
    b, d = shape.get("B"), shape.get("D")
    mult = 3 if mode == "forward+backward" else 1 if mode == "forward" else 2
    gram = 2 if mode == "forward+backward" else 1
    if op in ("nt_xent", "dcl", "dclw", "sogclr"):
        return gram * 2 * (2 * b) ** 2 * d
    if op == "info_nce":
        return mult * 2 * b * b * d
    if op == "sce":   # q @ queue.T (with a gradient) and k @ queue.T (without one)
        return (mult + 1) * 2 * b * shape["K"] * d
    if op in ("sfrik", "auh", "sfrik_mmd"):
        return (1 if op == "sfrik_mmd" else 2) * gram * 2 * b * b * d
    return None


def measure_gemm(n: int = 2048, reps: int = 5) -> dict:
    """The machine's float32 GEMM throughput in this process (the roofline), measured now."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b
    times = sorted(time_cpu(lambda: None, lambda _: a @ b,
                            BenchConfig(min_reps=reps, max_reps=reps, min_time_s=0.0)))
    return {"matmul_n": n, "dtype": "float32", "threads": torch.get_num_threads(),
            "matmul_ms": times[len(times) // 2], "gflops": 2 * n**3 / times[len(times) // 2] / 1e6,
            "best_gflops": 2 * n**3 / times[0] / 1e6, "loadavg_1m": os.getloadavg()[0]}


def compare_rows(records: list[dict]) -> list[dict]:
    """One row per (op, shape, dtype, mode) with fastssl measured."""
    cases: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        if r.get("status") == "ok" and r.get("shape") and not r.get("probe"):
            key = (r["op"], json.dumps(r["shape"], sort_keys=True), r.get("dtype"), r.get("mode"))
            cases[key][r["provider"]] = r
    rows = []
    for (op, shape_json, dtype, mode), provs in cases.items():
        if (fast_rec := provs.get("fastssl")) is None:
            continue
        # A baseline whose output is NaN (Sinkhorn overflow) is listed, not ranked.
        peers = [r for p, r in provs.items() if is_peer(p) and r.get("finite", True)]
        eager = provs.get("eager") if provs.get("eager", {}).get("finite", True) else None
        row = {"op": op, "shape": json.loads(shape_json), "dtype": dtype, "mode": mode,
               "fast": fast_rec, "eager": eager, "vs_eager": None, "vs_peer": None,
               "peer": min(peers, key=lambda r: r["p50_ms"]) if peers else None,
               "mem_vs_eager": None, "nan": sorted(p for p, r in provs.items() if (
                   is_peer(p) or p == "eager") and not r.get("finite", True))}
        if eager:
            row["vs_eager"] = eager["p50_ms"] / fast_rec["p50_ms"]
            if fast_rec.get("peak_mem_mb") is not None and eager.get("peak_mem_mb"):
                row["mem_vs_eager"] = fast_rec["peak_mem_mb"] / eager["peak_mem_mb"]
        if row["peer"]:
            row["vs_peer"] = row["peer"]["p50_ms"] / fast_rec["p50_ms"]
        if flop := model_flop(op, row["shape"], mode):
            row["gflops"] = {p: flop / (r["p50_ms"] / 1e3) / 1e9 for p, r in provs.items()}
            row["ms_per_gflop"] = fast_rec["p50_ms"] / (flop / 1e9)
        rows.append(row)
    rows.sort(key=lambda r: (r["op"], r["dtype"], str(sorted(
        (k, v) for k, v in r["shape"].items() if not isinstance(v, int))),
        [v for v in r["shape"].values() if isinstance(v, int)], r["mode"]))
    prev = {}
    for r in rows:   # time per GFLOP along each series: a jump across sizes is a defect
        key = (r["op"], r["dtype"], r["mode"], str({k: v for k, v in r["shape"].items()
                                                       if k != "B"}))
        if r.get("ms_per_gflop") and key in prev and r["ms_per_gflop"] > JUMP * prev[key][0]:
            r["jump"] = (r["ms_per_gflop"] / prev[key][0], prev[key][1])
        if r.get("ms_per_gflop"):
            prev[key] = (r["ms_per_gflop"], r["shape"].get("B"))
    return rows


def _x(v):
    # Three decimals just below 1.0, so that a miss never prints as "1.00x".
    return "-" if v is None else f"{v:.3f}x" if 0.995 <= v < 1.0 else f"{v:.2f}x"


def _shortfalls(row: dict) -> list[str]:
    bad = ["slower than eager"] if row["vs_eager"] is not None and row["vs_eager"] < 1.0 else []
    bad += ["slower than the peer"] if row["vs_peer"] is not None and row["vs_peer"] < 1.0 else []
    if (row["op"] in MEMORY_TARGET_OPS and row["mem_vs_eager"] is not None
            and in_target_range(row) and row["mem_vs_eager"] > MEMORY_FRACTION):
        bad.append("memory > 1/8 of eager")
    return bad


def _verdict(row: dict) -> str:
    """"met", "NOT met: ..." inside the target range, "below the target range ...: ..." else."""
    bad = _shortfalls(row)
    if not bad:
        return "met"
    return (f"{_below_range(row['op'])}: " if not in_target_range(row) else "NOT met: ") + \
        ", ".join(bad)


def op_verdict(rows: list[dict]) -> str:
    """The verdict over the sizes of one op line: the misses in range with their ratios, the
    sizes below the range listed as such."""
    def where(r):
        parts = [f"{_x(r['vs_eager'])} vs eager" if "slower than eager" in _shortfalls(r) else "",
                 f"{_x(r['vs_peer'])} vs {r['peer']['provider']}"
                 if "slower than the peer" in _shortfalls(r) else "",
                 f"memory {r['mem_vs_eager']:.3f} of eager"
                 if "memory > 1/8 of eager" in _shortfalls(r) else ""]
        return f"{_size(r['shape'])}: " + ", ".join(p for p in parts if p)
    missed = [where(r) for r in rows if _shortfalls(r) and in_target_range(r)]
    below = [where(r) for r in rows if _shortfalls(r) and not in_target_range(r)]
    out = ("NOT met at " + "; ".join(missed)) if missed else "met"
    return out + (f"; {_below_range(rows[0]['op'])}: " + "; ".join(below) if below else "")


def _size(shape: dict) -> str:
    return shape_str({k: v for k, v in shape.items() if k in ("B", "K", "n", "crops")})


def _providers_in(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["provider"] for r in records if r.get("provider")))


def _env_note(records: list[dict]) -> list[str]:
    """The THP setting and the C++ block sizes the figures were taken under (newer records)."""
    env = next((r for r in reversed(records) if "thp_enabled" in r), None)
    if env is None:
        return []
    blocks = env.get("cpp_block_config")
    return [f"Transparent huge pages: enabled `{env.get('thp_enabled')}`, defrag "
            f"`{env.get('thp_defrag')}`; C++ contrastive block sizes: "
            f"{json.dumps(blocks) if blocks else 'not reported by this build'}.", ""]


def compare_markdown(records: list[dict], roofline: dict | None = None, max_n: dict | None = None,
                     notes: list[str] | None = None, competing: dict | None = None) -> str:
    lines = ["# fastssl against eager PyTorch and the peers", ""]
    if load := load_note(records):
        lines += [f"Machine load: {load} (p20-p80 ranges per case in summary.md.)", ""]
    lines += _env_note(records)
    if roofline:
        lines += [f"Roofline: float32 GEMM {roofline['matmul_n']}^2 measured in the same run at "
                  f"**{roofline['gflops']:.1f} GFLOP/s** (best {roofline['best_gflops']:.1f}) with "
                  f"{roofline['threads']} threads, load {roofline['loadavg_1m']:.1f}. Achieved "
                  "GFLOP/s count the fewest matmul FLOPs the loss needs (forward 1 product, "
                  "forward+backward 3 for A B^T, 2 for a Gram Z Z^T). The GEMM was measured once, "
                  "under the same shared load: figures above 100% mean the load was lower when the "
                  "op ran, or that its products were larger (D = 1024) and ran closer to peak.", ""]
    peers = [f"`{p}`" for p in _providers_in(records) if is_peer(p)]
    lines += ["Ratio = the baseline's median time / fastssl's (>= 1.00x: fastssl no slower). "
              "`eager` = the best plain PyTorch a user would write from the formula: full "
              "matrices, masks in place, one cross-entropy (bench/baselines.py); peers in this "
              f"run: {', '.join(peers) or 'none'}. Memory = fastssl's allocated peak / eager's "
              "(CPU: the peak of the tensor allocations the torch profiler reports, as CUDA's "
              "max_memory_allocated; the RSS growth, which adds glibc's heap fragmentation, is "
              "in results.jsonl as rss_growth_mb). "
              f"Target range of {', '.join(MEMORY_TARGET_OPS)}: N >= {TARGET_MIN_N} anchors (N "
              "= B, the batch per view); smaller sizes are shown, marked below the target range. "
              f"ms/GFLOP: fastssl's time per model GFLOP; `JUMP` marks a size where it grew more "
              f"than {JUMP}x from the previous size of the series (the time does not scale with "
              "the work: a defect to explain).", "", MODES_NOTE, ""]
    by_op = defaultdict(list)
    for r in compare_rows(records):
        by_op[r["op"]].append(r)
    for op, op_rows in by_op.items():
        lines += [f"## {op}", ""] + table(
            ["shape", "dtype", "mode", "fastssl", "eager", "best peer", "vs eager", "vs peer",
             "memory fastssl / eager", "GFLOP/s fastssl / eager", "ms/GFLOP", "verdict"],
            [_compare_row(r, roofline) for r in op_rows]) + [""]
    if max_n:
        lines += ["## Largest nt_xent batch within a memory budget", "",
                  f"Budget {max_n['budget_mb']:.0f} MiB of peak growth per forward+backward, D = "
                  f"{max_n['D']}, float32; B doubled from {max_n['start_B']} up to the bound "
                  f"{max_n['bound_B']}.", ""] + table(
            ["provider", "largest B that fits (N = 2B)", "first B over the budget",
             "peak at the largest"],
            [[prov, res["max_B"] or "-", res["first_fail_B"] or "- (bound reached)",
              fmt_mb(res.get("peak_mb"))] for prov, res in max_n["providers"].items()]) + [""]
    if competing:
        lines += competing_markdown(competing) + [""]
    auto = [text for prov, text in PEER_NOTES.items() if prov in set(_providers_in(records))]
    if notes or auto:
        lines += ["## Notes", ""] + [f"- {n}" for n in auto + list(notes or [])] + [""]
    return "\n".join(lines)


def _compare_row(r: dict, roofline: dict | None) -> list:
    f, e, p = r["fast"], r["eager"], r["peer"]
    mem = "-" if e is None else f"{fmt_mb(f.get('peak_mem_mb'))} / {fmt_mb(e.get('peak_mem_mb'))}" \
        + ("" if r["mem_vs_eager"] is None else f" ({r['mem_vs_eager']:.3f})")
    gf = r.get("gflops") or {}
    gfs = "-" if "fastssl" not in gf else f"{gf['fastssl']:.1f} / " + (
        f"{gf['eager']:.1f}" if "eager" in gf else "-")
    if roofline and "fastssl" in gf:
        gfs += f" ({100 * gf['fastssl'] / roofline['gflops']:.0f}% of GEMM)"
    per = "-" if not r.get("ms_per_gflop") else f"{r['ms_per_gflop']:.2f}" + (
        f" JUMP x{r['jump'][0]:.1f} from B={r['jump'][1]}" if r.get("jump") else "")
    peer = "-" if p is None else f"{p['provider']} {fmt_ms(p['p50_ms'])}"
    peer += f" (NaN codes: {', '.join(r['nan'])})" if r["nan"] else ""
    return [shape_str(r["shape"]), r["dtype"], r["mode"], fmt_ms(f["p50_ms"]),
            fmt_ms(e["p50_ms"]) if e else "-", peer, _x(r["vs_eager"]), _x(r["vs_peer"]), mem, gfs,
            per, _verdict(r)]


VARIANT_KEYS = ("symmetric", "eps", "network", "crops", "output")


def headline_groups(records: list[dict]) -> list[tuple[str, str, str, list[dict]]]:
    """(op, dtype, variant, rows) for the README: forward+backward rows (forward where that is
    all there is) compared with users' code; float32 on CPU, bfloat16 on GPU, sinkhorn in every
    dtype (the peers overflow in the half types, the point of those rows)."""
    by_op = defaultdict(list)
    for r in compare_rows(records):
        if r["mode"] in ("forward+backward", "forward") and (r["eager"] or r["peer"] or r["nan"]):
            variant = ", ".join(f"{k}={v}" for k, v in r["shape"].items() if k in VARIANT_KEYS
                                and (k, v) not in (("network", "odd_even"), ("crops", 2)))
            by_op[(r["op"], r["dtype"], variant)].append(r)
    out = []
    for (op, dtype, variant), rows in by_op.items():
        gpu = rows[0]["fast"].get("device", "cpu") == "cuda"
        if (op == "sinkhorn" or dtype == "float32" or gpu and dtype == "bfloat16") \
                and "bitonic" not in variant:
            out.append((op, dtype, variant,
                        [r for r in rows if r["mode"] == "forward+backward"] or rows))
    return out


def headline_markdown(records: list[dict], link: str, roofline: dict | None = None) -> str:
    """The README's table: per op and variant, the ratios at the largest size, the worst inside
    the target range in brackets, the verdict over every size."""
    rows = []
    for op, dtype, variant, full in headline_groups(records):
        big = max(full, key=lambda r: tuple(r["shape"].get(k, 0) for k in ("B", "K", "n")))
        ranged = [r for r in full if in_target_range(r)]
        worst_e, worst_p = (min((r[k] for r in ranged if r[k] is not None), default=None)
                            for k in ("vs_eager", "vs_peer"))
        peer = "-" if big["vs_peer"] is None else (
            f"{_x(big['vs_peer'])} {big['peer']['provider']} ({_x(worst_p)})")
        peer += f" ({', '.join(big['nan'])}: NaN codes)" if big["nan"] else ""
        g = (big.get("gflops") or {}).get("fastssl")
        gf = [] if not roofline else ["-" if g is None else
                                      f"{g:.1f} ({100 * g / roofline['gflops']:.0f}%)"]
        rows.append([f"{op} ({dtype}{', ' + variant if variant else ''})", shape_str(big["shape"]),
                     fmt_ms(big["fast"]["p50_ms"]), f"{_x(big['vs_eager'])} ({_x(worst_e)})", peer,
                     "-" if big["mem_vs_eager"] is None else f"{big['mem_vs_eager']:.3f}", *gf,
                     op_verdict(full)])
    lines = table(["op", "largest shape", "fastssl", "vs eager (worst in range)",
                   "vs best peer (worst in range)", "memory / eager",
                   *(["fastssl GFLOP/s (% of GEMM)"] if roofline else []),
                   "verdict over the sizes"], rows)
    return "\n".join(lines + ["", f"Every size, dtype and the largest N within a memory budget: "
                                  f"[{link}]({link})."])


def roofline_line(roofline: dict) -> str:
    return (f"GEMM roofline measured in the same run: float32 {roofline['matmul_n']}^2 at "
            f"{roofline['gflops']:.1f} GFLOP/s (best {roofline['best_gflops']:.1f}), "
            f"{roofline['threads']} threads, load {roofline['loadavg_1m']:.1f}; fastssl's GFLOP/s "
            "count the fewest matmul FLOPs the loss needs.")


def max_n_line(max_n: dict) -> str:
    parts = [f"{prov} {'none' if res.get('first_fail_B') else 'not measured'}"
             if res.get("max_B") is None else f"{prov} B = {res['max_B']}"
             + ("" if res.get("first_fail_B") else " (the bound)")
             for prov, res in max_n["providers"].items()]
    return (f"Largest nt_xent batch within {max_n['budget_mb']:.0f} MiB of peak growth (D = "
            f"{max_n['D']}, float32, forward+backward, B doubled up to {max_n['bound_B']}): "
            + ", ".join(parts) + ".")


def competing_line(competing: dict) -> str:
    cases = competing["cases"]
    ratios, loads = [c["ratio"] for c in cases], [c["loadavg_1m"] for c in cases]
    low = [f"{c['op']} {_shape_short(c['shape'])} {c['ratio']:.2f}x" for c in cases
           if c["ratio"] < 1.0]
    return (f"Under a competing load ({competing['load']['what']}; load average "
            f"{min(loads):.1f}-{max(loads):.1f} on {competing['cpu_count']} cores), fastssl and "
            f"eager timed interleaved: eager/fastssl {min(ratios):.2f}x-{max(ratios):.2f}x over "
            f"{len(cases)} cases" + ("; below 1.0: " + ", ".join(low) if low else
                                     ", every case >= 1.0") + ".")


def _shape_short(shape: dict) -> str:
    return shape_str(shape, skip=("D",))


def search_max_b(probe, b0: int, b_max: int, bisect: int = 0, time_left=lambda: math.inf) -> dict:
    """The largest B that fits: B doubled from b0 while probe(B) -> (fits, seconds, peak MiB)
    fits, up to b_max, while the predicted next call (4x the last: O(N^2)) fits the time left;
    then `bisect` halvings of the gap to the first failure."""
    best, fail, peak_best, last_s, b, end = None, None, None, 0.0, b0, "reached the bound"
    while b <= b_max:
        if time_left() < max(2.0, 4.5 * last_s):
            end = "stopped: the next size would not fit the part's time cap"
            break
        ok, last, peak = probe(b)
        if not ok:
            fail, end = b, "first failure"
            break
        best, peak_best, last_s, b = b, peak, last, 2 * b
    for _ in range(bisect):   # between the last fit and the first failure (1/8 resolution)
        if (best is None or fail is None or fail - best <= max(8, best // 8)
                or time_left() < max(2.0, 2 * last_s)):
            break
        mid = (best + fail) // 2
        ok, _, peak = probe(mid)
        best, fail, peak_best = (mid, fail, peak) if ok else (best, mid, peak_best)
    return {"max_B": best, "first_fail_B": fail, "peak_mb": peak_best, "end": end}


def max_n_search(budget_mb: float, start_b: int, bound_b: int,
                 providers=("fastssl", "eager", "peer:lightly"), d: int = 128) -> dict:
    """search_max_b for nt_xent forward+backward on CPU within a peak-growth budget."""
    out = {"budget_mb": budget_mb, "D": d, "start_B": start_b, "bound_B": bound_b, "providers": {}}
    for prov in providers:
        try:
            fn = fast.nt_xent if prov == "fastssl" else baselines.eager_nt_xent \
                if prov == "eager" else baselines.peer("nt_xent", prov.split(":", 1)[1])
        except baselines.PeerMissing as e:
            out["providers"][prov] = {"max_B": None, "first_fail_B": None, "note": str(e)}
            continue

        def probe(b):
            g = torch.Generator().manual_seed(b)
            zs = [torch.randn(b, d, generator=g).requires_grad_() for _ in range(2)]
            with fastssl.use_backend("auto"):
                try:
                    peak = cpu_alloc_peak(lambda: zs, lambda z: fn(*z).backward())[0]
                except (RuntimeError, MemoryError):
                    peak = None
            mb = None if peak is None else peak / 2**20
            return mb is not None and mb <= budget_mb, 0.0, mb
        res = search_max_b(probe, start_b, bound_b)
        out["providers"][prov] = {k: res[k] for k in ("max_B", "first_fail_B", "peak_mb")}
    return out


# Every contrastive case at its largest committed size (issue 25), timed under the load.
COMPETING_CASES = (
    ("nt_xent", {"B": 8192, "D": 128}), ("dcl", {"B": 8192, "D": 128}),
    ("dclw", {"B": 8192, "D": 128}), ("info_nce", {"B": 8192, "D": 128, "symmetric": False}),
    ("info_nce", {"B": 8192, "D": 128, "symmetric": True}), ("sogclr", {"B": 4096, "D": 128}),
    ("sce", {"B": 4096, "D": 128, "K": 16384}))
# The same cases at toy sizes: the code path in seconds (tests, smoke runs), not a measurement.
COMPETING_TINY = tuple({(op, json.dumps(s, sort_keys=True)): (op, s) for op, s in (
    (op, {**shape, "B": 32, "D": 16, **({"K": 128} if "K" in shape else {})})
    for op, shape in COMPETING_CASES)}.values())

# The competing process: float32 GEMMs on its own threads until killed; it also exits when its
# parent is gone, so a benchmark killed hard leaves no load behind.
_GEMM_LOOP = """
import os, sys, torch
n, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
parent = os.getppid()
a, b = torch.randn(n, n), torch.randn(n, n)
a @ b
print("ready", flush=True)
while os.getppid() == parent:
    a @ b
"""


class CompetingLoad:
    """A background process running float32 GEMMs (n x n) on `threads` threads for the span of
    a with-block; killed on exit, errors and KeyboardInterrupt included."""

    def __init__(self, threads: int = 2, n: int = 1024):
        self.threads, self.n, self.proc = threads, n, None

    def __enter__(self) -> "CompetingLoad":
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads),
               "MKL_NUM_THREADS": str(self.threads)}
        self.proc = subprocess.Popen([sys.executable, "-c", _GEMM_LOOP, str(self.n),
                                      str(self.threads)], stdout=subprocess.PIPE, text=True,
                                     env=env)
        try:
            if self.proc.stdout.readline().strip() != "ready":   # its first GEMM is done
                raise RuntimeError(f"the competing GEMM process did not start "
                                   f"(exit {self.proc.poll()})")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def what(self) -> str:
        return f"a second process running float32 GEMMs {self.n}^2 on {self.threads} threads"


def time_interleaved(op: str, shape: dict, reps: int = 5) -> dict:
    """fastssl (automatic backend) and eager forward+backward, interleaved as every case of the
    suite is (bench/harness.py), after one warm-up each: medians of `reps` calls each."""
    if reps < 5:
        raise ValueError(f"reps: at least 5 calls per provider, got {reps}")
    spec = next(s for s in contrastive.SPECS if s.name == op)
    steps, leaves = {}, {}
    load0 = os.getloadavg()[0]
    for p in ("fastssl", "eager"):
        with _provider_ctx(p):
            prep = spec.build(p, shape, torch.float32, torch.device("cpu"))
            setup, run = _mode_steps(prep, "forward+backward")
            run(setup())
        steps[p] = (setup, lambda s, run=run, p=p: _with_ctx(p, run, s))
        leaves[p] = prep.leaves
    times = _interleaved(steps, torch.device("cpu"),
                         BenchConfig(min_reps=reps, max_reps=reps, min_time_s=0.0), leaves)
    med = {p: sorted(t)[len(t) // 2] for p, t in times.items()}
    return {"op": op, "shape": dict(shape), "dtype": "float32", "mode": "forward+backward",
            "reps": reps, "fastssl_ms": med["fastssl"], "eager_ms": med["eager"],
            "ratio": med["eager"] / med["fastssl"], "times_ms": times,
            "loadavg_1m": os.getloadavg()[0], "loadavg_1m_start": load0}


def competing_load(cases=COMPETING_CASES, reps: int = 5, load_threads: int = 2, load_n: int = 1024,
                   progress=None) -> dict:
    """Every case timed by `time_interleaved` while a `CompetingLoad` runs; the load process is
    gone when this returns or raises."""
    out = {"load": {}, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "git_commit": git_commit(), "cases": []}
    with CompetingLoad(load_threads, load_n) as load:
        out["load"] = {"what": load.what, "threads": load_threads, "matmul_n": load_n}
        for op, shape in cases:
            out["cases"].append(time_interleaved(op, shape, reps))
            if progress:
                progress(out["cases"][-1])
    out["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    return out


def competing_markdown(competing: dict) -> list[str]:
    def row(c):
        verdict = "met" if c["ratio"] >= 1.0 else "NOT met: slower than eager" if \
            in_target_range(c) else f"{_below_range(c['op'])}: slower than eager"
        return [c["op"], _shape_short(c["shape"]), fmt_ms(c["fastssl_ms"]), fmt_ms(c["eager_ms"]),
                f"{c['ratio']:.2f}x", f"{c['loadavg_1m_start']:.1f}-{c['loadavg_1m']:.1f}", verdict]
    reps = competing["cases"][0]["reps"] if competing["cases"] else "-"
    return ["## Under a competing load: ratio eager/fastssl", "",
            f"Load: {competing['load']['what']}, while fastssl (automatic backend) and eager ran "
            f"forward+backward on {competing['threads']} threads ({competing['cpu_count']} cores), "
            f"interleaved, medians of {reps} calls each (bench/compare.py `competing_load`, "
            f"{competing.get('timestamp', '?')} UTC, commit `{competing.get('git_commit')}`). "
            "Target: ratio >= 1.0.", ""] + table(
        ["op", "shape", "fastssl", "eager", "ratio eager/fastssl", "load average", "verdict"],
        [row(c) for c in competing["cases"]])


def _show(c):
    print(f"{c['op']:<9} {_shape_short(c['shape']):<28} fastssl {fmt_ms(c['fastssl_ms']):>9}  "
          f"eager {fmt_ms(c['eager_ms']):>9}  ratio {c['ratio']:.2f}x  load {c['loadavg_1m']:.1f}",
          file=sys.stderr, flush=True)


def extra_measurements(out: Path, roofline: bool, competing: bool, ops=None, largest=False,
                       tiny=False) -> None:
    """roofline.json and competing_load.json for `python -m bench` (the ops run; tiny: toy)."""
    if roofline:
        (out / "roofline.json").write_text(json.dumps(measure_gemm(), indent=1) + "\n")
    if competing:
        cases = [c for c in (COMPETING_TINY if tiny else COMPETING_CASES)
                 if ops is None or c[0] in ops]
        (out / "competing_load.json").write_text(
            json.dumps(competing_load(cases, progress=_show), indent=1) + "\n")


def write_compare(out: Path, records: list[dict] | None = None, notes: list[str] | None = None):
    """DIR/compare.md from the directory's files; notes replace DIR/compare_notes.json's."""
    if notes:
        (out / "compare_notes.json").write_text(json.dumps(notes, indent=1) + "\n")
    records = load_jsonl(out / "results.jsonl") if records is None else records
    roofline, max_n, competing, saved = (load_json(out / f"{n}.json") for n in (
        "roofline", "max_n", "competing_load", "compare_notes"))
    (out / "compare.md").write_text(compare_markdown(records, roofline, max_n, saved, competing))
    return out / "compare.md"


# Issue 25's targets at the largest size: (op, symmetric) -> (share of the roofline, x eager)
ISSUE25 = {("nt_xent", None): (0.65, 2.5), ("dcl", None): (0.65, 2.5), ("dclw", None): (0.65, 2.5),
           ("sogclr", None): (0.65, 2.5), ("sce", None): (0.65, 2.5),
           ("info_nce", True): (0.65, 2.5), ("info_nce", False): (0.80, 0.0)}


def issue25_verdicts(records: list[dict], out: Path) -> list[str]:
    """One line per issue-25 target from the directory's records and files."""
    roof, comp = load_json(out / "roofline.json"), load_json(out / "competing_load.json")
    rows = compare_rows(list(latest_by_case(records).values()))
    lines, ok = ["issue 25 verdicts:"], lambda c: "met" if c else "NOT met"
    for (op, sym), (share, speed) in ISSUE25.items():
        full = [r for r in rows if r["op"] == op and r["mode"] == "forward+backward" and
                r["dtype"] == "float32" and r["shape"].get("symmetric") == sym]
        if not full:
            lines.append(f"  {op}{'' if sym is None else f' symmetric={sym}'}: not measured")
            continue
        big = max(full, key=lambda r: r["shape"]["B"])
        g = (big.get("gflops") or {}).get("fastssl", 0) / (roof or {}).get("gflops", math.inf)
        ve = big["vs_eager"] or 0
        lines.append(f"  {op}{'' if sym is None else f' symmetric={sym}'} {_size(big['shape'])}: "
                     f"{100 * g:.0f}% of roofline (>= {100 * share:.0f}%: {ok(g >= share)}), "
                     f"{ve:.2f}x eager" + (f" (>= {speed}x: {ok(ve >= speed)})" if speed else ""))
    for c in (comp or {}).get("cases", []):
        lines.append(f"  competing load {c['op']} {_shape_short(c['shape'])}: {c['ratio']:.2f}x "
                     f"eager ({ok(c['ratio'] >= 1.0)})")
    for r in rows:
        if r["op"] in ("sinkhorn", "swav") and r["mode"] in ("forward", "forward+backward") \
                or r["op"] in ("auh", "sfrik") and r["mode"] == "forward" and \
                r["shape"] == {"B": 512, "D": 1024}:
            worst = min(v for v in (r["vs_eager"], r["vs_peer"], math.inf) if v is not None)
            lines.append(f"  {r['op']} {shape_str(r['shape'])} {r['dtype']} {r['mode']}: "
                         f"{_x(worst if worst != math.inf else None)} of eager/lightly "
                         f"({ok(worst >= 1.0) if worst != math.inf else 'no baseline timed'})")
    return lines


# The README block, from every results directory under bench/results/ (the one generator:
# `python -m bench --update-readme` and `python -m bench.compare --update-readme`). Speedups are
# against eager and the best peer only; a directory measured against the reference alone is
# listed by name.


def readme_section(records: list[dict], directory: Path, rel: Path) -> str:
    latest = list(latest_by_case(records).values())
    env, dev = latest[-1], device_type(latest)
    roofline, competing, max_n = (load_json(directory / f"{n}.json")
                                  for n in ("roofline", "competing_load", "max_n"))
    details = rel / ("compare.md" if (directory / "compare.md").exists() else "summary.md")
    lines = [f"**{env.get('device_name', dev)}** ({dev}, {env.get('num_threads')} threads), commit "
             f"`{env.get('git_commit')}`, {str(env.get('timestamp', ''))[:10]}: fastssl against "
             "eager PyTorch and the fastest peer, every provider measured in the same run; ratio "
             "= their median time / fastssl's (>= 1.00x: fastssl no slower); target range of the "
             f"contrastive ops: N >= {TARGET_MIN_N} anchors.", ""]
    if note := load_note(latest):
        lines += [f"Machine load: {note}", ""]
    lines.append(headline_markdown(latest, str(details), roofline))
    extra = ([roofline_line(roofline)] if roofline else []) + (
        [competing_line(competing)] if competing and competing.get("cases") else []) + (
        [max_n_line(max_n)] if max_n else [])
    lines += [""] + [f"- {e}" for e in extra] if extra else []
    if details.name != "summary.md":
        lines += ["", f"Every provider, mode and the reference (the correctness anchor): "
                      f"[{rel}/summary.md]({rel}/summary.md)."]
    return "\n".join(lines)


def readme_block(results_root: Path | None = None) -> str:
    root = Path(RESULTS_ROOT if results_root is None else results_root)
    parts = ["<!-- generated by `python -m bench --update-readme` (or `python -m bench.compare "
             "--update-readme`); edit bench/compare.py, not this block -->", ""]
    shown, anchor_only = 0, []
    for path in sorted(root.glob("*/results.jsonl")):
        records = [r for r in load_jsonl(path) if r.get("op")]
        if not records:
            continue
        rel = (path.parent.relative_to(root.parent.parent)
               if path.is_relative_to(root.parent.parent) else path.parent)
        users = any(r.get("status") == "ok" and (r.get("provider") == "eager" or is_peer(
            r.get("provider", ""))) for r in records)
        if users and headline_groups(list(latest_by_case(records).values())):
            parts += [readme_section(records, path.parent, rel), ""]
            shown += 1
        else:
            anchor_only.append(f"[{rel.name}]({rel}/summary.md)")
    if anchor_only:
        parts += ["Not shown as speedups (no eager or peer baseline in the run; measured against "
                  "the reference, the correctness anchor, or without a baseline): "
                  + ", ".join(anchor_only) + ".", ""]
    if not shown and not anchor_only:
        parts.append("No benchmark results yet: run `python -m bench`.")
    return "\n".join(parts).rstrip()


def update_readme(readme_path: Path, results_root: Path | None = None) -> bool:
    """Rewrite the block between the bench markers; whether the file changed. ValueError if the
    markers are missing or out of order."""
    readme_path = Path(readme_path)
    text = readme_path.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"{readme_path}: expected the markers {BEGIN!r} and {END!r}, in that "
                         "order")
    new = text[:start + len(BEGIN)] + "\n" + readme_block(results_root) + "\n" + text[end:]
    if new != text:
        readme_path.write_text(new)
    return new != text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--roofline", action="store_true", help="measure the GEMM roofline now")
    p.add_argument("--max-n", type=float, default=None, metavar="BUDGET_MIB")
    p.add_argument("--max-n-bound", type=int, default=8192)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--note", action="append", default=[], help="replaces the saved notes")
    p.add_argument("--competing-load", action="store_true",
                   help="fastssl and eager interleaved under a 2-thread GEMM load")
    p.add_argument("--competing-tiny", action="store_true", help="the cases at toy sizes")
    p.add_argument("--update-readme", nargs="?", const=str(README), default=None,
                   metavar="README", help="rewrite the benchmark block of README.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    extra_measurements(args.out, args.roofline, args.competing_load, tiny=args.competing_tiny)
    if args.max_n is not None:
        (args.out / "max_n.json").write_text(json.dumps(
            max_n_search(args.max_n, 1024, args.max_n_bound), indent=1) + "\n")
    print(f"wrote {write_compare(args.out, notes=args.note)}")
    if args.update_readme:
        changed = update_readme(Path(args.update_readme))
        print(f"README benchmark block {'updated' if changed else 'unchanged'}: "
              f"{args.update_readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
