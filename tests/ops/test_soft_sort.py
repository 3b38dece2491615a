"""fastssl soft_sort (every backend) against diffsort.DiffSortNet: values, P, gradients."""
import pytest
import torch
from conftest import backend_params

import fastssl
from fastssl.functional import soft_sort
from fastssl.losses import SoftSortNet
from fastssl.testing import assert_lowp_rule

from conftest import diffsort, needs_diffsort  # diffsort optional (GPU machine)

DISTS = ["cauchy", "reciprocal", "optimal", "logistic", "logistic_phi", "gaussian"]
NETS = ["odd_even", "bitonic"]
ALL = backend_params("reference", "torch", "cpp", "triton", "cuda")
SIZES = [2, 3, 5, 11, 12, 13, 16, 32, 100]
TRITON_SIZES = [2, 5, 12]  # the interpreter runs every comparator step in Python


def _diffsort(x, network, dist, steepness, art_lambda=0.25):
    net = diffsort.DiffSortNet(network, x.shape[1], device=str(x.device), steepness=steepness,
                               art_lambda=art_lambda, distribution=dist)
    return net(x)


_CACHE = {}


def _case(network, dist, n, dtype, batch, steepness, device):
    """Inputs, cotangents and diffsort's outputs/gradient, computed once per case."""
    key = (network, dist, n, dtype, batch, steepness, device)
    if key not in _CACHE:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(batch, n, generator=g, dtype=dtype).to(device).requires_grad_(True)
        gy = torch.randn(batch, n, generator=g, dtype=dtype).to(device)
        gp = torch.randn(batch, n, n, generator=g, dtype=dtype).to(device)
        y0, p0 = _diffsort(x, network, dist, steepness)
        (g0,) = torch.autograd.grad((y0 * gy).sum() + (p0 * gp).sum(), x)
        _CACHE[key] = (x, gy, gp, y0.detach(), p0.detach(), g0)
    return _CACHE[key]


def _compare(backend, device, network, dist, n, *, dtype=torch.float64, batch=3, steepness=4.0,
             tol=1e-9):
    x, gy, gp, y0, p0, g0 = _case(network, dist, n, dtype, batch, steepness, device)
    with fastssl.use_backend(backend):
        y1, p1 = soft_sort(x, network=network, steepness=steepness, distribution=dist)
    (g1,) = torch.autograd.grad((y1 * gy).sum() + (p1 * gp).sum(), x)
    for a, b, what in [(y1, y0, "values"), (p1, p0, "P"), (g1, g0, "grad")]:
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"{what} {network} {dist} n={n}")


def _sizes(backend, device, dist):
    if backend == "triton" and device == "cpu":
        return TRITON_SIZES if dist == "cauchy" else [2, 5]
    if backend == "reference":
        return [3, 12]  # it is diffsort itself: only the wrapper is checked
    if backend == "torch":
        return [2, 5, 11, 13, 16]
    return [n for n in SIZES if n <= 16 or dist in BIG_DISTS.get(n, ())]


BIG_DISTS = {32: ("cauchy", "gaussian"), 100: ("cauchy",)}


@needs_diffsort
@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("network", NETS)
def test_matches_diffsort(backend, device, network):
    for dist in DISTS:
        for n in _sizes(backend, device, dist):
            _compare(backend, device, network, dist, n, tol=1e-9 if device == "cpu" else 1e-5)


@needs_diffsort
@pytest.mark.parametrize("backend,device", backend_params("torch", "cpp", "triton", "cuda"))
def test_float32(backend, device):
    for network in (NETS[:1] if backend == "triton" and device == "cpu" else NETS):
        _compare(backend, device, network, "cauchy", 7 if backend == "triton" else 11,
                 dtype=torch.float32, batch=5, tol=2e-5)


@pytest.mark.parametrize("backend,device", ALL)
def test_ties_and_tv_a(backend, device):
    if backend == "reference" and diffsort is None:
        pytest.skip(needs_diffsort.kwargs["reason"])  # the reference sorting network is diffsort
    with fastssl.use_backend(backend):
        _, P = soft_sort(torch.full((2, 11), -0.7, dtype=torch.float64, device=device),
                         steepness=3.0)
        q = (P[0, :, 10:].sum(-1) * 2 ** 11).tolist()
        assert q == [2, 2, 20, 20, 90, 90, 240, 240, 420, 420, 504]
        _, P = soft_sort(torch.tensor([[0.0, 0.5]], dtype=torch.float64, device=device),
                         steepness=1.0)
        assert abs(P[0, 0, 0].item() - 0.6475836) < 1e-7
        _, P = soft_sort(torch.tensor([[0.2, -0.3]], device=device), steepness=1.0)
        torch.testing.assert_close(P[0].cpu(), torch.tensor([[0.3524164, 0.6475836],
                                                             [0.6475836, 0.3524164]]),
                                   atol=1e-7, rtol=0)


@pytest.mark.parametrize("backend,device", backend_params("torch", "cpp", "cuda"))
@pytest.mark.parametrize("network", NETS)
def test_hard_limit(backend, device, network):
    x = torch.tensor([[0.3, -0.1, 0.9, 0.5, 0.2, -2.0, 1.7]], dtype=torch.float64, device=device)
    with fastssl.use_backend(backend):
        y, P = soft_sort(x, network=network, steepness=1e7)
    hard = torch.nn.functional.one_hot(x.argsort(1).argsort(1), 7).to(P.dtype)
    assert (P - hard).abs().max() < 1e-4
    torch.testing.assert_close(y, x.sort(1).values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck(backend):
    for network, dist, n in [("odd_even", "cauchy", 5), ("bitonic", "logistic_phi", 6),
                             ("odd_even", "optimal", 4), ("bitonic", "reciprocal", 5),
                             ("odd_even", "logistic", 3), ("odd_even", "gaussian", 4)]:
        x = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
        with fastssl.use_backend(backend):
            assert torch.autograd.gradcheck(
                lambda t: soft_sort(t, network=network, distribution=dist, steepness=2.0),
                (x,), eps=1e-6, atol=1e-5)


def test_large_n_cpp():
    torch.manual_seed(0)
    x = torch.randn(2, 1024, dtype=torch.float64, requires_grad=True)
    with fastssl.use_backend("cpp"):
        y, _ = soft_sort(x, steepness=50.0, return_permutation=False)
    assert _ is None
    (g,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    torch.testing.assert_close(g, torch.ones_like(g))
    with fastssl.use_backend("torch"):
        y_t, _ = soft_sort(x, steepness=50.0, return_permutation=False)
    w = torch.randn_like(x)
    torch.testing.assert_close(y, y_t, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad((y * w).sum(), x)[0],
                               torch.autograd.grad((y_t * w).sum(), x)[0], rtol=1e-9, atol=1e-10)
    x = torch.randn(2, 256, dtype=torch.float64, requires_grad=True)
    with fastssl.use_backend("cpp"):
        y, P = soft_sort(x, network="bitonic", steepness=50.0)
    torch.testing.assert_close(y, (x.unsqueeze(1) @ P).squeeze(1))
    with fastssl.use_backend("torch"):
        y2, P2 = soft_sort(x, network="bitonic", steepness=50.0)
    gp = torch.randn_like(P)
    (g1,) = torch.autograd.grad((P * gp).sum(), x)
    (g2,) = torch.autograd.grad((P2 * gp).sum(), x)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-10)


@needs_diffsort
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cpp(dtype):
    torch.manual_seed(1)
    x = torch.randn(8, 11).to(dtype)
    with fastssl.use_backend("cpp"):
        y, P = soft_sort(x, steepness=5.0)
    assert y.dtype == dtype and P.dtype == dtype
    y_ref, P_ref = _diffsort(x.float(), "odd_even", "cauchy", 5.0)
    if dtype == torch.float16:
        y_lp, P_lp = _diffsort(x, "odd_even", "cauchy", 5.0)
        assert_lowp_rule(P, P_lp, P_ref)
        assert_lowp_rule(y, y_lp, y_ref)
    else:
        assert (P.float() - P_ref).abs().max() < 1e-2


@needs_diffsort
def test_module_is_diffsort_drop_in():
    x = torch.randn(4, 9)
    mine = SoftSortNet("bitonic", 9, steepness=3.0, distribution="logistic_phi", art_lambda=0.4)
    ref = diffsort.DiffSortNet("bitonic", 9, steepness=3.0, distribution="logistic_phi",
                               art_lambda=0.4)
    for a, b in zip(mine(x), ref(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    legacy = SoftSortNet("odd_even", 9, interpolation_type="reciprocal")
    torch.testing.assert_close(legacy(x)[1], diffsort.DiffSortNet(
        "odd_even", 9, interpolation_type="reciprocal")(x)[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="x"):
        mine(torch.randn(4, 8))


def test_bad_inputs():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="network"):
        soft_sort(x, network="bubble")
    with pytest.raises(ValueError, match="distribution"):
        soft_sort(x, distribution="laplace")
    with pytest.raises(ValueError, match="steepness"):
        soft_sort(x, steepness=-1.0)
    with pytest.raises(ValueError, match="x"):
        soft_sort(torch.randn(4))
    with pytest.raises(ValueError, match="x"):
        soft_sort(torch.randn(3, 1))
    with pytest.raises(TypeError, match="x"):
        soft_sort(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="size"):
        SoftSortNet("odd_even", 1)
