"""Contrastive ops: the streaming log-sum-exp statistics behind NT-Xent, InfoNCE, DCL, SogCLR
and SCE, as torch.library custom ops with autograd, and the backend table of the family.

Three ops (the losses in ``fastssl.functional.contrastive`` compose them with O(N) PyTorch):

* ``fastssl::contrastive_lse(a, b, self_col, pos_col, scale, split, exclude_pos, weighted,
  col_stats, backend) -> (lse0, lse1, wmean, col_lse)``. With X = scale * a @ b.T and the
  entries (i, self_col[i]) (and (i, pos_col[i]) when exclude_pos) masked out: lse0[i] =
  log-sum-exp of row i over the columns < split, lse1[i] over the columns >= split (empty when
  split >= C), wmean[i] = softmax-weighted mean of row i's logits over the same columns as lse0
  (empty unless weighted; no gradient), col_lse[j] = log-sum-exp of column j (empty unless
  col_stats).
* ``fastssl::contrastive_lse_sym(z, self_col, pos_col, scale, exclude_pos, weighted, backend)
  -> (lse, wmean)``: the same with a = b = z and symmetric masks (single-process NT-Xent and
  SogCLR), whose backward needs one pass instead of two.
* ``fastssl::sce_stats(q, k, cols, self_col, scale_s, scale_t, backend) -> (lse_s, lse_t,
  wmean)``: student X = scale_s * q @ cols.T, teacher Y = scale_t * k @ cols.T with
  (i, self_col[i]) masked in Y only; lse_s, lse_t the row log-sum-exps, wmean[i] = sum_j
  softmax(Y)_ij X_ij. Gradient for q only (k and the columns are constants of SCE).

Backends: "triton" (``fastssl.kernels.contrastive``, CUDA or the CPU interpreter), "torch" (a
chunked PyTorch path: blocks of rows against all columns, never the full M x C matrix; serves
float64), "cpp" (the torch entry with its same-pass ops in C++, csrc/contrastive_cpu.cpp),
"reference" (the losses of ``fastssl.reference``, full matrices). On CPU, auto picks "cpp"
when fastssl._C is built, else "torch".

Same pass (issue 18). Where a loss is a plain sum of row log-sum-exps (NT-Xent, InfoNCE) or
weights SCE's per-row statistics, the "cpp" and "torch" entries make the gradient in the
forward: ``fastssl::contrastive_lse_sum`` and ``sce_stats(..., same_pass=True)``, three (SCE:
four) products like eager autograd, where the recompute ops take four (five).
"""
from __future__ import annotations

import torch

from fastssl._backend import choose
from fastssl._validation import accumulation_dtype
from fastssl.ops._entry import entry
from fastssl.reference import contrastive as _reference

# Rows per chunk of the torch path. A bounded number of large chunks: every chunk costs a dozen ATen calls,
# each a parallel region whose barrier is what collapses when other processes share the cores
# (issue 18 measured the old fixed 4M-element chunks at 0.4-0.6x of eager under load). A chunk
# is about 1/CHUNKS_PER_MATRIX of the M x C logits (so the working set stays under 1/8 of
# eager's, which holds several full matrices: measured 0.11 at nt_xent N = 4096 with 32, 0.15
# with 16), at least MIN_CHUNK_ELEMENTS (small problems:
# one or a few chunks) and at most CHUNK_ELEMENTS.
CHUNK_ELEMENTS = 1 << 24
MIN_CHUNK_ELEMENTS = 1 << 18  # 1 MiB of float32: symmetric InfoNCE at B = 2048 peaks at 0.09 of eager (0.14 with 2 MiB)
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


# ----------------------------------------------------------------------------------------------
# torch backend: chunked PyTorch
# ----------------------------------------------------------------------------------------------

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
        g = _fill_masked(y.exp_(), r0, r1, self_col, pos_col, exclude_pos, 0.0)  # all-masked rows: NaN -> 0
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
        lse_t[r0:r1] = torch.where(has_probe[r0:r1], (y.gather(1, at) - ly.gather(1, at)).squeeze(1),
                                   float("-inf"))
        p_t = _fill_masked(ly.exp_(), r0, r1, self_col, None, False, 0.0)  # all-masked rows: NaN -> 0
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
# Backend table (one per family: every op and loss of the family dispatches through it)
# ----------------------------------------------------------------------------------------------

class _TorchKernels:
    lse_forward = staticmethod(torch_lse_forward)
    lse_sum_forward = staticmethod(torch_lse_sum_forward)
    lse_backward = staticmethod(torch_lse_backward)
    sce_forward = staticmethod(torch_sce_forward)
    sce_grad_forward = staticmethod(torch_sce_grad_forward)
    sce_backward = staticmethod(torch_sce_backward)


class _CppKernels(_TorchKernels):
    """The torch entry's arithmetic in C++ (csrc/contrastive_cpu.cpp): the row blocks spread
    over the threads in one parallel region per call instead of a Python loop of parallel ATen
    calls (whose barriers stall when other processes share the cores). SCE's recompute pair
    (sce_forward / sce_backward, used only without a gradient) stays the torch entry's."""

    @staticmethod
    def lse_forward(a, b, self_col, pos_col, scale, split, exclude_pos, weighted, col_stats):
        from fastssl import _C
        return tuple(_C.contrastive_lse_forward_cpu(a, b, self_col, pos_col, float(scale),
                                                    int(split), bool(exclude_pos),
                                                    bool(weighted), bool(col_stats)))

    @staticmethod
    def lse_backward(a, b, self_col, pos_col, scale, split, exclude_pos, lse0, lse1, col_lse,
                     g0, g1, g_col, need_da=True, need_db=True):
        from fastssl import _C
        da, db = _C.contrastive_lse_backward_cpu(a, b, self_col, pos_col, float(scale),
                                                 int(split), bool(exclude_pos), lse0, lse1,
                                                 col_lse, g0, g1, g_col, bool(need_da),
                                                 bool(need_db))
        return (da.to(a.dtype) if need_da else None), (db.to(b.dtype) if need_db else None)

    @staticmethod
    def lse_sum_forward(a, b, self_col, pos_col, scale, exclude_pos, subtract_pos, need_da,
                        need_db):
        from fastssl import _C
        out = tuple(_C.contrastive_lse_sum_cpu(a, b, self_col, pos_col, float(scale),
                                               bool(exclude_pos), bool(subtract_pos),
                                               bool(need_da), bool(need_db)))
        # an extension built before the per-row cross-entropy output: lse - pos instead
        return out if len(out) == 5 else out + (out[0].new_empty(0),)

    @staticmethod
    def sce_grad_forward(q, k, cols, self_col, scale_s, scale_t):
        from fastssl import _C
        return tuple(_C.sce_grad_cpu(q, k, cols, self_col, float(scale_s), float(scale_t)))


class _TritonKernels:
    """Loads fastssl.kernels.contrastive (and so triton) only when the triton backend runs."""

    def __getattr__(self, name):
        from fastssl.kernels import contrastive as kernels
        return getattr(kernels, name)


class _ReferenceLosses:
    nt_xent = staticmethod(_reference.nt_xent)
    info_nce = staticmethod(_reference.info_nce)
    dcl = staticmethod(_reference.dcl)
    dclw = staticmethod(_reference.dclw)
    sogclr = staticmethod(_reference.sogclr)
    sce = staticmethod(_reference.sce)


TABLE = {"triton": _TritonKernels(), "cpp": _CppKernels, "torch": _TorchKernels,
         "reference": _ReferenceLosses}


def backend_for(op: str, device: torch.device) -> str:
    """The backend that serves `op` on `device` under the current setting (the dispatch point)."""
    return choose(op, device, TABLE, family="contrastive")


def _kernels(backend: str):
    if backend not in ("triton", "cpp", "torch"):
        raise RuntimeError(f"fastssl contrastive ops: backend {backend!r} has no kernels "
                           f"(expected 'triton', 'cpp' or 'torch')")
    return TABLE[backend]


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------

# The entry check of each op (fastssl/ops/_entry.py): ranks of the tensor arguments and the
# backends that serve it; devices are checked for every tensor argument.
_KERNEL_BACKENDS = ("triton", "cpp", "torch")
_MASKS = {"self_col": 1, "pos_col": 1}
_LSE_SPEC = dict(ranks={"a": 2, "b": 2, **_MASKS}, backends=_KERNEL_BACKENDS)
_LSE_BWD_SPEC = dict(ranks={"a": 2, "b": 2, **_MASKS, **{n: 1 for n in (
    "lse0", "lse1", "col_lse", "g0", "g1", "g_col")}}, backends=_KERNEL_BACKENDS)
_LSE_SUM_SPEC = dict(ranks={"a": 2, "b": 2, **_MASKS}, backends=("cpp", "torch"))
_SYM_SPEC = dict(ranks={"z": 2, **_MASKS}, backends=_KERNEL_BACKENDS)
_SYM_BWD_SPEC = dict(ranks={"z": 2, **_MASKS, "lse": 1, "g": 1}, backends=_KERNEL_BACKENDS)
_SCE_SPEC = dict(ranks={"q": 2, "k": 2, "cols": 2, "self_col": 1}, backends=_KERNEL_BACKENDS)
_SCE_BWD_SPEC = dict(ranks={"q": 2, "k": 2, "cols": 2, "self_col": 1, "lse_s": 1, "lse_t": 1,
                            "g_lse": 1, "g_w": 1}, backends=_KERNEL_BACKENDS)


def _stats_dtype(a: torch.Tensor) -> torch.dtype:
    return accumulation_dtype(a)


@torch.library.custom_op("fastssl::contrastive_lse", mutates_args=())
@entry("contrastive_lse", **_LSE_SPEC)
def contrastive_lse(a: torch.Tensor, b: torch.Tensor, self_col: torch.Tensor,
                    pos_col: torch.Tensor, scale: float, split: int, exclude_pos: bool,
                    weighted: bool, col_stats: bool, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    outs = _kernels(backend).lse_forward(a, b, self_col, pos_col, scale, split, exclude_pos,
                                         weighted, col_stats)
    dt = _stats_dtype(a)
    return tuple(o.to(dt).contiguous() for o in outs)


@contrastive_lse.register_fake
@entry("contrastive_lse", **_LSE_SPEC)
def _(a, b, self_col, pos_col, scale, split, exclude_pos, weighted, col_stats, backend):
    m, c = a.shape[0], b.shape[0]
    dt = _stats_dtype(a)
    return (a.new_empty(m, dtype=dt), a.new_empty(m if split < c else 0, dtype=dt),
            a.new_empty(m if weighted else 0, dtype=dt),
            a.new_empty(c if col_stats else 0, dtype=dt))


@torch.library.custom_op("fastssl::contrastive_lse_backward", mutates_args=())
@entry("contrastive_lse_backward", **_LSE_BWD_SPEC)
def contrastive_lse_backward(a: torch.Tensor, b: torch.Tensor, self_col: torch.Tensor,
                             pos_col: torch.Tensor, scale: float, split: int, exclude_pos: bool,
                             lse0: torch.Tensor, lse1: torch.Tensor, col_lse: torch.Tensor,
                             g0: torch.Tensor, g1: torch.Tensor, g_col: torch.Tensor,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    da, db = _kernels(backend).lse_backward(a, b, self_col, pos_col, scale, split, exclude_pos,
                                            lse0, lse1, col_lse, g0, g1, g_col)
    return da.to(a.dtype).contiguous(), db.to(b.dtype).contiguous()


@contrastive_lse_backward.register_fake
@entry("contrastive_lse_backward", **_LSE_BWD_SPEC)
def _(a, b, self_col, pos_col, scale, split, exclude_pos, lse0, lse1, col_lse, g0, g1, g_col,
      backend):
    return torch.empty_like(a), torch.empty_like(b)


def _lse_setup_context(ctx, inputs, output):
    a, b, self_col, pos_col, scale, split, exclude_pos, _weighted, _col, backend = inputs
    lse0, lse1, _wmean, col_lse = output
    ctx.save_for_backward(a, b, self_col, pos_col, lse0, lse1, col_lse)
    ctx.args = (scale, split, exclude_pos, backend)


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _lse_backward(ctx, g0, g1, _g_wmean, g_col):
    # wmean carries no gradient by contract (SogCLR uses it as a detached value).
    a, b, self_col, pos_col, lse0, lse1, col_lse = ctx.saved_tensors
    scale, split, exclude_pos, backend = ctx.args
    da, db = contrastive_lse_backward(
        a, b, self_col, pos_col, scale, split, exclude_pos, lse0, lse1, col_lse,
        _zeros_if_none(g0, lse0), _zeros_if_none(g1, lse1), _zeros_if_none(g_col, col_lse),
        backend)
    return da, db, None, None, None, None, None, None, None, None


contrastive_lse.register_autograd(_lse_backward, setup_context=_lse_setup_context)


# Backends whose table entry has `lse_sum_forward` (the same-pass gradient). The Triton kernels
# stream the backward instead (a second pass; dB from every row block would need atomics).
SAME_PASS_BACKENDS = ("cpp", "torch")


def has_same_pass(backend: str) -> bool:
    """Whether `backend` serves contrastive_lse_sum (the losses then use it instead of
    contrastive_lse / contrastive_lse_sym for a plain sum of row log-sum-exps)."""
    return backend in SAME_PASS_BACKENDS


@torch.library.custom_op("fastssl::contrastive_lse_sum", mutates_args=())
@entry("contrastive_lse_sum", **_LSE_SUM_SPEC)
def contrastive_lse_sum(a: torch.Tensor, b: torch.Tensor, self_col: torch.Tensor,
                        pos_col: torch.Tensor, scale: float, exclude_pos: bool,
                        subtract_pos: bool, need_da: bool, need_db: bool, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, lse, da, db): total = sum_i lse_i, with lse as contrastive_lse's lse0 over all
    columns, minus sum_i X[i, pos_col[i]] when subtract_pos (the summed cross-entropy of each
    row against its positive column; rows with pos_col -1 have no positive term), and the
    gradients of total in a and b computed in the same pass (empty when need_da / need_db is
    False). Only total carries a gradient: its backward scales da and db by the incoming
    gradient (no recompute). Passing the same tensor as a and b gives the symmetric case
    (NT-Xent): autograd adds the two gradients."""
    if not has_same_pass(backend):
        raise RuntimeError(f"fastssl::contrastive_lse_sum: backend {backend!r} has no same-pass "
                           f"kernels (expected one of {SAME_PASS_BACKENDS})")
    lse, pos, da, db, ce = TABLE[backend].lse_sum_forward(a, b, self_col, pos_col, scale,
                                                          exclude_pos, subtract_pos, need_da,
                                                          need_db)
    # per-row terms first (the kernel's -log_softmax at the positive where it gives one), then
    # one float64 sum: lse.sum() - pos.sum() subtracts two sums of the logits' magnitude and
    # loses their digits (float32: ~1e-6 of the loss at 2N = 64)
    if subtract_pos:
        terms = lse - pos
        if ce.numel() == lse.numel():
            # ce is +inf where a mask hides the positive itself (then lse - pos is the term)
            terms = torch.where(torch.isfinite(ce), ce, terms)
    else:
        terms = lse
    total = terms.sum(dtype=torch.float64) if terms.dtype == torch.float32 else terms.sum()
    dt = _stats_dtype(a)
    return total.to(dt), lse.to(dt).contiguous(), da.to(dt).contiguous(), db.to(dt).contiguous()


@contrastive_lse_sum.register_fake
@entry("contrastive_lse_sum", **_LSE_SUM_SPEC)
def _(a, b, self_col, pos_col, scale, exclude_pos, subtract_pos, need_da, need_db, backend):
    dt = _stats_dtype(a)
    return (a.new_empty((), dtype=dt), a.new_empty(a.shape[0], dtype=dt),
            a.new_empty((a.shape[0], a.shape[1]) if need_da else (0,), dtype=dt),
            a.new_empty((b.shape[0], b.shape[1]) if need_db else (0,), dtype=dt))


def _lse_sum_setup_context(ctx, inputs, output):
    a, b, _self_col, _pos_col, _scale, _exclude_pos, _sub, need_da, need_db, _backend = inputs
    _total, lse, da, db = output
    ctx.mark_non_differentiable(lse, da, db)
    ctx.save_for_backward(da, db)
    ctx.args = (need_da, need_db, a.dtype, b.dtype)


def _lse_sum_backward(ctx, g_total, _g_lse, _g_da, _g_db):
    da, db = ctx.saved_tensors
    need_da, need_db, a_dtype, b_dtype = ctx.args
    if (ctx.needs_input_grad[0] and not need_da) or (ctx.needs_input_grad[1] and not need_db):
        raise RuntimeError("fastssl::contrastive_lse_sum: a gradient was asked for an input "
                           "whose need_da / need_db was False in the forward")
    ga = (da * g_total).to(a_dtype) if need_da else None
    gb = (db * g_total).to(b_dtype) if need_db else None
    return ga, gb, None, None, None, None, None, None, None, None


contrastive_lse_sum.register_autograd(_lse_sum_backward, setup_context=_lse_sum_setup_context)


@torch.library.custom_op("fastssl::contrastive_lse_sym", mutates_args=())
@entry("contrastive_lse_sym", **_SYM_SPEC)
def contrastive_lse_sym(z: torch.Tensor, self_col: torch.Tensor, pos_col: torch.Tensor,
                        scale: float, exclude_pos: bool, weighted: bool, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """contrastive_lse with b = a = z and symmetric masks (self_col[i] = i, and pos_col[j] = i
    whenever pos_col[i] = j): lse and wmean of every row of the symmetric X = scale z z.T.

    Its backward is ONE row-parallel pass: by symmetry, the column gradient of X is the row
    gradient with the roles of (lse_i, g_i) and (lse_j, g_j) swapped, so
    dz_i = scale * sum_j (g_i P_ij + g_j P_ji) z_j, the column statistics being the row ones.
    """
    lse, _, wmean, _ = _kernels(backend).lse_forward(z, z, self_col, pos_col, scale, z.shape[0],
                                                     exclude_pos, weighted, False)
    dt = _stats_dtype(z)
    return lse.to(dt).contiguous(), wmean.to(dt).contiguous()


@contrastive_lse_sym.register_fake
@entry("contrastive_lse_sym", **_SYM_SPEC)
def _(z, self_col, pos_col, scale, exclude_pos, weighted, backend):
    dt = _stats_dtype(z)
    return z.new_empty(z.shape[0], dtype=dt), z.new_empty(z.shape[0] if weighted else 0, dtype=dt)


@torch.library.custom_op("fastssl::contrastive_lse_sym_backward", mutates_args=())
@entry("contrastive_lse_sym_backward", **_SYM_BWD_SPEC)
def contrastive_lse_sym_backward(z: torch.Tensor, self_col: torch.Tensor, pos_col: torch.Tensor,
                                 scale: float, exclude_pos: bool, lse: torch.Tensor,
                                 g: torch.Tensor, backend: str) -> torch.Tensor:
    empty = lse[:0]
    dz, _ = _kernels(backend).lse_backward(z, z, self_col, pos_col, scale, z.shape[0],
                                           exclude_pos, lse, empty, lse, g, empty, g,
                                           need_da=True, need_db=False)
    return dz.to(z.dtype).contiguous()


@contrastive_lse_sym_backward.register_fake
@entry("contrastive_lse_sym_backward", **_SYM_BWD_SPEC)
def _(z, self_col, pos_col, scale, exclude_pos, lse, g, backend):
    return torch.empty_like(z)


def _lse_sym_setup_context(ctx, inputs, output):
    z, self_col, pos_col, scale, exclude_pos, _weighted, backend = inputs
    ctx.save_for_backward(z, self_col, pos_col, output[0])
    ctx.args = (scale, exclude_pos, backend)


def _lse_sym_backward(ctx, g, _g_wmean):
    z, self_col, pos_col, lse = ctx.saved_tensors
    scale, exclude_pos, backend = ctx.args
    dz = contrastive_lse_sym_backward(z, self_col, pos_col, scale, exclude_pos, lse,
                                      _zeros_if_none(g, lse), backend)
    return dz, None, None, None, None, None, None


contrastive_lse_sym.register_autograd(_lse_sym_backward, setup_context=_lse_sym_setup_context)


@torch.library.custom_op("fastssl::sce_stats", mutates_args=())
@entry("sce_stats", **_SCE_SPEC)
def sce_stats(q: torch.Tensor, k: torch.Tensor, cols: torch.Tensor, self_col: torch.Tensor,
              scale_s: float, scale_t: float, same_pass: bool, backend: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse_s, lse_t, wmean, u_s, u_t). With same_pass (backends in SAME_PASS_BACKENDS), u_s and
    u_t are the per-row gradients in q of lse_s and wmean, made in this pass (the backward
    only weights them); otherwise they are empty and the backward recomputes."""
    dt = _stats_dtype(q)
    if same_pass:
        if not has_same_pass(backend):
            raise RuntimeError(f"fastssl::sce_stats: same_pass=True, but backend {backend!r} has "
                               f"no same-pass kernels (expected one of {SAME_PASS_BACKENDS})")
        outs = TABLE[backend].sce_grad_forward(q, k, cols, self_col, scale_s, scale_t)
    else:
        outs = (*_kernels(backend).sce_forward(q, k, cols, self_col, scale_s, scale_t),
                q.new_empty(0, dtype=dt), q.new_empty(0, dtype=dt))  # two tensors: no aliasing
    return tuple(o.to(dt).contiguous() for o in outs)


@sce_stats.register_fake
@entry("sce_stats", **_SCE_SPEC)
def _(q, k, cols, self_col, scale_s, scale_t, same_pass, backend):
    dt = _stats_dtype(q)
    m = q.shape[0]
    unit = (m, q.shape[1]) if same_pass else (0,)
    return (q.new_empty(m, dtype=dt), q.new_empty(m, dtype=dt), q.new_empty(m, dtype=dt),
            q.new_empty(unit, dtype=dt), q.new_empty(unit, dtype=dt))


@torch.library.custom_op("fastssl::sce_stats_backward", mutates_args=())
@entry("sce_stats_backward", **_SCE_BWD_SPEC)
def sce_stats_backward(q: torch.Tensor, k: torch.Tensor, cols: torch.Tensor,
                       self_col: torch.Tensor, scale_s: float, scale_t: float,
                       lse_s: torch.Tensor, lse_t: torch.Tensor, g_lse: torch.Tensor,
                       g_w: torch.Tensor, backend: str) -> torch.Tensor:
    dq = _kernels(backend).sce_backward(q, k, cols, self_col, scale_s, scale_t, lse_s, lse_t,
                                        g_lse, g_w)
    return dq.to(q.dtype).contiguous()


@sce_stats_backward.register_fake
@entry("sce_stats_backward", **_SCE_BWD_SPEC)
def _(q, k, cols, self_col, scale_s, scale_t, lse_s, lse_t, g_lse, g_w, backend):
    return torch.empty_like(q)


def _sce_setup_context(ctx, inputs, output):
    q, k, cols, self_col, scale_s, scale_t, same_pass, backend = inputs
    lse_s, lse_t, _, u_s, u_t = output
    ctx.mark_non_differentiable(u_s, u_t)
    if same_pass:
        ctx.save_for_backward(u_s, u_t)
    else:
        ctx.save_for_backward(q, k, cols, self_col, lse_s, lse_t)
    ctx.args = (scale_s, scale_t, same_pass, backend, q.dtype)


def _sce_backward(ctx, g_lse, _g_lse_t, g_w, _g_u_s, _g_u_t):
    # The teacher's log-sum-exp depends only on k and the columns, which carry no gradient.
    scale_s, scale_t, same_pass, backend, q_dtype = ctx.args
    if same_pass:
        u_s, u_t = ctx.saved_tensors
        parts = [u * g[:, None] for u, g in ((u_s, g_lse), (u_t, g_w)) if g is not None]
        dq = sum(parts[1:], parts[0]) if parts else torch.zeros_like(u_s)
        return dq.to(q_dtype), None, None, None, None, None, None, None
    q, k, cols, self_col, lse_s, lse_t = ctx.saved_tensors
    dq = sce_stats_backward(q, k, cols, self_col, scale_s, scale_t, lse_s, lse_t,
                            _zeros_if_none(g_lse, lse_s), _zeros_if_none(g_w, lse_s), backend)
    return dq, None, None, None, None, None, None, None


sce_stats.register_autograd(_sce_backward, setup_context=_sce_setup_context)
