"""The one-call C++ Sinkhorn (csrc/swav_cpu.cpp, sinkhorn_cached_cpu): exponentials cached in
the codes, float16/bfloat16 scores read as they are (no float32 copy), rows at risk of
underflow redone in the log domain."""
import pytest
import torch

import fastssl.functional as fast
import fastssl.reference as ref
from bench.harness import cpu_peak_growth

_C = pytest.importorskip("fastssl._C")


def _scores(b, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.tanh(torch.randn(b, k, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [0.05, 0.01])
@pytest.mark.parametrize("iterations", [1, 3])
def test_equals_float64_reference_on_the_same_values(dtype, eps, iterations):
    s = _scores(67, 45, 0)
    # A row far below every column's max (x - M ~ -150 at eps 0.01): its cached exponentials
    # underflow, so it must take the exact log-domain path.
    s[5] = -1.0
    s[:5, :] = 0.5
    low = s.to(dtype)
    expected = ref.sinkhorn(low.double(), epsilon=eps, iterations=iterations)
    got = _C.sinkhorn_cached_cpu(low.contiguous(), eps, iterations)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(got).all()
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(got.double().sum(1), torch.ones(67, dtype=torch.float64))


def test_public_sinkhorn_uses_it_on_cpu():
    s = _scores(33, 20, 1).to(torch.bfloat16)
    with __import__("fastssl").use_backend("cpp"):
        out = fast.sinkhorn(s, epsilon=0.01)
    torch.testing.assert_close(out, _C.sinkhorn_cached_cpu(s, 0.01, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_scores_cost_no_float32_copy(dtype):
    # codes (B x K float32) are the output; a float32 copy of the scores would double the peak.
    b, k = 2048, 3000
    s = _scores(b, k, 2).to(dtype)
    codes_mb = b * k * 4 / 2**20
    with __import__("fastssl").use_backend("cpp"):
        fast.sinkhorn(s)
        peak = cpu_peak_growth(lambda: None, lambda _: fast.sinkhorn(s))
    if peak is None:
        pytest.skip("no VmHWM reset on this OS")
    assert peak / 2**20 <= 1.25 * codes_mb, (peak / 2**20, codes_mb)


def test_bad_inputs():
    with pytest.raises(RuntimeError, match="eps"):
        _C.sinkhorn_cached_cpu(torch.rand(3, 4), 0.0, 3)
    with pytest.raises(RuntimeError, match="iterations"):
        _C.sinkhorn_cached_cpu(torch.rand(3, 4), 0.05, 0)
    with pytest.raises(RuntimeError, match="float16, bfloat16"):
        _C.sinkhorn_cached_cpu(torch.ones(3, 4, dtype=torch.int32), 0.05, 3)
