"""The README benchmark block (issue 18): one generator behind both entry points, speedups
against eager and the best peer only (never the reference), verdicts that tell a missed target
from a size below the target range, the load said from the records; and the competing-load
measurement of bench.compare, whose GEMM process never outlives it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import compare, summary  # noqa: E402
from bench import __main__ as bench_main  # noqa: E402

ENV = dict(
    device="cpu",
    device_name="Test CPU",
    git_commit="abc123",
    timestamp="2026-01-01T00:00:00",
    num_threads=2,
    cpu_count=2,
)


def _rec(op, provider, b, ms, mem, load=0.5, mode="forward+backward", **shape):
    return {
        "op": op,
        "family": "contrastive",
        "provider": provider,
        "shape": {"B": b, "D": 128, **shape},
        "x": b,
        "x_key": "B",
        "dtype": "float32",
        "mode": mode,
        "status": "ok",
        "p50_ms": ms,
        "p20_ms": ms * 0.9,
        "p80_ms": ms * 1.1,
        "peak_mem_mb": mem,
        "loadavg_1m": load,
        **ENV,
    }


def _eager_run(load=0.5):
    """nt_xent in range everywhere (N = 2B >= 2048); info_nce slower than eager at B = 1024
    (below the range) and at B = 4096 (inside it); a peer and the reference for nt_xent."""
    recs = []
    for b, fast, eager, peer, ref in (
        (1024, 50.0, 80.0, 200.0, 150.0),
        (2048, 200.0, 300.0, 900.0, 700.0),
    ):
        recs += [
            _rec("nt_xent", "fastssl", b, fast, 5.0, load),
            _rec("nt_xent", "eager", b, eager, 100.0, load),
            _rec("nt_xent", "peer:lightly", b, peer, 120.0, load),
            _rec("nt_xent", "reference", b, ref, 90.0, load),
        ]
    for b, fast, eager in ((1024, 20.0, 15.0), (2048, 60.0, 90.0), (4096, 250.0, 240.0)):
        recs += [_rec("info_nce", "fastssl", b, fast, 1.0, load, symmetric=False),
                 _rec("info_nce", "eager", b, eager, 100.0, load, symmetric=False)]
    return recs


def _write(root: Path, name: str, recs: list[dict], **files) -> Path:
    d = root / "bench" / "results" / name
    d.mkdir(parents=True)
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for fname, obj in files.items():
        (d / f"{fname}.json").write_text(json.dumps(obj))
    return d


ROOF = {"matmul_n": 2048, "dtype": "float32", "threads": 2, "matmul_ms": 300.0, "gflops": 50.0,
        "best_gflops": 60.0, "loadavg_1m": 1.0}
COMPETING = {
    "load": {"what": "a second process running float32 GEMMs 1024^2 on 2 threads"},
    "threads": 2,
    "cpu_count": 2,
    "git_commit": "abc123",
    "timestamp": "2026-01-01T00:10:00",
    "cases": [
        {
            "op": "nt_xent",
            "shape": {"B": 1024, "D": 128},
            "reps": 5,
            "fastssl_ms": 100.0,
            "eager_ms": 180.0,
            "ratio": 1.8,
            "loadavg_1m": 4.0,
            "loadavg_1m_start": 3.0,
        },
        {
            "op": "info_nce",
            "shape": {"B": 1024, "D": 128, "symmetric": False},
            "reps": 5,
            "fastssl_ms": 30.0,
            "eager_ms": 24.0,
            "ratio": 0.8,
            "loadavg_1m": 4.2,
            "loadavg_1m_start": 4.0,
        },
    ],
}


@pytest.fixture
def results_root(tmp_path):
    _write(tmp_path, "cpu-eager", _eager_run(load=4.5), roofline=ROOF, competing_load=COMPETING)
    ref_only = [
        _rec("nt_xent", p, 2048, ms, 10.0) for p, ms in (("fastssl", 50.0), ("reference", 100.0))
    ]
    _write(tmp_path, "cpu-reference-only", ref_only)
    return tmp_path / "bench" / "results"


def _readme(path: Path) -> Path:
    path.write_text(f"# x\n\nbefore\n{summary.BEGIN}\nold table\n{summary.END}\nafter\n")
    return path


def _block(path: Path) -> str:
    text = path.read_text()
    return text[text.index(summary.BEGIN):text.index(summary.END)]


def test_both_entry_points_write_the_same_block(results_root, tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "RESULTS_ROOT", results_root)
    out = results_root / "cpu-eager"
    a, b = _readme(tmp_path / "a.md"), _readme(tmp_path / "b.md")
    # compare.main writes compare.md (which the block links) before its README update; the
    # bench entry point then sees the same directory.
    assert compare.main(["--out", str(out), "--update-readme", str(b)]) == 0
    assert (
        bench_main.main(
            ["--report-only", "--no-plots", "--out", str(out), "--update-readme", str(a)]
        )
        == 0
    )
    assert _block(a) == _block(b) and "old table" not in _block(a)
    assert a.read_text().startswith("# x\n\nbefore\n") and a.read_text().endswith("after\n")
    assert summary.update_readme(a) is False          # idempotent
    a.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        summary.update_readme(a)


def test_block_has_no_speedups_against_the_reference(results_root):
    block = summary.readme_block(results_root)
    assert "vs eager" in block and "vs best peer" in block
    table = [line for line in block.splitlines() if line.startswith("|")]
    assert table and not any("reference" in line for line in table)
    # The reference-only run is named, not tabled.
    assert "[cpu-reference-only](bench/results/cpu-reference-only/summary.md)" in block
    assert block.count("**Test CPU**") == 1
    nt = next(line for line in table if line.startswith("| nt_xent"))
    # B = 1024 (4.00x of lightly) is below the target range (N = B per view): not the worst
    assert "| 1.50x (1.50x) |" in nt and "4.50x peer:lightly (4.50x)" in nt and "| met |" in nt


def test_verdicts_tell_a_miss_from_a_size_below_the_range(results_root):
    block = summary.readme_block(results_root)
    line = next(l for l in block.splitlines() if l.startswith("| info_nce"))
    # worst in range: B = 4096 (0.96x); B = 1024 (0.75x) is shown but not counted as a miss
    assert "(0.96x)" in line
    assert "NOT met at B=4096: 0.96x vs eager" in line
    assert "below the target range (B < 2048, N < 2048): B=1024: 0.75x vs eager" in line
    rows = {(r["op"], r["shape"]["B"]): r for r in compare.compare_rows(_eager_run())}
    assert compare._verdict(rows[("info_nce", 1024)]).startswith("below the target range")
    assert compare._verdict(rows[("info_nce", 4096)]) == "NOT met: slower than eager"
    # N is the batch per view: nt_xent at B = 1024 is below the range too
    assert not compare.in_target_range(rows[("nt_xent", 1024)])
    assert compare._verdict(rows[("info_nce", 2048)]) == "met"
    assert compare._x(0.998) == "0.998x" and compare._x(1.0) == "1.00x"


def test_load_roofline_and_competing_lines_come_from_the_files(results_root):
    block = summary.readme_block(results_root)
    assert "median 4.5, range 4.5-4.5, on 2 cores" in block and "The machine was loaded" in block
    # nt_xent B=2048: 2*2*4096^2*128 / 0.2 s
    assert "50.0 GFLOP/s" in block and "| 42.9 (86%) |" in block
    assert (
        "eager/fastssl 0.80x-1.80x over 2 cases; below 1.0: info_nce B=1024, symmetric=False 0.80x"
        in block
    )
    quiet = compare.load_note(_eager_run(load=0.5))
    assert "stayed within the core count" in quiet and "loaded" not in quiet


def test_summary_columns_eager_and_best_peer_first():
    assert summary.is_baseline("peer:anything") and summary.is_baseline("diffsort")
    assert {"peer:lightly", "peer:torchsort", "diffsort", "eager"} <= set(summary.BASELINES)
    text = summary.build_summary(_eager_run())
    head = next(l for l in text.splitlines() if l.startswith("| shape") and "best peer" in l)
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols[5:8] == ["speedup vs eager", "speedup vs best peer", "speedup vs reference"]
    row = next(
        l
        for l in text.splitlines()
        if l.startswith("| B=2048, D=128 | float32 | forward+backward | fastssl |")
    )
    assert "| 1.50x | 4.50x (peer:lightly) | 3.50x |" in row


def test_competing_load_cli_tiny(tmp_path):
    """The real measurement at toy sizes: a GEMM process, fastssl and eager interleaved,
    competing_load.json and its compare.md section; the GEMM process is gone afterwards."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.compare",
            "--out",
            str(tmp_path),
            "--competing-load",
            "--competing-tiny",
            "--threads",
            "1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "competing_load.json").read_text())
    assert [(c["op"], c["shape"]) for c in res["cases"]] == [
        (op, s) for op, s in compare.COMPETING_TINY
    ]
    for c in res["cases"]:
        assert len(c["times_ms"]["fastssl"]) == len(c["times_ms"]["eager"]) == 5
        assert c["ratio"] == pytest.approx(c["eager_ms"] / c["fastssl_ms"]) and c["loadavg_1m"] >= 0
    assert "2 threads" in res["load"]["what"]
    md = (tmp_path / "compare.md").read_text()
    assert "## Under a competing load: ratio eager/fastssl" in md and "| nt_xent | B=32 |" in md


def test_competing_load_process_is_killed_on_interrupt(monkeypatch):
    with pytest.raises(ValueError, match="reps"):
        compare.time_interleaved("nt_xent", {"B": 8, "D": 4}, reps=3)
    started = []

    class Recorded(compare.CompetingLoad):
        def __enter__(self):
            started.append(self)
            return super().__enter__()

    def interrupted(op, shape, reps):
        assert started[0].proc.poll() is None      # the load runs while measuring
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "CompetingLoad", Recorded)
    monkeypatch.setattr(compare, "time_interleaved", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare.competing_load(compare.COMPETING_TINY, load_n=64)
    assert started[0].proc.poll() is not None
