"""The prepared GPU run (`python -m bench.gpu_run`), tested through its dry run: the same parts,
caps, result files, summary and $OUT copies, on CPU at tiny sizes. One part is made to hang
(the --stall test hook) under a short cap: it must be cut off, keep the result it wrote before,
and leave the other parts to report."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import gpu_pytest, gpu_run  # noqa: E402

STALLED, STALL_CAP = "bench_swav", 15.0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run_dry")
    published = tmp_path_factory.mktemp("gpu_run_OUT")
    env = {**os.environ, "OUT": str(published), "PYTHONPATH": str(REPO)}
    env.pop("FASTSSL_BACKEND", None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_run", "--dry-run", "--out", str(out),
                           "--stall", STALLED, "--cap", f"{STALLED}={STALL_CAP:g}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return SimpleNamespace(out=out, published=published, proc=proc, seconds=time.monotonic() - t0)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_gpu_budget_fits_eight_minutes():
    rows = gpu_run.budget_table(gpu_run.parse_caps(None, dry_run=False))
    assert {name for name, _, _ in rows} >= set(gpu_run.PART_NAMES) | {"cold start", "build", "report"}
    assert sum(secs for _, secs, _ in rows) <= gpu_run.TOTAL_BUDGET_S == 480.0
    assert all(secs > 0 for name, secs, _ in rows if name != "static")


def test_caps_are_validated():
    assert gpu_run.parse_caps(["max_n=3"], dry_run=True)["max_n"] == 3.0
    for bad in (["max_n"], ["nope=3"], ["max_n=x"], ["max_n=0"]):
        with pytest.raises(SystemExit, match="--cap"):
            gpu_run.parse_caps(bad, dry_run=True)


def test_pytest_plugin_selects_by_device_and_backend():
    def item(params=None, gpu=False):
        return SimpleNamespace(callspec=SimpleNamespace(params=params or {}),
                               get_closest_marker=lambda name: object() if gpu and name == "gpu" else None)
    assert gpu_pytest.selected(item({"backend": "triton", "device": "cuda"}), "cuda", None)
    assert not gpu_pytest.selected(item({"backend": "triton", "device": "cpu"}), "cuda", None)
    assert gpu_pytest.selected(item({"backend": "cuda"}, gpu=True), "cuda", None)
    assert not gpu_pytest.selected(item({"x": 1}), "cuda", None)
    assert gpu_pytest.selected(item({"backend": "torch", "device": "cpu"}), "cpu", {"torch"})
    assert not gpu_pytest.selected(item({"backend": "cpp", "device": "cpu"}), "cpu", {"torch"})


def test_budget_is_printed_first_and_the_run_reports(dry_run):
    text = dry_run.proc.stdout
    assert dry_run.proc.returncode == 1, dry_run.proc.stderr[-3000:]   # the stalled part counts as failed
    head = text[:text.index("build: start")]
    for part in gpu_run.PART_NAMES:
        assert re.search(rf"^\s+{part}\s+\d+\s", head, re.M), part
    assert re.search(r"^\s+total\s+\d+", head, re.M)
    assert "GPU run summary" in text and text.rstrip().endswith(str(dry_run.out))


def test_stalled_part_is_cut_off_and_the_others_report(dry_run):
    parts = {r["part"]: r for r in _jsonl(dry_run.out / "parts.jsonl")}
    assert set(parts) == set(gpu_run.PART_NAMES)
    stalled = parts[STALLED]
    assert stalled["status"] == "timeout" and STALL_CAP <= stalled["seconds"] < STALL_CAP + 15, stalled
    for name, rec in parts.items():
        if name != STALLED:
            assert rec["status"] == "ok", (name, rec, (dry_run.out / "logs" / f"{name}.log").read_text()[-2000:])
    # What the stalled part measured before it hung is kept.
    records = _jsonl(dry_run.out / "results.jsonl")
    kept = [r for r in records if r.get("gpu_run_part") == STALLED]
    assert len(kept) == 1 and kept[0]["status"] == "ok" and kept[0]["op"] == "sinkhorn", kept


def test_every_part_wrote_its_results(dry_run):
    out = dry_run.out
    records = _jsonl(out / "results.jsonl")
    by = {(r["op"], r["provider"], r.get("gpu_run_part")): r for r in records}
    for op in ("nt_xent", "info_nce"):
        for prov in ("fastssl", "eager", "reference"):
            r = by[(op, prov, "bench_contrastive")]
            assert r["status"] == "ok" and r["p50_ms"] > 0 and r["tflops"] > 0, r
        assert by[(op, "eager:compile", "bench_contrastive")]["status"] == "skipped"
    for op, prov, part in (("sce", "fastssl", "bench_sce_sphere"), ("sfrik_mmd", "reference", "bench_sce_sphere"),
                           ("soft_sort", "fastssl", "bench_sortnet"), ("soft_sort", "diffsort", "bench_sortnet"),
                           ("groco", "fastssl", "bench_sortnet")):
        assert by[(op, prov, part)]["status"] in ("ok", "skipped"), by[(op, prov, part)]
        assert by[(op, "fastssl", part)]["status"] == "ok"
    step = by[("train_step", "fastssl", "trainer")]
    assert step["status"] == "ok" and step["images_per_s"] > 0 and 0 < step["loss_share"]

    max_n = json.loads((out / "max_n.json").read_text())
    assert set(max_n["providers"]) == {"fastssl", "eager"}
    fast_n, eager_n = (max_n["providers"][p]["max_B"] for p in ("fastssl", "eager"))
    assert fast_n and eager_n and fast_n >= eager_n
    assert any(r.get("probe") == "max_n" and r["status"] == "oom" for r in records)   # eager hit the budget

    tests = _jsonl(out / "tests.jsonl")
    assert tests and all(t["outcome"] == "passed" for t in tests), [t for t in tests if t["outcome"] != "passed"]
    assert all(t["nodeid"].endswith(("-cpu]",)) or "-cpu-" in t["nodeid"] for t in tests)
    assert json.loads((out / "roofline.json").read_text())["peak_tflops"] > 0
    assert json.loads((out / "build.json").read_text())["status"] == "skipped"
    assert json.loads((out / "checkpoint.json").read_text())["status"] in ("ok", "skipped")


def test_summary_and_copies(dry_run):
    out = dry_run.out
    summary = (out / "summary.md").read_text()
    for heading in ("# GPU run", "## Parts", "## Tests", "## Roofline", "## Headline benchmarks",
                    "## Largest N", "## Training step", "# Benchmark summary"):
        assert heading in summary, heading
    assert f"| {STALLED} |" in summary and "timeout" in summary
    assert "| nt_xent |" in (out / "readme_table.md").read_text()
    assert list(out.glob("*.png"))
    files = sorted(dry_run.published.iterdir())
    assert 0 < len(files) <= 8 and all(f.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in files)
    assert {"summary.md", "results.jsonl", "parts.jsonl"} <= {f.name for f in files}
    archive = next(f for f in files if f.name.endswith(".tar.gz"))
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert any(n.endswith("/summary.md") for n in names) and any(n.endswith(".png") for n in names)


def test_largest_n_probes_are_not_timings():
    """A largest-N probe (one call) at the headline shape must not stand in for the timed case."""
    from bench import summary
    shape = {"B": 32768, "D": 128}

    def rec(provider, p50, **extra):
        return {"op": "nt_xent", "provider": provider, "mode": "forward+backward", "dtype": "bfloat16",
                "device": "cuda", "status": "ok", "note": "", "p20_ms": p50, "p50_ms": p50, "p80_ms": p50,
                "peak_mem_mb": 10.0, "x": extra.get("shape", shape)["B"], "x_key": "B", "shape": shape, **extra}
    records = [rec("fastssl", 10.0), rec("eager", 30.0),
               rec("fastssl", 100.0, shape={"B": 32768, "D": 128, "probe": "max_n"}, probe="max_n"),
               rec("fastssl", 900.0, shape={"B": 524288, "D": 128, "probe": "max_n"}, probe="max_n")]
    vs_eager = next(t for t in summary.TARGETS if t.device == "cuda" and t.baseline == "eager")
    verdict, detail = summary.evaluate_target(records, vs_eager)
    assert verdict == "met" and detail.startswith("3.00x"), detail
    max_n = next(t for t in summary.TARGETS if t.device == "cuda" and t.check == "max_n")
    assert summary.evaluate_target(records, max_n)[0] == "met"
    rows = [r for r in summary._headline_rows(records) if r["op"] == "nt_xent"]
    assert len(rows) == 1 and rows[0]["fast"]["p50_ms"] == 10.0


@pytest.mark.parametrize("symmetric", [False, True])
def test_eager_baselines_compute_the_reference_loss(symmetric):
    """The eager providers are the same losses as fastssl.reference, written the short way."""
    import torch

    import fastssl.reference as ref
    from bench.contrastive import eager_info_nce, eager_nt_xent
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    pairs = [(lambda: eager_info_nce(z1, z2, 0.2, symmetric=symmetric),
              lambda: ref.info_nce(z1, z2, 0.2, symmetric=symmetric))]
    if not symmetric:
        pairs.append((lambda: eager_nt_xent(z1, z2, 0.2), lambda: ref.nt_xent(z1, z2, 0.2)))
    for eager, reference in pairs:
        got, want = eager(), reference()
        g_got = torch.autograd.grad(got, (z1, z2))
        g_want = torch.autograd.grad(want, (z1, z2))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
