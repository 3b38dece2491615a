"""fastssl against what users would otherwise run (issue 18): ratios vs eager and the best peer,
achieved GFLOP/s against the machine's measured GEMM throughput, and the largest nt_xent N
that fits a memory budget, from a results directory of `python -m bench`.

    python -m bench.compare --out bench/results/<dir> [--roofline] [--max-n BUDGET_MIB]

writes <dir>/compare.md (and roofline.json / max_n.json when asked to measure them). The
summary.md that `python -m bench` writes lists every provider; this file is the verdict:
for every op and size, fastssl's time ratio against eager and against the fastest peer
(ratio = their time / fastssl's, >= 1.0 means fastssl is no slower) and its peak memory as a
fraction of eager's.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.harness import fmt_mb, fmt_ms

PEER_PREFIX = "peer:"
PEER_NAMES = ("diffsort",)
# The ops whose CPU target is "no slower than eager at any N >= 2048, memory <= 1/8 of eager"
# (x is the per-view batch B; sce's rows are B against a K = 16384 queue).
MEMORY_TARGET_OPS = ("nt_xent", "info_nce", "dcl", "sogclr", "sce")
MEMORY_FRACTION = 1 / 8


def is_peer(provider: str) -> bool:
    return provider.startswith(PEER_PREFIX) or provider in PEER_NAMES


def model_flop(op: str, shape: dict, mode: str) -> float | None:
    """The fewest matmul FLOPs the loss needs, whatever an implementation recomputes: forward
    one product per similarity matrix; forward+backward three for A B^T (dA and dB), two for
    a Gram Z Z^T (dZ = (dS + dS^T) Z is one product)."""
    b, d = shape.get("B"), shape.get("D")
    mult = 3 if mode == "forward+backward" else 1 if mode == "forward" else 2
    gram = 2 if mode == "forward+backward" else 1
    if op in ("nt_xent", "dcl", "sogclr"):
        n = 2 * b
        return gram * 2 * n * n * d
    if op == "info_nce":
        return mult * 2 * b * b * d
    if op == "sce":
        # q @ queue.T (with a gradient) and k @ queue.T (without one).
        return (mult + 1) * 2 * b * shape["K"] * d
    if op in ("sfrik", "auh"):
        return gram * 2 * 2 * b * b * d
    if op == "sfrik_mmd":
        return gram * 2 * b * b * d
    return None


def measure_gemm(n: int = 2048, reps: int = 5) -> dict:
    """The machine's float32 GEMM throughput in this process (the roofline), measured now."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"matmul_n": n, "dtype": "float32", "threads": torch.get_num_threads(),
            "matmul_ms": times[len(times) // 2] * 1e3,
            "gflops": 2 * n ** 3 / times[len(times) // 2] / 1e9,
            "best_gflops": 2 * n ** 3 / times[0] / 1e9,
            "loadavg_1m": os.getloadavg()[0]}


def _key(r: dict) -> tuple:
    return (r["op"], json.dumps(r.get("shape"), sort_keys=True), r.get("dtype"), r.get("mode"))


def _cases(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    out: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        if r.get("status") == "ok" and r.get("shape") and not r.get("probe"):
            out[_key(r)][r["provider"]] = r
    return out


def _finite_note(r: dict) -> str:
    return "" if r.get("finite", True) else " (NaN)"


def compare_rows(records: list[dict]) -> list[dict]:
    """One row per (op, shape, dtype, mode) with fastssl measured."""
    rows = []
    for (op, shape_json, dtype, mode), provs in _cases(records).items():
        fast = provs.get("fastssl")
        if fast is None:
            continue
        eager = provs.get("eager")
        # A peer whose output is NaN (Sinkhorn overflow) is no competitor: it is listed, not ranked.
        peers = {p: r for p, r in provs.items() if is_peer(p) and r.get("finite", True)}
        best_peer = min(peers.values(), key=lambda r: r["p50_ms"]) if peers else None
        nan = sorted(p for p, r in provs.items() if (is_peer(p) or p == "eager") and not r.get("finite", True))
        shape = json.loads(shape_json)
        row = {"op": op, "shape": shape, "dtype": dtype, "mode": mode, "fast": fast, "eager": eager,
               "peer": best_peer, "nan": nan, "vs_eager": None, "vs_peer": None, "mem_vs_eager": None}
        if eager and not eager.get("finite", True):
            eager = row["eager"] = None
        if eager:
            row["vs_eager"] = eager["p50_ms"] / fast["p50_ms"]
            if fast.get("peak_mem_mb") is not None and eager.get("peak_mem_mb"):
                row["mem_vs_eager"] = fast["peak_mem_mb"] / eager["peak_mem_mb"]
        if best_peer:
            row["vs_peer"] = best_peer["p50_ms"] / fast["p50_ms"]
        flop = model_flop(op, shape, mode)
        if flop:
            row["gflops"] = {p: flop / (r["p50_ms"] / 1e3) / 1e9 for p, r in provs.items()}
        rows.append(row)
    rows.sort(key=lambda r: (r["op"], r["dtype"], str(sorted((k, v) for k, v in r["shape"].items()
                                                            if not isinstance(v, int))),
                             [v for v in r["shape"].values() if isinstance(v, int)], r["mode"]))
    return rows


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _verdict(row: dict) -> str:
    bad = []
    if row["vs_eager"] is not None and row["vs_eager"] < 1.0:
        bad.append("slower than eager")
    if row["vs_peer"] is not None and row["vs_peer"] < 1.0:
        bad.append("slower than the peer")
    if (row["op"] in MEMORY_TARGET_OPS and row["mem_vs_eager"] is not None
            and (row["shape"].get("B", 0) >= 2048) and row["mem_vs_eager"] > MEMORY_FRACTION):
        bad.append("memory > 1/8 of eager")
    return "met" if not bad else "NOT met: " + ", ".join(bad)


def compare_markdown(records: list[dict], roofline: dict | None = None, max_n: dict | None = None,
                     notes: list[str] | None = None) -> str:
    lines = ["# fastssl against eager PyTorch and the peers", ""]
    loads = sorted(r["loadavg_1m"] for r in records if r.get("loadavg_1m") is not None)
    cores = next((r.get("cpu_count") for r in records if r.get("cpu_count")), None)
    if loads:
        lines += [f"Machine load while measuring (1-minute load average): median "
                  f"{loads[len(loads) // 2]:.1f}, range {loads[0]:.1f}-{loads[-1]:.1f}, on {cores} cores. "
                  "The machine was shared with other processes during the whole run: absolute times are "
                  "inflated and noisy; the providers of one case ran one after another, minutes apart at "
                  "most, so ratios carry that noise too (see the p20-p80 ranges in summary.md).", ""]
    if roofline:
        lines += [f"Roofline: float32 GEMM {roofline['matmul_n']}^2 measured in the same run at "
                  f"**{roofline['gflops']:.1f} GFLOP/s** (best {roofline['best_gflops']:.1f}) with "
                  f"{roofline['threads']} threads, load {roofline['loadavg_1m']:.1f}. "
                  "Achieved GFLOP/s count the fewest matmul FLOPs the loss needs (forward 1 product, "
                  "forward+backward 3 for A B^T, 2 for a Gram Z Z^T). The GEMM was measured once, under the "
                  "same shared load: figures above 100% mean the load was lower when the op ran, or "
                  "that its products were larger (D = 1024) and ran closer to peak.", ""]
    lines += ["Ratio = the baseline's median time / fastssl's (>= 1.00x: fastssl no slower). "
              "`eager` = the loss from its formula in plain PyTorch, full matrices (bench/baselines.py); "
              "peers: `peer:lightly` (lightly's own loss code), `diffsort`. Memory = fastssl's peak "
              "growth / eager's.", ""]
    rows = compare_rows(records)
    by_op = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    for op, op_rows in by_op.items():
        lines += [f"## {op}", "", "| shape | dtype | mode | fastssl | eager | best peer | vs eager | vs peer "
                  "| memory fastssl / eager | GFLOP/s fastssl / eager | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in op_rows:
            f, e, p = r["fast"], r["eager"], r["peer"]
            shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items())
            mem = "-"
            if e is not None:
                mem = f"{fmt_mb(f.get('peak_mem_mb'))} / {fmt_mb(e.get('peak_mem_mb'))}"
                if r["mem_vs_eager"] is not None:
                    mem += f" ({r['mem_vs_eager']:.3f})"
            gf = r.get("gflops") or {}
            gfs = "-" if "fastssl" not in gf else f"{gf['fastssl']:.1f} / " + (
                f"{gf['eager']:.1f}" if "eager" in gf else "-")
            if roofline and "fastssl" in gf:
                gfs += f" ({100 * gf['fastssl'] / roofline['gflops']:.0f}% of GEMM)"
            peer = "-" if p is None else f"{p['provider']} {fmt_ms(p['p50_ms'])}"
            if r["nan"]:
                peer += f" (NaN codes: {', '.join(r['nan'])})"
            lines.append(f"| {shape} | {r['dtype']} | {r['mode']} | {fmt_ms(f['p50_ms'])} | "
                         f"{fmt_ms(e['p50_ms']) if e else '-'} | {peer} | {_x(r['vs_eager'])} | "
                         f"{_x(r['vs_peer'])} | {mem} | {gfs} | {_verdict(r)} |")
        lines.append("")
    if max_n:
        lines += ["## Largest nt_xent batch within a memory budget", "",
                  f"Budget {max_n['budget_mb']:.0f} MiB of peak growth per forward+backward, D = {max_n['D']}, "
                  f"float32; B doubled from {max_n['start_B']} up to the bound {max_n['bound_B']}.", "",
                  "| provider | largest B that fits (N = 2B) | first B over the budget | peak at the largest |",
                  "|---|---|---|---|"]
        for prov, res in max_n["providers"].items():
            lines.append(f"| {prov} | {res['max_B'] or '-'} | {res['first_fail_B'] or '- (bound reached)'} | "
                         f"{fmt_mb(res.get('peak_mb'))} |")
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def headline_markdown(records: list[dict], link: str) -> str:
    """The README's lines for a results directory: per op, fastssl's ratio against eager and
    the best peer at the largest measured size (the worst ratio over its sizes in brackets)."""
    rows = [r for r in compare_rows(records) if r["mode"] in ("forward+backward", "forward")]
    lines = ["| op | largest shape | fastssl | vs eager (worst over sizes) | vs best peer (worst) | "
             "memory / eager | verdict at the largest |", "|---|---|---|---|---|---|---|"]
    by_op = defaultdict(list)
    for r in rows:
        # one line per op, dtype and variant (info_nce symmetric or not, sinkhorn's eps)
        variant = ", ".join(f"{k}={v}" for k, v in r["shape"].items()
                            if k in ("symmetric", "eps", "network") and not (k == "network" and v == "odd_even"))
        by_op[(r["op"], r["dtype"], variant)].append(r)
    for (op, dtype, variant), op_rows in by_op.items():
        if (dtype != "float32" and op != "sinkhorn") or "bitonic" in variant:
            continue
        full = [r for r in op_rows if r["mode"] == "forward+backward"] or op_rows
        big = max(full, key=lambda r: (r["shape"].get("B", 0), r["shape"].get("K", 0), r["shape"].get("n", 0)))
        worst_e = min((r["vs_eager"] for r in full if r["vs_eager"] is not None), default=None)
        worst_p = min((r["vs_peer"] for r in full if r["vs_peer"] is not None), default=None)
        shape = ", ".join(f"{k}={v}" for k, v in big["shape"].items())
        peer = "-" if big["vs_peer"] is None else f"{_x(big['vs_peer'])} {big['peer']['provider']} ({_x(worst_p)})"
        mem = "-" if big["mem_vs_eager"] is None else f"{big['mem_vs_eager']:.3f}"
        if big["nan"]:
            peer = f"{peer} ({', '.join(big['nan'])}: NaN codes)"
        lines.append(f"| {op} ({dtype}{', ' + variant if variant else ''}) | {shape} | {fmt_ms(big['fast']['p50_ms'])} | "
                     f"{_x(big['vs_eager'])} ({_x(worst_e)}) | {peer} | {mem} | {_verdict(big)} |")
    lines += ["", f"Every size, dtype and the largest N within a memory budget: [{link}]({link})."]
    return "\n".join(lines)


def max_n_search(budget_mb: float, start_b: int, bound_b: int, providers=("fastssl", "eager", "peer:lightly"),
                 d: int = 128) -> dict:
    """Bounded doubling search for nt_xent forward+backward: the largest B whose peak growth
    stays within the budget (one call per size; a provider stops at its first failure)."""
    import fastssl
    import fastssl.functional as fast
    from bench import baselines
    from bench.harness import cpu_peak_growth

    out = {"budget_mb": budget_mb, "D": d, "start_B": start_b, "bound_B": bound_b, "providers": {}}
    for prov in providers:
        try:
            fn = (fast.nt_xent if prov == "fastssl" else baselines.eager_nt_xent if prov == "eager"
                  else baselines.peer("nt_xent", prov.split(":", 1)[1]))
        except baselines.PeerMissing as e:
            out["providers"][prov] = {"max_B": None, "first_fail_B": None, "note": str(e)}
            continue
        best, fail, peak_best, b = None, None, None, start_b
        while b <= bound_b:
            g = torch.Generator().manual_seed(b)
            z1 = torch.randn(b, d, generator=g).requires_grad_()
            z2 = torch.randn(b, d, generator=g).requires_grad_()
            with fastssl.use_backend("auto"):
                try:
                    peak = cpu_peak_growth(lambda: None, lambda _: fn(z1, z2).backward())
                except (RuntimeError, MemoryError):
                    peak = float("inf")
            del z1, z2
            if peak is None or peak / 2**20 > budget_mb:
                fail = b
                break
            best, peak_best, b = b, peak / 2**20, 2 * b
        out["providers"][prov] = {"max_B": best, "first_fail_B": fail, "peak_mb": peak_best}
    return out


def update_readme(readme_path: Path) -> bool:
    """The README's benchmark block: bench.summary's tables (against the reference) and, for
    every results directory with a roofline/compare run, the verdict against eager and the
    peers. (bench.summary.readme_block does not know these yet; until it does, regenerate the
    block with `python -m bench.compare --update-readme`.)"""
    from bench import summary
    from bench.results import load

    text = readme_path.read_text()
    start, end = text.find(summary.BEGIN), text.find(summary.END)
    if start < 0 or end < start:
        raise ValueError(f"{readme_path}: no benchmark markers")
    block = summary.readme_block().replace("python -m bench --update-readme", "python -m bench.compare --update-readme")
    extra = []
    for path in sorted(summary.RESULTS_ROOT.glob("*/compare.md")):
        records = load(path.parent / "results.jsonl")
        rel = path.relative_to(summary.RESULTS_ROOT.parent.parent)
        extra += ["", f"**Against eager PyTorch and the peers** ({path.parent.name}: every provider measured in the same pass; ratio = their "
                  "time / fastssl's, worst over the measured sizes in brackets; the machine was shared, loads in compare.md):", "",
                  headline_markdown(records, str(rel))]
    new = text[:start + len(summary.BEGIN)] + "\n" + block + "\n" + "\n".join(extra) + "\n" + text[end:]
    changed = new != text
    readme_path.write_text(new)
    return changed


def main(argv=None) -> int:
    from bench.results import load

    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--roofline", action="store_true", help="measure the GEMM roofline now")
    p.add_argument("--max-n", type=float, default=None, metavar="BUDGET_MIB")
    p.add_argument("--max-n-bound", type=int, default=8192)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--update-readme", action="store_true", help="rewrite README.md's benchmark block")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    roof_path, max_path = args.out / "roofline.json", args.out / "max_n.json"
    if args.roofline:
        roof_path.write_text(json.dumps(measure_gemm(), indent=1) + "\n")
    if args.max_n is not None:
        max_path.write_text(json.dumps(max_n_search(args.max_n, 1024, args.max_n_bound), indent=1) + "\n")
    roofline = json.loads(roof_path.read_text()) if roof_path.exists() else None
    max_n = json.loads(max_path.read_text()) if max_path.exists() else None
    records = load(args.out / "results.jsonl")
    (args.out / "compare.md").write_text(compare_markdown(records, roofline, max_n, args.note))
    print(f"wrote {args.out / 'compare.md'}")
    if args.update_readme:
        update_readme(Path(__file__).resolve().parent.parent / "README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
