"""The Sinkhorn op: every CPU backend equals fastssl.reference; stability where it overflows."""
import os

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


def _interpreter_loops_over_runtime_sizes() -> tuple[bool, str]:
    """Whether Triton's CPU interpreter runs `range(0, K, BLOCK)` with K a runtime argument.

    Triton 3.6's interpreter hands a runtime int to a kernel as a 1-element array and converts
    it back with int(array): NumPy 2.5 refuses that for arrays of one dimension ("only
    0-dimensional arrays can be converted to Python scalars"); Triton 3.9's interpreter runs
    it. Probed, not looked up by version, so any pair of versions gets the right answer."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return True, ""
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(x_ptr, n, BLOCK: tl.constexpr):
        for k0 in range(0, n, BLOCK):
            tl.store(x_ptr + k0 + tl.arange(0, BLOCK), tl.full([BLOCK], 1.0, tl.float32))

    x = torch.zeros(8)
    try:
        _probe[(1,)](x, 8, BLOCK=4)
    except Exception as exc:  # noqa: BLE001 - the interpreter's own failure is the answer
        return False, (f"Triton {triton.__version__}'s interpreter cannot loop over a runtime size "
                       f"with NumPy {numpy.__version__} ({type(exc).__name__}: "
                       f"{str(exc)[:120]}); the compiled kernels are unaffected (GPU tests)")
    ok = bool(x.eq(1).all())
    return ok, "" if ok else "the interpreter's loop over a runtime size wrote wrong values"


_INTERP_OK, _INTERP_WHY = _interpreter_loops_over_runtime_sizes()


@pytest.fixture(autouse=True)
def _skip_where_the_interpreter_cannot_run(request):
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("backend") == "triton" and params.get("device") == "cpu" and not _INTERP_OK:
        pytest.skip(_INTERP_WHY)


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
    assert_close(
        codes.sum(0),
        torch.full((K,), B / K, dtype=torch.float64, device=device),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_stays_finite_where_reference_overflows(backend, device, dtype):
    s = _cosine_scores(16, 12, D=4, dtype=dtype, device=device)
    s[0, 0] = (
        0.95  # exp(19) overflows float16 (and the column/row sums do for bfloat16 at eps=0.01)
    )
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
    from fastssl.ops.swav import backend_for
    assert backend_for("sinkhorn", torch.device("cpu")) == "cpp"


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
    torch.library.opcheck(
        torch.ops.fastssl.sinkhorn.default,
        (torch.randn(5, 6), 0.05, 3, False, "cpp"),
        test_utils=("test_schema", "test_faketensor"),
    )


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
        assert_close(
            got.double(),
            want,
            dtype=tol,
            rtol=1e-4 if eps == 0.01 and tol != torch.float64 else None,
        )


# ---- swav_cross_entropy: -sum_b <q_b, log_softmax(s_b / T)>, fused value and gradient --------

def _ce_inputs(B, K, dtype, device="cpu", seed=0):
    s = _cosine_scores(B, K, dtype=dtype, device=device, seed=seed).requires_grad_(True)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.softmax(torch.randn(B, K, generator=g, dtype=torch.float64), dim=1)
    return s, q.to(dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)


def _ce_reference(s, q, T):
    return -(q * F.log_softmax(s / T, dim=1)).sum()


@pytest.mark.parametrize("backend,device", FAST)
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


@pytest.mark.parametrize("backend", ["torch", "cpp"])
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


def test_cross_entropy_launch_configuration_compiles_on_triton_3_6():
    """The gradient kernel's tile keeps at most one column per thread along a row: with more
    (ROWS <= 4, BLOCK_K = 256, 4 warps, i.e. every B <= 512 with K > 128) Triton 3.6 fails to
    compile it for sm_80 and sm_90 (python -m bench.static under 3.6). Checked for the sizes
    SwAV uses, every dtype, both targets."""
    from fastssl.kernels.swav import config
    for cc in (80, 90):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            for B in (1, 64, 256, 512, 1024, 4096, 65536):
                for K in (3, 37, 129, 3000, 65536):
                    c = config("cross_entropy", dtype, B, K, cc)
                    assert c["BLOCK_K"] <= 32 * c["num_warps"], (cc, dtype, B, K, c)
                    assert c["ROWS"] * c["BLOCK_K"] <= 2048, (cc, dtype, B, K, c)


def test_cross_entropy_gradient_at_swav_size_in_the_interpreter():
    """SwAV's recipe size (B = 256 crops' scores, K = 3000 prototypes: 12 prototype chunks, the
    last one partial) through the Triton kernel, value and gradient against the float64
    reference. The interpreter ignores warps, not the tile: the tile here is the one sm_80 and
    sm_90 launch at this size (checked), so one run covers both."""
    if os.environ.get("TRITON_INTERPRET") != "1" or not _INTERP_OK:
        pytest.skip(
            _INTERP_WHY or "runs on the CPU interpreter (the GPU tests cover compiled runs)"
        )
    from fastssl.kernels import swav as KW
    B, K, T = 256, 3000, 0.1
    tile = {k: v for k, v in KW.config("cross_entropy", torch.float32, B, K, None).items()
            if k in ("ROWS", "BLOCK_K")}
    for cc in (80, 90):
        gpu = KW.config("cross_entropy", torch.float32, B, K, cc)
        assert {k: gpu[k] for k in tile} == tile, (cc, gpu, tile)
    s, q = _ce_inputs(B, K, torch.float32)
    s = s.detach()
    q = 2 * q  # two assigned crops' codes
    loss, grad = KW.swav_cross_entropy(s, q, T, True)
    s64 = s.double().requires_grad_(True)
    ref = _ce_reference(s64, q.double(), T)
    (ref_g,) = torch.autograd.grad(ref, s64)
    assert grad.shape == (B, K) and grad.dtype == torch.float32
    assert_close(loss.double(), ref, dtype=torch.float32)
    assert_close(grad.double(), ref_g, dtype=torch.float32)
