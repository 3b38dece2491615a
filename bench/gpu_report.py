"""The report of `python -m bench.gpu_run`: plots and the bench summary (bench/plots.py,
bench/summary.py) of the run's results.jsonl, with a "GPU run" section in front (parts and
their time, build, CUDA tests, roofline, headline table with TFLOP/s, largest N, training step,
checkpoint), readme_table.md, and a short table printed last (the end of the output is what a
remote call hands back)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from bench.harness import fmt_mb, fmt_ms


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except Exception:  # noqa: BLE001 - a part that did not get this far
        return None


def _load_jsonl(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:   # a line cut off by a killed writer
            continue
    return out


def tests_summary(out: Path) -> dict:
    recs = _load_jsonl(out / "tests.jsonl")
    counts = Counter(r["outcome"] for r in recs)
    failed = [r for r in recs if r["outcome"] in ("failed", "error")]
    collect = [r for r in recs if r.get("when") == "collect"]
    return {"total": len(recs), "passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
            "error": counts.get("error", 0), "skipped": counts.get("skipped", 0), "failures": failed,
            "collect_errors": sum(r["outcome"] == "error" for r in collect),
            "skip_reasons": Counter(r.get("message", "")[:160] for r in recs if r["outcome"] == "skipped")}


def _headline(records: list[dict]) -> list[dict]:
    return [r for r in records if str(r.get("gpu_run_part", "")).startswith("bench_")]


def _speed_vs(r: dict, records: list[dict], provider: str) -> str:
    for b in records:
        if (b.get("provider") == provider and b.get("op") == r.get("op") and b.get("shape") == r.get("shape")
                and b.get("mode") == r.get("mode") and b.get("dtype") == r.get("dtype") and b.get("status") == "ok"):
            return f"{b['p50_ms'] / r['p50_ms']:.2f}x"
    return "-"


def gpu_section(out: Path, parts: list[dict], records: list[dict]) -> str:
    from bench.gpu_run import COLD_START_S, PARTS, REPORT_S, VERSIONS_S
    lines = ["# GPU run (python -m bench.gpu_run)", ""]
    env = _load_json(out / "env.json")
    if env:
        lines += ["Versions: " + ", ".join(f"{k} {env.get(k)}" for k in (
            "python", "torch", "torch_cuda", "triton", "numpy", "setuptools", "pytest", "diffsort", "gpu",
            "nvcc", "git_commit")) + ".", ""]
    caps = {p.name: p for p in PARTS}
    lines += ["## Parts", "", "| part | cap | used | status | note |", "|---|---|---|---|---|",
              f"| cold start | {COLD_START_S:.0f} s | - | allowance | machine start and transfer |",
              f"| versions | {VERSIONS_S:.0f} s | - | - | env.json |"]
    for p in parts:
        what = caps[p["part"]].what if p["part"] in caps else "optional"
        lines.append(f"| {p['part']} | {p['cap_s']:.0f} s | {p['seconds']:.1f} s | {p['status']} | "
                     f"{p.get('note') or what} |")
    lines += [f"| report | {REPORT_S:.0f} s | - | - | plots, summary |", ""]

    build = _load_json(out / "build.json")
    if build:
        ext = build.get("extension", {})
        lines += ["## Build", "", f"{build.get('status')}: {build.get('note', '')}; fastssl._C: C++ "
                  f"{'yes' if ext.get('cpp') else 'no'}, CUDA {'yes' if ext.get('cuda') else 'no'}"
                  + (f" (CUDA build {build['cuda_build_s']} s)" if build.get("cuda_build_s") is not None else "")
                  + f". Wheels: {build.get('wheels')}.", ""]
        if build.get("log_tail"):
            lines += ["```", *build["log_tail"], "```", ""]

    t = tests_summary(out)
    lines += ["## Tests", "", f"{t['total']} run: {t['passed']} passed, {t['failed']} failed, {t['error']} errors, "
              f"{t['skipped']} skipped (per-test log: tests.jsonl)."
              + (f" **{t['collect_errors']} test file(s) could not be collected** (listed below: their "
                 f"tests did not run)." if t["collect_errors"] else ""), ""]
    for f in t["failures"][:40]:
        msg = f.get("message", "").replace("\n", " ")[:300]
        lines.append(f"- `{f['nodeid']}` {f['outcome']}: {msg}")
    if t["failures"]:
        lines.append("")
    if t["skip_reasons"]:
        lines += ["Skipped, by reason:", ""]
        lines += [f"- {n} x {why or '(no reason given)'}" for why, n in t["skip_reasons"].most_common(12)]
        lines.append("")

    roof = _load_json(out / "roofline.json")
    if roof:
        lines += ["## Roofline", "", f"{roof['matmul_n']}^3 {roof['dtype']} matmul: {roof['matmul_ms']:.3f} ms = "
                  f"**{roof['peak_tflops']:.1f} TFLOP/s** ({roof.get('note', '')})"
                  + (f"; device copy {roof['copy_tb_s']:.2f} TB/s (read + write)" if roof.get("copy_tb_s") else "")
                  + ".", ""]

    head = _headline(records)
    if head:
        lines += ["## Headline benchmarks", "",
                  "TFLOP/s counts the fewest matmul FLOPs of the loss (bench/gpu_parts.py `_model_flop`); "
                  "% peak is against the roofline matmul above.", "",
                  "| op | shape | dtype | mode | provider | time p50 | peak memory | TFLOP/s | % peak | vs eager | vs reference | status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in head:
            shape = ", ".join(f"{k}={v}" for k, v in (r.get("shape") or {}).items())
            if r.get("status") == "ok":
                tf = f"{r['tflops']:.1f}" if r.get("tflops") else "-"
                frac = f"{100 * r['peak_fraction']:.0f}%" if r.get("peak_fraction") else "-"
                vs_e = _speed_vs(r, head, "eager") if not r["provider"].startswith("eager") else "-"
                vs_r = _speed_vs(r, head, "reference") if r["provider"] != "reference" else "-"
                lines.append(f"| {r['op']} | {shape} | {r['dtype']} | {r['mode']} | {r['provider']} | "
                             f"{fmt_ms(r['p50_ms'])} | {fmt_mb(r.get('peak_mem_mb'))} | {tf} | {frac} | {vs_e} | {vs_r} | ok |")
            else:
                note = str(r.get("note", "")).replace("|", "/")[:120]
                lines.append(f"| {r['op']} | {shape} | {r.get('dtype')} | {r.get('mode')} | {r['provider']} | - | - | - | - | - | - | "
                             f"{r.get('status')}: {note} |")
        lines.append("")

    max_n = _load_json(out / "max_n.json")
    if max_n:
        lines += ["## Largest N", "", f"nt_xent forward+backward, D={max_n['D']}, {max_n['dtype']}, memory budget "
                  f"{fmt_mb(max_n['budget_bytes'] / 2**20)} (inputs included):", ""]
        for prov, v in max_n["providers"].items():
            n = "none" if v["max_N"] is None else f"N = {v['max_N']:,} anchors (B = {v['max_B']:,})"
            fail = "" if v.get("first_fail_B") is None else f", fails at B = {v['first_fail_B']:,}"
            lines.append(f"- {prov}: {n}{fail} ({v['end']}; search bound B = {v['bound_B']:,})")
        lines.append("")

    steps = [r for r in records if r.get("gpu_run_part") == "trainer"]
    if steps:
        lines += ["## Training step", "", "| method | shape | step p50 | images/s | loss fwd+bwd | loss share | status |",
                  "|---|---|---|---|---|---|---|"]
        for r in steps:
            shape = r.get("shape") or {}
            if r.get("status") == "ok":
                share = r.get("loss_share")
                lines.append(f"| {shape.get('method')} | {shape.get('arch')} B={shape.get('B')} {shape.get('res')}px x{shape.get('views')} | "
                             f"{fmt_ms(r['p50_ms'])} | {r.get('images_per_s', 0):,.0f} | {fmt_ms(r.get('loss_ms'))} | "
                             f"{'-' if share is None else f'{100 * share:.1f}%'} | ok |")
            else:
                lines.append(f"| {shape.get('method')} | - | - | - | - | - | {r.get('status')}: {str(r.get('note', ''))[:120]} |")
        lines.append("")

    ck = _load_json(out / "checkpoint.json")
    if ck:
        detail = ck.get("note", "")
        if ck.get("status") in ("ok", "failed"):
            detail += (f" (missing {ck['missing_keys']}, unexpected {ck['unexpected_keys']}, "
                       f"max feature difference {ck['max_abs_feature_diff']:.2e}, torchvision {ck['torchvision_version']})")
        lines += ["## Checkpoint", "", f"{ck.get('status')}: {detail}", ""]
    return "\n".join(lines)


def console_table(out: Path, parts: list[dict], records: list[dict]) -> list[str]:
    lines = ["", "=" * 100, "GPU run summary", "-" * 100]
    for p in parts:
        lines.append(f"{p['part']:<18} {p['status']:<9} {p['seconds']:6.1f} s / cap {p['cap_s']:4.0f} s  {p.get('note', '')}")
    t = tests_summary(out)
    lines.append(f"tests: {t['passed']} passed, {t['failed']} failed, {t['error']} errors, {t['skipped']} skipped"
                 + (f" ({t['collect_errors']} files not collected)" if t["collect_errors"] else ""))
    for f in t["failures"][:10]:
        lines.append(f"  FAIL {f['nodeid']}")
    roof = _load_json(out / "roofline.json")
    if roof:
        lines.append(f"roofline: {roof['peak_tflops']:.1f} TFLOP/s ({roof['matmul_n']}^3 {roof['dtype']})")
    for r in _headline(records) + [r for r in records if r.get("gpu_run_part") == "trainer"]:
        shape = ",".join(f"{k}={v}" for k, v in (r.get("shape") or {}).items())
        if r.get("status") == "ok":
            extra = f" {r['tflops']:.0f} TFLOP/s" if r.get("tflops") else ""
            if r.get("images_per_s"):
                extra = f" {r['images_per_s']:.0f} img/s, loss {100 * (r.get('loss_share') or 0):.1f}%"
            lines.append(f"{r['op']:<10} {r['provider']:<16} {shape[:44]:<44} {fmt_ms(r['p50_ms']):>9} "
                         f"{fmt_mb(r.get('peak_mem_mb')):>10}{extra}")
        else:
            lines.append(f"{r['op']:<10} {r['provider']:<16} {shape[:44]:<44} [{r.get('status')}] {str(r.get('note', ''))[:60]}")
    max_n = _load_json(out / "max_n.json")
    if max_n:
        for prov, v in max_n["providers"].items():
            lines.append(f"max N {prov}: {v['max_N']} ({v['end']})")
    ck = _load_json(out / "checkpoint.json")
    if ck:
        lines.append(f"checkpoint: {ck.get('status')}: {ck.get('note')}")
    lines.append("=" * 100)
    return lines


def write_reports(out: Path, parts: list[dict], log, *, update_readme: bool = False) -> None:
    from bench import plots, summary
    records = _load_jsonl(out / "results.jsonl")
    try:
        made = plots.make_plots(records, out) if records else []
        log(f"wrote {len(made)} plot(s)")
    except Exception as exc:  # noqa: BLE001 - no matplotlib: the numbers still stand
        log(f"no plots: {type(exc).__name__}: {exc}")
    text = gpu_section(out, parts, records)
    if records:
        text += "\n\n" + summary.build_summary(records).replace("# fastssl benchmark summary", "# Benchmark summary", 1)
        (out / "readme_table.md").write_text(summary.readme_table(records) + "\n")
    (out / "summary.md").write_text(text.rstrip() + "\n")
    log(f"wrote {out / 'summary.md'}")
    if update_readme:
        readme = Path(__file__).resolve().parent.parent / "README.md"
        try:
            changed = summary.update_readme(readme)
            log(f"README benchmark block {'updated' if changed else 'unchanged'}")
        except ValueError as exc:
            log(f"README not updated: {exc}")
    for line in console_table(out, parts, records):
        log(line)
