"""The benchmark suite runs: a quick CPU run of `python -m bench` measures every op and the
training step and writes its files. Timings are not checked, only that everything ran."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import harness, summary  # noqa: E402
from bench.__main__ import all_specs, plan_cases  # noqa: E402


def _run_bench(args, timeout):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("FASTSSL_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_quick")
    _run_bench(["--quick", "--device", "cpu", "--threads", "1", "--out", str(out)], timeout=600)
    records = [
        json.loads(line)
        for line in (out / "results.jsonl").read_text().splitlines()
        if line.strip()
    ]
    return out, records


def test_every_op_runs(quick_run):
    _, records = quick_run
    for spec in all_specs():
        cases, skipped = plan_cases(spec, "cpu", True, None, None, None)
        assert cases, f"{spec.name}: nothing planned"
        for provider in ("fastssl", "reference"):
            if provider not in spec.providers:
                continue
            planned = [c for c in cases if c[0] == provider]
            assert planned or spec.name == "train_step", (spec.name, provider)
            for _, size, dtype, modes in planned:
                for mode in modes:
                    recs = [r for r in records if r["op"] == spec.name and r["provider"] == provider
                            and r["shape"] == size.shape and r["mode"] == mode]
                    assert len(recs) == 1, (spec.name, provider, size.shape, mode)
                    r = recs[0]
                    assert r["status"] == "ok", (
                        f"{spec.name} {provider} {mode}: {r['status']} {r.get('note')}"
                    )
                    assert r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and r["p50_ms"] > 0
                    assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0


def test_records_are_complete(quick_run):
    _, records = quick_run
    ok = [r for r in records if r["status"] == "ok"]
    assert ok
    for r in ok:
        for field in (
            "op",
            "provider",
            "mode",
            "shape",
            "dtype",
            "device",
            "device_name",
            "p20_ms",
            "p50_ms",
            "p80_ms",
            "peak_mem_mb",
            "fastssl_version",
            "git_commit",
            "torch_version",
        ):
            assert r.get(field) is not None, (field, r)
    # No provider crashed: anything not measured says why, and is an expected kind of failure.
    for r in records:
        assert r["status"] in ("ok", "skipped", "unsupported"), r
        if r["status"] != "ok":
            assert r["note"], r
    # The Triton interpreter is not a CPU speed provider, and is said so.
    tri = [r for r in records if r["provider"] == "fastssl:triton"]
    assert tri and all(r["status"] == "skipped" and "interpreter" in r["note"] for r in tri)
    steps = [r for r in ok if r["op"] == "train_step"]
    assert {r["shape"]["method"] for r in steps if r["provider"] == "fastssl"} == {
        "simclr", "groco", "groco_multicrop", "sce", "sogclr", "sfrik", "swav", "auh"}
    for r in steps:
        assert r["images_per_s"] > 0 and 0 < r["loss_share"]


def test_files_are_written(quick_run):
    out, records = quick_run
    pngs = sorted(out.glob("*.png"))
    ops = {r["op"] for r in records if r["status"] == "ok"}
    for op in ops:
        assert any(p.name.startswith(op + "_") for p in pngs), f"no plot for {op}"
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "summary.md").read_text()
    for op in ops:
        assert f"## {op}" in text
    assert "speedup vs reference" in text


def test_isolated_worker_and_report_only(tmp_path):
    """The subprocess-per-(op, provider) path of full runs, then a report rebuilt from the file."""
    _run_bench(
        [
            "--quick",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--op",
            "sinkhorn",
            "--provider",
            "reference",
            "--isolate",
            "--out",
            str(tmp_path),
        ],
        timeout=300,
    )
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    # one record per quick size (two: the plots show a line)
    assert [r["status"] for r in recs] == ["ok", "ok"] and {r["op"] for r in recs} == {"sinkhorn"}
    (tmp_path / "summary.md").unlink()
    _run_bench(["--report-only", "--device", "cpu", "--out", str(tmp_path)], timeout=300)
    assert (tmp_path / "summary.md").exists()


def test_cpu_memory_measures_a_known_allocation():
    mib = 64
    setup = lambda: None  # noqa: E731
    run = lambda _: torch.ones(mib * 2**20 // 4)  # noqa: E731
    first = harness.cpu_peak_growth(setup, run)
    again = harness.cpu_peak_growth(setup, run)   # freed memory must not hide the second peak
    for got in (first, again):
        assert got is not None and mib * 0.9 <= got / 2**20 <= mib * 1.5, got


def test_failures_are_classified():
    assert harness.classify_failure(NotImplementedError("x")) == "not_implemented"
    assert harness.classify_failure(MemoryError()) == "oom"
    assert harness.classify_failure(RuntimeError("CUDA out of memory. Tried to allocate")) == "oom"
    assert (
        harness.classify_failure(
            RuntimeError("fastssl.x: backend 'cpp' has no implementation of this op")
        )
        == "unsupported"
    )
    assert harness.classify_failure(harness.Skip("n/a")) == "skipped"
    assert harness.classify_failure(ValueError("bad")) == "error"


def _rec(op, provider, shape, mode, p50, mem, dtype="float32", status="ok"):
    return {
        "op": op,
        "provider": provider,
        "shape": shape,
        "mode": mode,
        "dtype": dtype,
        "device": "cpu",
        "status": status,
        "note": "",
        "p20_ms": p50,
        "p50_ms": p50,
        "p80_ms": p50,
        "peak_mem_mb": mem,
        "x": shape.get("B"),
        "x_key": "B",
    }


def test_target_verdicts():
    shape = {"B": 8192, "D": 128}
    recs = [_rec("nt_xent", "reference", shape, "forward+backward", 1000.0, 4096.0),
            _rec("nt_xent", "fastssl", shape, "forward+backward", 900.0, 100.0)]
    mem_t, time_t = [t for t in summary.TARGETS if t.device == "cpu" and t.op == "nt_xent"]
    assert summary.evaluate_target(recs, mem_t)[0] == "met"
    assert summary.evaluate_target(recs, time_t)[0] == "met"
    recs[1]["p50_ms"] = 1500.0
    assert summary.evaluate_target(recs, time_t)[0] == "NOT met"
    assert summary.evaluate_target(recs[:1], time_t)[0] == "not measured"


def test_readme_block_is_rewritten(tmp_path):
    results_root = tmp_path / "bench" / "results"
    dev = results_root / "cpu-test"
    dev.mkdir(parents=True)
    shape = {"B": 1024, "D": 128}
    recs = [
        dict(
            _rec("nt_xent", p, shape, "forward+backward", t, m),
            device_name="Test CPU",
            git_commit="abc",
            timestamp="2026-01-01T00:00:00",
            num_threads=2,
        )
        for p, t, m in (("reference", 100.0, 400.0), ("fastssl", 50.0, 10.0))
    ]
    (dev / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{summary.BEGIN}\nold table\n{summary.END}\nafter\n")
    assert summary.update_readme(readme, results_root) is True
    text = readme.read_text()
    assert "old table" not in text and "before" in text and "after" in text
    # Against the reference alone: named, never tabled as a speedup (issue 18; the tables
    # against eager and the peers: tests/bench/test_readme_block.py).
    assert "[cpu-test](bench/results/cpu-test/summary.md)" in text and "2.00x" not in text
    assert summary.update_readme(readme, results_root) is False   # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        summary.update_readme(readme, results_root)


def test_cpu_allocated_peak_counts_live_tensors_not_freed_ones():
    # 8 MiB kept and 4 MiB made and freed twice: the peak is 12 MiB (not 16), whatever glibc
    # keeps mapped; a C++ op's at::empty (the Sinkhorn's codes) is counted as a Python one
    mib = 2**20
    def run(_):
        keep = torch.ones(2 * mib)
        for _ in range(2):
            tmp = torch.ones(mib)
            del tmp
        return keep
    peak, rss = harness.cpu_alloc_peak(lambda: None, run)
    assert abs(peak - 12 * mib) <= 64 * 1024, peak
    assert rss is None or rss >= 0
    import fastssl
    s = torch.randn(256, 1024)
    peak, _ = harness.cpu_alloc_peak(lambda: s, lambda x: fastssl.functional.sinkhorn(x))
    assert peak >= s.numel() * 4, peak   # the float32 codes
