"""Markdown summary of a results file (every provider, the speedups against eager and the best
peer first, memory against the reference, the issue targets) and the GPU run's readme_table.
The README's block is bench/compare.py's (re-exported: `update_readme`, `readme_block`)."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

import fastssl
from fastssl.ops import contrastive, sortnet, sphere, swav

from .common import (BASELINES, BEGIN, END, case_key as _key, device_type as _device_type,  # noqa: F401
                     fmt_mb, fmt_ms, is_baseline, is_peer, latest_by_case as _latest_by_case,
                     pct, provider_order as _provider_order, shape_str as _shape_str, table)
from .compare import load_note, readme_block, update_readme  # noqa: F401 - the README block


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


FB = "forward+backward"
_NT_CPU = ("nt_xent", {"B": 8192, "D": 128}, FB, "float32")
_NT_GPU = ("nt_xent", {"B": 32768, "D": 128}, FB, "bfloat16")
_NT = "nt_xent N=2x32768, D=128, bf16, fwd+bwd: "
_SCE = ("sce", {"B": 1024, "K": 65536}, FB, "bfloat16")
_GROCO = ("groco", {"B": 1024, "D": 2048, "views": 2}, FB, "bfloat16")
_SINK = "sinkhorn B={}, K={}, 3 iterations: >= {}x faster than the reference"
# (issue, device, what, (op, shape, mode, dtype), check, threshold, extra fields)
_TARGETS = [
    (3, "cpu", "nt_xent N=16384 (B=8192 x 2 views), D=128, fwd+bwd: peak memory <= 1/8 of the "
     "reference", _NT_CPU, "mem_ratio", 1 / 8, {}),
    (3, "cpu", "nt_xent N=16384, D=128, fwd+bwd: time no worse than the reference", _NT_CPU,
     "speedup", 1.0, {}),
    # The automatic backend (what users get; C++ on CPU tensors), not the forced one.
    (4, "cpu", "soft_sort (automatic backend: C++ on CPU) B=1024, n=16, fwd+bwd: >= 20x faster "
     "than diffsort", ("soft_sort", {"B": 1024, "n": 16, "network": "odd_even"}, FB, "float32"),
     "speedup", 20.0, {"baseline": "diffsort"}),
    (4, "cpu", "groco B=512, D=256, 2 views, fwd+bwd: >= 3x faster than the reference",
     ("groco", {"B": 512, "D": 256, "views": 2}, FB, "float32"), "speedup", 3.0, {}),
    (5, "cpu", _SINK.format(4096, 3000, 1.5), ("sinkhorn", {"B": 4096, "K": 3000}, "forward",
                                                "float32"), "speedup", 1.5, {}),
    (3, "cuda", _NT + ">= 2x faster than the eager reference", _NT_GPU, "speedup", 2.0, {}),
    (3, "cuda", _NT + ">= 1.3x faster than torch.compile(reference)", _NT_GPU, "speedup", 1.3,
     {"baseline": "reference:compile"}),
    (3, "cuda", _NT + ">= 2x faster than eager PyTorch (F.cross_entropy over the full logits)",
     _NT_GPU, "speedup", 2.0, {"baseline": "eager"}),
    (3, "cuda", _NT + ">= 1.3x faster than torch.compile(eager)", _NT_GPU, "speedup", 1.3,
     {"baseline": "eager:compile"}),
    (3, "cuda", _NT + "loss memory <= 1/30 of the reference", _NT_GPU, "mem_ratio", 1 / 30, {}),
    (3, "cuda", "nt_xent: largest N that fits >= 1,000,000 anchors (bf16, fwd+bwd)",
     ("nt_xent", {"D": 128}, FB, "bfloat16"), "max_n", 1_000_000, {"n_factor": 2}),
    (3, "cuda", "sce K=65536, B=1024, bf16, fwd+bwd: >= 2x faster than the reference", _SCE,
     "speedup", 2.0, {}),
    (3, "cuda", "sce K=65536, B=1024, bf16, fwd+bwd: memory <= 1/10 of the reference", _SCE,
     "mem_ratio", 1 / 10, {}),
    (4, "cuda", "soft_sort B=4096, n=32, odd_even, fwd+bwd: >= 30x faster than diffsort",
     ("soft_sort", {"B": 4096, "n": 32, "network": "odd_even"}, FB, "float32"), "speedup", 30.0,
     {"baseline": "diffsort"}),
    (4, "cuda", "soft_sort n=1024 bitonic runs", ("soft_sort", {"n": 1024, "network": "bitonic"},
                                                  FB, "float32"), "runs", 0.0, {}),
    (4, "cuda", "groco B=1024, D=2048, 2 views, fwd+bwd: >= 10x faster than the reference",
     _GROCO, "speedup", 10.0, {}),
    (4, "cuda", "groco B=1024, D=2048, 2 views, fwd+bwd: loss memory <= 1/10 of the reference",
     _GROCO, "mem_ratio", 1 / 10, {}),
    (5, "cuda", _SINK.format(4096, 3000, 3), ("sinkhorn", {"B": 4096, "K": 3000}, "forward",
                                              "float32"), "speedup", 3.0, {}),
    (5, "cuda", _SINK.format(1024, 65536, 3), ("sinkhorn", {"B": 1024, "K": 65536}, "forward",
                                               "float32"), "speedup", 3.0, {}),
]
for _m in ("simclr", "groco", "sce", "sogclr", "sfrik", "swav", "auh"):
    _step = ("train_step", {"method": _m, "arch": "resnet50", "B": 256, "res": 224}, "step",
             "bfloat16")
    _TARGETS += [(7, "cuda", f"train step {_m}, ResNet-50 2x224 bf16 channels-last, B=256: >= "
                  "3000 images/s", _step, "images_per_s", 3000.0, {}),
                 (7, "cuda", f"train step {_m}: loss <= 3% of the step time", _step, "loss_share",
                  0.03, {})]
TARGETS = [Target(i, dev, what, op, shape, mode, check, thr, dtype, **kw)
           for i, dev, what, (op, shape, mode, dtype), check, thr, kw in _TARGETS]


def _matches(rec: dict, t: Target, provider: str) -> bool:
    # A probe (the GPU run's largest-N search) answers "does it fit", not "how fast".
    shape = rec.get("shape") or {}
    return ((not rec.get("probe") or t.check == "max_n") and rec.get("op") == t.op
            and rec.get("provider") == provider and rec.get("mode") == t.mode
            and (t.dtype is None or rec.get("dtype") == t.dtype)
            and all(shape.get(k) == v for k, v in t.shape.items()))


def _latest(records: list[dict], t: Target, provider: str) -> dict | None:
    found = [r for r in records if _matches(r, t, provider)]
    return ([r for r in found if r.get("status") == "ok"] or found or [None])[-1]


def evaluate_target(records: list[dict], t: Target) -> tuple[str, str]:
    """(verdict, detail): verdict is "met", "NOT met" or "not measured"."""
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    rec = _latest(records, t, t.provider)
    if t.check == "max_n":
        runs = [r for r in records if _matches(r, t, t.provider)]
        ok = [r["x"] * t.n_factor for r in runs if r.get("status") == "ok"]
        if not ok:
            return "not measured", "no successful fastssl run"
        failed = sorted(r["x"] * t.n_factor for r in runs if r.get("status") != "ok")
        return met(max(ok) >= t.threshold), f"largest N measured {max(ok):,}" + (
            f" (failed from N={failed[0]:,})" if failed else "")
    if rec is None:
        return "not measured", "no record"
    if rec.get("status") != "ok":
        return ("NOT met" if t.check == "runs" else "not measured",
                f"{t.provider}: {rec.get('status')} {rec.get('note', '')}".strip())
    if t.check == "runs":
        return "met", fmt_ms(rec["p50_ms"])
    if t.check in ("images_per_s", "loss_share"):
        v = rec.get(t.check)
        if v is None:
            return "not measured", "no images/s" if t.check == "images_per_s" else "no loss share"
        if t.check == "images_per_s":
            return met(v >= t.threshold), f"{v:,.0f} images/s"
        return met(v <= t.threshold), f"loss {100 * v:.1f}% of the step"
    base = _latest(records, t, t.baseline)
    if base is None or base.get("status") != "ok":
        if t.check == "mem_ratio" and base is not None and base.get("status") == "oom":
            return "met", (f"{t.baseline} runs out of memory; fastssl peak "
                           f"{fmt_mb(rec.get('peak_mem_mb'))}")
        why = "no record" if base is None else f"{base.get('status')} {base.get('note', '')}"
        return "not measured", f"{t.baseline}: {why.strip()}"
    if t.check == "speedup":
        v = base["p50_ms"] / rec["p50_ms"]
        return met(v >= t.threshold), (f"{_speedup(v)} ({fmt_ms(rec['p50_ms'])} vs {t.baseline} "
                                       f"{fmt_ms(base['p50_ms'])})")
    m, b = rec.get("peak_mem_mb"), base.get("peak_mem_mb")
    if m is None or b is None or b <= 0:
        return "not measured", "no memory figure"
    return met(m / b <= t.threshold), f"{_ratio(m / b)} ({fmt_mb(m)} vs {fmt_mb(b)})"


def _speedup(v: float) -> str:
    return f"{v:.2f}x" if v >= 0.1 else f"{v:.3g}x"


def _ratio(v: float) -> str:
    return "0" if v <= 0 else f"{v:.3f} (1/{1 / v:.0f})" if v < 0.5 else f"{v:.2f}"


def build_summary(records: list[dict]) -> str:
    latest = list(_latest_by_case(records).values())
    dev = _device_type(latest)
    env = latest[-1] if latest else {}
    lines = [f"# fastssl benchmark summary: {env.get('device_name', dev)}", "",
             f"fastssl {env.get('fastssl_version')} at commit `{env.get('git_commit')}`, torch "
             f"{env.get('torch_version')}, triton {env.get('triton_version')}, "
             f"{env.get('num_threads')} threads, measured {env.get('timestamp')}"
             + (f", transparent huge pages `{env['thp_enabled']}` (defrag "
                f"`{env.get('thp_defrag')}`)" if env.get("thp_enabled") else "") + ".", ""]
    if note := load_note(latest):
        lines += [f"Machine load: {note}", ""]
    lines += [
        "Times are medians over repeated calls (p20-p80 in brackets), the providers of a case "
        "interleaved in one process; on GPU synchronised CUDA events after warm-up. Speedup = "
        "baseline time / provider time. Peak memory is the peak above what was allocated before "
        "the call (inputs); on CPU the peak of the tensor allocations the torch profiler reports "
        "(the allocator's live bytes, as on GPU; the RSS high-water growth is kept in the "
        "records as rss_growth_mb), on GPU torch.cuda.max_memory_allocated. Memory ratio = "
        "provider / reference (smaller is better).", "",
        "Modes: `forward` runs under torch.no_grad() (the loss evaluated, not trained on), "
        "`backward` is the backward of a recorded forward, `forward+backward` a training step "
        "(fastssl's same-pass ops make their gradient during the recorded forward: compare the "
        "step).", "",
        "Providers: `fastssl` = automatic backend, `fastssl:<backend>` = backend forced, "
        "`reference` = fastssl.reference eager, `reference:compile` = torch.compile of it (GPU), "
        "`eager` = the loss as a careful user writes it (masks in place, one F.cross_entropy), "
        "`eager:compile` = torch.compile of that (GPU), `peer:<library>` = that library's own "
        "implementation (bench/baselines.py), `diffsort` = diffsort.DiffSortNet. Speedup "
        "columns: vs eager and vs the fastest peer of the case first, then the other baselines.",
        ""]
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
        lines += [f"## {op}", ""] + (_trainer_table if op == "train_step" else _op_table)(recs)
        if op != "train_step" and (note := same_code_note(recs)):
            lines += ["", note]
        problems = dict.fromkeys((r["provider"], r.get("status"), r.get("note", ""))
                                 for r in recs if r.get("status") != "ok")
        if problems:
            lines += ["", "Not measured:"] + [f"- `{p}`: {s}: {n}" for p, s, n in problems]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def auto_backend(op: str, family: str | None, device: str) -> str | None:
    """The backend fastssl's automatic choice runs for `op` on `device` tensors (the library's
    own rule), or None when it cannot be said here."""
    try:
        module = {"contrastive": contrastive, "sphere": sphere, "sortnet": sortnet,
                  "swav": swav}[family]
        with fastssl.use_backend("auto"):
            return module.backend_for(op, torch.device(device))
    except Exception:  # noqa: BLE001 - e.g. a CUDA results file summarised without CUDA
        return None


def same_code_note(recs: list[dict]) -> str | None:
    """When `fastssl` and the forced backend it resolves to were both measured: they are the
    same code, and the spread of their rows is measurement noise."""
    ok = [r for r in recs if r.get("status") == "ok"]
    chosen = ok and auto_backend(ok[0]["op"], ok[0].get("family"), ok[0].get("device", "cpu"))
    if not chosen:
        return None
    forced = f"fastssl:{chosen}"
    pairs = [(max(r["p50_ms"], t["p50_ms"]) / min(r["p50_ms"], t["p50_ms"]), r, t)
             for r in ok if r["provider"] == "fastssl"
             for t in ok if t["provider"] == forced and _key(t) == _key(r)]
    if not pairs:
        return None
    spread, r, twin = max(pairs, key=lambda p: p[0])
    return (f"`fastssl` (automatic) runs the same code as `{forced}` here: on "
            f"{r.get('device', 'cpu')} tensors the automatic choice is `{chosen}`. Their rows "
            "differ only by measurement noise (drift and other load on the machine): at most "
            f"{spread:.2f}x here ({_shape_str(r.get('shape'))}, {r.get('mode')}: "
            f"{fmt_ms(r['p50_ms'])} vs {fmt_ms(twin['p50_ms'])}). Headline figures use the "
            "automatic backend, the one users get.")


def _op_table(recs: list[dict]) -> list[str]:
    ok = [r for r in recs if r.get("status") == "ok"]
    if not ok:
        return ["No successful measurement."]
    present = {r["provider"] for r in ok}
    peers = sorted(p for p in present if is_peer(p))
    # vs eager and vs the best peer first; a single peer's own column would repeat the best one.
    rest = [b for b in sorted({p for p in present if is_baseline(p)}, key=_provider_order)
            if b != "eager" and not (is_peer(b) and len(peers) == 1)]
    columns = ["eager"] * ("eager" in present) + ["best peer"] * bool(peers) + rest
    cases: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in ok:
        cases[_key(r)][r["provider"]] = r
    rows = []
    for (shape_json, dtype, mode), provs in sorted(cases.items(), key=lambda kv: _case_order(
            kv[0])):
        ref = provs.get("reference")
        # A peer whose output is not finite (Sinkhorn overflow) is not a competitor.
        fin = [r for p, r in provs.items() if is_peer(p) and r.get("finite", True)]
        best = min(fin, key=lambda r: r["p50_ms"]) if fin else None
        for prov, r in sorted(provs.items(), key=lambda kv: _provider_order(kv[0])):
            speed = []
            for b in columns:
                if b == "best peer":
                    speed.append("-" if best is None or is_peer(prov) else
                                 f"{_speedup(best['p50_ms'] / r['p50_ms'])} ({best['provider']})")
                else:
                    speed.append("-" if b not in provs or b == prov else
                                 _speedup(provs[b]["p50_ms"] / r["p50_ms"]))
            mem = r.get("peak_mem_mb")
            ratio = (_ratio(mem / ref["peak_mem_mb"]) if ref is not None and prov != "reference"
                     and mem is not None and ref.get("peak_mem_mb") else "-")
            rows.append([_shape_str(json.loads(shape_json)), dtype, mode, prov, _p50_range(r),
                         *speed, fmt_mb(mem), ratio])
    return table(["shape", "dtype", "mode", "provider", "time p50 (p20-p80)",
                  *(f"speedup vs {b}" for b in columns), "peak memory", "memory / reference"], rows)


def _p50_range(r: dict) -> str:
    return f"{fmt_ms(r['p50_ms'])} ({fmt_ms(r.get('p20_ms'))}-{fmt_ms(r.get('p80_ms'))})"


def _trainer_table(recs: list[dict]) -> list[str]:
    ok = sorted((r for r in recs if r.get("status") == "ok"),
                key=lambda r: (_shape_str(r.get("shape")), r["provider"]))
    return table(["shape", "dtype", "provider", "step p50 (p20-p80)", "images/s", "loss fwd+bwd",
                  "loss share", "peak memory"], [
        [_shape_str(r.get("shape")), r["dtype"], r["provider"], _p50_range(r),
         "-" if r.get("images_per_s") is None else f"{r['images_per_s']:,.0f}",
         fmt_ms(r.get("loss_ms")), pct(r.get("loss_share")), fmt_mb(r.get("peak_mem_mb"))]
        for r in ok]) if ok else ["No successful measurement."]


def _case_order(key: tuple):
    shape_json, dtype, mode = key
    shape = json.loads(shape_json) or {}
    return (str(sorted((k, v) for k, v in shape.items() if not isinstance(v, int))),
            [v for v in shape.values() if isinstance(v, int)], str(dtype),
            {"forward": 0, "backward": 1, "forward+backward": 2, "step": 3}.get(mode, 9))


def write_summary(records: list[dict], path: Path) -> Path:
    Path(path).write_text(build_summary(records))
    return Path(path)


def _headline_rows(records: list[dict]) -> list[dict]:
    """Per op: the target shape where the device has a target for the op, else the largest
    shape with fastssl and the reference (forward+backward, or forward/step)."""
    latest = list(_latest_by_case(records).values())
    dev = _device_type(latest)
    rows = []
    for op in dict.fromkeys(r["op"] for r in latest):
        recs = [r for r in latest if r["op"] == op and r.get("status") == "ok"
                and not r.get("probe")]
        if op == "train_step":
            rows += [{"op": op, "fast": r, "ref": None} for r in recs if r["provider"] == "fastssl"]
            continue
        target = next((t for t in TARGETS if t.device == dev and t.op == op
                       and t.check in ("speedup", "mem_ratio")), None)
        fast = [r for r in recs if r["provider"] == (target.provider if target else "fastssl")]
        if target is not None:
            fast = [r for r in fast if _matches(r, target, r["provider"])] or fast
        if not fast:
            continue

        def same(p, r):
            return next((b for b in recs if b["provider"] == p and _key(b) == _key(r)), None)
        r = max(fast, key=lambda r: (same("reference", r) is not None,
                                     r.get("mode") in (FB, "step") or op == "sinkhorn",
                                     r.get("x") or 0, math.prod(v for v in (r.get("shape") or {})
                                                                .values() if isinstance(v, int))))
        extra = next((b for p in ("eager", "diffsort", "eager:compile", "reference:compile")
                      if (b := same(p, r))), None)
        rows.append({"op": op, "fast": r, "ref": same("reference", r), "extra": extra})
    return rows


def readme_table(records: list[dict]) -> str:
    latest = list(_latest_by_case(records).values())
    if not latest:
        return ""
    env, dev = latest[-1], _device_type(latest)
    lines = [f"**{env.get('device_name', dev)}** ({dev}, {env.get('num_threads')} threads), commit "
             f"`{env.get('git_commit')}`, {str(env.get('timestamp', ''))[:10]}:", ""]
    rows, trainer = [], []
    for row in _headline_rows(records):
        r, base, extra = row["fast"], row.get("ref"), row.get("extra")
        if row["op"] == "train_step":
            trainer.append([_shape_str(r.get("shape")), r["dtype"], fmt_ms(r["p50_ms"]),
                            f"{r.get('images_per_s', 0):,.0f}", pct(r.get("loss_share"))])
            continue
        mem = (_ratio(r["peak_mem_mb"] / base["peak_mem_mb"]) if base is not None
               and r.get("peak_mem_mb") is not None and base.get("peak_mem_mb") else "-")
        other = "-" if extra is None else (f"{extra['provider']} {fmt_ms(extra['p50_ms'])} "
                                           f"({extra['p50_ms'] / r['p50_ms']:.1f}x)")
        prov = "" if r["provider"] == "fastssl" else f" ({r['provider']})"
        rows.append([r["op"], _shape_str(r.get("shape")), r["dtype"], r["mode"],
                     f"{fmt_ms(r['p50_ms'])}{prov}", fmt_ms(base["p50_ms"]) if base else "-",
                     "-" if base is None else _speedup(base["p50_ms"] / r["p50_ms"]), mem, other])
    lines += table(["op", "shape", "dtype", "mode", "fastssl", "reference", "speedup",
                    "memory vs reference", "other baseline"], rows)
    if trainer:
        lines += [""] + table(["training step", "dtype", "step", "images/s", "loss share"], trainer)
    if targets := [t for t in TARGETS if t.device == dev]:
        v = [evaluate_target(latest, t)[0] for t in targets]
        lines += ["", f"Targets on this device: {v.count('met')} met, {v.count('NOT met')} not "
                      f"met, {v.count('not measured')} not measured (details in the summary)."]
    if (note := load_note(latest)) and "loaded" in note:
        lines += ["", "Measured on a loaded machine: absolute times are inflated."]
    return "\n".join(lines)
