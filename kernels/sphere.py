"""Triton kernels of the sphere family: pairwise kernels of a Gram matrix that is never stored.

Both kernels walk tiles of X @ Y.T (rows of X against rows of Y), computed by a loop over the
feature dimension D in blocks (SFRIK uses D = 32768), with the normalisation folded in as
G_ij = <x_i, y_j> * rx_i * ry_j (rx, ry: inverse row norms), so no normalised copy is stored.

KIND 0 (SFRIK's MMD): psi(t) = sum_k w_k P_k(t), P_k the normalised Gegenbauer polynomials in
dimension q = D, evaluated by their three-term recurrence in registers for any number of
degrees (NUM_W, a constexpr; the weights and recurrence coefficients come from a small vector).
KIND 1 (AUH's uniformity): the Gaussian potential exp(2s(t - 1)), the pair (i, i + diag_offset)
excluded, reduced as an online log-sum-exp (row max and shifted row sum) so that the log of
the mean stays finite when every term underflows.

Forward: one program per block of rows, streaming row partials (sum, or max and shifted sum).
With SYM (X is Y) only the column blocks at or after the diagonal block are visited and the
off-diagonal ones count twice. Backward: the same tiles recomputed; the coefficient tile
C = dpsi(G) (or the softmax weights of the log-sum-exp) times ry is multiplied by the Y block
and accumulated into the program's own rows of an fp32 (fp64 for fp64) output, D block by D
block, so no N x N buffer and no atomics. Accumulation is fp32 for fp32/bf16/fp16 and fp64
for fp64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastssl.backends.torch.sphere import _coef_tensor, _inv_norm

from ._launch import check_range, check_tensor, launch, target


@triton.jit
def _series(t, coef_ptr, NUM_W: tl.constexpr):
    # coef = [w_1..w_K, a_1..a_{K-1}, b_1..b_{K-1}]: P_{k+1} = a_k t P_k - b_k P_{k-1}.
    p_prev = tl.full(t.shape, 1.0, t.dtype)
    p = t
    acc = tl.load(coef_ptr) * t
    for k in tl.static_range(1, NUM_W):
        a_k = tl.load(coef_ptr + NUM_W + k - 1)
        b_k = tl.load(coef_ptr + 2 * NUM_W - 1 + k - 1)
        p_next = a_k * t * p - b_k * p_prev
        p_prev = p
        p = p_next
        acc += tl.load(coef_ptr + k) * p
    return acc


@triton.jit
def _series_derivative(t, coef_ptr, NUM_W: tl.constexpr):
    # d/dt of the recurrence: P'_{k+1} = a_k (P_k + t P'_k) - b_k P'_{k-1}.
    p_prev = tl.full(t.shape, 1.0, t.dtype)
    p = t
    dp_prev = tl.zeros(t.shape, t.dtype)
    dp = tl.full(t.shape, 1.0, t.dtype)
    dacc = tl.full(t.shape, 1.0, t.dtype) * tl.load(coef_ptr)
    for k in tl.static_range(1, NUM_W):
        a_k = tl.load(coef_ptr + NUM_W + k - 1)
        b_k = tl.load(coef_ptr + 2 * NUM_W - 1 + k - 1)
        p_next = a_k * t * p - b_k * p_prev
        dp_next = a_k * (p + t * dp) - b_k * dp_prev
        p_prev = p
        p = p_next
        dp_prev = dp
        dp = dp_next
        dacc += tl.load(coef_ptr + k) * dp
    return dacc


@triton.jit
def _gram_tile(x_ptr, y_ptr, sx, sy, rows, cols, row_ok, col_ok, D,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    dot = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_ok = dd < D
        # 64-bit row offsets: rows * D passes 2**31 at 65,536 rows of SFRIK's D = 32768.
        xt = tl.load(x_ptr + rows.to(tl.int64)[:, None] * D + dd[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        yt = tl.load(y_ptr + cols.to(tl.int64)[:, None] * D + dd[None, :],
                     mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            # Exact bf16 -> fp32 widening: the products equal those of a bf16 MMA.
            xt = xt.to(tl.float32)
            yt = yt.to(tl.float32)
        # Per-row powers of two (exact in any float dtype) that bring each row's largest
        # magnitude near 1: rows near 1e20 would overflow the float32 dot (issue 22).
        xt = (xt * sx[:, None]).to(xt.dtype)
        yt = (yt * sy[:, None]).to(yt.dtype)
        dot = tl.dot(xt, tl.trans(yt), dot, input_precision=PRECISION, out_dtype=ACC)
    return dot


@triton.jit
def _pair_forward_kernel(x_ptr, y_ptr, rx_ptr, ry_ptr, sx_ptr, sy_ptr, coef_ptr, out_a_ptr,
                         out_b_ptr,
                         M, N, D, diag_offset, two_scale, lower_bound,
                         KIND: tl.constexpr, NUM_W: tl.constexpr, SYM: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rx = tl.load(rx_ptr + rows, mask=row_ok, other=0.0)
    sx = tl.load(sx_ptr + rows, mask=row_ok, other=1.0)
    row_sum = tl.zeros((BLOCK_M,), ACC)
    # Every logit 2s(G - 1) is >= lower_bound, so starting the running max there never
    # shifts a real term into underflow; rows without any term keep row_sum = 0.
    row_max = tl.zeros((BLOCK_M,), ACC) + lower_bound
    start = 0
    if SYM:
        start = pid
    for jb in range(start, tl.cdiv(N, BLOCK_N)):
        cols = jb * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        sy = tl.load(sy_ptr + cols, mask=col_ok, other=1.0)
        dot = _gram_tile(x_ptr, y_ptr, sx, sy, rows, cols, row_ok, col_ok, D,
                         BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION, UPCAST)
        ry = tl.load(ry_ptr + cols, mask=col_ok, other=0.0)
        g = dot * rx[:, None] * ry[None, :]
        valid = row_ok[:, None] & col_ok[None, :]
        factor = 1.0
        if SYM:
            # The tile (jb, pid) mirrors (pid, jb): off-diagonal tiles count twice.
            factor = tl.where(jb == pid, 1.0, 2.0)
        if KIND == 0:
            val = tl.where(valid, _series(g, coef_ptr, NUM_W), 0.0)
            row_sum += tl.sum(val, axis=1) * factor
        else:
            valid = valid & (cols[None, :] != rows[:, None] + diag_offset)
            logit = tl.where(valid, two_scale * (g - 1.0), float("-inf"))
            new_max = tl.maximum(row_max, tl.max(logit, axis=1))
            row_sum = (row_sum * tl.exp(row_max - new_max)
                       + tl.sum(tl.exp(logit - new_max[:, None]), axis=1) * factor)
            row_max = new_max
    tl.store(out_a_ptr + rows, row_sum, mask=row_ok)
    if KIND == 1:
        tl.store(out_b_ptr + rows, row_max, mask=row_ok)


@triton.jit
def _pair_backward_kernel(a_ptr, b_ptr, ra_ptr, rb_ptr, sa_ptr, sb_ptr, coef_ptr, lse_ptr,
                          out_ptr,
                          M, N, D, diag_offset, two_scale,
                          KIND: tl.constexpr, NUM_W: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # out[i] = sum_j C(G_ij) * rb_j * b_j: the gradient of the pair sum wrt the normalised a_i.
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ra = tl.load(ra_ptr + rows, mask=row_ok, other=0.0)
    sa = tl.load(sa_ptr + rows, mask=row_ok, other=1.0)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr)
    for jb in range(0, tl.cdiv(N, BLOCK_N)):
        cols = jb * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        sb = tl.load(sb_ptr + cols, mask=col_ok, other=1.0)
        dot = _gram_tile(a_ptr, b_ptr, sa, sb, rows, cols, row_ok, col_ok, D,
                         BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION, UPCAST)
        rb = tl.load(rb_ptr + cols, mask=col_ok, other=0.0)
        g = dot * ra[:, None] * rb[None, :]
        valid = row_ok[:, None] & col_ok[None, :]
        if KIND == 0:
            c = _series_derivative(g, coef_ptr, NUM_W)
        else:
            valid = valid & (cols[None, :] != rows[:, None] + diag_offset)
            # lse >= every logit, so the exponent is <= 0: no overflow.
            c = two_scale * tl.exp(two_scale * (g - 1.0) - lse)
        c = tl.where(valid, c, 0.0) * rb[None, :]
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < D
            bt = tl.load(b_ptr + cols.to(tl.int64)[:, None] * D + dd[None, :],
                         mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            bt = (bt * sb[:, None]).to(bt.dtype)  # rb is the scaled row's inverse norm
            c_low = c.to(bt.dtype)
            if UPCAST:
                c_low = c_low.to(tl.float32)
                bt = bt.to(tl.float32)
            contrib = tl.dot(c_low, bt, input_precision=PRECISION, out_dtype=ACC)
            o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * D + dd[None, :]
            o_mask = row_ok[:, None] & d_ok[None, :]
            tl.store(o_ptrs, tl.load(o_ptrs, mask=o_mask, other=0.0) + contrib, mask=o_mask)


_TL_ACC = {torch.float64: tl.float64, torch.float32: tl.float32}
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

KERNELS = ("pair_fwd", "pair_bwd")


def config(kernel: str, dtype: torch.dtype, symmetric: bool, cc: int | None) -> dict:
    """Launch configuration (tile constexprs, num_warps, num_stages) of one kernel of this family
    for compute capability ``cc`` (None: the CPU interpreter) and inputs of ``dtype``.

    Products: bfloat16 / float16 tiles go to the tensor cores as they are; float32 uses them
    through tf32x3 (float32-level error); float64 keeps exact products (ieee).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    f32 = dtype == torch.float32
    precision = {torch.float64: "ieee", torch.float32: "tf32x3"}.get(dtype, "tf32")
    acc = _TL_ACC[torch.float64 if dtype == torch.float64 else torch.float32]
    # The interpreter's tl.dot misreads bf16 operands (it multiplies their raw bits), so on
    # CPU bf16 tiles are widened to fp32 first.
    upcast = cc is None and dtype == torch.bfloat16
    if cc is None:
        # The interpreter: small tiles keep the emulation fast and exercise several blocks.
        bm = bn = bd = 16
        warps, stages = 4, 1
    else:
        hopper = cc >= 90
        bd = 32 if (f32 or dtype == torch.float64) else 64
        if dtype == torch.float64:
            # float64 (gradcheck-style inputs): a double takes two registers and Hopper has no
            # float64 wgmma (mma.sync on both targets), so the float32 tiles spill (Triton's own
            # ptxas run: up to 308 bytes for 128 x 128 on Hopper, 80 for the backward's 64 x 64
            # on 4 warps on sm_80). 64-row tiles on 8 warps on both targets: 0 spills.
            bm, bn = (64, 64) if kernel == "pair_fwd" else (64, 32)
            warps, stages = 8, 2
        elif kernel == "pair_fwd":
            # 128 x 128 tiles on two warpgroups on Hopper (the symmetric walk needs square tiles).
            # On sm_80, 4 warps leave the Gegenbauer recurrence 128 registers and it spills.
            bm = bn = 128 if hopper else 64
            warps = 8
            stages = 3 if hopper else 2
        else:
            # float32: tf32x3's operand splits of a 64-wide column tile spill on sm_80, and of a
            # 128-row tile on Hopper (Triton's own ptxas run, bench/results/static): 64 x 32.
            # bf16 / fp16 on 8 warps on sm_80 too: on 4, triton 3.6 spilled 32 bytes (gauss).
            bm, bn = (64, 32) if f32 else ((128, 64) if hopper else (64, 64))
            warps = 4 if f32 else 8
            stages = 2
    if symmetric:
        bn = bm  # the symmetric walk pairs row block i with column block i
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, ACC=acc, PRECISION=precision, UPCAST=upcast,
                num_warps=warps, num_stages=stages)


def _check_rows(x_name, x, r_name, r, like=None):
    check_tensor(x_name, x, dim=2, dtypes=_DTYPES, device=None if like is None else like.device)
    if like is not None:
        if x.dtype != like.dtype:
            raise TypeError(f"{x_name} must have dtype {like.dtype}, got {x.dtype}")
        if x.shape[1] != like.shape[1]:
            raise ValueError(f"{x_name} must have {like.shape[1]} columns, got {tuple(x.shape)}")
    check_tensor(r_name, r, dim=1, device=x.device, shape=(x.shape[0],), dtypes=_DTYPES)


def _check_series(kind: int, coef, num_w: int, device, acc) -> None:
    check_range("kind", kind, 0, 1)
    check_range("num_w", num_w, 1)
    if kind == 0:
        # coef = [w_1..w_K, a_1..a_{K-1}, b_1..b_{K-1}]: 3K - 2 entries are read.
        check_tensor("coef", coef, dim=1, device=device, dtypes=(acc,))
        if coef.numel() < 3 * num_w - 2:
            raise ValueError(f"coef must hold 3 * num_w - 2 = {3 * num_w - 2} entries, got "
                             f"{coef.numel()}")


def _scales(name, s, x, acc):
    """Per-row scales of x (ones when None): one entry per row, in the accumulation dtype."""
    if s is None:
        return torch.ones(x.shape[0], dtype=acc, device=x.device)
    check_tensor(name, s, dim=1, device=x.device, shape=(x.shape[0],), dtypes=(acc,))
    return s.contiguous()


def pair_forward(x: torch.Tensor, y: torch.Tensor | None, rx: torch.Tensor, ry: torch.Tensor | None,
                 *, kind: int, coef: torch.Tensor | None, num_w: int, diag_offset: int = 0,
                 two_scale: float = 0.0, sx: torch.Tensor | None = None,
                 sy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row partials of the pair reduction of rows x against rows y (y None: x against itself,
    mirrored tiles counted twice). KIND 0: (row sums of psi, None). KIND 1: (shifted row sums,
    row maxima), so that the log of the total is logsumexp(max + log sum).

    sx, sy: optional per-row scales (powers of two) applied to the rows as they are loaded;
    rx, ry are then the inverse norms of the scaled rows."""
    symmetric = y is None
    _check_rows("x", x, "rx", rx)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    sx = _scales("sx", sx, x, acc)
    if symmetric:
        y, ry, sy = x, rx, sx
    else:
        _check_rows("y", y, "ry", ry, like=x)
        sy = _scales("sy", sy, y, acc)
    x, y, rx, ry = x.contiguous(), y.contiguous(), rx.contiguous(), ry.contiguous()
    m, d = x.shape
    n = y.shape[0]
    cfg = config("pair_fwd", x.dtype, symmetric, target(x.device))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    _check_series(kind, coef, num_w, x.device, acc)
    out_a = torch.empty(m, dtype=acc, device=x.device)
    out_b = torch.empty(m if kind == 1 else 1, dtype=acc, device=x.device)
    if coef is None:
        coef = torch.zeros(1, dtype=acc, device=x.device)
    lower_bound = -2.0 * two_scale * 1.01 - 1.0
    launch(_pair_forward_kernel, (triton.cdiv(m, cfg["BLOCK_M"]),),
           x, y, rx, ry, sx, sy, coef, out_a, out_b, m, n, d, diag_offset, two_scale, lower_bound,
           KIND=kind, NUM_W=max(num_w, 1), SYM=symmetric, **cfg)
    return out_a, (out_b if kind == 1 else None)


def pair_backward(a: torch.Tensor, b: torch.Tensor, ra: torch.Tensor, rb: torch.Tensor, *,
                  kind: int, coef: torch.Tensor | None, num_w: int, diag_offset: int = 0,
                  two_scale: float = 0.0, lse: torch.Tensor | None = None,
                  sa: torch.Tensor | None = None, sb: torch.Tensor | None = None) -> torch.Tensor:
    """(M, D) accumulation-dtype gradient of the pair reduction wrt the normalised rows of a
    (sa, sb: optional per-row scales, as pair_forward's sx, sy)."""
    _check_rows("a", a, "ra", ra)
    _check_rows("b", b, "rb", rb, like=a)
    acc_s = torch.float64 if a.dtype == torch.float64 else torch.float32
    sa, sb = _scales("sa", sa, a, acc_s), _scales("sb", sb, b, acc_s)
    a, b, ra, rb = a.contiguous(), b.contiguous(), ra.contiguous(), rb.contiguous()
    m, d = a.shape
    n = b.shape[0]
    cfg = config("pair_bwd", a.dtype, False, target(a.device))
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    _check_series(kind, coef, num_w, a.device, acc)
    out = torch.zeros(m, d, dtype=acc, device=a.device)
    if coef is None:
        coef = torch.zeros(1, dtype=acc, device=a.device)
    if lse is None:
        lse = torch.zeros(1, dtype=acc, device=a.device)
    check_tensor("lse", lse, device=a.device)
    if lse.numel() != 1:
        raise ValueError(f"lse must hold one value, got shape {tuple(lse.shape)}")
    launch(_pair_backward_kernel, (triton.cdiv(m, cfg["BLOCK_M"]),),
           a, b, ra, rb, sa, sb, coef, lse.to(acc).reshape(1), out, m, n, d, diag_offset, two_scale,
           KIND=kind, NUM_W=max(num_w, 1), **cfg)
    return out


# ---- the triton entry of the table: normalisation scales, then the pair kernels above ----

def _kernel_rows(z, r=None):
    """(inverse norm, inverse norm of the scaled row, scale): the kernels scale each row by a
    power of two that brings its largest magnitude into [0.5, 1) as they load it (exact), so
    their float32 dot products cannot overflow at |z| ~ 1e20; r / s is the scaled row's
    inverse norm (s a power of two: exact)."""
    r = _inv_norm(z) if r is None else r  # the caller's, where it normalised the rows already
    m = torch.linalg.vector_norm(z.detach(), ord=float("inf"), dim=1, dtype=r.dtype)
    ok = torch.isfinite(m) & (m > 0)
    s = torch.where(ok, torch.ldexp(torch.ones_like(m), -torch.frexp(m).exponent),
                    torch.ones_like(m))
    return r, r / s, s


def _triton_series_forward(x, y, weights, dim, rx=None, ry=None):
    _, rx, sx = _kernel_rows(x, rx)
    ry, sy = (None, None) if y is None else _kernel_rows(y, ry)[1:]
    coef = _coef_tensor(weights, dim, rx.dtype, x.device)
    rows, _ = pair_forward(x, y, rx, ry, kind=0, coef=coef, num_w=len(weights), sx=sx, sy=sy)
    return rows.sum()


def _triton_series_grad_hat(a, b, weights, dim):
    ra, ra_s, sa = _kernel_rows(a)
    coef = _coef_tensor(weights, dim, ra.dtype, a.device)
    if b is None:
        # psi'(G) is symmetric: the column term equals the row term.
        out = pair_backward(a, a, ra_s, ra_s, kind=0, coef=coef, num_w=len(weights),
                            sa=sa, sb=sa)
        return out.mul_(2), ra
    _, rb_s, sb = _kernel_rows(b)
    out = pair_backward(a, b, ra_s, rb_s, kind=0, coef=coef, num_w=len(weights), sa=sa, sb=sb)
    return out, ra


def _triton_gauss_forward(x, y, scale, diag_offset, rx=None, ry=None):
    _, rx, sx = _kernel_rows(x, rx)
    ry, sy = (None, None) if y is None else _kernel_rows(y, ry)[1:]
    sums, maxima = pair_forward(x, y, rx, ry, kind=1, coef=None, num_w=1,
                                diag_offset=0 if y is None else diag_offset,
                                two_scale=2.0 * scale, sx=sx, sy=sy)
    return torch.logsumexp(maxima + torch.log(sums), dim=0)


def _triton_gauss_grad_hat(a, b, scale, diag_offset, lse):
    ra, ra_s, sa = _kernel_rows(a)
    if b is None:
        out = pair_backward(a, a, ra_s, ra_s, kind=1, coef=None, num_w=1, diag_offset=0,
                            two_scale=2.0 * scale, lse=lse, sa=sa, sb=sa)
        return out.mul_(2), ra
    _, rb_s, sb = _kernel_rows(b)
    out = pair_backward(a, b, ra_s, rb_s, kind=1, coef=None, num_w=1,
                        diag_offset=diag_offset, two_scale=2.0 * scale, lse=lse, sa=sa, sb=sb)
    return out, ra


class TritonSphere:
    """The triton entry of the family's table (fastssl/backends/interfaces.py); no same-pass
    methods."""
    series_forward = staticmethod(_triton_series_forward)
    series_grad_hat = staticmethod(_triton_series_grad_hat)
    gauss_forward = staticmethod(_triton_gauss_forward)
    gauss_grad_hat = staticmethod(_triton_gauss_grad_hat)
