"""The one-call C++ Sinkhorn (csrc/swav_cpu.cpp, sinkhorn_cached_cpu): exponentials cached in
the codes, float16/bfloat16 scores read as they are (no float32 copy), rows at risk of
underflow redone in the log domain. Also the vector row kernels it and swav_cross_entropy_cpu
run on, in every kernel set this CPU has (baseline SSE2/NEON width, AVX2, AVX-512): the exp
polynomial against float64, the exact float16/bfloat16 loads, the cross-entropy rows."""
import pytest
import torch

import fastssl.functional as fast
import fastssl.reference as ref
from bench.harness import cpu_peak_growth

_C = pytest.importorskip("fastssl._C")
ISAS = _C.swav_cpu_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    before = _C.swav_cpu_isa()
    _C.swav_cpu_isa(request.param)
    yield request.param
    _C.swav_cpu_isa(before)


def _scores(b, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.tanh(torch.randn(b, k, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [0.05, 0.01])
@pytest.mark.parametrize("iterations", [1, 3])
def test_equals_float64_reference_on_the_same_values(isa, dtype, eps, iterations):
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


def test_kernel_sets():
    assert ISAS[0] == "baseline" and _C.swav_cpu_isa() == ISAS[-1]  # the widest by default
    with pytest.raises(RuntimeError, match="name must be one of"):
        _C.swav_cpu_isa("bogus")
    with pytest.raises(RuntimeError, match="x must be"):
        _C.swav_cpu_exp(torch.zeros(3, dtype=torch.float64))


def test_exp_polynomial_against_float64(isa):
    # the whole argument range the kernels use (x <= 0), sizes with every vector tail length
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-87.0, 0.0, 100001), -87.0 * torch.rand(100000, generator=g),
                   torch.tensor([0.0, -0.0, -1e-30, -1e-7, -0.5, -87.0])])
    for n in list(range(1, 40)) + [x.numel()]:
        got = _C.swav_cpu_exp(x[:n].contiguous()).double()
        want = torch.exp(x[:n].double())
        rel = ((got - want) / want).abs().max().item()
        assert rel < 2.5e-7, (isa, n, rel)  # about 2 float ulp (measured ~1.4)
    # below -87 the result is 0: e^x < 1.7e-38, at the end of the float normal range
    low = torch.cat([torch.linspace(-200.0, -87.001, 1001), torch.tensor([-float("inf")])])
    assert (_C.swav_cpu_exp(low) == 0).all()


@pytest.mark.parametrize("dtype,eps", [(torch.float16, 1e4), (torch.bfloat16, 1e30)])
def test_half_loads_are_exact(isa, dtype, eps):
    # every finite float16/bfloat16 value: the vector loads must give the exact float, so the
    # codes equal those of the same scores upcast to float32 beforehand, bit for bit
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    vals = bits.view(dtype)
    vals = vals[torch.isfinite(vals)]
    k = 248  # not a multiple of any vector width: the rows end in a tail
    vals = vals[: vals.numel() // k * k].reshape(-1, k).contiguous()
    got = _C.sinkhorn_cached_cpu(vals, eps, 2)
    want = _C.sinkhorn_cached_cpu(vals.float(), eps, 2)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(13, 37), (3, 16), (2, 1), (4, 3000)])
@pytest.mark.parametrize("compute_grad,grad_scale", [(True, 1.0), (True, -2.5), (False, 1.0)])
def test_cross_entropy_rows_against_float64(isa, shape, compute_grad, grad_scale):
    g = torch.Generator().manual_seed(1)
    s = torch.tanh(torch.randn(*shape, generator=g, dtype=torch.float64))
    q = 2 * torch.softmax(torch.randn(*shape, generator=g, dtype=torch.float64), dim=1)
    s64 = s.clone().requires_grad_(True)
    want = -(q * torch.log_softmax(s64 / 0.1, dim=1)).sum()
    (want_g,) = torch.autograd.grad(want, s64)
    loss, grad = _C.swav_cross_entropy_cpu(s.float(), q.float(), 0.1, compute_grad, grad_scale)
    # inputs rounded to float32 move the loss by ~K 1e-7 relative; the sums run in double
    torch.testing.assert_close(loss.double(), want.detach(), rtol=2e-6, atol=1e-5)
    if compute_grad:
        torch.testing.assert_close(grad.double(), grad_scale * want_g, rtol=1e-5, atol=1e-5)
    else:
        assert grad.numel() == 0


def test_cross_entropy_float64_grad_scale():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(6, 11, generator=g, dtype=torch.float64)
    q = torch.softmax(torch.randn(6, 11, generator=g, dtype=torch.float64), dim=1)
    _, g1 = _C.swav_cross_entropy_cpu(s, q, 0.2, True)
    _, g3 = _C.swav_cross_entropy_cpu(s, q, 0.2, True, 3.0)
    torch.testing.assert_close(g3, 3.0 * g1, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compute_grad,grad_scale", [(True, 1.0), (True, -2.5), (False, 1.0)])
def test_cross_entropy_reads_half_scores_as_they_are(isa, dtype, compute_grad, grad_scale):
    # float16/bfloat16 scores go into the kernel without a float32 copy (issue 25: the copies
    # were SwAV's half-precision deficit against lightly); the widening is exact, so the loss
    # and the float32 gradient equal those of the same scores upcast beforehand, bit for bit
    g = torch.Generator().manual_seed(4)
    for b, k in ((13, 37), (4, 3000), (2, 5)):  # tails of every vector width
        s = (3 * torch.randn(b, k, generator=g)).to(dtype)
        q = torch.softmax(torch.randn(b, k, generator=g), dim=1)
        loss, grad = _C.swav_cross_entropy_cpu(s, q, 0.1, compute_grad, grad_scale)
        want_loss, want_grad = _C.swav_cross_entropy_cpu(s.float(), q, 0.1, compute_grad,
                                                         grad_scale)
        assert loss.dtype == grad.dtype == torch.float32
        assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)


def test_cross_entropy_half_scores_need_float_targets():
    s = torch.randn(3, 8).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="targets must be a contiguous CPU Float"):
        _C.swav_cross_entropy_cpu(s, torch.softmax(s.float(), 1).to(torch.bfloat16), 0.1, True)


def test_huge_page_advice_toggle_keeps_the_codes():
    # the page advice (MADV_HUGEPAGE, and from 32 MiB MADV_POPULATE_WRITE) may change the
    # pages, never the values; every mode of the measurement switch (bench/sinkhorn_thp.py)
    before = _C.swav_huge_page_advice()
    assert before == 3  # the default: both
    s = _scores(2048, 4100, 5).float()  # 33.6 MB of codes: past the prefault threshold
    try:
        outs = []
        for mode in range(4):
            assert _C.swav_huge_page_advice(mode) == mode
            outs.append(_C.sinkhorn_cached_cpu(s, 0.05, 3))
    finally:
        _C.swav_huge_page_advice(int(before))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
