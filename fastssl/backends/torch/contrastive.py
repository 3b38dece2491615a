"""The torch backend of the contrastive family: the streaming statistics in chunked PyTorch
(blocks of rows against all columns, never the full M x C logits; serves every device and
float64). The ``cpp`` entry (fastssl/backends/ext/contrastive.py) runs the same arithmetic in
C++ and reuses SCE's recompute pair from here.
"""
from __future__ import annotations

import torch

from fastssl._validation import accumulation_dtype

# Rows per chunk of the torch path. A bounded number of large chunks: every chunk costs a dozen
# ATen calls, each a parallel region whose barrier is what collapses when other processes share
# the cores (issue 18 measured the old fixed 4M-element chunks at 0.4-0.6x of eager under load).
# A chunk is about 1/CHUNKS_PER_MATRIX of the M x C logits (so the working set stays under 1/8
# of eager's, which holds several full matrices: measured 0.11 at nt_xent N = 4096 with 32,
# 0.15 with 16), at least MIN_CHUNK_ELEMENTS (small problems: one or a few chunks) and at most
# CHUNK_ELEMENTS.
CHUNK_ELEMENTS = 1 << 24
# 1 MiB of float32: symmetric InfoNCE at B = 2048 peaks at 0.09 of eager (0.14 with 2 MiB)
MIN_CHUNK_ELEMENTS = 1 << 18
CHUNKS_PER_MATRIX = 32
MAX_CHUNK_ROWS = 8192


def _chunk_rows(cols: int, rows: int | None = None) -> int:
    cols = max(cols, 1)
    target = CHUNK_ELEMENTS
    if rows is not None:
        target = min(CHUNK_ELEMENTS, max(MIN_CHUNK_ELEMENTS, rows * cols // CHUNKS_PER_MATRIX))
    return max(1, min(MAX_CHUNK_ROWS, target // cols))


def _row_lse_(x):
    """Row log-sum-exp of x, destroying x (x becomes exp(x - row max)): one chunk buffer,
    where torch.logsumexp allocates two more. Rows of only -inf give -inf."""
    m = x.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    x.sub_(m).exp_()
    return x.sum(dim=1).log_().add_(m.squeeze(1))


def _fill_masked(x, r0, r1, self_col, pos_col, exclude_pos, value):
    """In place: x[i, self_col[i]] (and x[i, pos_col[i]]) = value for the rows r0:r1 of the
    chunk. O(rows) scatters, no host sync; a column of -1 means nothing to mask on that row."""
    for col in ((self_col, pos_col) if exclude_pos else (self_col,)):
        c = col[r0:r1]
        idx = c.clamp(min=0)[:, None]
        keep = x.gather(1, idx)
        x.scatter_(1, idx, torch.where((c >= 0)[:, None], torch.full_like(keep, value), keep))
    return x


def torch_lse_forward(a, b, self_col, pos_col, scale, split, exclude_pos, weighted, col_stats):
    acc = accumulation_dtype(a)
    m, c = a.shape[0], b.shape[0]
    has_split = split < c
    bt = b.to(acc).T
    lse0 = a.new_empty(m, dtype=acc)
    lse1 = a.new_empty(m if has_split else 0, dtype=acc)
    wmean = a.new_empty(m if weighted else 0, dtype=acc)
    col_lse = a.new_full((c,) if col_stats else (0,), float("-inf"), dtype=acc)
    step = _chunk_rows(c, m)
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        x = torch.mm(a[r0:r1].to(acc) * scale, bt)
        _fill_masked(x, r0, r1, self_col, pos_col, exclude_pos, float("-inf"))
        if not (has_split or weighted or col_stats):
            lse0[r0:r1] = _row_lse_(x)   # the common case (NT-Xent, InfoNCE, DCL): in place
            continue
        x0 = x[:, :split] if has_split else x
        lse0[r0:r1] = torch.logsumexp(x0, dim=1)
        if has_split:
            lse1[r0:r1] = torch.logsumexp(x[:, split:], dim=1)
        if weighted:
            # softmax * logit, with 0 * -inf (masked entries) read as 0
            p = torch.exp(x0 - lse0[r0:r1, None])
            wmean[r0:r1] = torch.nan_to_num(p * x0, nan=0.0).sum(1)
        if col_stats:
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(x, dim=0))
    return lse0, lse1, wmean, col_lse


def torch_lse_backward(a, b, self_col, pos_col, scale, split, exclude_pos, lse0, lse1, col_lse,
                       g0, g1, g_col, need_da=True, need_db=True):
    acc = accumulation_dtype(a)
    m, c = a.shape[0], b.shape[0]
    has_split = split < c
    col_grad = col_lse.numel() > 0
    b_acc = b.to(acc)
    da = torch.empty(a.shape, dtype=acc, device=a.device) if need_da else None
    db = torch.zeros(b.shape, dtype=acc, device=b.device) if need_db else None
    step = _chunk_rows(c, m)
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        a_scaled = a[r0:r1].to(acc) * scale
        x = torch.mm(a_scaled, b_acc.T)
        col_part = None
        if col_grad:
            col_part = (x - col_lse[None, :]).exp_()
            _fill_masked(col_part, r0, r1, self_col, pos_col, exclude_pos, 0.0)
            col_part.mul_(g_col[None, :].to(acc))
        # dx = g * softmax, in place; masked entries are zeroed after the exp, before the
        # multiply, so an overflowing masked exp never meets a zero gradient (no inf * 0).
        if has_split:
            x[:, :split].sub_(lse0[r0:r1, None])
            x[:, split:].sub_(lse1[r0:r1, None])
        else:
            x.sub_(lse0[r0:r1, None])
        x.exp_()
        _fill_masked(x, r0, r1, self_col, pos_col, exclude_pos, 0.0)
        if has_split:
            x[:, :split].mul_(g0[r0:r1, None].to(acc))
            x[:, split:].mul_(g1[r0:r1, None].to(acc))
        else:
            x.mul_(g0[r0:r1, None].to(acc))
        if col_part is not None:
            x.add_(col_part)
        if need_da:
            da[r0:r1] = torch.mm(x, b_acc).mul_(scale)
        if need_db:
            db.addmm_(x.T, a_scaled)
    return (da.to(a.dtype) if need_da else None), (db.to(b.dtype) if need_db else None)


def _unmasked_col(self_col, pos_col, exclude_pos, c):
    """Per row, one column that is not masked (the smallest of 0, 1, 2 outside the row's
    masked columns), or -1 when the row has none (C <= its masked columns)."""
    masked = [self_col, pos_col] if exclude_pos else [self_col]
    col = torch.full_like(self_col, -1)
    for j in reversed(range(min(c, len(masked) + 1))):
        free = torch.ones_like(self_col, dtype=torch.bool)
        for mcol in masked:
            free &= mcol != j
        col = torch.where(free, torch.full_like(col, j), col)
    return col


@torch.no_grad()  # the gradient is computed here, not recorded (the out= calls require it)
def torch_lse_sum_forward(a, b, self_col, pos_col, scale, exclude_pos, subtract_pos, need_da,
                          need_db):
    """(lse, pos, da, db, ce): lse as torch_lse_forward's lse0 (over all columns), pos[i] =
    X[i, pos_col[i]] (0 where pos_col is -1), ce[i] = -log_softmax(X)[i, pos_col[i]] (lse[i]
    where pos_col is -1, +inf where self_col masks the positive; only when subtract_pos and
    not exclude_pos, else empty: eager
    cross-entropy's arithmetic, no rounding at the logits' magnitude as lse - pos has), and,
    from the same pass, the gradients in a and b
    of L = sum_i lse_i, minus sum_i pos_i when subtract_pos (then each row's cross-entropy
    against its positive column: G = P - onehot(pos)): dA = scale G B, dB = scale G^T A.

    A loss is a scalar, so its gradient can be produced with its value (Liger-Kernel's fused
    linear cross-entropy): a row block's softmax is final as soon as its row of X is formed.
    Three products per block, as eager autograd, none recomputed at backward; the backward
    only scales dA and dB by the incoming gradient. Per block: one log_softmax in place, one
    exp; lse is read back at one unmasked column (lse_i = X_ij - log P_ij), no extra pass."""
    acc = accumulation_dtype(a)
    m, c = a.shape[0], b.shape[0]
    b_acc = b.to(acc)
    lse = a.new_empty(m, dtype=acc)
    pos = a.new_zeros(m, dtype=acc)
    want_ce = subtract_pos and not exclude_pos
    ce = a.new_empty(m if want_ce else 0, dtype=acc)
    da = a.new_empty((m, a.shape[1]) if need_da else (0,), dtype=acc)
    db = a.new_zeros((c, b.shape[1]) if need_db else (0,), dtype=acc)
    probe = _unmasked_col(self_col, pos_col, exclude_pos, c)
    has_probe = probe >= 0
    probe = probe.clamp(min=0)[:, None]
    has_pos = pos_col >= 0
    pos_at = pos_col.clamp(min=0)[:, None]
    step = _chunk_rows(c, m)
    x_buf = a.new_empty((min(step, m), c), dtype=acc)  # one block buffer, reused
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        a_r = a[r0:r1].to(acc) * scale
        x = torch.mm(a_r, b_acc.T, out=x_buf[:r1 - r0])
        pos[r0:r1] = torch.where(has_pos[r0:r1], x.gather(1, pos_at[r0:r1]).squeeze(1), 0.0)
        _fill_masked(x, r0, r1, self_col, pos_col, exclude_pos, float("-inf"))
        at = probe[r0:r1]
        x_probe = x.gather(1, at).squeeze(1)
        y = torch._log_softmax(x, 1, False, out=x)  # row by row: in place is exact
        lse[r0:r1] = torch.where(has_probe[r0:r1], x_probe - y.gather(1, at).squeeze(1),
                                 float("-inf"))
        if want_ce:
            ce[r0:r1] = torch.where(has_pos[r0:r1], -y.gather(1, pos_at[r0:r1]).squeeze(1),
                                    lse[r0:r1])
        if not (need_da or need_db):
            continue
        # all-masked rows: NaN -> 0
        g = _fill_masked(y.exp_(), r0, r1, self_col, pos_col, exclude_pos, 0.0)
        if subtract_pos:
            g.scatter_add_(1, pos_at[r0:r1], -has_pos[r0:r1, None].to(acc))
        if need_da:
            torch.mm(g, b_acc, out=da[r0:r1])
        if need_db:
            db.addmm_(g.T, a_r)
    if need_da:
        da.mul_(scale)
    return lse, pos, da, db, ce


def torch_sce_forward(q, k, cols, self_col, scale_s, scale_t):
    acc = accumulation_dtype(q)
    m, c = q.shape[0], cols.shape[0]
    ct = cols.to(acc).T
    lse_s, lse_t, wmean = (q.new_empty(m, dtype=acc) for _ in range(3))
    step = _chunk_rows(c, m)
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        x = torch.mm(q[r0:r1].to(acc) * scale_s, ct)
        y = torch.mm(k[r0:r1].to(acc) * scale_t, ct)
        _fill_masked(y, r0, r1, self_col, None, False, float("-inf"))
        lse_s[r0:r1] = torch.logsumexp(x, dim=1)
        lse_t[r0:r1] = torch.logsumexp(y, dim=1)
        wmean[r0:r1] = (y.sub_(lse_t[r0:r1, None]).exp_() * x).sum(1)
    return lse_s, lse_t, wmean


@torch.no_grad()
def torch_sce_grad_forward(q, k, cols, self_col, scale_s, scale_t):
    """torch_sce_forward's (lse_s, lse_t, wmean) and, from the same pass, their gradients in q
    per row: u_s[i] = d lse_s[i] / d q_i = scale_s P_s[i] @ cols and u_t[i] = d wmean[i] / d q_i
    = scale_s P_t[i] @ cols (only q carries a gradient, so each row's gradient is the row's
    incoming gradients times these: any weighting of the rows, no recompute at backward).
    Four products against the recompute path's five; lse read back from log_softmax at one
    column (lse_i = X_i0 - log P_i0; the teacher's at an unmasked column)."""
    acc = accumulation_dtype(q)
    m, c = q.shape[0], cols.shape[0]
    c_acc = cols.to(acc)
    lse_s, lse_t, wmean = (q.new_empty(m, dtype=acc) for _ in range(3))
    u_s = q.new_empty(q.shape, dtype=acc)
    u_t = q.new_empty(q.shape, dtype=acc)
    probe = _unmasked_col(self_col, self_col, False, c)
    has_probe = probe >= 0
    probe = probe.clamp(min=0)[:, None]
    step = _chunk_rows(c, m)
    rows0 = min(step, m)
    x_buf, y_buf, lx_buf, ly_buf = (q.new_empty((rows0, c), dtype=acc) for _ in range(4))
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        n = r1 - r0
        x = torch.mm(q[r0:r1].to(acc) * scale_s, c_acc.T, out=x_buf[:n])
        y = torch.mm(k[r0:r1].to(acc) * scale_t, c_acc.T, out=y_buf[:n])
        _fill_masked(y, r0, r1, self_col, None, False, float("-inf"))
        lx = torch._log_softmax(x, 1, False, out=lx_buf[:n])
        ly = torch._log_softmax(y, 1, False, out=ly_buf[:n])
        lse_s[r0:r1] = x[:, 0] - lx[:, 0]
        at = probe[r0:r1]
        lse_t[r0:r1] = torch.where(has_probe[r0:r1],
                                   (y.gather(1, at) - ly.gather(1, at)).squeeze(1), float("-inf"))
        # all-masked rows: NaN -> 0
        p_t = _fill_masked(ly.exp_(), r0, r1, self_col, None, False, 0.0)
        wmean[r0:r1] = torch.linalg.vecdot(p_t, x)
        torch.mm(lx.exp_(), c_acc, out=u_s[r0:r1])
        torch.mm(p_t, c_acc, out=u_t[r0:r1])
    return lse_s, lse_t, wmean, u_s.mul_(scale_s), u_t.mul_(scale_s)


def torch_sce_backward(q, k, cols, self_col, scale_s, scale_t, lse_s, lse_t, g_lse, g_w):
    acc = accumulation_dtype(q)
    m, c = q.shape[0], cols.shape[0]
    c_acc = cols.to(acc)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    step = _chunk_rows(c, m)
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        x = torch.mm(q[r0:r1].to(acc) * scale_s, c_acc.T)
        y = torch.mm(k[r0:r1].to(acc) * scale_t, c_acc.T)
        _fill_masked(y, r0, r1, self_col, None, False, float("-inf"))
        dx = x.sub_(lse_s[r0:r1, None]).exp_().mul_(g_lse[r0:r1, None].to(acc))
        dx.add_(y.sub_(lse_t[r0:r1, None]).exp_().mul_(g_w[r0:r1, None].to(acc)))
        dq[r0:r1] = torch.mm(dx, c_acc) * scale_s
    return dq.to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Symmetric schedule (issue 25): X = scale * Z Z^T with symmetric masks, one pass over the
# upper-triangle tiles (I, J), I <= J, each tile serving its rows and (I < J) its transpose.
# ----------------------------------------------------------------------------------------------

# Rows of a tile. Correctness over speed here (the cpp entry is the fast CPU path): a tile of
# GRAM_BLOCK x GRAM_BLOCK logits, never the 2N x 2N matrix.
GRAM_BLOCK = 512


def check_cross(cross: int, n: int) -> int:
    """The symmetric schedule's `cross` (0, or a row index strictly inside z), else ValueError."""
    if isinstance(cross, bool) or not isinstance(cross, int) or not (
            cross == 0 or 0 < cross < n):
        raise ValueError(f"cross: expected 0 or 0 < cross < {n}, got {cross!r}")
    return cross


def _gram_tiles(n: int, block: int, cross: int = 0):
    """The upper-triangle tile list (I0, I1, J0, J1), row panel by row panel; with cross > 0
    only the tiles holding a pair across it (i0 < cross < j1)."""
    starts = range(0, n, block)
    return [(i0, min(i0 + block, n), j0, min(j0 + block, n))
            for i0 in starts for j0 in starts
            if j0 >= i0 and (cross == 0 or (i0 < cross < min(j0 + block, n)))]


def _mask_same_side(x, i0, i1, j0, j1, cross, value):
    """In place: the tile's pairs on one side of `cross` (cross mode: not entries) = value."""
    if cross and (i0 < cross < i1 or j0 < cross < j1):
        rows = torch.arange(i0, i1, device=x.device)[:, None] < cross
        cols = torch.arange(j0, j1, device=x.device)[None, :] < cross
        x.masked_fill_(rows == cols, value)
    return x


def _zero_masked_tile(x, i0, i1, j0, j1, masks, value=0.0):
    """In place: x[i - i0, col[i] - j0] = value for the tile's rows whose masked column lies in
    [j0, j1). With symmetric masks these are also the tile's column-derived masked entries."""
    w = j1 - j0
    for col in masks:
        c = col[i0:i1] - j0
        ok = (col[i0:i1] >= 0) & (c >= 0) & (c < w)
        idx = c.clamp(0, w - 1)[:, None]
        keep = x.gather(1, idx)
        x.scatter_(1, idx, torch.where(ok[:, None], torch.full_like(keep, value), keep))
    return x


def _merge_lse_(m, s, w, x, dim):
    """Online log-sum-exp: fold the tile x (masked entries -inf) into the running (max m, sum s,
    weighted sum w of exp(x - m) * x; w None unless weighted) along `dim` (1: rows, 0: cols)."""
    mt = x.amax(dim=dim)
    new = torch.maximum(m, mt)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    e = (x - safe.unsqueeze(dim)).exp_()
    factor = (m - safe).exp_()
    s.mul_(factor).add_(e.sum(dim))
    if w is not None:
        w.mul_(factor).add_(torch.nan_to_num(e.mul_(x), nan=0.0).sum(dim))  # 0 * -inf: 0
    m.copy_(new)


def torch_gram_lse_forward(z, self_col, pos_col, scale, exclude_pos, weighted, cross=0):
    """(lse, wmean) of the rows of X = scale * z z^T (masked), from the upper-triangle tiles:
    tile (I, J) adds its row statistics to rows I and, for I < J, its column statistics to
    rows J (X symmetric: column j of X_IJ is row j of X_JI). Exact per-row online shifts.
    cross > 0: only the pairs across it are entries (symmetric InfoNCE's q k^T block)."""
    check_cross(cross, z.shape[0])
    acc = accumulation_dtype(z)
    zz = z.detach().to(acc)
    n = zz.shape[0]
    masks = (self_col, pos_col) if exclude_pos else (self_col,)
    m = zz.new_full((n,), float("-inf"))
    s = zz.new_zeros(n)
    w = zz.new_zeros(n) if weighted else None
    for i0, i1, j0, j1 in _gram_tiles(n, GRAM_BLOCK, cross):
        x = torch.mm(zz[i0:i1], zz[j0:j1].T).mul_(scale)
        _zero_masked_tile(x, i0, i1, j0, j1, masks, float("-inf"))
        _mask_same_side(x, i0, i1, j0, j1, cross, float("-inf"))
        _merge_lse_(m[i0:i1], s[i0:i1], None if w is None else w[i0:i1], x, 1)
        if j0 != i0:
            _merge_lse_(m[j0:j1], s[j0:j1], None if w is None else w[j0:j1], x, 0)
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = s.log().add_(safe)  # a row with every column masked: log 0 = -inf
    if not weighted:
        return lse, zz.new_empty(0)
    return lse, torch.where(s > 0, w / s, torch.zeros_like(s))


def torch_gram_lse_backward(z, self_col, pos_col, scale, exclude_pos, lse, g, cross=0):
    """dz = scale (G + G^T) z, G_ij = g_i P_ij: tile (I, J) recomputed once, its symmetric
    H_IJ = G_IJ + (G_JI)^T (g_i P_ij + g_j P_ji) giving dz_I += H_IJ z_J and, for I < J,
    dz_J += H_IJ^T z_I. cross as in the forward."""
    check_cross(cross, z.shape[0])
    acc = accumulation_dtype(z)
    zz = z.detach().to(acc)
    n = zz.shape[0]
    masks = (self_col, pos_col) if exclude_pos else (self_col,)
    lse, g = lse.to(acc), g.to(acc)
    dz = torch.zeros_like(zz)
    for i0, i1, j0, j1 in _gram_tiles(n, GRAM_BLOCK, cross):
        x = torch.mm(zz[i0:i1], zz[j0:j1].T).mul_(scale)
        h = (x - lse[i0:i1, None]).exp_().mul_(g[i0:i1, None])
        if j0 == i0:
            h = h + h.T
        else:
            h.add_((x - lse[None, j0:j1]).exp_().mul_(g[None, j0:j1]))
        # masked entries (and only they: a row of only masked columns has lse -inf) may be
        # inf or NaN here; zeroed after the exps
        _zero_masked_tile(h, i0, i1, j0, j1, masks)
        _mask_same_side(h, i0, i1, j0, j1, cross, 0.0)
        dz[i0:i1].addmm_(h, zz[j0:j1])
        if j0 != i0:
            dz[j0:j1].addmm_(h.T, zz[i0:i1])
    return dz.mul_(scale).to(z.dtype)


class TorchContrastive:
    """The family's interface (fastssl/backends/interfaces.py), same-pass methods included."""
    lse_forward = staticmethod(torch_lse_forward)
    lse_backward = staticmethod(torch_lse_backward)
    sce_forward = staticmethod(torch_sce_forward)
    sce_backward = staticmethod(torch_sce_backward)
    lse_sum_forward = staticmethod(torch_lse_sum_forward)
    sce_grad_forward = staticmethod(torch_sce_grad_forward)
    gram_lse_forward = staticmethod(torch_gram_lse_forward)
    gram_lse_backward = staticmethod(torch_gram_lse_backward)
