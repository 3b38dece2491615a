"""Contrastive fast paths (torch chunked, triton) against fastssl.reference: values and gradients
of every input, odd sizes, D in {1, 3, 130}, float64 gradcheck, low precision by the
flash-attention rule, SogCLR state, extreme logits, torch.library registration."""
import pytest
import torch
import torch.nn.functional as F
from conftest import backend_params

import fastssl
from fastssl import functional, reference
from fastssl.backends.torch import contrastive as torch_contrastive
from fastssl.ops import contrastive as ops
from fastssl.testing import assert_close, assert_lowp_rule

LOSSES = [
    "nt_xent",
    "info_nce",
    "info_nce_sym",
    "dcl",
    "dclw",
    "dclw_sigma",
    "sce",
    "sce_keys",
    "sce_keys_noqueue",
]


def _loss_fn(name, queue=None, temperature=0.2):
    if name == "nt_xent":
        return lambda a, b: functional.nt_xent(a, b, temperature)
    if name == "info_nce":
        return lambda a, b: functional.info_nce(a, b, temperature)
    if name == "info_nce_sym":
        return lambda a, b: functional.info_nce(a, b, temperature, symmetric=True)
    if name == "dcl":
        return lambda a, b: functional.dcl(a, b, temperature)
    if name == "dclw":
        return lambda a, b: functional.dclw(a, b, temperature)
    if name == "dclw_sigma":
        return lambda a, b: functional.dclw(a, b, temperature, sigma=0.2)
    if name == "dcl_weighted":
        # DCLW's weights are constants of the gradient (detached): gradcheck the weighted
        # positive term with fixed weights (one per anchor row, both directions).
        w = torch.linspace(0.5, 1.5, 4, dtype=torch.float64)
        return lambda a, b: functional.dcl(
            a, b, temperature, weight_fn=lambda o0, o1: w.to(o0.dtype)
        )
    if name == "sce":
        return lambda a, b: functional.sce(a, b, queue, coeff=0.4, temperature=temperature)
    if name == "sce_keys":
        return lambda a, b: functional.sce(
            a, b, queue, coeff=0.4, temperature=temperature, use_keys=True
        )
    if name == "sce_keys_noqueue":
        return lambda a, b: functional.sce(a, b, None, temperature=temperature, use_keys=True)
    raise KeyError(name)


def _run(fn, backend, a, b, grad_b=True):
    a = a.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(grad_b)
    with fastssl.use_backend(backend):
        loss = fn(a, b)
    loss.backward()
    return loss.detach(), a.grad, (b.grad if grad_b else None)


def _inputs(n, d, dtype, seed=0, kq=7, device="cpu"):
    # drawn on the CPU (same values on every device), then moved to the parametrised device
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g).to(dtype)
    b = (a.float() + 0.5 * torch.randn(n, d, generator=g)).to(dtype)
    queue = F.normalize(torch.randn(kq, d, generator=g), dim=1)
    return a.to(device), b.to(device), queue.to(device)


def _check_against_reference(name, backend, n, d, dtype, kq=7, device="cpu"):
    a, b, queue = _inputs(n, d, dtype, kq=kq, device=device)
    fn = _loss_fn(name, queue.to(dtype))
    grad_b = not name.startswith("sce")
    ref = _run(fn, "reference", a, b, grad_b)
    out = _run(fn, backend, a, b, grad_b)
    assert out[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out[1].dtype == dtype
    for x, y, what in zip(out, ref, ("loss", "grad a", "grad b")):
        if y is None:
            assert x is None
            continue
        assert_close(x, y, msg=f"{name} {backend} {what}")


@pytest.mark.parametrize("backend,device", backend_params("cpp", "torch", "triton"))
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("d", [1, 3, 130])
def test_matches_reference_fp32(backend, device, name, d):
    # n = 5 and K = 7: neither is a tile multiple; 130 exercises the D loop of the kernels.
    _check_against_reference(name, backend, 5, d, torch.float32, device=device)


@pytest.mark.parametrize("name", LOSSES)
def test_torch_path_float64_many_chunks(name, monkeypatch):
    # Several row chunks (chunk = 8 rows here) must give the same as one full matrix.
    monkeypatch.setattr(torch_contrastive, "CHUNK_ELEMENTS", 8 * 40)
    _check_against_reference(name, "torch", 19, 6, torch.float64, kq=21)


@pytest.mark.parametrize("backend,device", backend_params("cpp", "torch", "triton"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["nt_xent", "info_nce_sym", "dcl", "dclw", "sce_keys"])
def test_low_precision_rule(backend, device, dtype, name):
    a, b, queue = _inputs(9, 24, dtype, seed=3, device=device)
    grad_b = not name.startswith("sce")
    fn_low = _loss_fn(name, queue.to(dtype))
    fn_high = _loss_fn(name, queue.to(dtype).float())
    fast = _run(fn_low, backend, a, b, grad_b)
    ref_low = _run(fn_low, "reference", a, b, grad_b)
    ref_high = _run(fn_high, "reference", a.float(), b.float(), grad_b)
    assert fast[0].dtype == torch.float32 and fast[1].dtype == dtype
    for f, rl, rh, what in zip(fast, ref_low, ref_high, ("loss", "grad a", "grad b")):
        if rh is None:
            continue
        assert torch.isfinite(f.float()).all()
        assert_lowp_rule(f.float(), rl.float(), rh.float(), msg=f"{name} {backend} {dtype} {what}")


def _sogclr_steps(backend, dtype, steps=3, gamma=0.8, d=3, device="cpu"):
    g = torch.Generator().manual_seed(5)
    u = torch.zeros(13, device=device)
    out = []
    batches = [torch.tensor([0, 3, 5, 7, 11], device=device),
               torch.tensor([0, 3, 5, 7, 11], device=device),
               torch.tensor([1, 3, 6, 7, 12], device=device)]
    for step in range(steps):
        a = torch.randn(5, d, generator=g).to(dtype).to(device)
        b = torch.randn(5, d, generator=g).to(dtype).to(device)
        fn = lambda x, y: functional.sogclr(x, y, batches[step], u, gamma=gamma, temperature=0.2)  # noqa: E731
        out.append(_run(fn, backend, a, b))
    return out, u


@pytest.mark.parametrize("backend,device", backend_params("cpp", "torch", "triton"))
@pytest.mark.parametrize("d", [1, 3, 130])
def test_sogclr_matches_reference_and_state(backend, device, d):
    ref, u_ref = _sogclr_steps("reference", torch.float32, d=d, device=device)
    out, u_out = _sogclr_steps(backend, torch.float32, d=d, device=device)
    for r, o in zip(ref, out):
        for x, y in zip(o, r):
            assert_close(x, y)
    torch.testing.assert_close(u_out, u_ref, rtol=2e-5, atol=0)
    assert u_out.dtype == torch.float32


def test_sogclr_float64_torch_path():
    ref, u_ref = _sogclr_steps("reference", torch.float64)
    out, u_out = _sogclr_steps("torch", torch.float64)
    for r, o in zip(ref, out):
        for x, y in zip(o, r):
            assert_close(x, y)
    torch.testing.assert_close(u_out, u_ref)


@pytest.mark.parametrize("backend,device", backend_params("cpp", "torch", "triton"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sogclr_low_precision(backend, device, dtype):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(7, 16, generator=g).to(dtype).to(device)
    b = torch.randn(7, 16, generator=g).to(dtype).to(device)
    index = torch.tensor([0, 3, 5, 7, 11, 12, 2], device=device)

    def run(backend_name, x, y):
        u = torch.zeros(13, device=device)
        fn = lambda p, q: functional.sogclr(p, q, index, u, gamma=0.8, temperature=0.2)  # noqa: E731
        return _run(fn, backend_name, x, y) + (u,)

    fast = run(backend, a, b)
    ref_low = run("reference", a, b)
    ref_high = run("reference", a.float(), b.float())
    for f, rl, rh in zip(fast, ref_low, ref_high):
        assert torch.isfinite(f.float()).all()
        assert_lowp_rule(f.float(), rl.float(), rh.float(), msg=f"sogclr {backend} {dtype}")


@pytest.mark.parametrize("name", ["nt_xent", "info_nce", "info_nce_sym", "dcl", "dcl_weighted",
                                  "sce", "sce_keys"])
def test_torch_path_gradcheck(name):
    a, b, queue = _inputs(4, 3, torch.float64, kq=5)
    fn = _loss_fn(name, queue.double(), temperature=0.5)
    with fastssl.use_backend("torch"):
        if name.startswith("sce"):
            kk = b.detach()
            assert torch.autograd.gradcheck(lambda x: fn(x, kk), (a.requires_grad_(True),))
        else:
            assert torch.autograd.gradcheck(fn, (a.requires_grad_(True), b.requires_grad_(True)))


def test_op_gradcheck_split_and_column_stats():
    # The op itself: both segment log-sum-exps and the column log-sum-exp, masks included.
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    self_col = torch.tensor([0, 1, 2, 3, 4])
    pos_col = torch.tensor([4, 5, 6, 0, 1])
    w = torch.randn(5 + 5 + 7, generator=g, dtype=torch.float64)

    def f(x, y):
        lse0, lse1, _, col = ops.contrastive_lse(x, y, self_col, pos_col, 0.7, 4, True, False,
                                                 True, "torch")
        return (torch.cat([lse0, lse1, col]) * w).sum()
    assert torch.autograd.gradcheck(f, (a, b))


def test_op_gradcheck_symmetric():
    # The one-pass symmetric backward, with the NT-Xent/SogCLR masks (own column, positive).
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    self_col = torch.arange(6)
    pos_col = (self_col + 3) % 6
    w = torch.randn(6, generator=g, dtype=torch.float64)
    for exclude_pos in (False, True):
        def f(x):
            lse, _ = ops.contrastive_lse_sym(x, self_col, pos_col, 0.8, exclude_pos, False, "torch")
            return (lse * w).sum()
        assert torch.autograd.gradcheck(f, (z,))


@pytest.mark.parametrize("backend,device", backend_params("cpp", "torch", "triton"))
@pytest.mark.parametrize("name", LOSSES + ["sogclr"])
def test_no_nan_for_extreme_logits_fp16(backend, device, name):
    # T = 0.01 puts logits at +-100: exp overflows fp16 (and the positive's exp is ~e100).
    a, b, queue = _inputs(6, 8, torch.float16, seed=4, device=device)
    b = a.clone()
    if name == "sogclr":
        u = torch.zeros(6, device=device)
        idx = torch.arange(6, device=device)
        fn = lambda x, y: functional.sogclr(x, y, idx, u, temperature=0.01)  # noqa: E731
    else:
        fn = _loss_fn(name, queue.half(), temperature=0.01)
    out = _run(fn, backend, a, b, not name.startswith("sce"))
    for t in out:
        if t is not None:
            assert torch.isfinite(t.float()).all(), name


def test_triton_backend_refuses_float64_clearly():
    a = torch.randn(3, 2, dtype=torch.float64)
    from fastssl._backend import can_serve
    if not can_serve("triton", a.device)[0]:
        pytest.skip("triton cannot run here")
    # the row-block kernels have no float64 (info_nce); the symmetric schedule's gram kernels
    # do, so float64 NT-Xent runs on triton and equals the reference
    with fastssl.use_backend("triton"), pytest.raises(RuntimeError, match="float64"):
        functional.info_nce(a, a.clone())
    with fastssl.use_backend("triton"):
        got = functional.nt_xent(a, a.flip(0))
    torch.testing.assert_close(got, reference.nt_xent(a, a.flip(0)), rtol=1e-12, atol=1e-12)


def test_auto_on_cpu_is_cpp_when_built(monkeypatch):
    from fastssl import _backend

    assert ops.backend_for("nt_xent", torch.device("cpu")) == (
        "cpp" if _backend.cpp_available() else "torch"
    )
    monkeypatch.setattr(_backend, "cpp_available", lambda: False)
    assert ops.backend_for("nt_xent", torch.device("cpu")) == "torch"


def test_opcheck_registered_ops():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=g, requires_grad=True)
    b = torch.randn(6, 3, generator=g, requires_grad=True)
    self_col = torch.tensor([0, 1, 2, 3, -1])
    pos_col = torch.tensor([1, 2, 3, 4, 5])
    torch.library.opcheck(torch.ops.fastssl.contrastive_lse.default,
                          (a, b, self_col, pos_col, 2.0, 3, True, True, True, "torch"))
    z = torch.randn(6, 3, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.fastssl.contrastive_lse_sym.default,
                          (z, torch.arange(6), (torch.arange(6) + 3) % 6, 2.0, True, True, "torch"))
    q = torch.randn(4, 3, generator=g, requires_grad=True)
    k = torch.randn(4, 3, generator=g)
    cols = torch.randn(6, 3, generator=g)
    torch.library.opcheck(torch.ops.fastssl.sce_stats.default,
                          (q, k, cols, torch.tensor([0, 1, -1, 3]), 2.0, 5.0, False, "torch"))
    torch.library.opcheck(torch.ops.fastssl.sce_stats.default,
                          (q, k, cols, torch.tensor([0, 1, -1, 3]), 2.0, 5.0, True, "torch"))
    for need_da, need_db in ((True, True), (True, False), (False, True)):
        # an input whose gradient is not made (need_* False) is a constant of the loss
        a_in, b_in = (a if need_da else a.detach()), (b if need_db else b.detach())
        torch.library.opcheck(torch.ops.fastssl.contrastive_lse_sum.default,
                              (a_in, b_in, self_col, pos_col, 2.0, True, True, need_da, need_db,
                               "torch"))


def test_compile_fullgraph_nt_xent_cpu():
    def step(z1, z2):
        return functional.nt_xent(z1, z2, 0.1)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    z1 = torch.randn(6, 4, requires_grad=True)
    z2 = torch.randn(6, 4, requires_grad=True)
    with fastssl.use_backend("torch"):
        loss = compiled(z1, z2)
        loss.backward()
        expected = step(z1.detach(), z2.detach())
    torch.testing.assert_close(loss.detach(), expected)
    assert torch.isfinite(z1.grad).all()
