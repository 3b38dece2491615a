"""fastssl.reference.sphere against the closed forms and invariants of the SFRIK spec
(section 3)."""

import math

import pytest
import torch

from fastssl import reference as R
from fastssl.reference.sphere import gegenbauer, gegenbauer_closed_form, kernel_series

DIMS = (2, 3, 5, 130, 32768)


def _uniform_sphere(n, d, *, gen, dtype=torch.float64):
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("dim", DIMS)
def test_recurrence_equals_upstream_closed_forms(dim):
    t = torch.linspace(-1, 1, 101, dtype=torch.float64)
    for k in (1, 2, 3, 4):
        torch.testing.assert_close(gegenbauer(t, k, dim), gegenbauer_closed_form(t, k, dim),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim", DIMS)
def test_polynomial_invariants(dim):
    t = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    for k in range(1, 9):
        assert abs(gegenbauer(one, k, dim).item() - 1.0) < 1e-12
        assert gegenbauer(t, k, dim).abs().max().item() <= 1 + 1e-12
    zero = torch.zeros(1, dtype=torch.float64)
    assert abs(gegenbauer(zero, 2, dim).item() + 1 / (dim - 1)) < 1e-15
    if dim == 2:  # circle: Chebyshev polynomials, P_k(cos a) = cos(k a)
        a = torch.linspace(0, math.pi, 50, dtype=torch.float64)
        for k in range(1, 7):
            torch.testing.assert_close(gegenbauer(a.cos(), k, 2), (k * a).cos())
    if dim == 3:  # 2-sphere: Legendre, P_5(t) = (63t^5 - 70t^3 + 15t)/8
        torch.testing.assert_close(gegenbauer(t, 5, 3), (63 * t**5 - 70 * t**3 + 15 * t) / 8)


def test_polynomials_have_zero_mean_on_the_sphere():
    # E_{x,y ~ U(S^{q-1})} P_k(<x,y>) = 0 for k >= 1 (Monte Carlo, q = 4).
    gen = torch.Generator().manual_seed(0)
    x, y = _uniform_sphere(40000, 4, gen=gen), _uniform_sphere(40000, 4, gen=gen)
    t = (x * y).sum(1)
    for k in (1, 2, 3, 4):
        assert abs(gegenbauer(t, k, 4).mean().item()) < 0.02


def test_dimension_one_rejected():
    with pytest.raises(ValueError, match="z"):
        R.sfrik_mmd(torch.randn(4, 1))
    with pytest.raises(ValueError, match="z1"):
        R.sfrik(torch.randn(4, 1), torch.randn(4, 1))
    with pytest.raises(ValueError, match="dim"):
        gegenbauer(torch.zeros(3), 2, 1)


@pytest.mark.parametrize("weights", [(1.0,), (1.0, 40.0, 40.0), (0.5, 2.0, 0.0, 3.0, 1.0)])
def test_mmd_nonnegative_and_collapse(weights):
    gen = torch.Generator().manual_seed(1)
    for d in (3, 7, 33):
        z = torch.randn(12, d, generator=gen, dtype=torch.float64)
        assert R.sfrik_mmd(z, weights=weights).item() >= -1e-12
        clustered = torch.randn(1, d, generator=gen, dtype=torch.float64) + 0.3 * z
        assert R.sfrik_mmd(clustered, weights=weights).item() >= -1e-12
        collapsed = torch.randn(1, d, generator=gen, dtype=torch.float64).expand(9, d) * 3
        torch.testing.assert_close(R.sfrik_mmd(collapsed, weights=weights),
                                   torch.tensor(sum(weights), dtype=torch.float64))


def test_mmd_orthonormal_rows_closed_form():
    n, q = 8, 16
    z = torch.linalg.qr(torch.randn(q, q, dtype=torch.float64))[0][:n] * 2.5
    expected = 81 / n - 40 * (n - 1) / (n * (q - 1))
    torch.testing.assert_close(R.sfrik_mmd(z), torch.tensor(expected, dtype=torch.float64))
    # The spec's number at N = 2048, q = 32768.
    assert abs(81 / 2048 - 40 * 2047 / (2048 * 32767) - 0.038331) < 1e-6


def test_mmd_iid_uniform_expectation():
    # E[mmd] = sum(w) / N for i.i.d. uniform rows (the off-diagonal terms have mean 0).
    gen = torch.Generator().manual_seed(2)
    n, q, trials = 16, 8, 300
    vals = torch.stack([R.sfrik_mmd(torch.randn(n, q, generator=gen, dtype=torch.float64))
                        for _ in range(trials)])
    assert abs(vals.mean().item() - 81 / n) < 0.1 * 81 / n


def test_sfrik_composition():
    gen = torch.Generator().manual_seed(3)
    z1, z2 = (torch.randn(10, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    x, y = (z / z.norm(dim=1, keepdim=True) for z in (z1, z2))
    mse = ((2 - 2 * (x * y).sum(1)) / 6).mean()
    mmd = (kernel_series(x @ x.T, (1, 40, 40), 6).mean()
           + kernel_series(y @ y.T, (1, 40, 40), 6).mean()) / 2
    torch.testing.assert_close(R.sfrik(z1, z2, sim_coeff=7.0, mmd_coeff=0.5), 7 * mse + 0.5 * mmd)
    assert 0 <= mse.item() <= 4 / 6


def test_auh_invariants():
    gen = torch.Generator().manual_seed(4)
    z1, z2 = (torch.randn(16, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    loss = R.auh(z1, z2, sim_coeff=0.0)
    assert loss.item() <= 0 and loss.item() >= -4 * 2.5
    c = torch.randn(1, 5, generator=gen, dtype=torch.float64).expand(6, 5)
    torch.testing.assert_close(R.auh(c, c), torch.zeros((), dtype=torch.float64))
    # About -2s for i.i.d. high-dimensional uniform rows.
    hd1, hd2 = (torch.randn(32, 2048, generator=gen, dtype=torch.float64) for _ in range(2))
    assert abs(R.auh(hd1, hd2, sim_coeff=0.0).item() + 5.0) < 0.2
    # Direct formula: log mean_{i != j} exp(-2s(1 - <x_i, x_j>)), averaged over the two views.
    s = 1.7
    x, y = (z / z.norm(dim=1, keepdim=True) for z in (z1, z2))
    off = ~torch.eye(16, dtype=torch.bool)
    unif = sum(torch.exp(-2 * s * (1 - v @ v.T))[off].mean().log() for v in (x, y)) / 2
    mse = (x - y).pow(2).mean()
    torch.testing.assert_close(R.auh(z1, z2, sim_coeff=3.0, unif_coeff=2.0, scale=s),
                               3 * mse + 2 * unif)


def test_auh_large_scale_stays_finite():
    z = torch.randn(8, 64, dtype=torch.float32)
    loss = R.auh(z, z.flip(0), scale=500.0, sim_coeff=0.0)
    assert torch.isfinite(loss) and loss.item() < -100


def test_reference_gradcheck():
    gen = torch.Generator().manual_seed(5)
    z1, z2 = (torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
              for _ in range(2))
    assert torch.autograd.gradcheck(lambda a: R.sfrik_mmd(a, weights=(1.0, 2.0, 3.0, 0.5)), (z1,))
    assert torch.autograd.gradcheck(lambda a, b: R.sfrik(a, b, sim_coeff=3.0), (z1, z2))
    assert torch.autograd.gradcheck(lambda a, b: R.auh(a, b, sim_coeff=3.0), (z1, z2))
