"""The Triton symmetric tile schedule (issue 25): gram_lse_forward / gram_lse_backward of the
triton entry, called directly (the ops' routing is tested with the ops), against a float64
full-matrix computation and fastssl.reference: values and gradients, odd sizes (one block, a
partial last block, several blocks), exclude_pos and weighted, non-normalised large-norm rows at
temperature 0.01 (the exact fallback), float64 gradcheck, bf16/fp16 by the 2x rule. Runs under
the CPU interpreter (conftest), so sizes stay small: M <= 96, D <= 32 (16-wide tiles there)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import backend_params

from fastssl import reference
from fastssl.ops.contrastive import TABLE
from fastssl.testing import assert_close, assert_lowp_rule

TRITON = TABLE["triton"]
# (backend, device): the interpreter on CPU, the GPU when there is one (bench.gpu_run keeps the
# cuda ones); each skips with its reason where it cannot run.
DEVICES = backend_params("triton")


def _kc():
    # The kernels module imports triton: only once a test runs (collection must not need it).
    from fastssl.kernels import contrastive
    return contrastive


def _layout(m: int, device="cpu"):
    """NT-Xent's masks for M rows: self_col = i, pos_col pairs row i with i + M // 2 (an odd M
    leaves its last row paired with itself, still symmetric: pos_col[pos_col[i]] = i)."""
    n = m // 2
    pos = torch.arange(m)
    pos[:n] += n
    pos[n:2 * n] -= n
    return torch.arange(m, device=device), pos.to(device)


def _full(z, self_col, pos_col, scale, exclude_pos, g, dtype=torch.float64):
    """(lse, wmean, dz) from the full M x M matrix in `dtype`, dz of sum_i g_i lse_i."""
    z = z.detach().cpu().to(dtype).requires_grad_(True)
    self_col, pos_col, g = self_col.cpu(), pos_col.cpu(), g.cpu()
    x = scale * z @ z.T
    m = x.shape[0]
    rows = torch.arange(m)
    mask = torch.zeros(m, m, dtype=torch.bool)
    keep = self_col >= 0
    mask[rows[keep], self_col[keep]] = True
    if exclude_pos:
        mask[rows, pos_col] = True
    xm = x.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(xm, dim=1)
    wmean = (torch.softmax(xm, dim=1) * x.masked_fill(mask, 0.0)).sum(1)
    (dz,) = torch.autograd.grad((lse * g.to(dtype)).sum(), z)
    return lse.detach(), wmean.detach(), dz


def _inputs(m, d, dtype, seed, device, normalise=True, norm=1.0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(m, d, generator=gen, dtype=torch.float64)
    if normalise:
        z = F.normalize(z, dim=1)
    g = torch.rand(m, generator=gen, dtype=torch.float64) + 0.5
    return (z * norm).to(device, dtype), g.to(device, dtype)


NORMWISE = 2e-5


def _check(z, g, scale, exclude_pos, weighted, self_col=None, normwise=False):
    """Values and gradient against the float64 full matrix: within the dtype's tolerance, or
    (normwise: float32 at scale 100) within NORMWISE of the largest reference entry: logits of
    magnitude >= 100 carry float32 rounding of 100 eps each, summed in another order than
    torch's GEMM (the existing lse kernels err 6.3e-4 on dz ~ 150 in test_one_small_row's case,
    3.5x the float32 full matrix's error, these 8.2e-4)."""
    m = z.shape[0]
    sc, pos = _layout(m, z.device)
    if self_col is not None:
        sc = self_col
    lse, wmean = TRITON.gram_lse_forward(z, sc, pos, scale, exclude_pos, weighted)
    dz = TRITON.gram_lse_backward(z, sc, pos, scale, exclude_pos, lse, g)
    r_lse, r_w, r_dz = _full(z, sc, pos, scale, exclude_pos, g)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    assert lse.dtype == acc and lse.shape == (m,)
    assert dz.dtype == z.dtype and dz.shape == z.shape
    if not weighted:
        assert wmean.numel() == 0
    if normwise:
        for name, fast, ref in (("lse", lse, r_lse), ("wmean", wmean, r_w), ("dz", dz, r_dz)):
            if name != "wmean" or weighted:
                err = (fast.cpu().double() - ref).abs().max().item()
                assert err <= NORMWISE * ref.abs().max().item(), (name, err)
        return lse, dz
    assert_close(lse.cpu(), r_lse.to(z.dtype), msg="lse")
    assert_close(dz.cpu(), r_dz.to(z.dtype), msg="dz")
    if weighted:
        assert_close(wmean.cpu(), r_w.to(z.dtype), msg="wmean")
    return lse, dz


# M: one partial block (5), exactly one interpreter block (16), a partial last block (37), six
# interpreter blocks (96); on a GPU (tiles of 32-128) also several partial blocks (300, 1000).
def _sized():
    out = []
    for p in DEVICES:
        backend, device = p.values
        sizes = [(5, 3), (16, 16), (37, 20), (96, 32)]
        if device == "cuda":
            sizes += [(300, 130), (1000, 64)]
        out += [pytest.param(backend, device, m, d, marks=p.marks, id=f"{p.id}-{m}x{d}")
                for m, d in sizes]
    return out


@pytest.mark.parametrize("backend,device,m,d", _sized())
@pytest.mark.parametrize("exclude_pos,weighted", [(False, False), (True, False), (True, True),
                                                  (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_full_matrix(backend, device, m, d, exclude_pos, weighted, dtype):
    z, g = _inputs(m, d, dtype, m * 100 + d, device)
    _check(z, g, 1 / 0.2, exclude_pos, weighted)


@pytest.mark.parametrize("backend,device", DEVICES)
def test_self_col_minus_one_keeps_the_diagonal(backend, device):
    # self_col[i] = -1: row i's own entry is a logit like any other (still a symmetric mask).
    z, g = _inputs(21, 8, torch.float64, 3, device)
    sc = torch.arange(21, device=device)
    sc[::3] = -1
    _check(z, g, 4.0, True, True, self_col=sc)


@pytest.mark.parametrize("backend,device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_norms_at_temperature_001_take_the_exact_fallback(backend, device, dtype):
    # Norms ~13 at scale 100: the shift c = scale max|z|^2 sits far above every row's lse, the
    # shifted sums underflow, and the row-maximum passes must give the exact values.
    z, g = _inputs(37, 20, dtype, 7, device, normalise=False, norm=3.0)
    sc, pos = _layout(37)
    r_lse = _full(z, sc, pos, 100.0, True, g)[0]
    c = 100.0 * z.cpu().double().norm(dim=1).max() ** 2
    assert (c - r_lse).max() > 2 * _kc()._LOG_RANGE[torch.float64]  # needs the fallback
    f32 = dtype == torch.float32
    _check(z, g, 100.0, True, True, normwise=f32)
    _check(z, g, 100.0, False, False, normwise=f32)


@pytest.mark.parametrize("backend,device", DEVICES)
def test_one_small_row_among_normalised_ones(backend, device):
    # Only the small row underflows at the common shift: the fallback covers it, and the
    # backward's tiles that hold it take the two-exp branch while the others take one exp.
    z, g = _inputs(40, 16, torch.float32, 11, device)
    z[5] *= 1e-3
    lse = _check(z, g, 100.0, False, True, normwise=True)[0]
    assert (100.0 - lse).max() > _kc()._LOG_RANGE[torch.float32]


@pytest.mark.parametrize("backend,device", DEVICES)
def test_without_the_underflow_guard_the_large_norm_case_fails(backend, device, monkeypatch):
    # The guard is what makes the case above exact: with it switched off the forward keeps the
    # underflowed sums and is wrong (so the test above can fail).
    z, g = _inputs(37, 20, torch.float32, 7, device, normalise=False, norm=3.0)
    sc, pos = _layout(37, device)
    monkeypatch.setitem(_kc()._LOG_RANGE, torch.float32, 1e30)
    lse, _ = TRITON.gram_lse_forward(z, sc, pos, 100.0, True, False)
    r_lse = _full(z, sc, pos, 100.0, True, g)[0]
    assert not torch.allclose(lse.cpu().double(), r_lse, rtol=1e-3, atol=1e-3)


class _Lse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, exclude_pos, scale):
        sc, pos = _layout(z.shape[0], z.device)
        lse, _ = TRITON.gram_lse_forward(z, sc, pos, scale, exclude_pos, False)
        ctx.save_for_backward(z, lse)
        ctx.args = (sc, pos, scale, exclude_pos)
        return lse

    @staticmethod
    def backward(ctx, g):
        z, lse = ctx.saved_tensors
        sc, pos, scale, exclude_pos = ctx.args
        return TRITON.gram_lse_backward(z, sc, pos, scale, exclude_pos, lse, g), None, None


@pytest.mark.parametrize("backend,device", DEVICES)
@pytest.mark.parametrize("exclude_pos", [False, True])
def test_float64_gradcheck(backend, device, exclude_pos):
    z, _ = _inputs(7, 3, torch.float64, 5, device)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _Lse.apply(t, exclude_pos, 3.0), (z,),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend,device", DEVICES)
def test_nt_xent_from_the_gram_statistics_matches_the_reference(backend, device):
    # The loss the symmetric op serves: mean_i (lse_i - X_i,pos(i)) over the 2N normalised rows.
    gen = torch.Generator().manual_seed(2)
    z1, z2 = (torch.randn(19, 12, generator=gen).to(device).requires_grad_(True)
              for _ in range(2))
    t = 0.1
    z = torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)])
    pos = _layout(38, device)[1]
    loss = (_Lse.apply(z, False, 1 / t) - (z * z[pos]).sum(1) / t).mean()
    gz1, gz2 = torch.autograd.grad(loss, (z1, z2))
    r1, r2 = (v.detach().cpu().double().requires_grad_(True) for v in (z1, z2))
    ref = reference.nt_xent(r1, r2, t)
    rg1, rg2 = torch.autograd.grad(ref, (r1, r2))
    assert_close(loss.detach().cpu(), ref.detach().float(), msg="loss")
    assert_close(gz1.cpu(), rg1.float(), msg="dz1")
    assert_close(gz2.cpu(), rg2.float(), msg="dz2")


@pytest.mark.parametrize("backend,device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("exclude_pos", [False, True])
def test_low_precision_rule(backend, device, dtype, exclude_pos):
    # Fast path on low-precision rows against the float64 result of the same rows, within 2x
    # the error of the full-matrix computation done in that dtype.
    z, g = _inputs(37, 24, dtype, 9, device)
    g = g.float()
    sc, pos = _layout(37, device)
    lse, w = TRITON.gram_lse_forward(z, sc, pos, 5.0, exclude_pos, True)
    dz = TRITON.gram_lse_backward(z, sc, pos, 5.0, exclude_pos, lse, g)
    hi = _full(z, sc, pos, 5.0, exclude_pos, g)
    lo = _full(z, sc, pos, 5.0, exclude_pos, g, dtype=dtype)
    for name, fast, r_lo, r_hi in zip(("lse", "wmean", "dz"), (lse, w, dz), lo, hi):
        assert_lowp_rule(fast.cpu(), r_lo, r_hi, msg=name)


@pytest.mark.parametrize("backend,device", DEVICES)
def test_empty_and_arguments(backend, device):
    z = torch.randn(6, 4, device=device)
    sc, pos = _layout(6, device)
    lse, w = TRITON.gram_lse_forward(z[:0], sc[:0], pos[:0], 2.0, False, True)
    assert lse.shape == (0,) and w.shape == (0,)
    with pytest.raises(ValueError, match="z must have 2"):
        TRITON.gram_lse_forward(z[None], sc, pos, 2.0, False, False)
    with pytest.raises(TypeError, match="z must have dtype"):
        TRITON.gram_lse_forward(z.long(), sc, pos, 2.0, False, False)
    with pytest.raises(ValueError, match="self_col"):
        TRITON.gram_lse_forward(z, sc[:5], pos, 2.0, False, False)
    with pytest.raises(ValueError, match="pos_col"):
        TRITON.gram_lse_forward(z, sc, pos[:5], 2.0, False, False)
    zeros = lambda k: torch.zeros(k, device=device)  # noqa: E731
    with pytest.raises(ValueError, match="lse"):
        TRITON.gram_lse_backward(z, sc, pos, 2.0, False, zeros(5), zeros(6))
    with pytest.raises(ValueError, match="g must"):
        TRITON.gram_lse_backward(z, sc, pos, 2.0, False, zeros(6), zeros(7))


@pytest.mark.parametrize("backend,device", DEVICES)
def test_gram_deterministic_mode_takes_the_row_block_kernels(backend, device, monkeypatch):
    # Under torch.use_deterministic_algorithms the atomic gram launches give way to the
    # row-block kernels (fixed summation order): same values as the gram path, and the gram
    # kernels are not launched at all.
    kc = _kc()
    m, d = 40, 16
    gen = torch.Generator().manual_seed(3)
    z = F.normalize(torch.randn(m, d, generator=gen), dim=1).to(device)
    self_col, pos_col = _layout(m, device)
    g = torch.full((m,), 1.0 / m, device=device)
    lse_ref, _, dz_ref = _full(z, self_col, pos_col, 10.0, True, g)
    launched = []
    real_launch = kc.launch

    def spy(kernel, *args, **kwargs):
        launched.append(getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel)))
        return real_launch(kernel, *args, **kwargs)

    monkeypatch.setattr(kc, "launch", spy)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        lse, _ = TRITON.gram_lse_forward(z, self_col, pos_col, 10.0, True, False)
        dz = TRITON.gram_lse_backward(z, self_col, pos_col, 10.0, True, lse, g)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert launched and not any("gram" in name for name in launched), launched
    assert_close(lse.double().cpu(), lse_ref, rtol=1e-5, atol=1e-5)
    assert_close(dz.double().cpu(), dz_ref, rtol=1e-4, atol=1e-5)
