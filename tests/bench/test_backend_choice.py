"""bench.backend_choice: the GPU run's measurement behind `auto`'s per-family order on CUDA.
Tested through its dry run (CPU, tiny sizes, cpp/torch standing in for cuda/triton), its rule,
and its no-GPU exit."""
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

from bench import backend_choice as BC  # noqa: E402


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("backend_choice")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"}
    env.pop("FASTSSL_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", "bench.backend_choice", "--dry-run", "--out",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_dry_run_writes_tests_timings_and_the_choice(dry):
    out, stdout = dry
    res = json.loads((out / "backend_choice.json").read_text())
    assert res["dry_run"] and set(res["families"]) == {"sortnet", "swav"}
    for fam, r in res["families"].items():
        # the tests step ran pytest on both backends' CUDA cases (skipped on CPU: none ran)
        for b in ("cuda", "triton"):
            t = r["tests"][b]
            assert t["rc"] == 0 and t["skipped"] > 0 and t["passed"] == 0, (fam, b, t)
            assert t["status"] == "no test ran"
        ops = {row["op"] for row in r["timings"]}
        assert ops == set(BC.FAMILIES[fam][2])
        assert all(row[b]["status"] == "ok" and row[b]["p50_ms"] > 0
                   for row in r["timings"] for b in ("cuda", "triton"))
        # no CUDA test ran, so cuda cannot be preferred, whatever the stand-ins' timings
        assert r["decision"]["prefer"] == "triton"
        assert f"{fam}: auto should prefer triton" in stdout
    tests = json.loads((out / "backend_choice_tests.json").read_text())
    assert set(tests) == {"sortnet", "swav"}
    md = (out / "backend_choice.md").read_text()
    assert "DRY RUN" in md and '"sortnet": (\'triton\', \'cuda\', \'torch\'),' in md


def _timed(ratio, n=3):
    return [{"op": "x", "shape": {}, "dtype": "float32", "mode": "forward",
             "cuda": {"status": "ok", "p50_ms": 1.0}, "triton": {"status": "ok", "p50_ms": ratio},
             "triton_over_cuda": ratio} for _ in range(n)]


PASSED = {"cuda": {"status": "passed", "passed": 10, "failed": 0}}


def test_rule_prefers_cuda_only_when_tested_and_faster():
    assert BC.decide(PASSED, _timed(2.0))["prefer"] == "cuda"
    assert BC.decide(PASSED, _timed(1.01))["prefer"] == "triton"  # within the margin
    assert BC.decide(PASSED, _timed(0.5))["prefer"] == "triton"
    failed = {"cuda": {"status": "failed", "passed": 9, "failed": 1}}
    assert BC.decide(failed, _timed(3.0))["prefer"] == "triton"
    assert BC.decide({}, _timed(3.0))["prefer"] == "triton"
    one_missing = _timed(3.0) + [{"op": "y", "shape": {}, "dtype": "float32",
                                  "cuda": {"status": "error"}, "triton": {"status": "ok"}}]
    assert BC.decide(PASSED, one_missing)["prefer"] == "triton"
    assert BC.decide(PASSED, [])["prefer"] == "triton"


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert BC.main(["--out", str(tmp_path)]) == 0
    assert "needs a CUDA device" in capsys.readouterr().out
    assert "needs a CUDA device" in (tmp_path / "backend_choice.md").read_text()
