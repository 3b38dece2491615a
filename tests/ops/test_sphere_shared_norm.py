"""SFRIK and AUH normalise each view once (issue 25): the mse term's inverse norms go to the pair
ops (x_inv_norm), which then do not normalise again, in the forward nor in the same-pass
backward. Pinned by counting the row-norm computations; the ops with given inverse norms
match the ops without them (values and gradients, float64 gradcheck), and bad inverse norms
are refused naming the argument."""
import pytest
import torch

import fastssl._validation as validation
import fastssl.functional as F
from fastssl.backends.torch import sphere as torch_sphere
from fastssl.ops import sphere as ops
from fastssl.reference import sphere as reference

W = [1.0, 40.0, 40.0]


def _rand(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.fixture
def norm_calls(monkeypatch):
    """The number of row-norm computations (fastssl._validation.row_norms, wherever called)."""
    calls = []
    original = validation.row_norms

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(validation, "row_norms", counting)
    monkeypatch.setattr(torch_sphere, "row_norms", counting)
    return calls


def _loss(name, z1, z2):
    if name == "sfrik":
        return F.sfrik(z1, z2, weights=W)
    return F.auh(z1, z2)


@pytest.mark.parametrize("name", ["sfrik", "auh"])
def test_each_view_is_normalised_once_in_the_forward(name, norm_calls):
    z1, z2 = _rand(16, 8, seed=1, dtype=torch.float32), _rand(16, 8, seed=2, dtype=torch.float32)
    with torch.no_grad():
        _loss(name, z1, z2)
    assert len(norm_calls) == 2  # one per view (was 4: the mse term and the op each normalised)


@pytest.mark.parametrize("name", ["sfrik", "auh"])
def test_each_view_is_normalised_once_in_a_training_step(name, norm_calls):
    z1 = _rand(16, 8, seed=1, dtype=torch.float32).requires_grad_(True)
    z2 = _rand(16, 8, seed=2, dtype=torch.float32).requires_grad_(True)
    _loss(name, z1, z2).backward()
    # the same-pass backward projects with the forward's inverse norms (was 6 in all)
    assert len(norm_calls) == 2


@pytest.mark.parametrize("name", ["sfrik", "auh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_normalisation_keeps_values_and_gradients(name, dtype):
    z1 = _rand(24, 6, seed=3, dtype=dtype).requires_grad_(True)
    z2 = (3.0 * _rand(24, 6, seed=4, dtype=dtype)).requires_grad_(True)
    got = _loss(name, z1, z2)
    g1, g2 = torch.autograd.grad(got, (z1, z2))
    ref_fn = reference.sfrik if name == "sfrik" else reference.auh
    kw = {"weights": W} if name == "sfrik" else {}
    want = ref_fn(z1, z2, **kw)
    w1, w2 = torch.autograd.grad(want, (z1, z2))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g1, w1)
    torch.testing.assert_close(g2, w2)


def _op(kind, x, y, rx, ry, backend="torch"):
    if kind == "series":
        return ops.series_sum(x, y, weights=W, backend=backend, x_inv_norm=rx, y_inv_norm=ry)
    return ops.gauss_lse(x, y, scale=2.0, diag_offset=1 if y is not None else 0,
                         backend=backend, x_inv_norm=rx, y_inv_norm=ry)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["series", "gauss"])
@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_ops_with_given_inverse_norms_match_the_ops_without(kind, with_y, grad, backend):
    if backend == "triton":
        pytest.importorskip("triton")  # CPU tensors run through the interpreter (conftest)
    dtype = torch.float64 if backend == "torch" else torch.float32
    x = _rand(9, 5, seed=5, dtype=dtype).requires_grad_(grad)
    y = _rand(7, 5, seed=6, dtype=dtype).requires_grad_(grad) if with_y else None
    rx, ry = ops.inv_norms(x), (ops.inv_norms(y) if with_y else None)
    with torch.set_grad_enabled(grad):
        got = _op(kind, x, y, rx, ry, backend)
        want = _op(kind, x, y, None, None, backend)
    torch.testing.assert_close(got, want)
    if grad:
        leaves = (x,) if y is None else (x, y)
        for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["series", "gauss"])
def test_gradcheck_with_given_inverse_norms(kind):
    x = _rand(6, 4, seed=7).requires_grad_(True)
    y = _rand(5, 4, seed=8).requires_grad_(True)
    # the inverse norms are recomputed from the perturbed inputs (as the losses do), detached
    # by the op: its own backward carries the normalisation's gradient
    assert torch.autograd.gradcheck(
        lambda a, b: _op(kind, a, b, ops.inv_norms(a), ops.inv_norms(b)), (x, y))


def test_the_given_inverse_norms_are_used_as_given():
    # a kernel that normalises again would not see the factor 2 on the inverse norms
    x = _rand(8, 5, seed=9)
    r = ops.inv_norms(x)
    doubled = ops.series_sum(x, weights=[1.0], backend="torch", x_inv_norm=2 * r)
    plain = ops.series_sum(x, weights=[1.0], backend="torch")
    torch.testing.assert_close(doubled, 4 * plain)  # psi = P_1(t) = t: linear in both rows


@pytest.mark.parametrize("bad,match", [
    (lambda x: torch.ones(x.shape[0] + 1, dtype=x.dtype), "rx: expected the 8 inverse norms"),
    (lambda x: torch.ones(x.shape[0], dtype=torch.float32), "rx: expected the 8 inverse norms"),
    (lambda x: torch.ones(x.shape[0], 1, dtype=x.dtype), "rx: expected a 1-D tensor"),
])
def test_bad_inverse_norms_are_refused_naming_the_argument(bad, match):
    x = _rand(8, 5, seed=10)
    with pytest.raises(ValueError, match=match):
        ops.series_sum(x, weights=W, backend="torch", x_inv_norm=bad(x))
    with pytest.raises(ValueError, match=match):
        ops.gauss_lse(x, scale=2.0, backend="torch", x_inv_norm=bad(x))


def test_ry_without_y_is_refused():
    x = _rand(8, 5, seed=11)
    with pytest.raises(ValueError, match="ry: expected None"):
        ops.series_sum(x, weights=W, backend="torch", y_inv_norm=ops.inv_norms(x))
