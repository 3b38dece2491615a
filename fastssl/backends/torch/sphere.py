"""The torch backend of the sphere family: the pair sums over blocks of rows in PyTorch, never
the full N x N Gram (serves every device and float64), with the same-pass forms that make the
gradient with the value; and the pieces every backend shares (inverse norms, the Gegenbauer
coefficients, the projection of the gradient through the normalisation).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from fastssl._validation import accumulation_dtype, row_norms

_NORM_EPS = 1e-12
# Elements of one (rows x N) block in the torch path: a few fp32 temporaries of 16 MiB
# (1024 rows at N = 4096: large enough for efficient GEMMs).
_TORCH_BLOCK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------
# shared pieces

def _norm(z: torch.Tensor) -> torch.Tensor:
    acc = accumulation_dtype(z)
    # scaled before squaring (row_norms): no overflow at |z| ~ 1e20 in float32
    return row_norms(z, acc).squeeze(1).clamp_min(_NORM_EPS)


def _inv_norm(z: torch.Tensor) -> torch.Tensor:
    return _norm(z).reciprocal()


def _rows_hat(z: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
    """The normalised rows of z, with the caller's inverse norms r where given (None: computed
    here): the loss's other terms normalise once and pass r on."""
    return _normalize_by(z, _inv_norm(z) if r is None else r)


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


def _sym_row_blocks(n: int):
    """Row blocks of a symmetric pair sum (each block against the columns from its start): with
    k blocks the products cover (k + 1) / 2k of the N x N Gram, so at least _SYM_BLOCKS blocks
    of >= _SYM_MIN_ROWS rows where N allows. Measured (issue 25, series + gauss forward, N =
    512, D = 1024, one thread, loaded machine): 1 block 146.9 ms, 2 124.2, 3 123.7, 4 121.1,
    8 136.5 (128-row blocks are the smallest that keep the products efficient)."""
    step = max(_SYM_MIN_ROWS, -(-n // _SYM_BLOCKS))
    step = max(1, min(n, step, _TORCH_BLOCK_ELEMENTS // max(n, 1)))
    for start in range(0, n, step):
        yield start, min(n, start + step)


_SYM_BLOCKS = 4
_SYM_MIN_ROWS = 128


# ---------------------------------------------------------------------------------------------
# torch backend: blocks of rows

def _torch_series_forward(x, y, weights, dim, rx=None, ry=None):
    xh = _rows_hat(x, rx)
    total = xh.new_zeros(())
    if y is None:
        # Row block [s, e) against columns >= s: the block itself once, columns >= e twice.
        n = xh.shape[0]
        for s, e in _sym_row_blocks(n):
            psi = _series_and_derivative(xh[s:e] @ xh[s:].T, weights, dim, False)
            total = total + psi[:, : e - s].sum() + 2 * psi[:, e - s:].sum()
        return total
    yh = _rows_hat(y, ry)
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
        for s, e in _sym_row_blocks(n):
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


def _torch_gauss_forward(x, y, scale, diag_offset, rx=None, ry=None):
    xh = _rows_hat(x, rx)
    parts = []
    if y is None:
        n = xh.shape[0]
        for s, e in _sym_row_blocks(n):
            logit = _fill_diag_(_gauss_logits(xh[s:e], xh[s:], scale), s, s, 0, float("-inf"))
            # Mirrored pairs (columns >= e) count twice.
            logit[:, e - s:] += math.log(2.0)
            parts.append(torch.logsumexp(logit.reshape(-1), dim=0))
        return torch.logsumexp(torch.stack(parts), dim=0)
    yh = _rows_hat(y, ry)
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
        for s, e in _sym_row_blocks(n):
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

def _torch_series_forward_grad(x, y, weights, dim, rx=None, ry=None):
    """(total, gx_hat, gy_hat): series_forward's total and d total / d x̂ (d total / d ŷ, empty
    when y is None) from the same blocks."""
    xh = _rows_hat(x, rx)
    total = xh.new_zeros(())
    gx = torch.zeros_like(xh)
    if y is None:
        n = xh.shape[0]
        for s, e in _sym_row_blocks(n):
            g = xh[s:e] @ xh[s:].T
            psi = _series_and_derivative(g, weights, dim, False)
            total = total + psi[:, : e - s].sum() + 2 * psi[:, e - s:].sum()
            c = _series_and_derivative(g, weights, dim, True)
            gx[s:e] += c @ xh[s:]
            gx[e:] += c[:, e - s:].T @ xh[s:e]
        return total, gx.mul_(2), xh.new_empty(0)
    yh = _rows_hat(y, ry)
    gy = torch.zeros_like(yh)
    for s, e in _row_blocks(xh.shape[0], yh.shape[0]):
        g = xh[s:e] @ yh.T
        total = total + _series_and_derivative(g, weights, dim, False).sum()
        c = _series_and_derivative(g, weights, dim, True)
        gx[s:e] = c @ yh
        gy.addmm_(c.T, xh[s:e])
    return total, gx, gy


def _torch_gauss_forward_grad(x, y, scale, diag_offset, rx=None, ry=None):
    """(lse, gx_hat, gy_hat): gauss_forward's lse and its gradients in x̂ (and ŷ) from the same
    blocks. The log-sum-exp is over all blocks, so the exponentials are taken against a running
    maximum m and the sums and gradients rescaled by exp(m_old - m_new) when it grows (as
    flash-attention's online softmax; tensor ops only, no host read)."""
    xh = _rows_hat(x, rx)
    acc = xh.dtype
    floor = torch.finfo(acc).min / 4  # a running max that never meets -inf (no inf - inf)
    m = torch.full((), floor, dtype=acc, device=x.device)
    total = xh.new_zeros(())
    gx = torch.zeros_like(xh)
    sym = y is None
    yh = xh if sym else _rows_hat(y, ry)
    gy = xh.new_empty(0) if sym else torch.zeros_like(yh)
    n_rows, n_cols = xh.shape[0], yh.shape[0]
    for s, e in (_sym_row_blocks(n_rows) if sym else _row_blocks(n_rows, n_cols)):
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


class TorchSphere:
    """The family's interface (fastssl/backends/interfaces.py), same-pass methods included."""
    series_forward = staticmethod(_torch_series_forward)
    series_grad_hat = staticmethod(_torch_series_grad_hat)
    gauss_forward = staticmethod(_torch_gauss_forward)
    gauss_grad_hat = staticmethod(_torch_gauss_grad_hat)
    series_forward_grad = staticmethod(_torch_series_forward_grad)
    gauss_forward_grad = staticmethod(_torch_gauss_forward_grad)
