"""The report of `python -m bench.gpu_run` (`python -m bench.gpu_report --out DIR`): plots, and
summary.md = a "GPU run" section (parts, build, tests, rooflines, headline table, largest N,
training step, checkpoint) before the bench summary of DIR/results.jsonl; readme_table.md; a
short table printed last (the end of the output is what a remote call hands back)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import plots, summary
from .common import (COLD_START_S, PARTS, README, REPORT_S, VERSIONS_S, fmt_mb, fmt_ms, load_json,
                     load_jsonl, pct, shape_str, table, tests_summary)


def _speed_vs(r: dict, records: list[dict], provider: str) -> str:
    b = next((b for b in records if b.get("provider") == provider and b.get("status") == "ok"
              and all(b.get(k) == r.get(k) for k in ("op", "shape", "mode", "dtype"))), None)
    return "-" if b is None else f"{b['p50_ms'] / r['p50_ms']:.2f}x"


def _note(r: dict, n: int = 120) -> str:
    return f"{r.get('status')}: {str(r.get('note', '')).replace('|', '/')[:n]}"


def _headline_row(r: dict, head: list[dict]) -> list:
    start = [r["op"], shape_str(r.get("shape")), r.get("dtype"), r.get("mode"), r["provider"]]
    if r.get("status") != "ok":
        return start + ["-"] * 6 + [_note(r)]
    return start + [fmt_ms(r["p50_ms"]), fmt_mb(r.get("peak_mem_mb")),
                    f"{r['tflops']:.1f}" if r.get("tflops") else "-",
                    f"{100 * r['peak_fraction']:.0f}%" if r.get("peak_fraction") else "-",
                    "-" if r["provider"].startswith("eager") else _speed_vs(r, head, "eager"),
                    "-" if r["provider"] == "reference" else _speed_vs(r, head, "reference"), "ok"]


def _step_row(r: dict) -> list:
    s = r.get("shape") or {}
    if r.get("status") != "ok":
        return [s.get("method"), *["-"] * 5, _note(r)]
    return [s.get("method"), f"{s.get('arch')} B={s.get('B')} {s.get('res')}px x{s.get('views')}",
            fmt_ms(r["p50_ms"]), f"{r.get('images_per_s', 0):,.0f}", fmt_ms(r.get("loss_ms")),
            pct(r.get("loss_share")), "ok"]


def _nt_rows(nt: dict) -> list[list]:
    """Issue 25's rows: nt_xent (Triton, fwd+bwd) against the spec peak and the measured GEMM."""
    return [[f"B={r['B']} D={r['D']}", fmt_ms(r.get("ms")), f"{r['tflops']:.1f}",
             "unknown" if r["pct_spec"] is None else f"{r['pct_spec']:.0f}%",
             f"{r['pct_gemm']:.0f}%"] if r["status"] == "ok" else
            [f"B={r['B']} D={r['D']}", "-", "-", "-", r["status"][:120]] for r in nt["rows"]]


def gpu_section(out: Path, parts: list[dict], records: list[dict]) -> str:
    lines = ["# GPU run (python -m bench.gpu_run)", ""]
    if env := load_json(out / "env.json"):
        lines += ["Versions: " + ", ".join(f"{k} {env.get(k)}" for k in (
            "python", "torch", "torch_cuda", "triton", "numpy", "setuptools", "pytest", "diffsort",
            "gpu", "nvcc", "git_commit")) + ".", ""]
    what = {p.name: p.what for p in PARTS}
    lines += ["## Parts", ""] + table(["part", "cap", "used", "status", "note"], [
        ["cold start", f"{COLD_START_S:.0f} s", "-", "allowance", "machine start and transfer"],
        ["versions", f"{VERSIONS_S:.0f} s", "-", "-", "env.json"]] + [
        [p["part"], f"{p['cap_s']:.0f} s", f"{p['seconds']:.1f} s", p["status"],
         p.get("note") or what.get(p["part"], "optional")] for p in parts] + [
        ["report", f"{REPORT_S:.0f} s", "-", "-", "plots, summary"]]) + [""]
    if build := load_json(out / "build.json"):
        ext, cuda_s = build.get("extension", {}), build.get("cuda_build_s")
        lines += ["## Build", "", f"{build.get('status')}: {build.get('note', '')}; fastssl._C: "
                  f"C++ {'yes' if ext.get('cpp') else 'no'}, "
                  f"CUDA {'yes' if ext.get('cuda') else 'no'}"
                  + (f" (CUDA build {cuda_s} s)" if cuda_s is not None else "")
                  + f". Wheels: {build.get('wheels')}.", ""]
        lines += ["```", *build["log_tail"], "```", ""] if build.get("log_tail") else []
    t = tests_summary(out)
    lines += ["## Tests", "", f"{t['total']} run: {t['passed']} passed, {t['failed']} failed, "
              f"{t['error']} errors, {t['skipped']} skipped (per-test log: tests.jsonl)."
              + (f" **{t['collect_errors']} test file(s) could not be collected** (listed below: "
                 "their tests did not run)." if t["collect_errors"] else ""), ""]
    lines += [f"- `{f['nodeid']}` {f['outcome']}: "
              f"{f.get('message', '').replace(chr(10), ' ')[:300]}" for f in t["failures"][:40]]
    lines += [""] * bool(t["failures"])
    if t["skip_reasons"]:
        lines += ["Skipped, by reason:", ""] + [f"- {n} x {why or '(no reason given)'}"
                                                for why, n in t["skip_reasons"][:12]] + [""]
    if roof := load_json(out / "roofline.json"):
        lines += ["## Roofline", "", f"{roof['matmul_n']}^3 {roof['dtype']} matmul: "
                  f"{roof['matmul_ms']:.3f} ms = **{roof['peak_tflops']:.1f} TFLOP/s** "
                  f"({roof.get('note', '')})" + (f"; device copy {roof['copy_tb_s']:.2f} TB/s "
                                                 "(read + write)" if roof.get("copy_tb_s") else "")
                  + ".", ""]
    if nt := load_json(out / "nt_xent_roofline.json"):
        g = nt["gemm"]
        lines += ["## nt_xent roofline", "", f"fastssl.functional.nt_xent forward+backward, "
                  f"Triton backend, {nt['dtype']}, on {nt['device_name']}; FLOPs = "
                  "bench.compare.model_flop (2 Gram products: 2 x 2 x (2B)^2 x D); spec peak: "
                  + (f"{nt['spec_tflops']:.0f} dense TFLOP/s" if nt["spec_tflops"] else
                     "unknown for this device") + f"; {nt['dtype']} GEMM {g['matmul_n']}^3 "
                  f"measured in the same part: {g['peak_tflops']:.1f} TFLOP/s.", ""] + table(
            ["shape (per view)", "time p50", "TFLOP/s", "% spec peak", "% GEMM"],
            _nt_rows(nt)) + [""]
    if head := [r for r in records if str(r.get("gpu_run_part", "")).startswith("bench_")]:
        lines += ["## Headline benchmarks", "", "TFLOP/s counts the fewest matmul FLOPs of the "
                  "loss (bench/compare.py `model_flop`); % peak is against the roofline matmul "
                  "above.", ""] + table(
            ["op", "shape", "dtype", "mode", "provider", "time p50", "peak memory", "TFLOP/s",
             "% peak", "vs eager", "vs reference", "status"],
            [_headline_row(r, head) for r in head]) + [""]
    if max_n := load_json(out / "max_n.json"):
        lines += ["## Largest N", "", f"nt_xent forward+backward, D={max_n['D']}, "
                  f"{max_n['dtype']}, memory budget {fmt_mb(max_n['budget_bytes'] / 2**20)} "
                  "(inputs included):", ""]
        for prov, v in max_n["providers"].items():
            n = "none" if v["max_N"] is None else f"N = {v['max_N']:,} anchors (B = {v['max_B']:,})"
            fail = "" if v.get("first_fail_B") is None else f", fails at B = {v['first_fail_B']:,}"
            lines.append(f"- {prov}: {n}{fail} ({v['end']}; search bound B = {v['bound_B']:,})")
        lines.append("")
    if steps := [r for r in records if r.get("gpu_run_part") == "trainer"]:
        lines += ["## Training step", ""] + table(
            ["method", "shape", "step p50", "images/s", "loss fwd+bwd", "loss share", "status"],
            [_step_row(r) for r in steps]) + [""]
    if ck := load_json(out / "checkpoint.json"):
        detail = ck.get("note", "") + (
            f" (missing {ck['missing_keys']}, unexpected {ck['unexpected_keys']}, max feature "
            f"difference {ck['max_abs_feature_diff']:.2e}, torchvision "
            f"{ck['torchvision_version']})" if ck.get("status") in ("ok", "failed") else "")
        lines += ["## Checkpoint", "", f"{ck.get('status')}: {detail}", ""]
    return "\n".join(lines)


def console_table(out: Path, parts: list[dict], records: list[dict]) -> list[str]:
    lines = ["", "=" * 100, "GPU run summary", "-" * 100]
    lines += [f"{p['part']:<18} {p['status']:<9} {p['seconds']:6.1f} s / cap {p['cap_s']:4.0f} s  "
              f"{p.get('note', '')}" for p in parts]
    t = tests_summary(out)
    lines.append(f"tests: {t['passed']} passed, {t['failed']} failed, {t['error']} errors, "
                 f"{t['skipped']} skipped" + (f" ({t['collect_errors']} files not collected)"
                                              if t["collect_errors"] else ""))
    lines += [f"  FAIL {f['nodeid']}" for f in t["failures"][:10]]
    if roof := load_json(out / "roofline.json"):
        lines.append(f"roofline: {roof['peak_tflops']:.1f} TFLOP/s ({roof['matmul_n']}^3 "
                     f"{roof['dtype']})")
    lines += [f"nt_xent triton {row[0]}: {row[2]} TFLOP/s, {row[3]} of spec, {row[4]} of GEMM"
              for row in _nt_rows(load_json(out / "nt_xent_roofline.json") or {"rows": []})]
    for r in records:
        if not str(r.get("gpu_run_part", "")).startswith(("bench_", "trainer")):
            continue
        head = f"{r['op']:<10} {r['provider']:<16} {shape_str(r.get('shape'), ',')[:44]:<44}"
        if r.get("status") != "ok":
            lines.append(f"{head} [{r.get('status')}] {str(r.get('note', ''))[:60]}")
            continue
        extra = f" {r['tflops']:.0f} TFLOP/s" if r.get("tflops") else ""
        if r.get("images_per_s"):
            extra = f" {r['images_per_s']:.0f} img/s, loss {pct(r.get('loss_share') or 0)}"
        lines.append(f"{head} {fmt_ms(r['p50_ms']):>9} {fmt_mb(r.get('peak_mem_mb')):>10}{extra}")
    lines += [f"max N {prov}: {v['max_N']} ({v['end']})" for prov, v in
              (load_json(out / "max_n.json") or {}).get("providers", {}).items()]
    if ck := load_json(out / "checkpoint.json"):
        lines.append(f"checkpoint: {ck.get('status')}: {ck.get('note')}")
    return lines + ["=" * 100]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_report", description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--update-readme", action="store_true")
    args, out = p.parse_args(argv), p.parse_args(argv).out
    parts, records = load_jsonl(out / "parts.jsonl"), load_jsonl(out / "results.jsonl")
    try:
        print(f"wrote {len(plots.make_plots(records, out) if records else [])} plot(s)")
    except Exception as exc:  # noqa: BLE001 - no matplotlib: the numbers still stand
        print(f"no plots: {type(exc).__name__}: {exc}")
    text = gpu_section(out, parts, records)
    if records:
        text += "\n\n" + summary.build_summary(records).replace(
            "# fastssl benchmark summary", "# Benchmark summary", 1)
        (out / "readme_table.md").write_text(summary.readme_table(records) + "\n")
    (out / "summary.md").write_text(text.rstrip() + "\n")
    print(f"wrote {out / 'summary.md'}")
    if args.update_readme:
        try:
            changed = summary.update_readme(README)
            print(f"README benchmark block {'updated' if changed else 'unchanged'}")
        except ValueError as exc:
            print(f"README not updated: {exc}")
    print("\n".join(console_table(out, parts, records)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
