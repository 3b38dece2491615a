"""The sphere family's same-pass ops (torch entry, issue 18): sphere_series_sum_grad and
sphere_gauss_lse_grad make the gradient in the forward; checked against the recompute ops
(sphere_series_sum / sphere_gauss_lse + their backward ops, themselves checked against the
reference in test_sphere_ops.py): values and gradients, y given or not, diagonal offsets, many
blocks, extreme scales (the running maximum), float64 gradcheck, a second backward."""
import pytest
import torch

from fastssl.backends.torch import sphere as torch_sphere
from fastssl.ops import sphere as ops

W = [1.0, 40.0, 40.0]


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _grads(fn, x, y):
    x = x.detach().clone().requires_grad_(True)
    y = None if y is None else y.detach().clone().requires_grad_(True)
    out = fn(x, y)
    (2.5 * out).backward()
    return out.detach(), x.grad, (None if y is None else y.grad)


def _both(kind, x, y, **kw):
    if kind == "series":
        same = lambda a, b: ops._series_sum_grad_op(a, b, W, "torch")[0]  # noqa: E731
        recompute = lambda a, b: ops._series_sum_op(a, b, W, "torch")  # noqa: E731
    else:
        same = lambda a, b: ops._gauss_lse_grad_op(a, b, kw["scale"], kw["offset"], "torch")[0]  # noqa: E731
        recompute = lambda a, b: ops._gauss_lse_op(a, b, kw["scale"], kw["offset"], "torch")  # noqa: E731
    return _grads(same, x, y), _grads(recompute, x, y)


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("kind,kw", [("series", {}), ("gauss", {"scale": 2.0, "offset": 0}),
                                     ("gauss", {"scale": 2.0, "offset": 1}),
                                     ("gauss", {"scale": 60.0, "offset": 0})])
def test_same_pass_matches_recompute(kind, kw, with_y, blocks, monkeypatch):
    if blocks:
        monkeypatch.setattr(torch_sphere, "_TORCH_BLOCK_ELEMENTS", 20)
    x, y = _rand(11, 5, seed=1), (_rand(9, 5, seed=2) if with_y else None)
    if kind == "gauss" and kw["offset"] and not with_y:
        pytest.skip("the offset applies to the x-y pairs only")
    got, ref = _both(kind, x, y, **kw)
    for a, b in zip(got, ref):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(a, b)
        assert torch.isfinite(a).all()


def test_same_pass_gradcheck_and_second_backward():
    x = _rand(6, 4, seed=3).requires_grad_(True)
    y = _rand(5, 4, seed=4).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: ops._series_sum_grad_op(a, b, W, "torch")[0], (x, y)
    )
    assert torch.autograd.gradcheck(
        lambda a: ops._gauss_lse_grad_op(a, None, 1.5, 0, "torch")[0], (x,)
    )
    out = ops._gauss_lse_grad_op(x, y, 1.5, 1, "torch")[0]
    g1 = torch.autograd.grad(out, (x, y), retain_graph=True)
    g2 = torch.autograd.grad(out, (x, y))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_public_entry_uses_the_same_pass_only_with_a_gradient(monkeypatch):
    calls = []
    real = torch_sphere._torch_series_forward_grad
    monkeypatch.setattr(ops.TABLE["torch"], "series_forward_grad",
                        lambda *a: calls.append(1) or real(*a), raising=False)
    x = _rand(4, 3, seed=5)
    ops.series_sum(x, weights=W, backend="torch")
    assert not calls
    ops.series_sum(x.requires_grad_(True), weights=W, backend="torch").backward()
    assert calls == [1]


def test_same_pass_refuses_a_backend_without_it():
    x = _rand(3, 2, seed=6)
    # the op's entry check names the backend (issue 22)
    with pytest.raises(ValueError, match=r"^backend: expected one of \('torch',\)"):
        ops._series_sum_grad_op(x, None, W, "reference")
    with pytest.raises(ValueError, match=r"^backend: expected one of \('torch',\)"):
        ops._gauss_lse_grad_op(x, None, 1.0, 0, "reference")
