"""Sphere-family ops: pair reductions over the Gram matrix of normalised rows, never stored.

* ``series_sum(x, y=None, weights)``: sum over all pairs (i, j) of
  psi(<x_i/|x_i|, y_j/|y_j|>), psi = sum_k w_k P_k (normalised Gegenbauer, dimension D).
  ``y=None`` means y = x (all N*N pairs, diagonal included; mirrored tiles computed once).
* ``gauss_lse(x, y=None, scale, diag_offset)``: log of the sum over pairs (i, j) with
  j != i + diag_offset of exp(2*scale*(<x̂_i, ŷ_j> - 1)) (AUH's uniformity before the mean).

Each is a torch.library custom op (forward and backward ops, fake kernels, autograd) taking
the backend name as an argument (chosen once by the public function through
:func:`backend_for`; the backward uses the forward's name, docs/design.md) from the family's
table ``TABLE``:
``triton`` (kernels/sphere.py), ``torch`` (blocks of rows in PyTorch, never the full N x N;
serves CPU and float64) and ``reference`` (the full matrices, autograd for the derivative).
Inputs are raw rows; the normalisation is part of the op (its backward projects the gradient).
The scalar is float32 for fp32/bf16/fp16 inputs and float64 for float64.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from fastssl._backend import check_backend_name, choose
from fastssl._validation import accumulation_dtype, row_norms
from fastssl.ops._entry import entry
from fastssl.reference.sphere import kernel_series

_NORM_EPS = 1e-12
# Elements of one (rows x N) block in the torch path: a few fp32 temporaries of 16 MiB
# (1024 rows at N = 4096: large enough for efficient GEMMs).
_TORCH_BLOCK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------
# shared pieces

def _inv_norm(z: torch.Tensor) -> torch.Tensor:
    acc = accumulation_dtype(z)
    # scaled before squaring (row_norms): no overflow at |z| ~ 1e20 in float32
    return row_norms(z, acc).squeeze(1).clamp_min(_NORM_EPS).reciprocal()


def _normalize_by(z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The rows of z normalised with their precomputed inverse norms r (accumulation dtype)."""
    return z.to(r.dtype) * r[:, None]


def recurrence_coefficients(num_w: int, dim: int) -> tuple[list[float], list[float]]:
    """a_k, b_k (k = 1..num_w-1) of P_{k+1} = a_k t P_k - b_k P_{k-1} in dimension `dim`."""
    a = [(2 * k + dim - 2) / (k + dim - 2) for k in range(1, num_w)]
    b = [k / (k + dim - 2) for k in range(1, num_w)]
    return a, b


_COEF_CACHE: dict = {}


def _coef_tensor(weights: Sequence[float], dim: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    key = (tuple(weights), dim, dtype, str(device))
    t = _COEF_CACHE.get(key)
    if t is None:
        a, b = recurrence_coefficients(len(weights), dim)
        t = torch.tensor(list(weights) + a + b, dtype=dtype, device=device)
        if len(_COEF_CACHE) > 64:
            _COEF_CACHE.clear()
        _COEF_CACHE[key] = t
    return t


def power_coefficients(weights: Sequence[float], dim: int) -> list[float]:
    """psi = sum_k w_k P_k in the monomial basis, c_0..c_K (float64 host arithmetic).

    The torch path evaluates psi and psi' by Horner's rule in place on each block: K fused
    multiply-adds per element instead of the recurrence's several temporaries.
    """
    a, b = recurrence_coefficients(len(weights), dim)
    p_prev, p = [1.0], [0.0, 1.0]
    coef = [0.0, weights[0]]
    for k in range(1, len(weights)):
        shifted = [0.0] + [a[k - 1] * c for c in p]
        p_prev, p = p, [c - b[k - 1] * (p_prev[i] if i < len(p_prev) else 0.0)
                        for i, c in enumerate(shifted)]
        coef = coef + [0.0]
        coef = [c + weights[k] * p[i] for i, c in enumerate(coef)]
    return coef


def _horner_(t: torch.Tensor, coef: Sequence[float]) -> torch.Tensor:
    """sum_m coef[m] t^m, computed into a fresh buffer with in-place steps."""
    acc = torch.full_like(t, coef[-1])
    for c in reversed(coef[:-1]):
        acc.mul_(t).add_(c)
    return acc


def _recurrence(t: torch.Tensor, weights: Sequence[float], dim: int,
                derivative: bool) -> torch.Tensor:
    """psi(t) or psi'(t) by the three-term recurrence (stable for any degree)."""
    a, b = recurrence_coefficients(len(weights), dim)
    p_prev, p = torch.ones_like(t), t
    dp_prev, dp = torch.zeros_like(t), torch.ones_like(t)
    acc = (torch.full_like(t, weights[0]) if derivative else weights[0] * t)
    for k in range(1, len(weights)):
        p_next = a[k - 1] * t * p - b[k - 1] * p_prev
        if derivative:
            dp_prev, dp = dp, a[k - 1] * (p + t * dp) - b[k - 1] * dp_prev
        p_prev, p = p, p_next
        acc = acc + weights[k] * (dp if derivative else p)
    return acc


def _series_and_derivative(t: torch.Tensor, weights: Sequence[float], dim: int,
                           derivative: bool) -> torch.Tensor:
    """psi(t) or psi'(t) (torch path): Horner in the monomial basis where that basis is benign
    (sum |c_m| bounds Horner's rounding error; sum |w_k| bounds |psi| on [-1, 1]), else the
    recurrence (high degrees in low dimensions, e.g. Chebyshev-like coefficients for D = 2)."""
    coef = power_coefficients(weights, dim)
    if derivative:
        coef = [m * c for m, c in enumerate(coef)][1:]
    scale = sum(abs(w) for w in weights) * (len(weights) ** 2 if derivative else 1)
    if sum(abs(c) for c in coef) > 64 * max(scale, 1e-300):
        return _recurrence(t, weights, dim, derivative)
    return _horner_(t, coef)


def _project(grad_hat: torch.Tensor, a: torch.Tensor, ra: torch.Tensor,
             grad: torch.Tensor) -> torch.Tensor:
    """Chain rule through a -> a/|a|: r (g - <g, â> â), times the upstream scalar gradient.

    `grad_hat` is a fresh buffer of the backend and is updated in place (one (B, D) buffer less).
    """
    a_hat = _normalize_by(a, ra)
    radial = (grad_hat * a_hat).sum(dim=1, keepdim=True)
    torch.addcmul(grad_hat, a_hat, radial, value=-1, out=grad_hat)
    grad_hat.mul_(ra[:, None] * grad.to(ra.dtype))
    return grad_hat.to(a.dtype)


def _row_blocks(rows: int, cols: int):
    step = max(1, min(rows, _TORCH_BLOCK_ELEMENTS // max(cols, 1)))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


# ---------------------------------------------------------------------------------------------
# torch backend: blocks of rows

def _torch_series_forward(x, y, weights, dim):
    rx = _inv_norm(x)
    xh = _normalize_by(x, rx)
    total = xh.new_zeros(())
    if y is None:
        # Row block [s, e) against columns >= s: the block itself once, columns >= e twice.
        n = xh.shape[0]
        for s, e in _row_blocks(n, n):
            psi = _series_and_derivative(xh[s:e] @ xh[s:].T, weights, dim, False)
            total = total + psi[:, : e - s].sum() + 2 * psi[:, e - s:].sum()
        return total
    yh = _normalize_by(y, _inv_norm(y))
    for s, e in _row_blocks(xh.shape[0], yh.shape[0]):
        total = total + _series_and_derivative(xh[s:e] @ yh.T, weights, dim, False).sum()
    return total


def _torch_series_grad_hat(a, b, weights, dim):
    ra = _inv_norm(a)
    ah = _normalize_by(a, ra)
    if b is None:
        # Symmetric: d/dâ_i sum_{jk} psi(G_jk) = 2 sum_j psi'(G_ij) â_j; each block of rows
        # against the columns from its start, scattering the mirrored part to those columns.
        n = ah.shape[0]
        out = torch.zeros_like(ah)
        for s, e in _row_blocks(n, n):
            c = _series_and_derivative(ah[s:e] @ ah[s:].T, weights, dim, True)
            out[s:e] += c @ ah[s:]
            out[e:] += c[:, e - s:].T @ ah[s:e]
        return out.mul_(2), ra
    bh = _normalize_by(b, _inv_norm(b))
    out = torch.empty_like(ah)
    for s, e in _row_blocks(ah.shape[0], bh.shape[0]):
        out[s:e] = _series_and_derivative(ah[s:e] @ bh.T, weights, dim, True) @ bh
    return out, ra


def _fill_diag_(x, s, col_start, diag_offset, value):
    """In place: x[r, c] = value where column (col_start + c) == row (s + r) + diag_offset: one
    diagonal of the block, O(rows) (no rows x cols mask)."""
    x.diagonal(s + diag_offset - col_start).fill_(value)
    return x


def _gauss_logits(a, b, scale):
    """2 scale (a @ b.T - 1) in place on the product (no second block-sized temporary)."""
    return (a @ b.T).sub_(1.0).mul_(2 * scale)


def _torch_gauss_forward(x, y, scale, diag_offset):
    rx = _inv_norm(x)
    xh = _normalize_by(x, rx)
    parts = []
    if y is None:
        n = xh.shape[0]
        for s, e in _row_blocks(n, n):
            logit = _fill_diag_(_gauss_logits(xh[s:e], xh[s:], scale), s, s, 0, float("-inf"))
            # Mirrored pairs (columns >= e) count twice.
            logit[:, e - s:] += math.log(2.0)
            parts.append(torch.logsumexp(logit.reshape(-1), dim=0))
        return torch.logsumexp(torch.stack(parts), dim=0)
    yh = _normalize_by(y, _inv_norm(y))
    for s, e in _row_blocks(xh.shape[0], yh.shape[0]):
        logit = _fill_diag_(_gauss_logits(xh[s:e], yh, scale), s, 0, diag_offset, float("-inf"))
        parts.append(torch.logsumexp(logit.reshape(-1), dim=0))
    return torch.logsumexp(torch.stack(parts), dim=0)


def _torch_gauss_grad_hat(a, b, scale, diag_offset, lse):
    ra = _inv_norm(a)
    ah = _normalize_by(a, ra)
    lse = lse.to(ah.dtype)
    if b is None:
        n = ah.shape[0]
        out = torch.zeros_like(ah)
        for s, e in _row_blocks(n, n):
            logit = 2 * scale * (ah[s:e] @ ah[s:].T - 1)
            c = (2 * scale) * torch.exp(logit - lse)
            c = _fill_diag_(c, s, s, 0, 0.0)
            out[s:e] += c @ ah[s:]
            out[e:] += c[:, e - s:].T @ ah[s:e]
        return out.mul_(2), ra
    bh = _normalize_by(b, _inv_norm(b))
    out = torch.empty_like(ah)
    for s, e in _row_blocks(ah.shape[0], bh.shape[0]):
        c = (2 * scale) * torch.exp(2 * scale * (ah[s:e] @ bh.T - 1) - lse)
        c = _fill_diag_(c, s, 0, diag_offset, 0.0)
        out[s:e] = c @ bh
    return out, ra


# Same pass (torch entry): the scalar and its gradients in x̂ (and ŷ) from one pass over the
# blocks, as the contrastive family does (issue 18): two products per block instead of the
# forward's one plus the backward's recompute and product (three). The backward projects and
# scales the saved gradients (no recompute).

def _torch_series_forward_grad(x, y, weights, dim):
    """(total, gx_hat, gy_hat): series_forward's total and d total / d x̂ (d total / d ŷ, empty
    when y is None) from the same blocks."""
    xh = _normalize_by(x, _inv_norm(x))
    total = xh.new_zeros(())
    gx = torch.zeros_like(xh)
    if y is None:
        n = xh.shape[0]
        for s, e in _row_blocks(n, n):
            g = xh[s:e] @ xh[s:].T
            psi = _series_and_derivative(g, weights, dim, False)
            total = total + psi[:, : e - s].sum() + 2 * psi[:, e - s:].sum()
            c = _series_and_derivative(g, weights, dim, True)
            gx[s:e] += c @ xh[s:]
            gx[e:] += c[:, e - s:].T @ xh[s:e]
        return total, gx.mul_(2), xh.new_empty(0)
    yh = _normalize_by(y, _inv_norm(y))
    gy = torch.zeros_like(yh)
    for s, e in _row_blocks(xh.shape[0], yh.shape[0]):
        g = xh[s:e] @ yh.T
        total = total + _series_and_derivative(g, weights, dim, False).sum()
        c = _series_and_derivative(g, weights, dim, True)
        gx[s:e] = c @ yh
        gy.addmm_(c.T, xh[s:e])
    return total, gx, gy


def _torch_gauss_forward_grad(x, y, scale, diag_offset):
    """(lse, gx_hat, gy_hat): gauss_forward's lse and its gradients in x̂ (and ŷ) from the same
    blocks. The log-sum-exp is over all blocks, so the exponentials are taken against a running
    maximum m and the sums and gradients rescaled by exp(m_old - m_new) when it grows (as
    flash-attention's online softmax; tensor ops only, no host read)."""
    xh = _normalize_by(x, _inv_norm(x))
    acc = xh.dtype
    floor = torch.finfo(acc).min / 4  # a running max that never meets -inf (no inf - inf)
    m = torch.full((), floor, dtype=acc, device=x.device)
    total = xh.new_zeros(())
    gx = torch.zeros_like(xh)
    sym = y is None
    yh = xh if sym else _normalize_by(y, _inv_norm(y))
    gy = xh.new_empty(0) if sym else torch.zeros_like(yh)
    n_rows, n_cols = xh.shape[0], yh.shape[0]
    for s, e in _row_blocks(n_rows, n_cols):
        col0 = s if sym else 0
        logit = _fill_diag_(_gauss_logits(xh[s:e], yh[col0:], scale), s, col0,
                            0 if sym else diag_offset, float("-inf"))
        m_new = torch.maximum(m, logit.max())
        shrink = torch.exp(m - m_new)
        total, m = total * shrink, m_new
        gx.mul_(shrink)
        if not sym:
            gy.mul_(shrink)
        c = logit.sub_(m).exp_()
        if sym:
            # mirrored pairs (columns >= e) count twice in the sum
            total = total + c[:, : e - s].sum() + 2 * c[:, e - s:].sum()
            gx[s:e] += c @ yh[s:]
            gx[e:] += c[:, e - s:].T @ xh[s:e]
        else:
            total = total + c.sum()
            gx[s:e] = c @ yh
            gy.addmm_(c.T, xh[s:e])
    lse = m + torch.log(total)
    # d lse / d x̂_i = 2 scale sum_j exp(logit_ij - lse) ŷ_j; the symmetric sum counts each
    # pair from both ends (the factor 2, as _torch_gauss_grad_hat)
    unit = (2 * scale) * torch.exp(m - lse) * (2 if sym else 1)
    return lse, gx.mul_(unit), (gy if sym else gy.mul_(unit))


# ---------------------------------------------------------------------------------------------
# reference backend: full matrices (fastssl.reference's polynomials, autograd for psi')

def _ref_gram(a, b):
    ah = _normalize_by(a, _inv_norm(a))
    bh = ah if b is None else _normalize_by(b, _inv_norm(b))
    return ah, bh, ah @ bh.T


def _ref_series_forward(x, y, weights, dim):
    return kernel_series(_ref_gram(x, y)[2], weights, dim).sum()


def _ref_series_grad_hat(a, b, weights, dim):
    ah, bh, g = _ref_gram(a, b)
    # torch.func works inside the op's body, where the autograd engine is switched off.
    _, vjp = torch.func.vjp(lambda t: kernel_series(t, weights, dim), g)
    (c,) = vjp(torch.ones_like(g))
    out = c @ bh if b is not None else (c + c.T) @ ah
    return out, _inv_norm(a)


def _ref_gauss_mask(m, n, diag_offset, device):
    return torch.arange(m, device=device)[:, None] + diag_offset == torch.arange(n, device=device)


def _ref_gauss_forward(x, y, scale, diag_offset):
    _, _, g = _ref_gram(x, y)
    logit = (2 * scale * (g - 1)).masked_fill(_ref_gauss_mask(*g.shape, diag_offset, x.device),
                                              float("-inf"))
    return torch.logsumexp(logit.reshape(-1), dim=0)


def _ref_gauss_grad_hat(a, b, scale, diag_offset, lse):
    ah, bh, g = _ref_gram(a, b)
    mask = _ref_gauss_mask(*g.shape, diag_offset, a.device)

    def lse_of(t):
        logit = (2 * scale * (t - 1)).masked_fill(mask, float("-inf"))
        return torch.logsumexp(logit.reshape(-1), dim=0)

    _, vjp = torch.func.vjp(lse_of, g)
    (c,) = vjp(torch.ones((), dtype=g.dtype, device=g.device))
    out = c @ bh if b is not None else (c + c.T) @ ah
    return out, _inv_norm(a)


# ---------------------------------------------------------------------------------------------
# triton backend

def _kernel_rows(z):
    """(inverse norm, inverse norm of the scaled row, scale): the kernels scale each row by a
    power of two that brings its largest magnitude into [0.5, 1) as they load it (exact), so
    their float32 dot products cannot overflow at |z| ~ 1e20; r / s is the scaled row's
    inverse norm (s a power of two: exact)."""
    r = _inv_norm(z)
    m = torch.linalg.vector_norm(z.detach(), ord=float("inf"), dim=1, dtype=r.dtype)
    ok = torch.isfinite(m) & (m > 0)
    s = torch.where(ok, torch.ldexp(torch.ones_like(m), -torch.frexp(m).exponent),
                    torch.ones_like(m))
    return r, r / s, s


def _triton_series_forward(x, y, weights, dim):
    from fastssl.kernels import sphere as K
    _, rx, sx = _kernel_rows(x)
    ry, sy = (None, None) if y is None else _kernel_rows(y)[1:]
    coef = _coef_tensor(weights, dim, rx.dtype, x.device)
    rows, _ = K.pair_forward(x, y, rx, ry, kind=0, coef=coef, num_w=len(weights), sx=sx, sy=sy)
    return rows.sum()


def _triton_series_grad_hat(a, b, weights, dim):
    from fastssl.kernels import sphere as K
    ra, ra_s, sa = _kernel_rows(a)
    coef = _coef_tensor(weights, dim, ra.dtype, a.device)
    if b is None:
        # psi'(G) is symmetric: the column term equals the row term.
        out = K.pair_backward(a, a, ra_s, ra_s, kind=0, coef=coef, num_w=len(weights),
                              sa=sa, sb=sa)
        return out.mul_(2), ra
    _, rb_s, sb = _kernel_rows(b)
    out = K.pair_backward(a, b, ra_s, rb_s, kind=0, coef=coef, num_w=len(weights), sa=sa, sb=sb)
    return out, ra


def _triton_gauss_forward(x, y, scale, diag_offset):
    from fastssl.kernels import sphere as K
    _, rx, sx = _kernel_rows(x)
    ry, sy = (None, None) if y is None else _kernel_rows(y)[1:]
    sums, maxima = K.pair_forward(x, y, rx, ry, kind=1, coef=None, num_w=1,
                                  diag_offset=0 if y is None else diag_offset,
                                  two_scale=2.0 * scale, sx=sx, sy=sy)
    return torch.logsumexp(maxima + torch.log(sums), dim=0)


def _triton_gauss_grad_hat(a, b, scale, diag_offset, lse):
    from fastssl.kernels import sphere as K
    ra, ra_s, sa = _kernel_rows(a)
    if b is None:
        out = K.pair_backward(a, a, ra_s, ra_s, kind=1, coef=None, num_w=1, diag_offset=0,
                              two_scale=2.0 * scale, lse=lse, sa=sa, sb=sa)
        return out.mul_(2), ra
    _, rb_s, sb = _kernel_rows(b)
    out = K.pair_backward(a, b, ra_s, rb_s, kind=1, coef=None, num_w=1,
                          diag_offset=diag_offset, two_scale=2.0 * scale, lse=lse, sa=sa, sb=sb)
    return out, ra


class _TritonSphere:
    series_forward = staticmethod(_triton_series_forward)
    series_grad_hat = staticmethod(_triton_series_grad_hat)
    gauss_forward = staticmethod(_triton_gauss_forward)
    gauss_grad_hat = staticmethod(_triton_gauss_grad_hat)


class _TorchSphere:
    series_forward = staticmethod(_torch_series_forward)
    series_forward_grad = staticmethod(_torch_series_forward_grad)
    gauss_forward_grad = staticmethod(_torch_gauss_forward_grad)
    series_grad_hat = staticmethod(_torch_series_grad_hat)
    gauss_forward = staticmethod(_torch_gauss_forward)
    gauss_grad_hat = staticmethod(_torch_gauss_grad_hat)


class _ReferenceSphere:
    series_forward = staticmethod(_ref_series_forward)
    series_grad_hat = staticmethod(_ref_series_grad_hat)
    gauss_forward = staticmethod(_ref_gauss_forward)
    gauss_grad_hat = staticmethod(_ref_gauss_grad_hat)


# The family's backend table (docs/design.md): name -> namespace, the same methods in each.
TABLE = {"triton": _TritonSphere(), "torch": _TorchSphere(), "reference": _ReferenceSphere()}


def backend_for(op: str, device: torch.device) -> str:
    """The backend that serves `op` ("sfrik", "auh", ...) on `device` now (the one dispatch
    point of the family: the public function calls it once and passes the name to the ops)."""
    return choose(op, device, TABLE, family="sphere")


# ---------------------------------------------------------------------------------------------
# the entry check of each registered op (fastssl/ops/_entry.py): devices, ranks, backend, and
# the feature dimension (the Gegenbauer recurrence divides by D - 1)

_BACKENDS = ("triton", "torch", "reference")


def _pair_limits(first: str, second: str, gegenbauer: bool):
    def limits(args):
        a, b = args[first], args[second]
        if b is not None and b.shape[1] != a.shape[1]:
            raise ValueError(f"{second}: expected {a.shape[1]} columns (the feature dimension "
                             f"of {first}), got shape {tuple(b.shape)}")
        if gegenbauer:
            if a.shape[1] < 2:
                raise ValueError(f"{first}: the Gegenbauer kernel needs an embedding dimension "
                                 f"D >= 2, got shape {tuple(a.shape)}")
            w = args["weights"]
            if len(w) == 0 or not all(math.isfinite(v) for v in w):
                raise ValueError(f"weights: expected at least one finite weight, got {list(w)}")
    return limits


_SERIES_SPEC = dict(ranks={"x": 2, "y": 2}, backends=_BACKENDS,
                    limits=_pair_limits("x", "y", True))
_SERIES_BWD_SPEC = dict(ranks={"grad": 0, "a": 2, "b": 2}, backends=_BACKENDS,
                        limits=_pair_limits("a", "b", True))
_GAUSS_SPEC = dict(ranks={"x": 2, "y": 2}, backends=_BACKENDS, limits=_pair_limits("x", "y", False))
_GAUSS_BWD_SPEC = dict(ranks={"grad": 0, "a": 2, "b": 2, "lse": 0}, backends=_BACKENDS,
                       limits=_pair_limits("a", "b", False))
_SERIES_GRAD_SPEC = dict(ranks={"x": 2, "y": 2}, backends=("torch",),
                         limits=_pair_limits("x", "y", True))
_GAUSS_GRAD_SPEC = dict(ranks={"x": 2, "y": 2}, backends=("torch",),
                        limits=_pair_limits("x", "y", False))


# ---------------------------------------------------------------------------------------------
# torch.library ops

def _scalar_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((), dtype=accumulation_dtype(x))


@torch.library.custom_op("fastssl::sphere_series_sum", mutates_args=())
@entry("sphere_series_sum", **_SERIES_SPEC)
def _series_sum_op(x: torch.Tensor, y: Optional[torch.Tensor], weights: list[float],
                   backend: str) -> torch.Tensor:
    return TABLE[backend].series_forward(x, y, list(weights), x.shape[1])


@_series_sum_op.register_fake
@entry("sphere_series_sum", **_SERIES_SPEC)
def _(x, y, weights, backend):
    return _scalar_like(x)


@torch.library.custom_op("fastssl::sphere_series_backward", mutates_args=())
@entry("sphere_series_backward", **_SERIES_BWD_SPEC)
def _series_grad_op(grad: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor],
                    weights: list[float], backend: str) -> torch.Tensor:
    grad_hat, ra = TABLE[backend].series_grad_hat(a, b, list(weights), a.shape[1])
    return _project(grad_hat, a, ra, grad)


@_series_grad_op.register_fake
@entry("sphere_series_backward", **_SERIES_BWD_SPEC)
def _(grad, a, b, weights, backend):
    return torch.empty_like(a)


def _series_setup(ctx, inputs, output):
    x, y, weights, backend = inputs
    ctx.save_for_backward(x, y)
    ctx.weights, ctx.backend = weights, backend


def _series_backward(ctx, grad):
    # The forward's backend, never a new selection: the autograd engine may run this on a
    # thread that does not see the use_backend context.
    x, y = ctx.saved_tensors
    w, be = ctx.weights, ctx.backend
    if y is None:
        return _series_grad_op(grad, x, None, w, be), None, None, None
    gx = _series_grad_op(grad, x, y, w, be) if ctx.needs_input_grad[0] else None
    gy = _series_grad_op(grad, y, x, w, be) if ctx.needs_input_grad[1] else None
    return gx, gy, None, None


_series_sum_op.register_autograd(_series_backward, setup_context=_series_setup)


@torch.library.custom_op("fastssl::sphere_gauss_lse", mutates_args=())
@entry("sphere_gauss_lse", **_GAUSS_SPEC)
def _gauss_lse_op(x: torch.Tensor, y: Optional[torch.Tensor], scale: float,
                  diag_offset: int, backend: str) -> torch.Tensor:
    return TABLE[backend].gauss_forward(x, y, scale, diag_offset)


@_gauss_lse_op.register_fake
@entry("sphere_gauss_lse", **_GAUSS_SPEC)
def _(x, y, scale, diag_offset, backend):
    return _scalar_like(x)


@torch.library.custom_op("fastssl::sphere_gauss_backward", mutates_args=())
@entry("sphere_gauss_backward", **_GAUSS_BWD_SPEC)
def _gauss_grad_op(grad: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor], scale: float,
                   diag_offset: int, lse: torch.Tensor, backend: str) -> torch.Tensor:
    grad_hat, ra = TABLE[backend].gauss_grad_hat(a, b, scale, diag_offset, lse)
    return _project(grad_hat, a, ra, grad)


@_gauss_grad_op.register_fake
@entry("sphere_gauss_backward", **_GAUSS_BWD_SPEC)
def _(grad, a, b, scale, diag_offset, lse, backend):
    return torch.empty_like(a)


def _gauss_setup(ctx, inputs, output):
    x, y, scale, diag_offset, backend = inputs
    ctx.save_for_backward(x, y, output)
    ctx.scale, ctx.diag_offset, ctx.backend = scale, diag_offset, backend


def _gauss_backward(ctx, grad):
    x, y, lse = ctx.saved_tensors
    s, off, be = ctx.scale, ctx.diag_offset, ctx.backend
    if y is None:
        return _gauss_grad_op(grad, x, None, s, 0, lse, be), None, None, None, None
    gx = _gauss_grad_op(grad, x, y, s, off, lse, be) if ctx.needs_input_grad[0] else None
    # The transposed pairs: row j of y meets column i of x, excluded when i == j - offset.
    gy = _gauss_grad_op(grad, y, x, s, -off, lse, be) if ctx.needs_input_grad[1] else None
    return gx, gy, None, None, None


_gauss_lse_op.register_autograd(_gauss_backward, setup_context=_gauss_setup)


# Same-pass ops (the entries with `series_forward_grad` / `gauss_forward_grad`): the forward
# returns the unprojected gradients in x̂ and ŷ as extra outputs; the backward only projects
# them through the normalisation and scales them.
SAME_PASS_BACKENDS = ("torch",)


@torch.library.custom_op("fastssl::sphere_series_sum_grad", mutates_args=())
@entry("sphere_series_sum_grad", **_SERIES_GRAD_SPEC)
def _series_sum_grad_op(x: torch.Tensor, y: Optional[torch.Tensor], weights: list[float],
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, gx_hat, gy_hat): sphere_series_sum with its gradients in x̂ (and ŷ; empty when y
    is None) from the same pass."""
    if backend not in SAME_PASS_BACKENDS:
        raise RuntimeError(f"fastssl::sphere_series_sum_grad: backend {backend!r} has no "
                           f"same-pass kernels (expected one of {SAME_PASS_BACKENDS})")
    total, gx, gy = TABLE[backend].series_forward_grad(x, y, list(weights), x.shape[1])
    return total, gx.contiguous(), gy.contiguous()


@_series_sum_grad_op.register_fake
@entry("sphere_series_sum_grad", **_SERIES_GRAD_SPEC)
def _(x, y, weights, backend):
    acc = accumulation_dtype(x)
    return (_scalar_like(x), x.new_empty(x.shape, dtype=acc),
            x.new_empty(y.shape if y is not None else (0,), dtype=acc))


@torch.library.custom_op("fastssl::sphere_gauss_lse_grad", mutates_args=())
@entry("sphere_gauss_lse_grad", **_GAUSS_GRAD_SPEC)
def _gauss_lse_grad_op(x: torch.Tensor, y: Optional[torch.Tensor], scale: float,
                       diag_offset: int, backend: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, gx_hat, gy_hat): sphere_gauss_lse with its gradients in x̂ (and ŷ) from the same
    pass."""
    if backend not in SAME_PASS_BACKENDS:
        raise RuntimeError(f"fastssl::sphere_gauss_lse_grad: backend {backend!r} has no "
                           f"same-pass kernels (expected one of {SAME_PASS_BACKENDS})")
    lse, gx, gy = TABLE[backend].gauss_forward_grad(x, y, scale, diag_offset)
    return lse, gx.contiguous(), gy.contiguous()


@_gauss_lse_grad_op.register_fake
@entry("sphere_gauss_lse_grad", **_GAUSS_GRAD_SPEC)
def _(x, y, scale, diag_offset, backend):
    acc = accumulation_dtype(x)
    return (_scalar_like(x), x.new_empty(x.shape, dtype=acc),
            x.new_empty(y.shape if y is not None else (0,), dtype=acc))


def _same_pass_setup(ctx, inputs, output):
    x, y = inputs[0], inputs[1]
    _value, gx, gy = output
    ctx.mark_non_differentiable(gx, gy)
    ctx.save_for_backward(x, y, gx, gy)


def _same_pass_backward(ctx, grad, _g_gx, _g_gy):
    x, y, gx, gy = ctx.saved_tensors
    # _project updates its first argument in place: a copy keeps the saved gradient intact
    # (a second backward with retain_graph sees the same values)
    dx = _project(gx.clone(), x, _inv_norm(x), grad) if ctx.needs_input_grad[0] else None
    dy = (_project(gy.clone(), y, _inv_norm(y), grad)
          if y is not None and ctx.needs_input_grad[1] else None)
    return (dx, dy) + (None,) * (len(ctx.needs_input_grad) - 2)


_series_sum_grad_op.register_autograd(_same_pass_backward, setup_context=_same_pass_setup)
_gauss_lse_grad_op.register_autograd(_same_pass_backward, setup_context=_same_pass_setup)


def _wants_same_pass(backend: str, x: torch.Tensor, y: torch.Tensor | None) -> bool:
    needs_grad = x.requires_grad or (y is not None and y.requires_grad)
    return backend in SAME_PASS_BACKENDS and torch.is_grad_enabled() and needs_grad


# ---------------------------------------------------------------------------------------------
# public entry points

def series_sum(x: torch.Tensor, y: torch.Tensor | None = None, *,
               weights: Sequence[float], backend: str | None = None) -> torch.Tensor:
    """sum_{i,j} sum_k w_k P_k(<x̂_i, ŷ_j>) in dimension D (y None: y = x, all N*N pairs).

    `backend`: a name chosen by :func:`backend_for` (None: choose now)."""
    if backend is None:
        backend = backend_for("sphere_series_sum", x.device)
    check_backend_name("fastssl.ops.sphere.series_sum", backend, TABLE)
    if _wants_same_pass(backend, x, y):
        return _series_sum_grad_op(x, y, [float(w) for w in weights], backend)[0]
    return _series_sum_op(x, y, [float(w) for w in weights], backend)


def gauss_lse(x: torch.Tensor, y: torch.Tensor | None = None, *, scale: float,
              diag_offset: int = 0, backend: str | None = None) -> torch.Tensor:
    """log sum_{(i,j): j != i + diag_offset} exp(2 scale (<x̂_i, ŷ_j> - 1)) (y None: y = x).

    `backend`: a name chosen by :func:`backend_for` (None: choose now)."""
    if backend is None:
        backend = backend_for("sphere_gauss_lse", x.device)
    check_backend_name("fastssl.ops.sphere.gauss_lse", backend, TABLE)
    if _wants_same_pass(backend, x, y):
        return _gauss_lse_grad_op(x, y, float(scale), int(diag_offset), backend)[0]
    return _gauss_lse_op(x, y, float(scale), int(diag_offset), backend)
