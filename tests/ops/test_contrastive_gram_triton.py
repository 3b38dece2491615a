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


def _full(z, self_col, pos_col, scale, exclude_pos, g, dtype=torch.float64, cross=0):
    """(lse, wmean, dz) from the full M x M matrix in `dtype`, dz of sum_i g_i lse_i; cross > 0
    also masks the same-side pairs ((i < cross) == (j < cross))."""
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
    if cross:
        side = rows < cross
        mask |= side[:, None] == side[None, :]
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
EPS32 = torch.finfo(torch.float32).eps


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
    """The Triton methods as a differentiable lse of z: NT-Xent's layout, or with cross > 0
    symmetric InfoNCE's (z = [q; k], only the pairs across `cross`)."""

    @staticmethod
    def forward(ctx, z, exclude_pos, scale, cross):
        sc, pos = (_info_nce_layout(z.shape[0], cross, z.device) if cross
                   else _layout(z.shape[0], z.device))
        lse, _ = TRITON.gram_lse_forward(z, sc, pos, scale, exclude_pos, False, cross)
        ctx.save_for_backward(z, lse)
        ctx.args = (sc, pos, scale, exclude_pos, cross)
        return lse

    @staticmethod
    def backward(ctx, g):
        z, lse = ctx.saved_tensors
        sc, pos, scale, exclude_pos, cross = ctx.args
        dz = TRITON.gram_lse_backward(z, sc, pos, scale, exclude_pos, lse, g, cross)
        return dz, None, None, None


@pytest.mark.parametrize("backend,device", DEVICES)
@pytest.mark.parametrize("exclude_pos", [False, True])
def test_float64_gradcheck(backend, device, exclude_pos):
    z, _ = _inputs(7, 3, torch.float64, 5, device)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _Lse.apply(t, exclude_pos, 3.0, 0), (z,),
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
    loss = (_Lse.apply(z, False, 1 / t, 0) - (z * z[pos]).sum(1) / t).mean()
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


# ----------------------------------------------------------------------------------------------
# Cross mode (symmetric InfoNCE on z = [q; k]): only the pairs across row `cross` are entries
# ----------------------------------------------------------------------------------------------

def _info_nce_layout(m: int, cross: int, device="cpu"):
    """Symmetric InfoNCE's masks on z = [q; k] split at cross: no self column, row i < cross
    paired with cross + i and back (rows with no partner on the other side pair with themselves,
    a same-side entry the cross mask removes anyway; still symmetric)."""
    pos = torch.arange(m)
    n = min(cross, m - cross)
    pos[:n] += cross
    pos[cross:cross + n] -= cross
    return torch.full((m,), -1, device=device), pos.to(device)


def _check_cross(z, g, scale, cross, exclude_pos, weighted, normwise=False, layout=None):
    """Values and gradient of the cross mode against the float64 full matrix with the same-side
    pairs masked."""
    m = z.shape[0]
    sc, pos = layout if layout is not None else _info_nce_layout(m, cross, z.device)
    lse, wmean = TRITON.gram_lse_forward(z, sc, pos, scale, exclude_pos, weighted, cross)
    dz = TRITON.gram_lse_backward(z, sc, pos, scale, exclude_pos, lse, g, cross)
    r_lse, r_w, r_dz = _full(z, sc, pos, scale, exclude_pos, g, cross=cross)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    assert lse.dtype == acc and lse.shape == (m,) and dz.dtype == z.dtype
    assert wmean.numel() == (m if weighted else 0)
    pairs = [("lse", lse, r_lse), ("dz", dz, r_dz)] + ([("wmean", wmean, r_w)] if weighted else [])
    for name, fast, ref in pairs:
        if normwise:
            # dz: every P_ij = exp(X_ij - lse_i) carries the rounding of the float32 lse it is
            # computed from, up to eps/2 |lse_i| (6e-4 at |lse| ~ 1e4: measured 3.2e-4 of max
            # |dz| in the cross = 13 case below, where the float64 full matrix has none)
            tol = NORMWISE if name != "dz" else max(NORMWISE, EPS32 * r_lse.abs().max().item())
            err = (fast.cpu().double() - ref).abs().max().item()
            assert err <= tol * ref.abs().max().item(), (name, err)
        else:
            assert_close(fast.cpu(), ref.to(fast.dtype), msg=name)
    return lse, dz


# (M, cross): cross on a 16-row interpreter tile edge (the q x k tiles only), off it (tiles that
# straddle cross, same-side pairs inside them), the extremes 1 and M - 1, an odd M (partial last
# tile), and unequal sides; on a GPU also the launchers' tile edges.
def _cross_sized():
    out = []
    for p in DEVICES:
        backend, device = p.values
        sizes = [(32, 16, 16), (40, 20, 12), (37, 13, 20), (37, 1, 8), (37, 36, 8),
                 (96, 48, 32), (96, 23, 32)]
        if device == "cuda":
            sizes += [(600, 300, 130), (512, 256, 64), (1000, 333, 64)]
        out += [pytest.param(backend, device, m, cross, d, marks=p.marks,
                             id=f"{p.id}-{m}x{d}-cross{cross}") for m, cross, d in sizes]
    return out


@pytest.mark.parametrize("backend,device,m,cross,d", _cross_sized())
@pytest.mark.parametrize("exclude_pos,weighted", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_matches_full_matrix(backend, device, m, cross, d, exclude_pos, weighted, dtype):
    z, g = _inputs(m, d, dtype, m * 100 + cross, device)
    layout = None
    if exclude_pos and min(cross, m - cross) == 1:
        # a one-row side has one cross entry per row of the other side; excluding it as a
        # positive would leave that row empty (lse -inf): positives on the same side instead
        layout = (torch.full((m,), -1, device=device), torch.arange(m, device=device))
    _check_cross(z, g, 1 / 0.2, cross, exclude_pos, weighted, layout=layout)


@pytest.mark.parametrize("backend,device", DEVICES)
def test_cross_with_self_columns_and_nt_xent_positives(backend, device):
    # Any symmetric masks compose with the cross mask: self_col = i (same side: masked twice)
    # and NT-Xent's positives i <-> i + M/2 across a cross that is not M/2.
    z, g = _inputs(37, 12, torch.float64, 17, device)
    _check_cross(z, g, 4.0, 11, True, True, layout=_layout(37, device))


@pytest.mark.parametrize("backend,device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cross", [16, 13])
def test_cross_large_norms_at_temperature_001_take_the_exact_fallback(backend, device, dtype,
                                                                      cross):
    # As test_large_norms_at_temperature_001_take_the_exact_fallback, in cross mode: the shift
    # (Cauchy-Schwarz over every pair) sits far above the rows' lse; the fallback is exact.
    z, g = _inputs(37, 20, dtype, 7, device, normalise=False, norm=3.0)
    sc, pos = _info_nce_layout(37, cross)
    r_lse = _full(z, sc, pos, 100.0, False, g, cross=cross)[0]
    c = 100.0 * z.cpu().double().norm(dim=1).max() ** 2
    assert (c - r_lse).max() > 2 * _kc()._LOG_RANGE[torch.float64]  # needs the fallback
    f32 = dtype == torch.float32
    _check_cross(z, g, 100.0, cross, False, True, normwise=f32)
    _check_cross(z, g, 100.0, cross, True, False, normwise=f32)


@pytest.mark.parametrize("backend,device", DEVICES)
@pytest.mark.parametrize("m,block,cross", [(64, 16, 32), (64, 16, 24), (37, 16, 1), (37, 16, 36),
                                           (512, 64, 256), (500, 128, 250)])
def test_cross_tile_table_holds_exactly_the_tiles_with_a_cross_pair(backend, device, m, block,
                                                                    cross):
    # The saving: upper-triangle tiles I <= J, each holding at least one pair across cross, and
    # together every such pair (directly or through the transpose); on a tile edge that is the
    # q x k block, (cross / block)^2 tiles when cross = M / 2, a quarter of the square.
    ti, tj = _kc()._upper_tiles(m, block, device, cross)
    tiles = set(zip(ti.tolist(), tj.tolist()))
    assert len(tiles) == ti.numel() and all(i <= j for i, j in tiles)
    nb = -(-m // block)
    want = {(i, j) for i in range(nb) for j in range(i, nb)
            if i * block < cross < min((j + 1) * block, m)}
    assert tiles == want
    if cross % block == 0 and 2 * cross == m:
        assert len(tiles) == (cross // block) ** 2
    full_i, _ = _kc()._upper_tiles(m, block, device)
    assert full_i.numel() == nb * (nb + 1) // 2


@pytest.mark.parametrize("backend,device", DEVICES)
@pytest.mark.parametrize("cross", [3, 4])
def test_cross_float64_gradcheck(backend, device, cross):
    z, _ = _inputs(7, 3, torch.float64, 5, device)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _Lse.apply(t, False, 3.0, cross), (z,),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend,device", DEVICES)
def test_symmetric_info_nce_from_the_cross_statistics_matches_the_reference(backend, device):
    # The loss the cross mode serves: z = [q; k] normalised, cross = B, positives i <-> B + i:
    # mean over the 2B rows of (lse_i - X_i,pos(i)) is symmetric InfoNCE.
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(19, 12, generator=gen).to(device).requires_grad_(True) for _ in range(2))
    t = 0.1
    z = torch.cat([F.normalize(q, dim=1), F.normalize(k, dim=1)])
    pos = _info_nce_layout(38, 19, device)[1]
    loss = (_Lse.apply(z, False, 1 / t, 19) - (z * z[pos]).sum(1) / t).mean()
    gq, gk = torch.autograd.grad(loss, (q, k))
    rq, rk = (v.detach().cpu().double().requires_grad_(True) for v in (q, k))
    ref = reference.info_nce(rq, rk, t, symmetric=True)
    rgq, rgk = torch.autograd.grad(ref, (rq, rk))
    assert_close(loss.detach().cpu(), ref.detach().float(), msg="loss")
    assert_close(gq.cpu(), rgq.float(), msg="dq")
    assert_close(gk.cpu(), rgk.float(), msg="dk")


@pytest.mark.parametrize("backend,device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cross", [16, 13])
def test_cross_low_precision_rule(backend, device, dtype, cross):
    z, g = _inputs(37, 24, dtype, 9, device)
    g = g.float()
    sc, pos = _info_nce_layout(37, cross, device)
    lse, w = TRITON.gram_lse_forward(z, sc, pos, 5.0, False, True, cross)
    dz = TRITON.gram_lse_backward(z, sc, pos, 5.0, False, lse, g, cross)
    hi = _full(z, sc, pos, 5.0, False, g, cross=cross)
    lo = _full(z, sc, pos, 5.0, False, g, dtype=dtype, cross=cross)
    for name, fast, r_lo, r_hi in zip(("lse", "wmean", "dz"), (lse, w, dz), lo, hi):
        assert_lowp_rule(fast.cpu(), r_lo, r_hi, msg=name)


@pytest.mark.parametrize("backend,device", DEVICES)
@pytest.mark.parametrize("cross", [12, 13, -1, True, 1.5, "3", None])
def test_cross_bad_values_are_rejected(backend, device, cross):
    z = torch.randn(12, 4, device=device)
    sc, pos = _info_nce_layout(12, 6, device)
    vec = torch.zeros(12, device=device)
    with pytest.raises(ValueError, match=r"cross: expected 0 or 0 < cross < 12, got"):
        TRITON.gram_lse_forward(z, sc, pos, 2.0, False, False, cross)
    with pytest.raises(ValueError, match=r"cross: expected 0 or 0 < cross < 12, got"):
        TRITON.gram_lse_backward(z, sc, pos, 2.0, False, vec, vec, cross)


@pytest.mark.parametrize("backend,device", DEVICES)
def test_cross_zero_and_integer_types(backend, device):
    # cross = 0 is today's behaviour (every pair); integer types other than int are accepted.
    z, g = _inputs(21, 8, torch.float64, 6, device)
    sc, pos = _layout(21, device)
    base = TRITON.gram_lse_forward(z, sc, pos, 3.0, True, True)
    for off in (0, torch.tensor(0)):
        for a, b in zip(base, TRITON.gram_lse_forward(z, sc, pos, 3.0, True, True, off)):
            assert torch.equal(a, b)
    sc, pos = _info_nce_layout(21, 10, device)
    a = TRITON.gram_lse_forward(z, sc, pos, 3.0, False, False, 10)[0]
    b = TRITON.gram_lse_forward(z, sc, pos, 3.0, False, False, torch.tensor(10))[0]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"cross: expected 0 or 0 < cross < 1, got 1"):
        TRITON.gram_lse_forward(z[:1], sc[:1], pos[:1], 3.0, False, False, 1)


@pytest.mark.parametrize("backend,device", DEVICES)
@pytest.mark.parametrize("m,cross,exclude_pos,weighted", [(40, 16, False, True),
                                                          (37, 13, True, True),
                                                          (37, 1, False, False),
                                                          (37, 36, True, False)])
def test_cross_deterministic_mode_takes_the_row_block_kernels(backend, device, monkeypatch, m,
                                                              cross, exclude_pos, weighted):
    # Deterministic mode in cross mode: the two cross blocks on the row-block kernels (fixed
    # summation order, no gram launch), the same values as the full matrix, bit-identical
    # between two runs.
    kc = _kc()
    z, g = _inputs(m, 16, torch.float32, m + cross, device)
    sc, pos = _info_nce_layout(m, cross, device)
    r_lse, r_w, r_dz = _full(z, sc, pos, 10.0, exclude_pos, g, cross=cross)
    launched = []
    real_launch = kc.launch

    def spy(kernel, *args, **kwargs):
        launched.append(getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel)))
        return real_launch(kernel, *args, **kwargs)

    monkeypatch.setattr(kc, "launch", spy)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            lse, w = TRITON.gram_lse_forward(z, sc, pos, 10.0, exclude_pos, weighted, cross)
            dz = TRITON.gram_lse_backward(z, sc, pos, 10.0, exclude_pos, lse, g, cross)
            runs.append((lse, w, dz))
    finally:
        torch.use_deterministic_algorithms(prev)
    assert launched and not any("gram" in name for name in launched), launched
    lse, w, dz = runs[0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert lse.dtype == torch.float32 and dz.dtype == z.dtype
    assert w.numel() == (m if weighted else 0)
    assert_close(lse.double().cpu(), r_lse, rtol=1e-5, atol=1e-5)
    assert_close(dz.double().cpu(), r_dz, rtol=1e-4, atol=1e-5)
    if weighted:
        assert_close(w.double().cpu(), r_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", DEVICES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_routing_on_triton_matches_the_reference(backend, device, symmetric,
                                                          monkeypatch):
    # Triton has no same-pass kernels: non-symmetric InfoNCE once fell into the cross mode (the
    # symmetric loss) from 2B >= GRAM_MIN_ROWS. The threshold lowered so that 2B = 38 is past it.
    import fastssl
    from fastssl import functional
    from fastssl.ops import contrastive as ops
    monkeypatch.setattr(ops, "GRAM_MIN_ROWS", 32)
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(19, 12, generator=gen) for _ in range(2))
    fq, fk = (v.to(device).requires_grad_(True) for v in (q, k))
    with fastssl.use_backend(backend):
        loss = functional.info_nce(fq, fk, 0.2, symmetric=symmetric)
    gq, gk = torch.autograd.grad(loss, (fq, fk))
    rq, rk = (v.double().requires_grad_(True) for v in (q, k))
    ref = reference.info_nce(rq, rk, 0.2, symmetric=symmetric)
    rgq, rgk = torch.autograd.grad(ref, (rq, rk))
    assert_close(loss.detach().cpu(), ref.detach().float(), msg="loss")
    assert_close(gq.cpu(), rgq.float(), msg="dq")
    assert_close(gk.cpu(), rgk.float(), msg="dk")
