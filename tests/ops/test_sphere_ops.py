"""fastssl.ops.sphere: every backend against full-matrix formulas (values and gradients)."""
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_params

import fastssl
from fastssl.backends.torch import sphere as torch_sphere
from fastssl.ops import sphere as ops
from fastssl.reference.sphere import kernel_series
from fastssl.testing import assert_close

BACKENDS = backend_params("torch", "triton")


def _ref_series(x, y, weights):
    xh = F.normalize(x, dim=1)
    yh = xh if y is None else F.normalize(y, dim=1)
    return kernel_series(xh @ yh.T, weights, x.shape[1]).sum()


def _ref_gauss(x, y, scale, diag_offset):
    xh = F.normalize(x, dim=1)
    yh = xh if y is None else F.normalize(y, dim=1)
    logit = 2 * scale * (xh @ yh.T - 1)
    m, n = logit.shape
    mask = torch.arange(m)[:, None] + diag_offset == torch.arange(n)[None, :]
    return torch.logsumexp(logit.masked_fill(mask, float("-inf")).reshape(-1), dim=0)


def _inputs(m, n, d, dtype, device, symmetric, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    y = None if symmetric else torch.randn(n, d, generator=gen, dtype=torch.float64).to(
        device=device, dtype=dtype)
    return x, y


def _compare(fast_fn, ref_fn, x, y, dtype):
    xs = [x.clone().requires_grad_(True), None if y is None else y.clone().requires_grad_(True)]
    xr = [x.clone().requires_grad_(True), None if y is None else y.clone().requires_grad_(True)]
    out = fast_fn(*xs)
    ref = ref_fn(*xr)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref, dtype=dtype, msg="value")
    out.backward(torch.tensor(0.7, dtype=out.dtype))
    ref.backward(torch.tensor(0.7, dtype=ref.dtype))
    for a, b in zip(xs, xr):
        if a is not None:
            assert a.grad.dtype == a.dtype
            assert_close(a.grad, b.grad, dtype=dtype, msg="gradient")


SERIES_CASES = [
    # (rows, cols, D, weights, symmetric)
    (19, 19, 21, (1.0, 40.0, 40.0), True),
    (9, 9, 3, (2.0,), True),
    (7, 17, 130, (1.0, 2.0, 3.0, 4.0, 5.0), False),
    (33, 33, 2, (1.0, -0.5, 3.0), True),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", SERIES_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-w{len(c[3])}"
                         + ("-sym" if c[4] else "-rect"))
def test_series_sum(backend, device, dtype, case):
    m, n, d, weights, symmetric = case
    x, y = _inputs(m, n, d, dtype, device, symmetric)
    with fastssl.use_backend(backend):
        _compare(lambda a, b: ops.series_sum(a, b, weights=weights),
                 lambda a, b: _ref_series(a.double(), None if b is None else b.double(), weights),
                 x, y, dtype)


GAUSS_CASES = [
    # (rows, cols, D, scale, diag_offset, symmetric)
    (19, 19, 21, 2.5, 0, True),
    (17, 17, 130, 0.3, 0, True),
    (5, 15, 7, 2.5, 5, False),
    (6, 18, 4, 1.0, -3, False),
    (11, 11, 9, 60.0, 0, True),   # every exp underflows in fp32: the log-sum-exp keeps it finite
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", GAUSS_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-s{c[3]}-o{c[4]}"
                         + ("-sym" if c[5] else "-rect"))
def test_gauss_lse(backend, device, dtype, case):
    m, n, d, scale, offset, symmetric = case
    x, y = _inputs(m, n, d, dtype, device, symmetric, seed=1)
    with fastssl.use_backend(backend):
        _compare(lambda a, b: ops.gauss_lse(a, b, scale=scale, diag_offset=offset),
                 lambda a, b: _ref_gauss(a.double(), None if b is None else b.double(), scale,
                                         offset),
                 x, y, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck_float64(backend, device):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randn(5, 3, generator=gen, dtype=torch.float64, device=device, requires_grad=True)
    w = (1.0, 3.0, 2.0, 0.5)
    # The interpreter is slow: fast mode (random projections of the Jacobian) for triton.
    check = functools.partial(torch.autograd.gradcheck, fast_mode=backend == "triton")
    with fastssl.use_backend(backend):
        assert check(lambda a: ops.series_sum(a, weights=w), (x,))
        assert check(lambda a, b: ops.series_sum(a, b, weights=w), (x, y))
        assert check(lambda a: ops.gauss_lse(a, scale=1.5), (x,))
        assert check(lambda a, b: ops.gauss_lse(a, b, scale=1.5, diag_offset=2), (x, y))


def test_torch_path_row_blocks(monkeypatch):
    # Tiny blocks: many row blocks, the mirrored scatter of the symmetric walk included.
    monkeypatch.setattr(torch_sphere, "_TORCH_BLOCK_ELEMENTS", 45)
    x, y = _inputs(23, 11, 6, torch.float64, "cpu", False, seed=3)
    w = (1.0, 4.0, 2.0)
    with fastssl.use_backend("torch"):
        for b in (None, y):
            _compare(lambda a, c: ops.series_sum(a, c, weights=w),
                     lambda a, c: _ref_series(a, c, w), x, b, torch.float64)
            _compare(lambda a, c: ops.gauss_lse(a, c, scale=2.0, diag_offset=0 if c is None else 4),
                     lambda a, c: _ref_gauss(a, c, 2.0, 0 if c is None else 4), x, b, torch.float64)


def test_torch_path_polynomials_match_reference():
    # The torch path's monomial (Horner) form of psi and psi' against the reference recurrence.
    from fastssl.reference.sphere import gegenbauer
    t = torch.linspace(-1, 1, 41, dtype=torch.float64)
    for dim in (2, 3, 50, 32768):
        for degree in range(1, 8):
            w = (0.0,) * (degree - 1) + (1.0,)
            torch.testing.assert_close(torch_sphere._series_and_derivative(t, w, dim, False),
                                       gegenbauer(t, degree, dim), rtol=1e-12, atol=1e-12)
        w = (1.0, 40.0, 40.0, 3.0)
        tt = t.clone().requires_grad_(True)
        (d,) = torch.autograd.grad(kernel_series(tt, w, dim).sum(), tt)
        torch.testing.assert_close(torch_sphere._series_and_derivative(t, w, dim, True), d)
    # High degree in D = 2 takes the recurrence (the monomial basis is ill-conditioned there).
    w = tuple(float(k % 3 + 1) for k in range(20))
    tt = t.clone().requires_grad_(True)
    (d,) = torch.autograd.grad(kernel_series(tt, w, 2).sum(), tt)
    for derivative, expected in ((False, kernel_series(t, w, 2)), (True, d)):
        torch.testing.assert_close(torch_sphere._series_and_derivative(t.float(), w, 2, derivative),
                                   expected.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_nan_with_zero_and_collapsed_rows(backend, device):
    z = torch.zeros(6, 5, dtype=torch.float32, device=device)
    z[1:] = torch.randn(1, 5)
    z.requires_grad_(True)
    with fastssl.use_backend(backend):
        total = ops.series_sum(z, weights=(1.0, 40.0, 40.0)) + ops.gauss_lse(z, scale=2.5)
        total.backward()
    assert torch.isfinite(total) and torch.isfinite(z.grad).all()
