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
* ``fastssl::contrastive_lse_sym(z, self_col, pos_col, scale, exclude_pos, weighted, backend,
  cross=0) -> (lse, wmean)``: the same with a = b = z and symmetric masks (single-process
  NT-Xent and SogCLR), whose backward needs one pass instead of two; with cross > 0 only the
  pairs across row `cross` are entries (single-process symmetric InfoNCE, z = [q; k]).
* ``fastssl::sce_stats(q, k, cols, self_col, scale_s, scale_t, backend) -> (lse_s, lse_t,
  wmean)``: student X = scale_s * q @ cols.T, teacher Y = scale_t * k @ cols.T with
  (i, self_col[i]) masked in Y only; lse_s, lse_t the row log-sum-exps, wmean[i] = sum_j
  softmax(Y)_ij X_ij. Gradient for q only (k and the columns are constants of SCE).

Backends (``TABLE``, each the family's interface, fastssl/backends/interfaces.py): "triton"
(``fastssl.kernels.contrastive``, CUDA or the CPU interpreter), "torch" (chunked PyTorch,
fastssl/backends/torch/contrastive.py: blocks of rows against all columns, never the full M x C
matrix; serves float64), "cpp" (the torch entry's arithmetic in C++, csrc/contrastive_cpu.cpp,
through fastssl/backends/ext/contrastive.py). On CPU, auto picks "cpp" when fastssl._C is
built, else "torch". The "cpp" and "torch" entries also have the symmetric tile schedule
(``gram_lse_forward`` / ``gram_lse_backward``, issue 25) that ``contrastive_lse_sym`` uses.
The reference is not a backend here: the public losses choose it
(``fastssl._backend.public_loss``).

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
from fastssl.backends import LazyBackend
from fastssl.backends.torch.contrastive import TorchContrastive

# ----------------------------------------------------------------------------------------------
# Backend table (docs/design.md): name -> the family's interface (fastssl/backends/interfaces.py)
# ----------------------------------------------------------------------------------------------

_KERNEL_METHODS = ("lse_forward", "lse_backward", "sce_forward", "sce_backward")
_SAME_PASS_METHODS = ("lse_sum_forward", "sce_grad_forward")
_GRAM_METHODS = ("gram_lse_forward", "gram_lse_backward")

TABLE = {
    "triton": LazyBackend("fastssl.kernels.contrastive", "TritonContrastive",
                          _KERNEL_METHODS + _GRAM_METHODS),
    "cpp": LazyBackend("fastssl.backends.ext.contrastive", "CppContrastive",
                       _KERNEL_METHODS + _SAME_PASS_METHODS + _GRAM_METHODS),
    "torch": TorchContrastive,
}


def backend_for(op: str, device: torch.device) -> str:
    """The backend that serves `op` on `device` under the current setting (the dispatch point)."""
    return choose(op, device, TABLE, family="contrastive")


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
    outs = TABLE[backend].lse_forward(a, b, self_col, pos_col, scale, split, exclude_pos,
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
    da, db = TABLE[backend].lse_backward(a, b, self_col, pos_col, scale, split, exclude_pos,
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


# Backends whose table entry has the same-pass methods (`lse_sum_forward`, `sce_grad_forward`).
# The Triton kernels stream the backward instead (a second pass; dB from every row block would
# need atomics).
SAME_PASS_BACKENDS = tuple(n for n, impl in TABLE.items() if hasattr(impl, "lse_sum_forward"))


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
    # In place when this graph is not kept (no retain_graph / create_graph): the saved
    # gradients are freed after this call, and two scaled copies were a quarter of
    # non-symmetric InfoNCE's peak at B = 2048 (issue 25). The op's da / db outputs are these
    # tensors: read them before backward() (the losses discard them).
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    # eager tensors only: a traced backward (aot / compile: fake or functional tensor
    # subclasses) must stay free of mutation
    in_place = (keep_graph is not None and not torch.is_grad_enabled() and not keep_graph()
                and type(da) is torch.Tensor and type(db) is torch.Tensor
                and not torch.compiler.is_compiling())
    scaled = (lambda t: t.mul_(g_total)) if in_place else (lambda t: t * g_total)
    ga = scaled(da).to(a_dtype) if need_da else None
    gb = scaled(db).to(b_dtype) if need_db else None
    return ga, gb, None, None, None, None, None, None, None, None


contrastive_lse_sum.register_autograd(_lse_sum_backward, setup_context=_lse_sum_setup_context)


def has_gram(backend: str) -> bool:
    """Whether `backend`'s entry has the symmetric tile schedule (gram_lse_forward / _backward,
    issue 25): contrastive_lse_sym then forms only the upper-triangle tiles of z z^T (two full
    products for forward and backward where the row-block path takes three)."""
    return hasattr(TABLE[backend], "gram_lse_forward")


# Rows (2N) from which the losses take the symmetric schedule for NT-Xent and DCL. Below, one or
# two tiles hold the whole product (no work saved), and the same-pass / split ops keep eager's
# float32 accuracy at tiny sizes (tests/losses/test_float32_accuracy.py): they read each row's
# term at the positive, where lse - pos rounds at the logits' magnitude.
GRAM_MIN_ROWS = 512


def use_gram(backend: str, rows: int) -> bool:
    """Whether a loss over `rows` symmetric rows takes the symmetric schedule on `backend`."""
    return has_gram(backend) and rows >= GRAM_MIN_ROWS


@torch.library.custom_op("fastssl::contrastive_lse_sym", mutates_args=())
@entry("contrastive_lse_sym", **_SYM_SPEC)
def contrastive_lse_sym(z: torch.Tensor, self_col: torch.Tensor, pos_col: torch.Tensor,
                        scale: float, exclude_pos: bool, weighted: bool, backend: str,
                        cross: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """contrastive_lse with b = a = z and symmetric masks (self_col[i] = i, and pos_col[j] = i
    whenever pos_col[i] = j): lse and wmean of every row of the symmetric X = scale z z.T.

    cross > 0 (entries with the symmetric schedule only): only the pairs across row `cross`
    are entries. With z = [q; k] and cross = B, lse[:B] are the row log-sum-exps of
    scale q k^T and lse[B:] its column ones (symmetric InfoNCE), from the q k^T tiles alone.

    Entries with the symmetric schedule (``has_gram``) form each upper-triangle tile once for
    its rows and its transpose, in the forward and in the backward. Otherwise the backward is
    ONE row-parallel pass: by symmetry, the column gradient of X is the row
    gradient with the roles of (lse_i, g_i) and (lse_j, g_j) swapped, so
    dz_i = scale * sum_j (g_i P_ij + g_j P_ji) z_j, the column statistics being the row ones.
    """
    if has_gram(backend):
        lse, wmean = TABLE[backend].gram_lse_forward(z, self_col, pos_col, scale, exclude_pos,
                                                     weighted, cross)
    else:
        _cross_needs_gram(cross, backend)
        lse, _, wmean, _ = TABLE[backend].lse_forward(z, z, self_col, pos_col, scale,
                                                      z.shape[0], exclude_pos, weighted, False)
    dt = _stats_dtype(z)
    return lse.to(dt).contiguous(), wmean.to(dt).contiguous()


def _cross_needs_gram(cross: int, backend: str) -> None:
    if cross:
        raise RuntimeError(f"fastssl::contrastive_lse_sym: cross={cross} needs the symmetric "
                           f"schedule, which backend {backend!r} does not have")


@contrastive_lse_sym.register_fake
@entry("contrastive_lse_sym", **_SYM_SPEC)
def _(z, self_col, pos_col, scale, exclude_pos, weighted, backend, cross=0):
    dt = _stats_dtype(z)
    return z.new_empty(z.shape[0], dtype=dt), z.new_empty(z.shape[0] if weighted else 0, dtype=dt)


@torch.library.custom_op("fastssl::contrastive_lse_sym_backward", mutates_args=())
@entry("contrastive_lse_sym_backward", **_SYM_BWD_SPEC)
def contrastive_lse_sym_backward(z: torch.Tensor, self_col: torch.Tensor, pos_col: torch.Tensor,
                                 scale: float, exclude_pos: bool, lse: torch.Tensor,
                                 g: torch.Tensor, backend: str, cross: int = 0) -> torch.Tensor:
    if has_gram(backend):
        dz = TABLE[backend].gram_lse_backward(z, self_col, pos_col, scale, exclude_pos, lse, g,
                                              cross)
    else:
        _cross_needs_gram(cross, backend)
        empty = lse[:0]
        dz, _ = TABLE[backend].lse_backward(z, z, self_col, pos_col, scale, z.shape[0],
                                            exclude_pos, lse, empty, lse, g, empty, g,
                                            need_da=True, need_db=False)
    return dz.to(z.dtype).contiguous()


@contrastive_lse_sym_backward.register_fake
@entry("contrastive_lse_sym_backward", **_SYM_BWD_SPEC)
def _(z, self_col, pos_col, scale, exclude_pos, lse, g, backend, cross=0):
    return torch.empty_like(z)


def _lse_sym_setup_context(ctx, inputs, output):
    z, self_col, pos_col, scale, exclude_pos, _weighted, backend, cross = inputs
    ctx.save_for_backward(z, self_col, pos_col, output[0])
    ctx.args = (scale, exclude_pos, backend, cross)


def _lse_sym_backward(ctx, g, _g_wmean):
    z, self_col, pos_col, lse = ctx.saved_tensors
    scale, exclude_pos, backend, cross = ctx.args
    dz = contrastive_lse_sym_backward(z, self_col, pos_col, scale, exclude_pos, lse,
                                      _zeros_if_none(g, lse), backend, cross)
    return dz, None, None, None, None, None, None, None


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
        outs = (*TABLE[backend].sce_forward(q, k, cols, self_col, scale_s, scale_t),
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
    dq = TABLE[backend].sce_backward(q, k, cols, self_col, scale_s, scale_t, lse_s, lse_t,
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
