"""Sizes are checked before anything is allocated (issue 22, points 5 and 6).

Huge k, n and self_offset used to run into the memory before any check (``groco_fused`` with
k = 2**31 reached 10.9 GB; ``soft_sort_backward`` with n = 2**31 ran past 30 s; a 16384-wide
soft sort built its 134M-comparator network as a Python list) or, for self_offset near 2**63,
passed the C++ bound through signed overflow. Each call here runs in a subprocess whose address
space is capped at its size after import + 1 GiB, under a wall-clock timeout: it must end
within seconds with a named error, never a MemoryError, a timeout or a signal.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PRELUDE = """
import json, resource, time
import torch
import fastssl
import fastssl.functional as F
from fastssl import _C
from fastssl.ops.sortnet import DIST_IDS, network_tensor, sigma_bwd
torch.set_num_threads(1)
with open("/proc/self/statm") as f:
    vm = int(f.read().split()[0]) * resource.getpagesize()
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), hard))
def run(label, fn):
    t0 = time.perf_counter()
    try:
        fn()
        out = ("returned", "")
    except Exception as e:
        out = (type(e).__name__, str(e)[:400])
    print(json.dumps({"case": label, "outcome": out[0], "msg": out[1],
                      "seconds": time.perf_counter() - t0}), flush=True)
a = torch.nn.functional.normalize(torch.randn(3, 5, dtype=torch.float64), dim=1)
negs = torch.nn.functional.normalize(torch.randn(8, 5, dtype=torch.float64), dim=1)
pos = torch.nn.functional.normalize(torch.randn(2, 3, 5, dtype=torch.float64), dim=1)
"""

CASES = {
    # label: (code, exception type, text the message must contain)
    "groco_fused k=2**31": (
        "torch.ops.fastssl.groco_fused(a, negs, pos, 0, 2**31, 'odd_even', 'cauchy', 10.0)",
        "ValueError", "k: expected an int in [1, 7]"),
    "groco_fused k=2**63-1": (
        "torch.ops.fastssl.groco_fused(a, negs, pos, 0, 2**63 - 1, 'odd_even', 'cauchy', 10.0)",
        "ValueError", "k: expected"),
    "groco_fused self_offset=2**63-3": (
        "torch.ops.fastssl.groco_fused(a, negs, pos, 2**63 - 3, 2, 'odd_even', 'cauchy', 10.0)",
        "ValueError", "self_offset: expected an int in [0, 5]"),
    "_C.groco_fused_forward self_offset=2**63-3": (
        "_C.groco_fused_forward(a, negs, pos, 2**63 - 3, 2, network_tensor('odd_even', 4, "
        "torch.device('cpu')), DIST_IDS['cauchy'], 10.0, 0.25, sigma_bwd(10.0))",
        "RuntimeError", "self_offset must be in [0, N - B]"),
    "_C.groco_fused_forward k=2**63-1": (
        "_C.groco_fused_forward(a, negs, pos, 0, 2**63 - 1, network_tensor('odd_even', 4, "
        "torch.device('cpu')), DIST_IDS['cauchy'], 10.0, 0.25, sigma_bwd(10.0))",
        "RuntimeError", "k must be at most N - 1"),
    "soft_sort_backward n=2**31": (
        "torch.ops.fastssl.soft_sort_backward(torch.zeros(0), torch.zeros(0), torch.zeros(1, 3), "
        "2**31, 'cpp', 'odd_even', 'cauchy', 10.0, 0.25)",
        "ValueError", "n: expected an int in [0, 65536]"),
    "soft_sort_backward n=2**20": (
        "torch.ops.fastssl.soft_sort_backward(torch.zeros(0), torch.zeros(0), torch.zeros(1, 3), "
        "2**20, 'cpp', 'odd_even', 'cauchy', 10.0, 0.25)",
        "ValueError", "n: expected an int in [0, 65536]"),
    "F.soft_sort(1 x 16384)": (
        "F.soft_sort(torch.randn(1, 16384))",
        "ValueError", "GiB, more than the"),
    "F.soft_sort(1 x 70000)": (
        "F.soft_sort(torch.randn(1, 70000))",
        "ValueError", "rows of at most 65536 entries"),
    "soft_sort op 1 x 16384": (
        "torch.ops.fastssl.soft_sort(torch.randn(1, 16384), 'cpp', 'odd_even', 'cauchy', 10.0, "
        "0.25, True)",
        "ValueError", "GiB, more than the"),
    "groco_rows k=2**31": (
        "torch.ops.fastssl.groco_rows(torch.randn(2, 6), 2**31, 'cpp', 'odd_even', 'cauchy', 1.0)",
        "ValueError", "k: expected an int in [1, 5]"),
    # a moderate sort still works inside the cap (the network as tensors, not a list)
    "F.soft_sort(2 x 2048) without P": (
        "F.soft_sort(torch.randn(2, 2048), return_permutation=False)", "returned", ""),
}


def _run_cases():
    code = _PRELUDE + "\n".join(f"run({label!r}, lambda: {c})" for label, (c, _, _) in
                                CASES.items())
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    got = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            got[rec["case"]] = rec
    return proc, got


@pytest.fixture(scope="module")
def results():
    return _run_cases()


@pytest.mark.parametrize("label", list(CASES))
def test_answered_within_seconds_with_a_named_error(results, label):
    proc, got = results
    assert label in got, (f"case never finished (rc {proc.returncode}): "
                          f"{proc.stderr[-1500:]}")
    rec = got[label]
    _, kind, text = CASES[label]
    assert rec["outcome"] == kind, rec
    assert text in rec["msg"], rec
    assert rec["seconds"] < 20, rec


def test_network_tensors_equal_the_comparator_lists():
    """The tensor-built networks are diffsort's, comparator for comparator, and the closed-form
    count is their length."""
    from fastssl.backends.networks import (MAX_SORT_N, comparator_count, comparator_layers,
                                           network_layers, network_tensor)
    cpu = torch.device("cpu")
    for network in ("odd_even", "bitonic"):
        for n in range(1, 41):
            comps = [c for layer in comparator_layers(network, n) for c in layer]
            want = torch.tensor(comps, dtype=torch.int32).reshape(-1, 4).T
            assert torch.equal(network_tensor(network, n, cpu), want), (network, n)
            assert comparator_count(network, n) == len(comps), (network, n)
            layers = [torch.tensor(layer).T for layer in comparator_layers(network, n) if layer]
            got = network_layers(network, n, cpu)
            assert len(got) == len(layers)
            assert all(torch.equal(torch.stack(g), w) for g, w in zip(got, layers)), (network, n)
    assert comparator_count("odd_even", MAX_SORT_N) < 2 ** 31
