"""The memory-saving paths of issue 25 keep the values: the same-pass op's backward scales its
saved gradients in place only when the graph is not kept (a retained graph's second backward
must see the same gradients), and _NormalizeRows keeping its input recomputes the same
output."""
import pytest
import torch

import fastssl
from fastssl import functional
from fastssl.functional.contrastive import _NormalizeRows

BACKENDS = ["cpp", "torch"]


def _skip_without_cpp(backend):
    if backend == "cpp":
        pytest.importorskip("fastssl._C")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["info_nce", "nt_xent_small", "info_nce_sym_small"])
def test_retained_graph_gives_the_same_gradients_every_time(backend, name):
    _skip_without_cpp(backend)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(40, 8, generator=g, requires_grad=True)
    k = torch.randn(40, 8, generator=g, requires_grad=True)
    call = {"info_nce": lambda: functional.info_nce(q, k, 0.2),
            "nt_xent_small": lambda: functional.nt_xent(q, k, 0.2),
            "info_nce_sym_small": lambda: functional.info_nce(q, k, 0.2, symmetric=True)}[name]
    with fastssl.use_backend(backend):
        loss = call()
    grads = []
    for keep in (True, True, False):
        loss.backward(retain_graph=keep)
        grads.append((q.grad.clone(), k.grad.clone()))
        q.grad = k.grad = None
    for gq, gk in grads[1:]:
        assert torch.equal(gq, grads[0][0]) and torch.equal(gk, grads[0][1])
    with fastssl.use_backend(backend):
        loss = call()
    # autograd.grad with a non-unit incoming gradient (scaled in place: not kept)
    gq, gk = torch.autograd.grad(3.0 * loss, (q, k))
    torch.testing.assert_close(gq, 3.0 * grads[0][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gk, 3.0 * grads[0][1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalize_keeping_the_input_is_the_same_function(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(33, 7, generator=g, dtype=dtype)
    x[3] = 0.0  # a clamped row
    dy = torch.randn(33, 7, generator=g, dtype=dtype)
    outs = []
    for save_input in (False, True):
        xi = x.clone().requires_grad_()
        y = _NormalizeRows.apply(xi, save_input)
        (dx,) = torch.autograd.grad(y, xi, dy)
        outs.append((y.detach(), dx))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    xd = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _NormalizeRows.apply(t, True), (xd,))
