"""The Sinkhorn op: every CPU backend equals fastssl.reference; stability where it overflows."""
import pytest
import torch
import torch.nn.functional as F
from conftest import backend_params

import fastssl
from fastssl import functional
from fastssl import reference as R
from fastssl.testing import assert_close

ALL = backend_params("reference", "torch", "cpp", "triton")
FAST = backend_params("torch", "cpp", "triton")


def _cosine_scores(B, K, D=8, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1)
    return (z @ c.T).to(dtype=dtype, device=device)


def _run(backend, scores, **kw):
    with fastssl.use_backend(backend):
        return functional.sinkhorn(scores, **kw)


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,iters,eps", [((13, 37), 3, 0.05), ((1, 5), 3, 0.05),
                                             ((32, 7), 1, 0.1), ((20, 24), 5, 0.03)])
def test_equals_reference(backend, device, dtype, shape, iters, eps):
    s = _cosine_scores(*shape, dtype=dtype, device=device)
    ref = R.sinkhorn(s, epsilon=eps, iterations=iters)
    got = _run(backend, s, epsilon=eps, iterations=iters)
    assert got.dtype == dtype and got.shape == s.shape and not got.requires_grad
    assert_close(got, ref)


@pytest.mark.parametrize("backend,device", [p for p in FAST if p.values[0] != "triton"])
def test_larger_batch_than_threads(backend, device):
    # several row blocks / threads, unaligned sizes
    s = _cosine_scores(301, 53, device=device, dtype=torch.float64)
    assert_close(_run(backend, s), R.sinkhorn(s))


@pytest.mark.parametrize("backend,device", backend_params("torch", "cpp"))
def test_marginals(backend, device):
    B, K = 24, 10
    s = _cosine_scores(B, K, device=device, dtype=torch.float64)
    codes = _run(backend, s, epsilon=0.3, iterations=60)
    assert_close(codes.sum(1), torch.ones(B, dtype=torch.float64, device=device))
    # many iterations: prototype masses converge to B/K (the fixed point of the reference)
    assert_close(codes.sum(0), torch.full((K,), B / K, dtype=torch.float64, device=device), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_stays_finite_where_reference_overflows(backend, device, dtype):
    s = _cosine_scores(16, 12, D=4, dtype=dtype, device=device)
    s[0, 0] = 0.95  # exp(19) overflows float16 (and the column/row sums do for bfloat16 at eps=0.01)
    eps = 0.05 if dtype == torch.float16 else 0.01
    ref_lowp = R.sinkhorn(s, epsilon=eps)
    assert not torch.isfinite(ref_lowp).all()
    got = _run(backend, s, epsilon=eps)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # computed in float32 from the exact low-precision values: float32 accuracy vs float64
    assert_close(got.double(), R.sinkhorn(s.double(), epsilon=eps), dtype=torch.float32)


@pytest.mark.parametrize("backend,device", FAST)
def test_small_epsilon_float32(backend, device):
    s = _cosine_scores(16, 12, D=4, device=device)
    s[3, 2] = 0.99  # exp(99) overflows float32
    ref32 = R.sinkhorn(s, epsilon=0.01)
    assert not torch.isfinite(ref32).all()
    got = _run(backend, s, epsilon=0.01)
    assert torch.isfinite(got).all()
    ref64 = R.sinkhorn(s.double(), epsilon=0.01)
    # |x| up to 100: float32 rounding of x costs ~1e-5 relative in the codes
    assert_close(got.double(), ref64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend,device", FAST)
def test_extreme_rows_do_not_underflow(backend, device):
    # a sample far below every other at eps=0.01: a stored exp(x - colmax) would be 0 for the
    # whole row (then NaN); the log-domain passes keep it a proper distribution
    s = _cosine_scores(10, 6, device=device, dtype=torch.float64)
    s[4] -= 3.0
    got = _run(backend, s, epsilon=0.01)
    assert torch.isfinite(got).all()
    assert_close(got, R.sinkhorn(s, epsilon=0.01), rtol=1e-7, atol=1e-9)


def test_auto_picks_cpp_on_cpu():
    from fastssl.ops.swav import backend_name
    assert backend_name(torch.device("cpu")) == "cpp"


def test_cpp_kernel_exp_accuracy():
    # the vectorised float exp of csrc/swav_cpu.cpp over its whole range (x <= 0)
    from fastssl import _C
    x = torch.linspace(-86.0, 0.0, 4001, dtype=torch.float32)
    s = torch.stack([x, torch.zeros_like(x)])  # row 0 softmax: exp(x - max) / sum
    got = _C.sinkhorn_rowpass_cpu(s, 1.0, torch.zeros(4001), True)[0]
    want = torch.softmax(x.double(), 0)
    rel = ((got.double() - want) / want).abs().max().item()
    assert rel < 1e-6


def test_forced_backend_that_cannot_serve_raises():
    with fastssl.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
        functional.sinkhorn(torch.randn(3, 4))


def test_no_gradient_and_library_registration():
    s = torch.randn(5, 6, requires_grad=True)
    codes = functional.sinkhorn(s)
    assert not codes.requires_grad
    assert hasattr(torch.ops.fastssl, "sinkhorn")
    torch.library.opcheck(torch.ops.fastssl.sinkhorn.default, (torch.randn(5, 6), 0.05, 3, False, "cpp"),
                          test_utils=("test_schema", "test_faketensor"))


def test_traces_under_torch_compile_fullgraph():
    f = torch.compile(lambda s: functional.sinkhorn(s, epsilon=0.05, iterations=3), fullgraph=True,
                      backend="eager")
    s = _cosine_scores(6, 9)
    assert_close(f(s), R.sinkhorn(s))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: functional.sinkhorn(torch.randn(4)), ValueError, "scores"),
    (lambda: functional.sinkhorn(torch.ones(3, 4, dtype=torch.int64)), TypeError, "scores"),
    (lambda: functional.sinkhorn([[1.0, 2.0]]), TypeError, "scores"),
    (lambda: functional.sinkhorn(torch.randn(0, 4)), ValueError, "scores"),
    (lambda: functional.sinkhorn(torch.randn(3, 4), epsilon=0), ValueError, "epsilon"),
    (lambda: functional.sinkhorn(torch.randn(3, 4), epsilon=-0.1), ValueError, "epsilon"),
    (lambda: functional.sinkhorn(torch.randn(3, 4), iterations=-1), ValueError, "iterations"),
    (lambda: functional.sinkhorn(torch.randn(3, 4), iterations=2.0), TypeError, "iterations"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_backends_match_fp64(backend, dtype):
    s = _cosine_scores(300, 3000, D=128, dtype=dtype, device="cuda")
    for eps in (0.05, 0.01):
        got = _run(backend, s, epsilon=eps)
        assert torch.isfinite(got).all()
        want = R.sinkhorn(s.double(), epsilon=eps)
        tol = torch.float64 if dtype == torch.float64 else torch.float32
        assert_close(got.double(), want, dtype=tol, rtol=1e-4 if eps == 0.01 and tol != torch.float64 else None)


# ---- swav_cross_entropy: -sum_b <q_b, log_softmax(s_b / T)>, fused value and gradient --------

def _ce_inputs(B, K, dtype, device="cpu", seed=0):
    s = _cosine_scores(B, K, dtype=dtype, device=device, seed=seed).requires_grad_(True)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.softmax(torch.randn(B, K, generator=g, dtype=torch.float64), dim=1)
    return s, q.to(dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)


def _ce_reference(s, q, T):
    return -(q * F.log_softmax(s / T, dim=1)).sum()


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(13, 37), (1, 5), (20, 24)])
def test_cross_entropy_equals_reference(backend, device, dtype, shape):
    from fastssl.ops.swav import swav_cross_entropy
    s, q = _ce_inputs(*shape, dtype, device)
    q = (2 * q).requires_grad_(True)  # targets summing to 2 (two assigned crops' codes)
    ref = _ce_reference(s, q, 0.1)
    ref_gs, ref_gq = torch.autograd.grad(ref * 3.0, (s, q))
    with fastssl.use_backend(backend):
        got = swav_cross_entropy(s, q, 0.1)
    gs, gq = torch.autograd.grad(got * 3.0, (s, q))
    assert got.dtype == dtype and got.dim() == 0
    assert_close(got, ref)
    assert gs.dtype == dtype
    assert_close(gs, ref_gs)
    assert_close(gq, ref_gq)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_cross_entropy_gradcheck_float64(backend):
    from fastssl.ops.swav import swav_cross_entropy
    s, q = _ce_inputs(5, 7, torch.float64)
    with fastssl.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: swav_cross_entropy(a, b, 0.3),
                                        (s, q.requires_grad_(True)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_entropy_low_precision_gradient_in_input_dtype(dtype):
    from fastssl.ops.swav import swav_cross_entropy
    s, q = _ce_inputs(8, 12, dtype)
    got = swav_cross_entropy(s, q, 0.1)
    (g,) = torch.autograd.grad(got, s)
    assert got.dtype == torch.float32 and g.dtype == dtype
    s64 = s.detach().double().requires_grad_(True)
    ref = _ce_reference(s64, q.double(), 0.1)
    (rg,) = torch.autograd.grad(ref, s64)
    assert_close(got.double(), ref, dtype=torch.float32)
    assert_close(g.double(), rg.to(dtype).double(), dtype=dtype)


def test_cross_entropy_library_registration_and_compile():
    from fastssl.ops.swav import swav_cross_entropy
    s, q = _ce_inputs(4, 6, torch.float32)
    torch.library.opcheck(torch.ops.fastssl.swav_cross_entropy.default, (s, q, 0.1, True, "cpp"))
    torch.library.opcheck(torch.ops.fastssl.swav_cross_entropy.default, (s, q, 0.1, False, "cpp"))
    f = torch.compile(lambda a, b: swav_cross_entropy(a, b, 0.1), fullgraph=True, backend="eager")
    assert_close(f(s, q), _ce_reference(s, q, 0.1))


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_cross_entropy_grad_scale(backend):
    # the backward's incoming gradient can be folded into the op's gradient (the C++ kernel
    # scales while it writes)
    s, q = _ce_inputs(5, 19, torch.float32)
    s = s.detach()
    loss, g = torch.ops.fastssl.swav_cross_entropy(s, q, 0.1, True, backend)
    loss2, g2 = torch.ops.fastssl.swav_cross_entropy(s, q, 0.1, True, backend, torch.tensor(-0.75))
    assert_close(loss2, loss)
    assert_close(g2, -0.75 * g)
    with pytest.raises(ValueError, match="grad_scale"):
        torch.ops.fastssl.swav_cross_entropy(s, q, 0.1, True, backend, torch.ones(2))
    torch.library.opcheck(torch.ops.fastssl.swav_cross_entropy.default,
                          (s, q, 0.1, True, backend, torch.tensor(2.0)))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_cross_entropy_recorded_backward(backend):
    # create_graph: the backward keeps grad_loss differentiable (no folded scale); first-order
    # gradients unchanged
    from fastssl.ops.swav import swav_cross_entropy
    s, q = _ce_inputs(6, 9, torch.float64)
    w = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    with fastssl.use_backend(backend):
        got = swav_cross_entropy(s, q, 0.1) * w
    (gs,) = torch.autograd.grad(got, s, create_graph=True)
    (ref_gs,) = torch.autograd.grad(_ce_reference(s, q, 0.1) * w, s, create_graph=True)
    assert_close(gs, ref_gs)
    # d/dw of <gs, 1> = <d gs / d w, 1> = <gs / w, 1>
    (gw,) = torch.autograd.grad(gs.sum(), w)
    assert_close(gw, (ref_gs / w).sum().detach())
