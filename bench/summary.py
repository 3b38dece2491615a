"""Markdown summary of a results file (speedups against eager and the best peer first, then the
other baselines and the reference; memory ratios; verdicts on the issue targets) and the
README's benchmark block.

The README block lies between the markers `<!-- bench:begin -->` and `<!-- bench:end -->`;
`update_readme` regenerates it from every device directory under bench/results/ (the one
generator: `python -m bench --update-readme` and `python -m bench.compare --update-readme` both
call it). Its speedups are against eager PyTorch and the best peer only (issue 18): a results
directory measured against the reference alone (the correctness anchor, not what users would
otherwise run) is listed by name, not shown as speedups.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench import compare
from bench.harness import fmt_mb, fmt_ms

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
RESULTS_ROOT = Path(__file__).resolve().parent / "results"
# What fastssl is compared against, in column order: eager, the peers (any "peer:<library>"
# provider and diffsort; the known ones named here), then the reference, the correctness anchor.
BASELINES = ("eager", "eager:compile", "peer:lightly", "peer:torchsort", "diffsort", "reference",
             "reference:compile")


def is_baseline(provider: str) -> bool:
    return provider in BASELINES or compare.is_peer(provider)


# ----------------------------------------------------------------------------------------------
# the issue targets


@dataclass
class Target:
    issue: int
    device: str             # "cpu" or "cuda"
    what: str               # the target in words
    op: str
    shape: dict             # matched as a subset of the record's shape
    mode: str
    check: str              # speedup | mem_ratio | runs | max_n | images_per_s | loss_share
    threshold: float = 0.0
    dtype: str | None = None
    provider: str = "fastssl"
    baseline: str = "reference"
    n_factor: int = 1       # max_n: anchors per unit of the x axis (nt_xent: N = 2B)


def _cpu_targets() -> list[Target]:
    nt = dict(op="nt_xent", shape={"B": 8192, "D": 128}, mode="forward+backward", dtype="float32")
    return [
        Target(3, "cpu", "nt_xent N=16384 (B=8192 x 2 views), D=128, fwd+bwd: peak memory <= 1/8 of the reference",
               check="mem_ratio", threshold=1 / 8, **nt),
        Target(3, "cpu", "nt_xent N=16384, D=128, fwd+bwd: time no worse than the reference",
               check="speedup", threshold=1.0, **nt),
        # The automatic backend (what users get; C++ on CPU tensors), not the forced one: the two
        # run the same code, and their rows differ only by measurement noise (see same_code_note).
        Target(4, "cpu", "soft_sort (automatic backend: C++ on CPU) B=1024, n=16, fwd+bwd: >= 20x faster "
               "than diffsort",
               op="soft_sort", shape={"B": 1024, "n": 16, "network": "odd_even"}, mode="forward+backward",
               dtype="float32", check="speedup", threshold=20.0, provider="fastssl", baseline="diffsort"),
        Target(4, "cpu", "groco B=512, D=256, 2 views, fwd+bwd: >= 3x faster than the reference",
               op="groco", shape={"B": 512, "D": 256, "views": 2}, mode="forward+backward", dtype="float32",
               check="speedup", threshold=3.0),
        Target(5, "cpu", "sinkhorn B=4096, K=3000, 3 iterations: >= 1.5x faster than the reference",
               op="sinkhorn", shape={"B": 4096, "K": 3000}, mode="forward", dtype="float32",
               check="speedup", threshold=1.5),
    ]


def _gpu_targets() -> list[Target]:
    nt = dict(op="nt_xent", shape={"B": 32768, "D": 128}, mode="forward+backward", dtype="bfloat16")
    sce = dict(op="sce", shape={"B": 1024, "K": 65536}, mode="forward+backward", dtype="bfloat16")
    groco = dict(op="groco", shape={"B": 1024, "D": 2048, "views": 2}, mode="forward+backward", dtype="bfloat16")
    out = [
        Target(3, "cuda", "nt_xent N=2x32768, D=128, bf16, fwd+bwd: >= 2x faster than the eager reference",
               check="speedup", threshold=2.0, **nt),
        Target(3, "cuda", "nt_xent N=2x32768, D=128, bf16, fwd+bwd: >= 1.3x faster than torch.compile(reference)",
               check="speedup", threshold=1.3, baseline="reference:compile", **nt),
        Target(3, "cuda", "nt_xent N=2x32768, D=128, bf16, fwd+bwd: >= 2x faster than eager PyTorch (F.cross_entropy over the full logits)",
               check="speedup", threshold=2.0, baseline="eager", **nt),
        Target(3, "cuda", "nt_xent N=2x32768, D=128, bf16, fwd+bwd: >= 1.3x faster than torch.compile(eager)",
               check="speedup", threshold=1.3, baseline="eager:compile", **nt),
        Target(3, "cuda", "nt_xent N=2x32768, D=128, bf16, fwd+bwd: loss memory <= 1/30 of the reference",
               check="mem_ratio", threshold=1 / 30, **nt),
        Target(3, "cuda", "nt_xent: largest N that fits >= 1,000,000 anchors (bf16, fwd+bwd)",
               op="nt_xent", shape={"D": 128}, mode="forward+backward", dtype="bfloat16", check="max_n",
               threshold=1_000_000, n_factor=2),
        Target(3, "cuda", "sce K=65536, B=1024, bf16, fwd+bwd: >= 2x faster than the reference",
               check="speedup", threshold=2.0, **sce),
        Target(3, "cuda", "sce K=65536, B=1024, bf16, fwd+bwd: memory <= 1/10 of the reference",
               check="mem_ratio", threshold=1 / 10, **sce),
        Target(4, "cuda", "soft_sort B=4096, n=32, odd_even, fwd+bwd: >= 30x faster than diffsort",
               op="soft_sort", shape={"B": 4096, "n": 32, "network": "odd_even"}, mode="forward+backward",
               dtype="float32", check="speedup", threshold=30.0, baseline="diffsort"),
        Target(4, "cuda", "soft_sort n=1024 bitonic runs",
               op="soft_sort", shape={"n": 1024, "network": "bitonic"}, mode="forward+backward",
               dtype="float32", check="runs"),
        Target(4, "cuda", "groco B=1024, D=2048, 2 views, fwd+bwd: >= 10x faster than the reference",
               check="speedup", threshold=10.0, **groco),
        Target(4, "cuda", "groco B=1024, D=2048, 2 views, fwd+bwd: loss memory <= 1/10 of the reference",
               check="mem_ratio", threshold=1 / 10, **groco),
        Target(5, "cuda", "sinkhorn B=4096, K=3000, 3 iterations: >= 3x faster than the reference",
               op="sinkhorn", shape={"B": 4096, "K": 3000}, mode="forward", dtype="float32",
               check="speedup", threshold=3.0),
        Target(5, "cuda", "sinkhorn B=1024, K=65536, 3 iterations: >= 3x faster than the reference",
               op="sinkhorn", shape={"B": 1024, "K": 65536}, mode="forward", dtype="float32",
               check="speedup", threshold=3.0),
    ]
    for method in ("simclr", "groco", "sce", "sogclr", "sfrik", "swav", "auh"):
        step = dict(op="train_step", shape={"method": method, "arch": "resnet50", "B": 256, "res": 224},
                    mode="step", dtype="bfloat16")
        out.append(Target(7, "cuda", f"train step {method}, ResNet-50 2x224 bf16 channels-last, B=256: >= 3000 images/s",
                          check="images_per_s", threshold=3000.0, **step))
        out.append(Target(7, "cuda", f"train step {method}: loss <= 3% of the step time",
                          check="loss_share", threshold=0.03, **step))
    return out


TARGETS = _cpu_targets() + _gpu_targets()


def _matches(rec: dict, t: Target, provider: str) -> bool:
    # A probe (the GPU run's largest-N search: one untimed-warm-up call per size) answers
    # "does it fit", not "how fast".
    if rec.get("probe") and t.check != "max_n":
        return False
    shape = rec.get("shape") or {}
    return (rec.get("op") == t.op and rec.get("provider") == provider and rec.get("mode") == t.mode
            and (t.dtype is None or rec.get("dtype") == t.dtype)
            and all(shape.get(k) == v for k, v in t.shape.items()))


def _latest(records: list[dict], t: Target, provider: str) -> dict | None:
    found = [r for r in records if _matches(r, t, provider)]
    ok = [r for r in found if r.get("status") == "ok"]
    return (ok or found or [None])[-1]


def evaluate_target(records: list[dict], t: Target) -> tuple[str, str]:
    """(verdict, detail): verdict is "met", "NOT met" or "not measured"."""
    rec = _latest(records, t, t.provider)
    if t.check == "max_n":
        ok = [r for r in records if _matches(r, t, t.provider) and r.get("status") == "ok"]
        if not ok:
            return "not measured", "no successful fastssl run"
        best = max(r["x"] * t.n_factor for r in ok)
        failed = sorted({r["x"] * t.n_factor for r in records if _matches(r, t, t.provider)
                         and r.get("status") != "ok"})
        detail = f"largest N measured {best:,}" + (f" (failed from N={failed[0]:,})" if failed else "")
        return ("met" if best >= t.threshold else "NOT met"), detail
    if rec is None:
        return "not measured", "no record"
    if rec.get("status") != "ok":
        return ("NOT met" if t.check == "runs" else "not measured"), f"{t.provider}: {rec.get('status')} {rec.get('note', '')}".strip()
    if t.check == "runs":
        return "met", f"{fmt_ms(rec['p50_ms'])}"
    if t.check == "images_per_s":
        v = rec.get("images_per_s")
        if v is None:
            return "not measured", "no images/s"
        return ("met" if v >= t.threshold else "NOT met"), f"{v:,.0f} images/s"
    if t.check == "loss_share":
        v = rec.get("loss_share")
        if v is None:
            return "not measured", "no loss share"
        return ("met" if v <= t.threshold else "NOT met"), f"loss {100 * v:.1f}% of the step"
    base = _latest(records, t, t.baseline)
    if base is None or base.get("status") != "ok":
        why = "no record" if base is None else f"{base.get('status')} {base.get('note', '')}".strip()
        if t.check == "mem_ratio" and base is not None and base.get("status") == "oom":
            return "met", f"{t.baseline} runs out of memory; fastssl peak {fmt_mb(rec.get('peak_mem_mb'))}"
        return "not measured", f"{t.baseline}: {why}"
    if t.check == "speedup":
        v = base["p50_ms"] / rec["p50_ms"]
        return ("met" if v >= t.threshold else "NOT met"), (
            f"{_speedup(v)} ({fmt_ms(rec['p50_ms'])} vs {t.baseline} {fmt_ms(base['p50_ms'])})")
    if t.check == "mem_ratio":
        m, b = rec.get("peak_mem_mb"), base.get("peak_mem_mb")
        if m is None or b is None or b <= 0:
            return "not measured", "no memory figure"
        v = m / b
        return ("met" if v <= t.threshold else "NOT met"), (
            f"{_ratio(v)} ({fmt_mb(m)} vs {fmt_mb(b)})")
    return "not measured", f"unknown check {t.check}"


def _speedup(v: float) -> str:
    return f"{v:.2f}x" if v >= 0.1 else f"{v:.3g}x"


def _ratio(v: float) -> str:
    if v <= 0:
        return "0"
    return f"{v:.3f} (1/{1 / v:.0f})" if v < 0.5 else f"{v:.2f}"


# ----------------------------------------------------------------------------------------------
# summary


def _shape_str(shape: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (shape or {}).items()) or "-"


def _device_type(records: list[dict]) -> str:
    return next((r["device"] for r in records if r.get("device")), "cpu")


def _load_note(records: list[dict]) -> str | None:
    loads = [r["loadavg_1m"] for r in records if r.get("loadavg_1m") is not None]
    cores = next((r.get("cpu_count") for r in records if r.get("cpu_count")), None)
    if not loads or not cores:
        return None
    hi = max(loads)
    med = sorted(loads)[len(loads) // 2]
    # Our own threads account for about `threads` of the load; beyond the core count, other
    # processes were competing for the CPU.
    if med > cores or hi > 1.5 * cores:
        return (f"**Timings were taken on a loaded machine**: the 1-minute load average was {med:.1f} "
                f"(median) and up to {hi:.1f} on {cores} cores while measuring, i.e. other processes "
                f"competed for the CPU; absolute times are inflated and noisier than on an idle machine, "
                f"ratios between providers less so (each case is measured over several calls).")
    return f"Load average while measuring: median {med:.1f}, max {hi:.1f} on {cores} cores."


def _key(r: dict) -> tuple:
    return (json.dumps(r.get("shape"), sort_keys=True), r.get("dtype"), r.get("mode"))


def _latest_by_case(records: list[dict]) -> dict[tuple, dict]:
    """The last record per (op, provider, shape, dtype, mode) (results files can be appended to)."""
    out = {}
    for r in records:
        out[(r.get("op"), r.get("provider")) + _key(r)] = r
    return out


def build_summary(records: list[dict]) -> str:
    latest = list(_latest_by_case(records).values())
    dev = _device_type(latest)
    env = latest[-1] if latest else {}
    lines = [f"# fastssl benchmark summary: {env.get('device_name', dev)}", ""]
    lines.append(f"fastssl {env.get('fastssl_version')} at commit `{env.get('git_commit')}`, torch "
                 f"{env.get('torch_version')}, triton {env.get('triton_version')}, {env.get('num_threads')} "
                 f"threads, measured {env.get('timestamp')}.")
    lines.append("")
    note = _load_note(latest)
    if note:
        lines += [note, ""]
    lines += [
        "Times are medians over repeated calls (p20-p80 in brackets); on GPU synchronised "
        "(triton.testing.do_bench / CUDA events) after warm-up. Speedup = baseline time / provider "
        "time. Peak memory is the peak above what was allocated before the call (inputs); on CPU "
        "it is the growth of the process's peak RSS (VmHWM reset per measurement), on GPU "
        "torch.cuda.max_memory_allocated. Memory ratio = provider / reference (smaller is better).",
        "",
        "Modes: `forward` runs under torch.no_grad() (the loss evaluated, not trained on), "
        "`backward` is the backward of a recorded forward, `forward+backward` a training step "
        "(fastssl's same-pass ops make their gradient during the recorded forward: compare the step).",
        "",
        "Providers: `fastssl` = automatic backend, `fastssl:<backend>` = backend forced, "
        "`reference` = fastssl.reference eager, `reference:compile` = torch.compile of it (GPU), "
        "`eager` = the loss as a user writes it (F.cross_entropy over the full logits), "
        "`eager:compile` = torch.compile of that (GPU), "
        "`peer:<library>` = that library's own implementation (bench/baselines.py), "
        "`diffsort` = diffsort.DiffSortNet. Speedup columns: vs eager and vs the fastest peer of "
        "the case first, then the other baselines.",
        "",
    ]

    targets = [t for t in TARGETS if t.device == dev]
    if targets:
        lines += ["## Targets", "", "| issue | target | verdict | measured |", "|---|---|---|---|"]
        for t in targets:
            verdict, detail = evaluate_target(latest, t)
            lines.append(f"| #{t.issue} | {t.what} | **{verdict}** | {detail} |")
        lines.append("")

    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in latest:
        by_op[r["op"]].append(r)
    for op, recs in by_op.items():
        lines += [f"## {op}", ""]
        if op == "train_step":
            lines += _trainer_table(recs)
        else:
            lines += _op_table(recs)
            note = same_code_note(recs)
            if note:
                lines += ["", note]
        problems = [r for r in recs if r.get("status") not in ("ok",)]
        if problems:
            seen = set()
            lines.append("")
            lines.append("Not measured:")
            for r in problems:
                k = (r["provider"], r.get("status"), r.get("note"))
                if k in seen:
                    continue
                seen.add(k)
                lines.append(f"- `{r['provider']}`: {r.get('status')}: {r.get('note', '')}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def auto_backend(op: str, family: str | None, device: str) -> str | None:
    """The backend fastssl's automatic choice runs for `op` on `device` tensors (the library's
    own rule, fastssl.ops.<family>.backend_for), or None when it cannot be said here."""
    if not family or family == "trainer":
        return None
    try:
        import importlib

        import torch

        import fastssl
        module = importlib.import_module(f"fastssl.ops.{family}")
        with fastssl.use_backend("auto"):
            return module.backend_for(op, torch.device(device))
    except Exception:  # e.g. a CUDA results file summarised on a machine without CUDA
        return None


def same_code_note(recs: list[dict]) -> str | None:
    """When `fastssl` (automatic) and the forced backend it resolves to were both measured, say
    that they are the same code, and how far apart their rows are: that spread is measurement
    noise (run order, other load), not a different path."""
    ok = [r for r in recs if r.get("status") == "ok"]
    if not ok:
        return None
    chosen = auto_backend(ok[0]["op"], ok[0].get("family"), ok[0].get("device", "cpu"))
    if chosen is None:
        return None
    forced = f"fastssl:{chosen}"
    pairs = []
    for r in ok:
        if r["provider"] != "fastssl":
            continue
        twin = next((t for t in ok if t["provider"] == forced and _key(t) == _key(r)), None)
        if twin is not None:
            pairs.append((max(r["p50_ms"], twin["p50_ms"]) / min(r["p50_ms"], twin["p50_ms"]), r, twin))
    if not pairs:
        return None
    spread, r, twin = max(pairs, key=lambda p: p[0])
    return (f"`fastssl` (automatic) runs the same code as `{forced}` here: on {r.get('device', 'cpu')} "
            f"tensors the automatic choice is `{chosen}`. Their rows differ only by measurement noise "
            f"(the providers are measured one after the other, so drift and other load on the machine "
            f"fall on one of them): at most {spread:.2f}x here ({_shape_str(r.get('shape'))}, "
            f"{r.get('mode')}: {fmt_ms(r['p50_ms'])} vs {fmt_ms(twin['p50_ms'])}). Headline figures "
            f"use the automatic backend, the one users get.")


def _best_peer(provs: dict[str, dict]) -> dict | None:
    # A peer whose output is not finite (Sinkhorn overflow) is not a competitor.
    peers = [r for p, r in provs.items() if compare.is_peer(p) and r.get("finite", True)]
    return min(peers, key=lambda r: r["p50_ms"]) if peers else None


def _op_table(recs: list[dict]) -> list[str]:
    ok = [r for r in recs if r.get("status") == "ok"]
    if not ok:
        return ["No successful measurement."]
    present = {r["provider"] for r in ok}
    peers = sorted(p for p in present if compare.is_peer(p))
    # vs eager and vs the best peer first; a single peer's own column would repeat the best one.
    rest = [b for b in sorted({p for p in present if is_baseline(p)}, key=_provider_order)
            if b != "eager" and not (compare.is_peer(b) and len(peers) == 1)]
    columns = (["eager"] if "eager" in present else []) + (["best peer"] if peers else []) + rest
    head = "| shape | dtype | mode | provider | time p50 (p20-p80) | " + " | ".join(
        f"speedup vs {b}" for b in columns) + " | peak memory | memory / reference |"
    out = [head, "|" + "---|" * (7 + len(columns))]
    cases: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in ok:
        cases[_key(r)][r["provider"]] = r
    for (shape_json, dtype, mode), provs in sorted(cases.items(), key=lambda kv: _case_order(kv[0])):
        ref = provs.get("reference")
        best = _best_peer(provs)
        for prov, r in sorted(provs.items(), key=lambda kv: _provider_order(kv[0])):
            speed = []
            for b in columns:
                if b == "best peer":
                    speed.append("-" if best is None or best["provider"] == prov or compare.is_peer(prov)
                                 else f"{_speedup(best['p50_ms'] / r['p50_ms'])} ({best['provider']})")
                    continue
                base = provs.get(b)
                speed.append("-" if base is None or b == prov else _speedup(base["p50_ms"] / r["p50_ms"]))
            mem = r.get("peak_mem_mb")
            ratio = "-"
            if ref is not None and prov != "reference" and mem is not None and ref.get("peak_mem_mb"):
                ratio = _ratio(mem / ref["peak_mem_mb"])
            t = f"{fmt_ms(r['p50_ms'])} ({fmt_ms(r.get('p20_ms'))}-{fmt_ms(r.get('p80_ms'))})"
            out.append(f"| {_shape_str(json.loads(shape_json))} | {dtype} | {mode} | {prov} | {t} | "
                       + " | ".join(speed) + f" | {fmt_mb(mem)} | {ratio} |")
    return out


def _trainer_table(recs: list[dict]) -> list[str]:
    ok = [r for r in recs if r.get("status") == "ok"]
    if not ok:
        return ["No successful measurement."]
    out = ["| shape | dtype | provider | step p50 (p20-p80) | images/s | loss fwd+bwd | loss share | peak memory |",
           "|---|---|---|---|---|---|---|---|"]
    for r in sorted(ok, key=lambda r: (_shape_str(r.get("shape")), r["provider"])):
        t = f"{fmt_ms(r['p50_ms'])} ({fmt_ms(r.get('p20_ms'))}-{fmt_ms(r.get('p80_ms'))})"
        ips = r.get("images_per_s")
        share = r.get("loss_share")
        out.append(f"| {_shape_str(r.get('shape'))} | {r['dtype']} | {r['provider']} | {t} | "
                   f"{'-' if ips is None else f'{ips:,.0f}'} | {fmt_ms(r.get('loss_ms'))} | "
                   f"{'-' if share is None else f'{100 * share:.1f}%'} | {fmt_mb(r.get('peak_mem_mb'))} |")
    return out


def _case_order(key: tuple):
    shape_json, dtype, mode = key
    shape = json.loads(shape_json) or {}
    mode_rank = {"forward": 0, "backward": 1, "forward+backward": 2, "step": 3}.get(mode, 9)
    return (str(sorted((k, v) for k, v in shape.items() if not isinstance(v, int))),
            [v for v in shape.values() if isinstance(v, int)], str(dtype), mode_rank)


def _provider_order(p: str):
    order = ["fastssl", "fastssl:cuda", "fastssl:triton", "fastssl:cpp", "fastssl:torch",
             "eager", "eager:compile", "peer:lightly", "peer:torchsort", "diffsort", "reference",
             "reference:compile"]
    return (order.index(p), p) if p in order else (len(order) - 2 if compare.is_peer(p) else len(order), p)


def write_summary(records: list[dict], path: Path) -> Path:
    path = Path(path)
    path.write_text(build_summary(records))
    return path


# ----------------------------------------------------------------------------------------------
# README block


def _headline_rows(records: list[dict]) -> list[dict]:
    """Per op: the target shape when the device has a target for the op, else the largest shape
    with both fastssl and the reference measured (forward+backward, or forward/step)."""
    latest = list(_latest_by_case(records).values())
    dev = _device_type(latest)
    rows = []
    ops = list(dict.fromkeys(r["op"] for r in latest))
    for op in ops:
        recs = [r for r in latest if r["op"] == op and r.get("status") == "ok" and not r.get("probe")]
        if op == "train_step":
            rows += [{"op": op, "fast": r, "ref": None} for r in recs if r["provider"] == "fastssl"]
            continue
        target = next((t for t in TARGETS if t.device == dev and t.op == op and t.check in ("speedup", "mem_ratio")), None)
        fast_recs = [r for r in recs if r["provider"] == (target.provider if target else "fastssl")]
        if target is not None:
            fast_recs = [r for r in fast_recs if _matches(r, target, r["provider"])] or fast_recs
        if not fast_recs:
            continue
        best = None
        for r in fast_recs:
            base = next((b for b in recs if b["provider"] == "reference" and _key(b) == _key(r)), None)
            cand = (base is not None, r.get("mode") in ("forward+backward", "step") or op == "sinkhorn",
                    r.get("x") or 0, math.prod(v for v in (r.get("shape") or {}).values() if isinstance(v, int)))
            if best is None or cand > best[0]:
                best = (cand, r, base)
        _, r, base = best
        extra = next((b for p in ("eager", "diffsort", "eager:compile", "reference:compile") for b in recs
                      if b["provider"] == p and _key(b) == _key(r)), None)
        rows.append({"op": op, "fast": r, "ref": base, "extra": extra})
    return rows


def readme_table(records: list[dict]) -> str:
    latest = list(_latest_by_case(records).values())
    if not latest:
        return ""
    env = latest[-1]
    dev = _device_type(latest)
    lines = [f"**{env.get('device_name', dev)}** ({dev}, {env.get('num_threads')} threads), commit "
             f"`{env.get('git_commit')}`, {str(env.get('timestamp', ''))[:10]}:", ""]
    lines += ["| op | shape | dtype | mode | fastssl | reference | speedup | memory vs reference | other baseline |",
              "|---|---|---|---|---|---|---|---|---|"]
    trainer = []
    for row in _headline_rows(records):
        r, base, extra = row["fast"], row.get("ref"), row.get("extra")
        if row["op"] == "train_step":
            trainer.append(r)
            continue
        speed = "-" if base is None else _speedup(base["p50_ms"] / r["p50_ms"])
        mem = "-"
        if base is not None and r.get("peak_mem_mb") is not None and base.get("peak_mem_mb"):
            mem = _ratio(r["peak_mem_mb"] / base["peak_mem_mb"])
        other = "-"
        if extra is not None:
            other = f"{extra['provider']} {fmt_ms(extra['p50_ms'])} ({extra['p50_ms'] / r['p50_ms']:.1f}x)"
        prov = "" if r["provider"] == "fastssl" else f" ({r['provider']})"
        lines.append(f"| {r['op']} | {_shape_str(r.get('shape'))} | {r['dtype']} | {r['mode']} | "
                     f"{fmt_ms(r['p50_ms'])}{prov} | {fmt_ms(base['p50_ms']) if base else '-'} | {speed} | {mem} | {other} |")
    if trainer:
        lines += ["", "| training step | dtype | step | images/s | loss share |", "|---|---|---|---|---|"]
        for r in trainer:
            share = r.get("loss_share")
            lines.append(f"| {_shape_str(r.get('shape'))} | {r['dtype']} | {fmt_ms(r['p50_ms'])} | "
                         f"{r.get('images_per_s', 0):,.0f} | {'-' if share is None else f'{100 * share:.1f}%'} |")
    targets = [t for t in TARGETS if t.device == dev]
    if targets:
        verdicts = [evaluate_target(latest, t)[0] for t in targets]
        lines += ["", f"Targets on this device: {verdicts.count('met')} met, {verdicts.count('NOT met')} not met, "
                      f"{verdicts.count('not measured')} not measured (details in the summary)."]
    note = _load_note(latest)
    if note and note.startswith("**"):
        lines += ["", "Measured on a loaded machine: absolute times are inflated."]
    return "\n".join(lines)


def _against_users_code(records: list[dict]) -> bool:
    """Whether a run measured fastssl against what users would otherwise run (eager or a peer)."""
    return any(r.get("status") == "ok" and (r.get("provider") == "eager" or compare.is_peer(r.get("provider", "")))
               for r in records)


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def readme_section(records: list[dict], directory: Path, rel: Path) -> str:
    """One results directory's part of the README block: fastssl against eager and the best
    peer (bench.compare.headline_markdown), the machine's load from the records, and the
    roofline, competing-load and largest-N measurements saved next to them."""
    latest = list(_latest_by_case(records).values())
    env = latest[-1]
    dev = _device_type(latest)
    roofline = _json(directory / "roofline.json")
    competing = _json(directory / "competing_load.json")
    max_n = _json(directory / "max_n.json")
    details = rel / ("compare.md" if (directory / "compare.md").exists() else "summary.md")
    lines = [f"**{env.get('device_name', dev)}** ({dev}, {env.get('num_threads')} threads), commit "
             f"`{env.get('git_commit')}`, {str(env.get('timestamp', ''))[:10]}: fastssl against eager PyTorch "
             "and the fastest peer, every provider measured in the same run; ratio = their median time / "
             f"fastssl's (>= 1.00x: fastssl no slower); target range of the contrastive ops: N >= "
             f"{compare.TARGET_MIN_N} anchors.", ""]
    load = compare.load_note(latest)
    if load:
        lines += [f"Machine load: {load}", ""]
    lines.append(compare.headline_markdown(latest, str(details), roofline))
    extra = []
    if roofline:
        extra.append(compare.roofline_line(roofline))
    if competing and competing.get("cases"):
        extra.append(compare.competing_line(competing))
    if max_n:
        extra.append(compare.max_n_line(max_n))
    if extra:
        lines += [""] + [f"- {e}" for e in extra]
    if details.name != "summary.md":
        lines += ["", f"Every provider, mode and the reference (the correctness anchor): "
                      f"[{rel}/summary.md]({rel}/summary.md)."]
    return "\n".join(lines)


def readme_block(results_root: Path | None = None) -> str:
    """The README's benchmark block (the one generator; see the module docstring)."""
    from bench.results import load
    root = Path(RESULTS_ROOT if results_root is None else results_root)
    parts = ["<!-- generated by `python -m bench --update-readme` (or `python -m bench.compare "
             "--update-readme`); edit bench/summary.py, not this block -->", ""]
    shown, anchor_only = 0, []
    for path in sorted(root.glob("*/results.jsonl")):
        records = [r for r in load(path) if r.get("op")]
        if not records:
            continue
        rel = path.parent.relative_to(root.parent.parent) if path.is_relative_to(root.parent.parent) else path.parent
        if _against_users_code(records) and compare.headline_groups(list(_latest_by_case(records).values())):
            parts += [readme_section(records, path.parent, rel), ""]
            shown += 1
        else:
            anchor_only.append(f"[{rel.name}]({rel}/summary.md)")
    if anchor_only:
        parts += ["Not shown as speedups (no eager or peer baseline in the run; measured against the "
                  "reference, the correctness anchor, or without a baseline): " + ", ".join(anchor_only) + ".", ""]
    if not shown and not anchor_only:
        parts.append("No benchmark results yet: run `python -m bench`.")
    return "\n".join(parts).rstrip()


def update_readme(readme_path: Path, results_root: Path | None = None) -> bool:
    """Rewrite the block between the bench markers of `readme_path` from the results under
    `results_root`; returns whether the file changed. Raises ValueError if the markers are
    missing or out of order (they are placed by hand, once)."""
    readme_path = Path(readme_path)
    text = readme_path.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"{readme_path}: expected the markers {BEGIN!r} and {END!r}, in that order")
    block = readme_block(RESULTS_ROOT if results_root is None else results_root)
    new = text[:start + len(BEGIN)] + "\n" + block + "\n" + text[end:]
    if new == text:
        return False
    readme_path.write_text(new)
    return True
