"""fastssl.functional / fastssl.losses sphere family (sfrik_mmd, sfrik, auh) against the
reference."""

import pytest
import torch
from conftest import backend_params

import fastssl
from fastssl import functional
from fastssl import losses as L
from fastssl import reference as R
from fastssl.testing import assert_close, assert_lowp_rule

BACKENDS = backend_params("reference", "torch", "triton")


def _pair(b, d, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=gen, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(b, d, generator=gen, dtype=torch.float64)
    return z1.to(device=device, dtype=dtype), z2.to(device=device, dtype=dtype)


CALLS = {
    "sfrik_mmd": (lambda m, a, b, **k: m.sfrik_mmd(a, weights=k.get("weights", (1.0, 40.0, 40.0)))),
    "sfrik": (lambda m, a, b, **k: m.sfrik(a, b, weights=k.get("weights", (1.0, 40.0, 40.0)),
                                           sim_coeff=300.0, mmd_coeff=0.7)),
    "auh": (lambda m, a, b, **k: m.auh(a, b, sim_coeff=300.0, unif_coeff=1.3, scale=2.5)),
}


def _run(module, name, z1, z2, backend=None, **kw):
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    if backend is None:
        out = CALLS[name](module, a, b, **kw)
    else:
        with fastssl.use_backend(backend):
            out = CALLS[name](module, a, b, **kw)
    out.backward()
    grads = [a.grad if a.grad is not None else torch.zeros_like(a),
             b.grad if b.grad is not None else torch.zeros_like(b)]
    return out.detach(), grads


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("shape", [(13, 3), (17, 130)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference_fp32(backend, device, name, shape):
    z1, z2 = _pair(*shape, device=device)
    out, grads = _run(functional, name, z1, z2, backend)
    ref, ref_grads = _run(R, name, z1, z2)
    assert out.dtype == torch.float32 and out.shape == ()
    assert_close(out, ref, msg=name)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert_close(g, r, rtol=1e-3, atol=1e-5, msg=f"{name} gradient")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("weights", [(2.0,), (1.0, 40.0, 40.0), (1.0, 0.5, 3.0, 2.0, 1.5)],
                         ids=lambda w: f"w{len(w)}")
def test_number_of_weights_float64(backend, device, weights):
    z1, z2 = _pair(11, 7, torch.float64, device, seed=1)
    for name in ("sfrik_mmd", "sfrik"):
        out, grads = _run(functional, name, z1, z2, backend, weights=weights)
        ref, ref_grads = _run(R, name, z1, z2, weights=weights)
        assert out.dtype == torch.float64
        assert_close(out, ref)
        for g, r in zip(grads, ref_grads):
            assert_close(g, r)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CALLS))
def test_low_precision_rule(backend, device, dtype, name):
    z1, z2 = _pair(15, 24, dtype, device, seed=2)
    out, grads = _run(functional, name, z1, z2, backend)
    ref_low, ref_low_grads = _run(R, name, z1, z2)
    ref_high, ref_high_grads = _run(R, name, z1.float(), z2.float())
    assert out.dtype == torch.float32 and ref_low.dtype == torch.float32
    assert_lowp_rule(out, ref_low, ref_high, msg=f"{name} value")
    for g, gl, gh in zip(grads, ref_low_grads, ref_high_grads):
        assert g.dtype == dtype
        assert_lowp_rule(g.float(), gl.float(), gh, floor=1e-4, msg=f"{name} gradient")


def test_invariants_through_fast_path():
    gen = torch.Generator().manual_seed(3)
    c = torch.randn(1, 9, generator=gen).expand(12, 9).contiguous()
    with fastssl.use_backend("torch"):
        torch.testing.assert_close(functional.sfrik_mmd(c), torch.tensor(81.0))
        torch.testing.assert_close(functional.auh(c, c), torch.tensor(0.0), atol=1e-6, rtol=0)
        q = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))[0][:8]
        torch.testing.assert_close(functional.sfrik_mmd(q),
                                   torch.tensor(81 / 8 - 40 * 7 / (8 * 15), dtype=torch.float64))
        z1, z2 = _pair(20, 6, seed=4)
        assert functional.sfrik_mmd(z1).item() >= 0
        assert functional.auh(z1, z2, sim_coeff=0.0).item() <= 0


def test_modules_match_functional():
    z1, z2 = _pair(10, 8, seed=5)
    m = L.SFRIKLoss(weights=(1.0, 2.0), sim_coeff=10.0, mmd_coeff=2.0)
    torch.testing.assert_close(
        m(z1, z2), functional.sfrik(z1, z2, weights=(1.0, 2.0), sim_coeff=10.0, mmd_coeff=2.0)
    )
    a = L.AUHLoss(sim_coeff=5.0, unif_coeff=0.5, scale=1.5)
    torch.testing.assert_close(
        a(z1, z2), functional.auh(z1, z2, sim_coeff=5.0, unif_coeff=0.5, scale=1.5)
    )
    assert "weights=(1.0, 2.0)" in repr(m) and "scale=1.5" in repr(a)
    assert len(m.state_dict()) == 0 and len(a.state_dict()) == 0
    with pytest.raises(ValueError, match="weights"):
        L.SFRIKLoss(weights=())
    with pytest.raises(ValueError, match="scale"):
        L.AUHLoss(scale=0.0)


def test_default_dispatch_and_compile():
    z1, z2 = _pair(9, 5, seed=6)
    ref = R.sfrik(z1, z2)
    assert_close(functional.sfrik(z1, z2), ref)

    def step(a, b):
        return functional.sfrik(a, b) + functional.auh(a, b)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a1, b1 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    a2, b2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    out_c, out_e = compiled(a1, b1), step(a2, b2)
    out_c.backward()
    out_e.backward()
    assert_close(out_c, out_e)
    assert_close(a1.grad, a2.grad)
    assert_close(b1.grad, b2.grad)


def test_bad_inputs():
    z = torch.randn(6, 4)
    for fn in (functional.sfrik_mmd, R.sfrik_mmd):
        with pytest.raises(ValueError, match="z.*D >= 2"):
            fn(torch.randn(6, 1))
        with pytest.raises(ValueError, match="weights"):
            fn(z, weights=())
        with pytest.raises(ValueError, match="weights"):
            fn(z, weights=(1.0, float("nan")))
        with pytest.raises(TypeError, match="weights"):
            fn(z, weights="1-40-40")
        with pytest.raises(TypeError, match="z"):
            fn(torch.ones(6, 4, dtype=torch.int64))
        with pytest.raises(ValueError, match="z"):
            fn(torch.randn(6))
        with pytest.raises(ValueError, match="z"):
            fn(torch.randn(0, 4))
        with pytest.raises(TypeError, match="z"):
            fn(z.numpy())
    for fn in (functional.sfrik, functional.auh, R.sfrik, R.auh):
        with pytest.raises(ValueError, match="z2"):
            fn(z, torch.randn(5, 4))
        with pytest.raises(TypeError, match="z2"):
            fn(z, z.double())
        with pytest.raises(ValueError, match="sim_coeff"):
            fn(z, z, sim_coeff=-1.0)
    with pytest.raises(ValueError, match="z1.*D >= 2"):
        functional.sfrik(torch.randn(6, 1), torch.randn(6, 1))
    with pytest.raises(ValueError, match="mmd_coeff"):
        functional.sfrik(z, z, mmd_coeff=float("inf"))
    for fn in (functional.auh, R.auh):
        with pytest.raises(ValueError, match="scale"):
            fn(z, z, scale=0.0)
        with pytest.raises(ValueError, match="unif_coeff"):
            fn(z, z, unif_coeff=-2.0)
        with pytest.raises(ValueError, match="z1.*at least 2"):
            fn(torch.randn(1, 4), torch.randn(1, 4))
    with fastssl.use_backend("cpp"):
        with pytest.raises(RuntimeError, match="cpp"):
            functional.sfrik_mmd(z)


def test_check_finite():
    z = torch.randn(6, 4)
    z[2, 1] = float("nan")
    fastssl.set_check_finite(True)
    try:
        with pytest.raises(ValueError, match="z1"):
            functional.sfrik(z, z.clone())
    finally:
        fastssl.set_check_finite(False)
