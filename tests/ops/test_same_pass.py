"""The same-pass ops of the torch backend (issue 18): contrastive_lse_sum and sce_stats with
same_pass=True make the gradient in the forward; checked against the recompute ops
(contrastive_lse, sce_stats with same_pass=False), which are themselves checked against the
reference in test_contrastive_ops.py: values, gradients under arbitrary incoming weights,
masks (self, positive, -1, rows with every column masked), a is b, many row blocks, float64
gradcheck and half precision."""
import pytest
import torch
from conftest import backend_params

from fastssl.backends.torch import contrastive as torch_contrastive
from fastssl.ops import contrastive as ops

# the same-pass entries: the chunked torch loop and its C++ form (one parallel region)
# (the C++ entry splits even these small inputs into several row blocks over the threads)
SAME_PASS = pytest.mark.parametrize("backend,device", [p for p in backend_params("cpp", "torch")
                                                       if p.values[1] == "cpu"])


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _masks(m, c, seed):
    g = torch.Generator().manual_seed(seed)
    self_col = torch.randint(-1, c, (m,), generator=g)
    pos_col = torch.randint(-1, c, (m,), generator=g)
    return self_col, pos_col


def _lse_sum_and_grads(a, b, self_col, pos_col, scale, exclude_pos, same_tensor=False,
                       backend="torch", subtract_pos=False):
    a = a.detach().clone().requires_grad_(True)
    b = a if same_tensor else b.detach().clone().requires_grad_(True)
    total, lse, da, db = ops.contrastive_lse_sum(a, b, self_col, pos_col, scale, exclude_pos,
                                                 subtract_pos, True, True, backend)
    (3.0 * total).backward()
    return total.detach(), lse, a.grad, (None if same_tensor else b.grad)


def _recompute_and_grads(a, b, self_col, pos_col, scale, exclude_pos, same_tensor=False,
                         subtract_pos=False):
    """The recompute op's lse, and the positive term from the dense logits (autograd)."""
    a = a.detach().clone().requires_grad_(True)
    b = a if same_tensor else b.detach().clone().requires_grad_(True)
    lse, _, _, _ = ops.contrastive_lse(a, b, self_col, pos_col, scale, b.shape[0], exclude_pos,
                                       False, False, "torch")
    finite = torch.isfinite(lse)
    total = lse[finite].sum()
    if subtract_pos:
        x = scale * a @ b.T
        has = pos_col >= 0
        total = total - x[torch.arange(a.shape[0])[has], pos_col[has]].sum()
    (3.0 * total).backward()
    return lse.detach(), a.grad, (None if same_tensor else b.grad), total.detach()


@pytest.mark.parametrize("subtract_pos", [False, True])
@pytest.mark.parametrize("exclude_pos", [False, True])
@pytest.mark.parametrize("m,c,d", [(7, 9, 5), (1, 1, 3), (5, 2, 4), (12, 30, 1)])
@SAME_PASS
def test_lse_sum_matches_recompute_op(m, c, d, exclude_pos, subtract_pos, backend, device):
    a, b = _rand(m, d, seed=1), _rand(c, d, seed=2)
    self_col, pos_col = _masks(m, c, seed=m * 100 + c)
    total, lse, ga, gb = _lse_sum_and_grads(a, b, self_col, pos_col, 1.7, exclude_pos,
                                            backend=backend, subtract_pos=subtract_pos)
    ref_lse, ref_ga, ref_gb, ref_total = _recompute_and_grads(
        a, b, self_col, pos_col, 1.7, exclude_pos, subtract_pos=subtract_pos
    )
    torch.testing.assert_close(lse, ref_lse)
    finite = torch.isfinite(ref_lse)
    # rows with every column masked have lse = -inf; the total is over the rows that have one
    if bool(finite.all()):
        torch.testing.assert_close(total, ref_total)
    torch.testing.assert_close(ga, ref_ga)
    torch.testing.assert_close(gb, ref_gb)
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()


@SAME_PASS
def test_lse_sum_every_column_masked_rows(backend, device):
    # c = 2, self and positive mask both columns of rows 0 and 2: lse -inf, gradient 0 there
    a, b = _rand(3, 4, seed=3), _rand(2, 4, seed=4)
    self_col, pos_col = torch.tensor([0, 0, 1]), torch.tensor([1, -1, 0])
    _, lse, ga, gb = _lse_sum_and_grads(a, b, self_col, pos_col, 2.0, True, backend=backend)
    assert torch.isneginf(lse[[0, 2]]).all() and torch.isfinite(lse[1])
    assert (ga[[0, 2]] == 0).all() and torch.isfinite(gb).all()


@SAME_PASS
def test_lse_sum_same_tensor_is_the_symmetric_gram(backend, device):
    z = _rand(10, 6, seed=5)
    self_col = torch.arange(10)
    pos_col = (torch.arange(10) + 5) % 10
    total, lse, gz, _ = _lse_sum_and_grads(z, z, self_col, pos_col, 3.0, False, same_tensor=True,
                                           backend=backend)
    ref_lse, ref_gz, _, _ = _recompute_and_grads(z, z, self_col, pos_col, 3.0, False,
                                                 same_tensor=True)
    torch.testing.assert_close(lse, ref_lse)
    torch.testing.assert_close(total, ref_lse.sum())
    torch.testing.assert_close(gz, ref_gz)


@SAME_PASS
def test_lse_sum_many_row_blocks(monkeypatch, backend, device):
    monkeypatch.setattr(torch_contrastive, "MIN_CHUNK_ELEMENTS", 16)
    monkeypatch.setattr(torch_contrastive, "CHUNK_ELEMENTS", 16)
    a, b = _rand(23, 5, seed=6), _rand(19, 5, seed=7)
    self_col, pos_col = _masks(23, 19, seed=8)
    got = _lse_sum_and_grads(a, b, self_col, pos_col, 2.5, True, backend=backend,
                             subtract_pos=True)
    monkeypatch.undo()
    ref = _recompute_and_grads(a, b, self_col, pos_col, 2.5, True, subtract_pos=True)
    torch.testing.assert_close(got[1], ref[0])
    torch.testing.assert_close(got[2], ref[1])
    torch.testing.assert_close(got[3], ref[2])


@SAME_PASS
def test_lse_sum_gradcheck_float64(backend, device):
    a = _rand(6, 4, seed=9).requires_grad_(True)
    b = _rand(8, 4, seed=10).requires_grad_(True)
    self_col, pos_col = torch.tensor([0, 1, -1, 3, 4, 5]), torch.tensor([2, 3, 4, -1, 6, 7])

    def f(a, b):
        return ops.contrastive_lse_sum(a, b, self_col, pos_col, 1.3, True, True, True, True,
                                       backend)[0]
    assert torch.autograd.gradcheck(f, (a, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@SAME_PASS
def test_lse_sum_half_precision_inputs(dtype, backend, device):
    # statistics in float32, gradients in the input dtype, equal to the float32 op on the
    # same (rounded) inputs up to the final rounding
    a, b = _rand(9, 8, seed=11, dtype=dtype), _rand(11, 8, seed=12, dtype=dtype)
    self_col, pos_col = _masks(9, 11, seed=13)
    total, lse, ga, gb = _lse_sum_and_grads(a, b, self_col, pos_col, 2.0, False, backend=backend)
    assert total.dtype == torch.float32 and ga.dtype == dtype and gb.dtype == dtype
    ref = _lse_sum_and_grads(a.float(), b.float(), self_col, pos_col, 2.0, False, backend=backend)
    torch.testing.assert_close(lse, ref[1])
    torch.testing.assert_close(ga, ref[2].to(dtype))
    torch.testing.assert_close(gb, ref[3].to(dtype))


def test_lse_sum_refuses_a_backend_without_same_pass_kernels():
    a, b = _rand(3, 2, seed=14), _rand(3, 2, seed=15)
    cols = torch.full((3,), -1)
    # the op's entry check names the backend (issue 22)
    with pytest.raises(ValueError, match=r"^backend: expected one of \('cpp', 'torch'\)"):
        ops.contrastive_lse_sum(a, b, cols, cols, 1.0, False, False, False, False, "triton")


@SAME_PASS
def test_lse_sum_refuses_a_gradient_it_did_not_make(backend, device):
    a = _rand(3, 2, seed=16).requires_grad_(True)
    b = _rand(4, 2, seed=17).requires_grad_(True)
    cols = torch.full((3,), -1)
    total = ops.contrastive_lse_sum(a, b, cols, cols, 1.0, False, False, True, False, backend)[0]
    with pytest.raises(RuntimeError, match="need_da / need_db"):
        total.backward()


def _sce(q, k, cols, self_col, same_pass, w_lse, w_w, backend="torch"):
    q = q.detach().clone().requires_grad_(True)
    lse_s, lse_t, wmean, u_s, u_t = ops.sce_stats(
        q, k, cols, self_col, 2.0, 3.0, same_pass, backend
    )
    # arbitrary per-row weights of both statistics (SCE's are not uniform: logaddexp with pos)
    (w_lse * lse_s + w_w * wmean).sum().backward()
    assert (u_s.numel() > 0) == same_pass
    return lse_s.detach(), lse_t, wmean.detach(), q.grad


@pytest.mark.parametrize("m,c,d", [(6, 9, 4), (5, 1, 3), (13, 20, 2)])
@SAME_PASS
def test_sce_same_pass_matches_recompute(m, c, d, backend, device):
    q, k, cols = _rand(m, d, seed=20), _rand(m, d, seed=21), _rand(c, d, seed=22)
    self_col = torch.randint(-1, c, (m,), generator=torch.Generator().manual_seed(23))
    w_lse, w_w = _rand(m, seed=24), _rand(m, seed=25)
    got = _sce(q, k, cols, self_col, True, w_lse, w_w, backend)
    ref = _sce(q, k, cols, self_col, False, w_lse, w_w)
    # a teacher row with every column masked (c = 1, self masked) has no softmax: the same-pass
    # op reads its empty weighted mean as 0 (gradient 0), the recompute op gives NaN there
    has_teacher = torch.isfinite(ref[1])
    for x, y in zip(got, ref):
        torch.testing.assert_close(x[has_teacher], y[has_teacher])
    assert (got[2][~has_teacher] == 0).all() and torch.isfinite(got[3]).all()


@SAME_PASS
def test_sce_same_pass_many_row_blocks_and_gradcheck(monkeypatch, backend, device):
    monkeypatch.setattr(torch_contrastive, "MIN_CHUNK_ELEMENTS", 8)
    monkeypatch.setattr(torch_contrastive, "CHUNK_ELEMENTS", 8)
    q, k, cols = _rand(11, 3, seed=30), _rand(11, 3, seed=31), _rand(7, 3, seed=32)
    self_col = torch.randint(-1, 7, (11,), generator=torch.Generator().manual_seed(33))
    w_lse, w_w = _rand(11, seed=34), _rand(11, seed=35)
    got = _sce(q, k, cols, self_col, True, w_lse, w_w, backend)
    ref = _sce(q, k, cols, self_col, False, w_lse, w_w)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y)

    def f(q):
        lse_s, _, wmean, _, _ = ops.sce_stats(q, k, cols, self_col, 2.0, 3.0, True, backend)
        return (w_lse * lse_s + w_w * wmean).sum()
    assert torch.autograd.gradcheck(f, (q.detach().clone().requires_grad_(True),))


def test_sce_same_pass_refuses_a_backend_without_it():
    q = _rand(2, 2, seed=40)
    with pytest.raises(RuntimeError, match="no same-pass kernels"):
        ops.sce_stats(q, q, q, torch.tensor([-1, -1]), 1.0, 1.0, True, "triton")


def test_normalize_rows_matches_f_normalize():
    # the fused losses' lean L2 normalisation (keeps y and the norms): values and gradients as
    # F.normalize, a zero row (norm clamped at eps) included; float64 gradcheck
    from fastssl.functional.contrastive import _normalize
    x = _rand(9, 6, seed=50).requires_grad_(True)
    with torch.no_grad():
        x[3] = 0.0
    g = _rand(9, 6, seed=51)
    y = _normalize(x)
    ref = torch.nn.functional.normalize(x, dim=1)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    assert torch.autograd.gradcheck(_normalize, (_rand(5, 4, seed=52).requires_grad_(True),))
    xb = _rand(4, 8, seed=53, dtype=torch.bfloat16).requires_grad_(True)
    yb = _normalize(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), torch.nn.functional.normalize(xb.float(), dim=1),
                               atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("exclude_pos", [False, True])
@pytest.mark.parametrize("subtract_pos", [False, True])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_lse_sum_fused_float32_blocks_match_the_log_softmax_form(exclude_pos, subtract_pos,
                                                                 need):
    # The C++ float32 blocks take the fused exp (AVX2) by default; the log_softmax form stays
    # for float64 and without AVX2. Both forms on the same inputs (every-column-masked rows,
    # rows without a positive, several row blocks per thread), and against float64.
    _C = pytest.importorskip("fastssl._C")
    g = torch.Generator().manual_seed(9)
    m, c, d = 300, 2, 16
    a = torch.randn(m, d, generator=g)
    b = torch.randn(c, d, generator=g)
    self_col = torch.randint(-1, c, (m,), generator=g)
    pos_col = torch.randint(-1, c, (m,), generator=g)
    self_col[:4], pos_col[:4] = torch.tensor([0, 1, 0, 1]), torch.tensor([1, 0, 1, 0])
    a_wide, b_wide = torch.randn(m, d, generator=g), torch.randn(173, d, generator=g)
    cases = [(a, b, self_col, pos_col),
             (a_wide, b_wide, torch.randint(-1, 173, (m,), generator=g),
              torch.randint(-1, 173, (m,), generator=g))]
    before = _C.contrastive_fused_exp()
    try:
        for aa, bb, sc, pc in cases:
            outs = []
            for flag in (0, 1):
                _C.contrastive_fused_exp(flag)
                outs.append(_C.contrastive_lse_sum_cpu(aa, bb, sc, pc, 3.0, exclude_pos,
                                                       subtract_pos, *need))
            ref = _C.contrastive_lse_sum_cpu(aa.double(), bb.double(), sc, pc, 3.0,
                                             exclude_pos, subtract_pos, *need)
            for slow, fast, exact in zip(*outs, ref):
                assert slow.shape == fast.shape
                if slow.numel():
                    torch.testing.assert_close(fast, slow, rtol=2e-5, atol=2e-5)
                    torch.testing.assert_close(fast.double(), exact, rtol=2e-5, atol=2e-5)
    finally:
        _C.contrastive_fused_exp(before)
