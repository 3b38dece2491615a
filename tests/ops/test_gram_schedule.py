"""The symmetric tile schedule of the contrastive family (issue 25): gram_lse_forward /
gram_lse_backward of the "cpp" and "torch" entries against full float64 matrices (tile edges,
masks, weights, the fixed-shift and the per-row-shift forms), the registered symmetric ops
through them, and the losses that route through them (NT-Xent, DCL, DCLW, SogCLR, and
single-process symmetric InfoNCE through the cross mode) against fastssl.reference. Before
issue 25 neither entry had these methods."""
import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl import functional
from fastssl import reference as R
from fastssl.backends.torch import contrastive as torch_backend
from fastssl.ops import contrastive as ops

BACKENDS = ["cpp", "torch"]


@pytest.fixture(params=[None, 7, 64], ids=["default-tile", "tile7", "tile64"])
def tile(request, monkeypatch):
    """The tile edge of both entries: small edges put tile borders inside small problems."""
    if request.param is None:
        yield None
        return
    from fastssl import _C
    old = _C.contrastive_gram_block()
    _C.contrastive_gram_block(request.param)
    monkeypatch.setattr(torch_backend, "GRAM_BLOCK", request.param)
    yield request.param
    _C.contrastive_gram_block(old)


def _layout(b):
    ar = torch.arange(b)
    return torch.cat([ar, b + ar]), torch.cat([b + ar, ar])


def _full(z, self_col, pos_col, scale, exclude_pos, cross=0):
    """(lse, wmean) from the full masked matrix, differentiable (the test's reference); cross
    > 0 masks the pairs on one side of it."""
    x = scale * z @ z.T
    n = z.shape[0]
    mask = torch.zeros(n, n, dtype=torch.bool)
    for col in ((self_col, pos_col) if exclude_pos else (self_col,)):
        rows = torch.arange(n)[col >= 0]
        mask[rows, col[col >= 0]] = True
    if cross:
        low = torch.arange(n) < cross
        mask |= low[:, None] == low[None, :]
    xm = x.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(xm, 1)
    p = torch.softmax(xm, 1).nan_to_num(0.0)
    return lse, (p * x.masked_fill(mask, 0.0)).sum(1)


def _entry(name):
    return ops.TABLE[name]


CASES = [
    # (B, D, scale, exclude_pos, normalized): 2N = 2 (one row pair) to 2N = 600
    (1, 3, 10.0, False, True), (1, 3, 10.0, True, True), (5, 7, 10.0, False, True),
    (37, 9, 10.0, True, True), (300, 16, 10.0, True, True), (300, 5, 3.0, False, False),
    (70, 8, 100.0, True, True),     # temperature 0.01: the per-row shifts in float32
    (40, 8, 400.0, True, True),     # and in float64
    (45, 6, 2.0, True, False),      # large norms: the shift bound scale max |z|^2
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_methods_match_full_matrix(backend, case, dtype, tile):
    b, d, scale, exclude_pos, normalized = case
    g = torch.Generator().manual_seed(b * 31 + d)
    z = torch.randn(2 * b, d, generator=g, dtype=torch.float64)
    z = F.normalize(z, dim=1) if normalized else 4.0 * z
    sc, pc = _layout(b)
    zr = z.clone().requires_grad_()
    lse_ref, w_ref = _full(zr, sc, pc, scale, exclude_pos)
    gvec = torch.randn(2 * b, generator=g, dtype=torch.float64)
    (lse_ref.masked_fill(torch.isinf(lse_ref), 0.0) * gvec).sum().backward()
    entry = _entry(backend)
    lse, w = entry.gram_lse_forward(z.to(dtype), sc, pc, scale, exclude_pos, True)
    lse_nw, w_nw = entry.gram_lse_forward(z.to(dtype), sc, pc, scale, exclude_pos, False)
    assert w_nw.numel() == 0 and lse.dtype == dtype
    dz = entry.gram_lse_backward(z.to(dtype), sc, pc, scale, exclude_pos, lse_ref.to(dtype),
                                 gvec.to(dtype))
    assert dz.dtype == dtype
    # float32: the inputs' rounding moves a logit by ~eps |X|; float64 near exact
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    scale_tol = tol * max(1.0, scale * z.norm(dim=1).max().item() ** 2)
    torch.testing.assert_close(lse.double(), lse_ref.detach(), rtol=0, atol=scale_tol)
    torch.testing.assert_close(lse_nw.double(), lse_ref.detach(), rtol=0, atol=scale_tol)
    torch.testing.assert_close(w.double(), w_ref.detach(), rtol=0, atol=scale_tol)
    gscale = scale_tol * zr.grad.abs().max().item() + tol
    torch.testing.assert_close(dz.double(), zr.grad, rtol=0, atol=gscale)
    assert torch.isfinite(dz).all()


CROSS_CASES = [
    # (M, D, scale, cross, normalized): symmetric InfoNCE's layout (cross = M / 2), a cross
    # inside a tile, at the ends, temperature 0.01 (per-row shifts), large norms
    (600, 16, 10.0, 300, True), (74, 9, 10.0, 37, True), (75, 5, 3.0, 30, False),
    (40, 6, 10.0, 1, True), (40, 6, 10.0, 39, True), (140, 8, 100.0, 70, True),
    (90, 6, 2.0, 45, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CROSS_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_cross_mode_matches_full_matrix(backend, case, dtype, tile):
    m, d, scale, cross, normalized = case
    g = torch.Generator().manual_seed(m * 17 + cross)
    z = torch.randn(m, d, generator=g, dtype=torch.float64)
    z = F.normalize(z, dim=1) if normalized else 4.0 * z
    no_self = torch.full((m,), -1, dtype=torch.long)
    pos = (torch.arange(m) + cross) % m     # any columns: not excluded
    zr = z.clone().requires_grad_()
    lse_ref, w_ref = _full(zr, no_self, pos, scale, False, cross)
    gvec = torch.randn(m, generator=g, dtype=torch.float64)
    (lse_ref * gvec).sum().backward()
    entry = _entry(backend)
    lse, w = entry.gram_lse_forward(z.to(dtype), no_self, pos, scale, False, True, cross)
    dz = entry.gram_lse_backward(z.to(dtype), no_self, pos, scale, False, lse_ref.to(dtype),
                                 gvec.to(dtype), cross)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    scale_tol = tol * max(1.0, scale * z.norm(dim=1).max().item() ** 2)
    torch.testing.assert_close(lse.double(), lse_ref.detach(), rtol=0, atol=scale_tol)
    torch.testing.assert_close(w.double(), w_ref.detach(), rtol=0, atol=scale_tol)
    gscale = scale_tol * zr.grad.abs().max().item() + tol
    torch.testing.assert_close(dz.double(), zr.grad, rtol=0, atol=gscale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cross", [-1, 8, 9, True])
def test_gram_cross_refuses_bad_values(backend, cross):
    z = torch.randn(8, 3)
    no_self = torch.full((8,), -1, dtype=torch.long)
    with pytest.raises(ValueError, match="cross"):
        _entry(backend).gram_lse_forward(z, no_self, no_self, 1.0, False, False, cross)
    with pytest.raises(ValueError, match="cross"):
        _entry(backend).gram_lse_backward(z, no_self, no_self, 1.0, False, torch.zeros(8),
                                          torch.ones(8), cross)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sym_op_cross_gradcheck_float64(backend, tile):
    z = torch.randn(13, 3, dtype=torch.float64, requires_grad=True)
    no_self = torch.full((13,), -1, dtype=torch.long)

    def f(z):
        lse, _ = ops.contrastive_lse_sym(z, no_self, no_self, 2.5, False, False, backend, 6)
        return lse
    assert torch.autograd.gradcheck(f, (z,))


def test_gram_masked_rows_are_exact_minus_inf():
    # 2N = 2 with the positive excluded: both rows have every column masked
    z = torch.randn(2, 3, dtype=torch.float64)
    sc, pc = _layout(1)
    for backend in BACKENDS:
        lse, w = _entry(backend).gram_lse_forward(z, sc, pc, 10.0, True, True)
        assert torch.isneginf(lse).all() and (w == 0).all()
        dz = _entry(backend).gram_lse_backward(z, sc, pc, 10.0, True, lse, torch.ones(2,
                                               dtype=torch.float64))
        assert (dz == 0).all()


def test_cpp_gram_refuses_asymmetric_masks():
    z = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="pos_col"):
        _entry("cpp").gram_lse_forward(z, torch.arange(4), torch.tensor([1, 2, 3, 0]), 1.0,
                                       True, False)
    with pytest.raises(RuntimeError, match="self_col"):
        _entry("cpp").gram_lse_forward(z, torch.tensor([1, 0, 2, 3]), torch.arange(4), 1.0,
                                       False, False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exclude_pos", [False, True])
def test_sym_op_gradcheck_float64(backend, exclude_pos, tile):
    assert ops.has_gram(backend)
    b = 6
    z = torch.randn(2 * b, 3, dtype=torch.float64, requires_grad=True)
    sc, pc = _layout(b)

    def f(z):
        lse, _ = ops.contrastive_lse_sym(z, sc, pc, 2.5, exclude_pos, False, backend)
        return lse
    assert torch.autograd.gradcheck(f, (z,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sym_op_low_precision_2x_rule(backend, dtype):
    # low-precision inputs: the op's error against float64 (on the same rounded inputs) at most
    # twice that of eager PyTorch in that dtype (the full masked matrix's logsumexp)
    b = 150
    g = torch.Generator().manual_seed(3)
    z = F.normalize(torch.randn(2 * b, 16, generator=g), dim=1).to(dtype)
    sc, pc = _layout(b)
    exact, _ = _full(z.double(), sc, pc, 10.0, True)
    x = (z @ z.T) * 10.0
    x = x.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    x[torch.arange(2 * b), pc] = float("-inf")
    eager = torch.logsumexp(x, 1).double()
    lse, _ = ops.contrastive_lse_sym(z, sc, pc, 10.0, True, False, backend)
    assert (lse.double() - exact).abs().max() <= 2 * (eager - exact).abs().max() + 1e-6


def _spy(monkeypatch, backend):
    calls = []
    entry = ops.TABLE[backend]
    for name in ("gram_lse_forward", "gram_lse_backward"):
        orig = getattr(entry, name)

        def wrapped(*args, _orig=orig, _name=name):
            calls.append(_name)
            return _orig(*args)
        monkeypatch.setattr(entry, name, staticmethod(wrapped) if isinstance(entry, type)
                            else wrapped)
    return calls


LOSSES = {
    "nt_xent": (lambda f, a, b: f.nt_xent(a, b, 0.2)),
    "dcl": (lambda f, a, b: f.dcl(a, b, 0.2)),
    "dclw": (lambda f, a, b: f.dclw(a, b, 0.2, sigma=0.5)),
    "sogclr": (lambda f, a, b: f.sogclr(a, b, torch.arange(a.shape[0]),
                                        torch.full((a.shape[0] + 3,), 0.5, dtype=torch.float32),
                                        gamma=0.9, temperature=0.2)),
    "info_nce_sym": (lambda f, a, b: f.info_nce(a, b, 0.2, symmetric=True)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_through_the_schedule_match_reference(backend, name, monkeypatch):
    b = ops.GRAM_MIN_ROWS // 2 + 3  # 2N past the threshold, not a multiple of a tile
    g = torch.Generator().manual_seed(7)
    z1 = torch.randn(b, 12, generator=g, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(b, 12, generator=g, dtype=torch.float64)
    call = LOSSES[name]
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref = call(R, a1, a2)
    ref.backward()
    calls = _spy(monkeypatch, backend)
    f1, f2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    with fastssl.use_backend(backend):
        out = call(functional, f1, f2)
    out.backward()
    assert calls == ["gram_lse_forward", "gram_lse_backward"]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f1.grad, a1.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(f2.grad, a2.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["nt_xent", "dcl", "info_nce_sym"])
def test_losses_float32_through_the_schedule(name):
    b = ops.GRAM_MIN_ROWS // 2
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(b, 32, generator=g, dtype=torch.float64)
    z2 = z1 + 0.3 * torch.randn(b, 32, generator=g, dtype=torch.float64)
    call = LOSSES[name]
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref = call(R, a1, a2)
    ref.backward()
    f1, f2 = z1.float().requires_grad_(), z2.float().requires_grad_()
    with fastssl.use_backend("cpp"):
        out = call(functional, f1, f2)
    out.backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f1.grad.double(), a1.grad, rtol=1e-4, atol=1e-6)


def test_compile_fullgraph_nt_xent_through_the_schedule():
    def step(z1, z2):
        return functional.nt_xent(z1, z2, 0.1)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    b = ops.GRAM_MIN_ROWS // 2
    z1 = torch.randn(b, 4, requires_grad=True)
    z2 = torch.randn(b, 4, requires_grad=True)
    with fastssl.use_backend("cpp"):
        loss = compiled(z1, z2)
        loss.backward()
        expected = step(z1.detach(), z2.detach())
    torch.testing.assert_close(loss.detach(), expected)
    assert torch.isfinite(z1.grad).all()


def test_block_config_names_the_tile():
    from fastssl.backends.ext.contrastive import block_config
    cfg = block_config()
    assert cfg["gram_tile"] > 0 and cfg["row_block_elements"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["nt_xent", "dcl"])
def test_learnable_temperature_through_the_schedule(backend, name):
    # the scale's gradient: the tap's share from dz (half: dz holds the row and column terms)
    # plus the positive logits'
    b = ops.GRAM_MIN_ROWS // 2
    g = torch.Generator().manual_seed(5)
    z1 = torch.randn(b, 6, generator=g, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(b, 6, generator=g, dtype=torch.float64)
    grads = []
    for module, be in ((R, None), (functional, backend)):
        t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        a1 = z1.clone().requires_grad_()
        with fastssl.use_backend(be or "torch"):
            loss = getattr(module, name)(a1, z2, t)
        loss.backward()
        grads.append((loss.detach(), t.grad, a1.grad))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_learnable_temperature_info_nce_symmetric_cross_mode(backend, monkeypatch):
    # the tap's share of the symmetric op (half of <z, dz> / scale) in the cross mode too
    b = ops.GRAM_MIN_ROWS // 2
    g = torch.Generator().manual_seed(9)
    q = torch.randn(b, 6, generator=g, dtype=torch.float64)
    k = q + 0.5 * torch.randn(b, 6, generator=g, dtype=torch.float64)
    calls = _spy(monkeypatch, backend)
    grads = []
    for module, be in ((R, "torch"), (functional, backend)):
        t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        a = q.clone().requires_grad_()
        with fastssl.use_backend(be):
            loss = module.info_nce(a, k, t, symmetric=True)
        loss.backward()
        grads.append((loss.detach(), t.grad, a.grad))
    assert calls == ["gram_lse_forward", "gram_lse_backward"]
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_symmetric_info_nce_never_takes_the_symmetric_schedule(backend, monkeypatch):
    """A backend without same-pass kernels (Triton) once sent non-symmetric InfoNCE from
    2B >= GRAM_MIN_ROWS into the cross mode, which returns the SYMMETRIC loss: the value must
    stay the q -> k direction alone (here through the torch/C++ entries with the same-pass
    kernels hidden, as Triton has none)."""
    monkeypatch.setattr(ops, "has_same_pass", lambda name: False)
    b = ops.GRAM_MIN_ROWS // 2 + 3
    g = torch.Generator().manual_seed(11)
    q = torch.randn(b, 12, generator=g, dtype=torch.float64)
    k = q + 0.5 * torch.randn(b, 12, generator=g, dtype=torch.float64)
    a1, a2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    ref = R.info_nce(a1, a2, 0.2, symmetric=False)
    ref.backward()
    calls = _spy(monkeypatch, backend)
    f1, f2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    with fastssl.use_backend(backend):
        out = functional.info_nce(f1, f2, 0.2, symmetric=False)
    out.backward()
    assert not any(c.startswith("gram") for c in calls)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f1.grad, a1.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(f2.grad, a2.grad, rtol=1e-8, atol=1e-12)
