"""Numerics at the edges (issue 22, point 8), fast paths and the reference alike.

* float32 embeddings near 1e20 (squared norms overflow float32) give the float64 loss of the
  same directions: every normalisation scales a row by its largest magnitude before squaring.
* A temperature, sigma or epsilon whose reciprocal overflows the accumulation dtype is a
  ValueError naming it (it was a NaN loss); SogCLR's temperature also from above.
* Sinkhorn on float32 scores of magnitude 1e8, or at epsilon = 1e-10, gives codes (finite,
  each row a distribution), not NaN, on every CPU backend.
"""
from __future__ import annotations

import pytest
import torch

import fastssl
import fastssl.functional as F
from fastssl._validation import normalize_rows, row_norms

BACKENDS = ("auto", "torch", "reference", "triton")


def _views(seed=0, b=8, d=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)


LOSSES = {
    "nt_xent": lambda a, b: F.nt_xent(a, b, temperature=0.5),
    "info_nce": lambda a, b: F.info_nce(a, b, temperature=0.2),
    "dcl": lambda a, b: F.dcl(a, b, temperature=0.5),
    "dclw": lambda a, b: F.dclw(a, b, temperature=0.5, sigma=0.5),
    "sce": lambda a, b: F.sce(a, b, torch.nn.functional.normalize(
        torch.randn(5, a.shape[1], generator=torch.Generator().manual_seed(3)), dim=1).to(a.dtype)),
    "sfrik": lambda a, b: F.sfrik(a, b),
    "sfrik_mmd": lambda a, b: F.sfrik_mmd(a),
    "auh": lambda a, b: F.auh(a, b),
    "groco": lambda a, b: F.groco([a, b], topk_neg=3),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_huge_and_tiny_rows_give_the_float64_loss(loss, backend, magnitude):
    z1, z2 = _views()
    f = LOSSES[loss]
    want = f(z1.double(), z2.double())
    a = (z1 * magnitude).requires_grad_()
    b = (z2 * magnitude).requires_grad_()
    with fastssl.use_backend(backend):
        got = f(a, b)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    got.backward()
    # the gradient in the scaled inputs is the unscaled one over the magnitude
    a64 = z1.double().requires_grad_()
    b64 = z2.double().requires_grad_()
    f(a64, b64).backward()
    torch.testing.assert_close(a.grad.double() * magnitude, a64.grad, rtol=1e-3, atol=1e-5)


def test_row_norms_do_not_overflow():
    x = torch.tensor([[2e38, -1e38], [1e20, -1e20], [1e-40, 0.0], [0.0, 0.0]])
    want = torch.linalg.vector_norm(x.double(), dim=1, keepdim=True)
    torch.testing.assert_close(row_norms(x).double(), want, rtol=1e-6, atol=0.0)
    assert torch.isinf(torch.linalg.vector_norm(x[:1], dim=1)).all()  # what torch does
    y = normalize_rows(x[:2])
    torch.testing.assert_close(y.double(), x[:2].double() / want[:2], rtol=1e-6, atol=0.0)
    # F.normalize's clamp of norms below eps is kept (rows of norm < 1e-12 are x / 1e-12)
    torch.testing.assert_close(normalize_rows(x[2:]), x[2:] / 1e-12, rtol=1e-6, atol=0.0)
    for dtype in (torch.bfloat16, torch.float16):
        xs = torch.full((2, 4), 1e4 if dtype == torch.float16 else 1e30, dtype=dtype)
        assert normalize_rows(xs).dtype == dtype
        torch.testing.assert_close(normalize_rows(xs).float(), torch.full((2, 4), 0.5),
                                   rtol=1e-2, atol=0.0)


TINY = {
    "nt_xent temperature": lambda a, b: F.nt_xent(a, b, temperature=1e-39),
    "info_nce temperature": lambda a, b: F.info_nce(a, b, temperature=1e-39),
    "dcl temperature": lambda a, b: F.dcl(a, b, temperature=1e-39),
    "dclw temperature": lambda a, b: F.dclw(a, b, temperature=1e-39),
    "dclw sigma": lambda a, b: F.dclw(a, b, sigma=1e-39),
    "sce temperature": lambda a, b: F.sce(a, b, torch.randn(5, 16), temperature=1e-39),
    "sce temperature_m": lambda a, b: F.sce(a, b, torch.randn(5, 16), temperature_m=1e-39),
    "sogclr temperature": lambda a, b: F.sogclr(a, b, torch.arange(8), torch.zeros(8),
                                                temperature=1e-39),
    "sogclr temperature large": lambda a, b: F.sogclr(a, b, torch.arange(8), torch.zeros(8),
                                                      temperature=1e39),
    "swav epsilon": lambda a, b: F.swav([a, b], epsilon=1e-39),
    "swav temperature": lambda a, b: F.swav([a, b], temperature=1e-39),
    "sinkhorn epsilon": lambda a, b: F.sinkhorn(a, epsilon=1e-39),
}


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case", list(TINY))
def test_reciprocal_overflow_is_a_named_error(case, backend):
    z1, z2 = _views()
    name = case.split()[1]
    with fastssl.use_backend(backend), pytest.raises(ValueError, match=rf"^{name}: expected"):
        TINY[case](z1, z2)


def test_small_but_representable_temperature_stays_finite():
    z1, z2 = _views()
    for f in (lambda: F.nt_xent(z1, z2, temperature=1e-30),
              lambda: F.info_nce(z1, z2, temperature=1e-30),
              lambda: F.sogclr(z1, z2, torch.arange(8), torch.zeros(8), temperature=1e-30)):
        assert torch.isfinite(f())


@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
@pytest.mark.parametrize("scale,epsilon", [(1e8, 0.05), (1.0, 1e-10), (3e30, 0.05)])
def test_sinkhorn_stays_a_distribution_at_any_finite_magnitude(backend, scale, epsilon):
    g = torch.Generator().manual_seed(1)
    for b, k in ((16, 10), (5, 33), (64, 3)):
        s = torch.randn(b, k, generator=g) * scale
        with fastssl.use_backend(backend):
            codes = F.sinkhorn(s, epsilon=epsilon)
        assert torch.isfinite(codes).all(), (b, k)
        assert (codes >= 0).all()
        torch.testing.assert_close(codes.sum(1), torch.ones(b), rtol=1e-5, atol=1e-5)
