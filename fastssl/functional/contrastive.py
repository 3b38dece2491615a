"""Contrastive losses: NT-Xent, InfoNCE, DCL, SogCLR, SCE (docs/api.md signatures).

Each loss is a ``fastssl._backend.public_loss``: the decorator chooses the backend once (the
family table ``fastssl.ops.contrastive.TABLE``, or the reference, ``fastssl.reference``), and
the function below is the fused path, run with the chosen name: it validates its inputs (the
``check_*`` helpers, shared with ``fastssl.reference``), L2-normalises, gathers the columns
(``gather_distributed``), computes the O(N) statistics with the streaming ops (no N x N
matrix), composes the loss from them and ``reduce_loss``.

Layout shared by NT-Xent, DCL and SogCLR: the anchors are the local rows ``[z1; z2]`` (2B), the
columns the global ``[Z1; Z2]`` (2N); row i of z1 has its own column at ``off + i`` and its
positive at ``N + off + i``, and the other way round for z2 (``off`` = rank * B). In a single
process the columns are the rows and the masks are symmetric, so NT-Xent, DCL/DCLW and SogCLR
use the symmetric op (with the "cpp" and "torch" entries its upper-triangle tile schedule,
issue 25).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastssl import distributed as dist_utils
from fastssl._backend import public_loss
from fastssl._checks import (check_dcl, check_dclw, check_info_nce, check_nt_xent,
                             check_positive_weights, check_sce, check_sogclr)
from fastssl._validation import accumulation_dtype, row_norms
from fastssl.ops import contrastive as ops
from fastssl.reference import contrastive as _reference

# ----------------------------------------------------------------------------------------------
# Fused path helpers
# ----------------------------------------------------------------------------------------------


_NORM_EPS = 1e-12  # F.normalize's


class _NormalizeRows(torch.autograd.Function):
    """F.normalize(x, dim=1) (norms clamped at eps = 1e-12, as F.normalize) that keeps only its
    output (or its input) and the row norms for backward: dx = (dy - y <y, dy>) / |x| on rows
    whose norm is above eps, dy / eps on the others. F.normalize's autograd keeps x and builds
    its gradient from a division's and a norm's backward, several B x D temporaries more; at
    B = 2048, D = 128 they were most of the fused losses' peak memory (issue 18).

    save_input: keep x and recompute y = x / |x| (the same division: the same values) in the
    backward. For an op that does not keep its operands (the same-pass kernels keep only their
    gradients), y then lives only through the forward, while x is the caller's tensor, alive
    anyway (issue 25: 2 of non-symmetric InfoNCE's 8 MiB at B = 2048). An op that keeps y
    (the recompute and symmetric-schedule ops) wants y kept instead."""

    @staticmethod
    def forward(ctx, x, save_input=False):
        norm = row_norms(x).clamp_min_(_NORM_EPS)  # scaled: no overflow at |x| ~ 1e20
        y = x / norm
        ctx.save_for_backward(x if save_input else y, norm)
        ctx.save_input = save_input
        return y

    @staticmethod
    def backward(ctx, dy):
        saved, norm = ctx.saved_tensors
        y = saved / norm if ctx.save_input else saved
        # <y_i, dy_i> as a batched 1 x D @ D x 1 product (no B x D temporary), 0 where clamped
        proj = torch.bmm(y.unsqueeze(1), dy.unsqueeze(2)).squeeze(2)
        proj = proj.masked_fill_(norm <= _NORM_EPS, 0.0)
        return dy.addcmul(y, proj, value=-1.0).div_(norm), None


def _normalize(x: torch.Tensor, save_input: bool = False) -> torch.Tensor:
    """L2-normalise in the accumulation dtype, back to the input dtype (the kernels' operand);
    save_input as _NormalizeRows."""
    return _NormalizeRows.apply(x.to(accumulation_dtype(x)), save_input).to(x.dtype)


def _gather_layout(x: torch.Tensor, gather_distributed: bool):
    if gather_distributed and dist_utils.is_distributed():
        b = x.shape[0]
        return True, b * dist_utils.world_size(), dist_utils.row_offset(b)
    return False, x.shape[0], 0


def _sum_rows(x: torch.Tensor) -> torch.Tensor:
    """Sum of per-row loss terms, accumulated in float64 and returned in x's dtype: float32 sums
    of 2N terms lose digits with N and with the order of the rows (swapping the two views
    permutes them); this keeps the mean as accurate as eager's float32 cross-entropy."""
    if x.dtype == torch.float32:
        return x.sum(dtype=torch.float64).to(x.dtype)
    return x.sum()


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    acc = accumulation_dtype(a)
    return (a.to(acc) * b.to(acc)).sum(-1)


def _two_view_layout(z1, z2, gather_distributed, normalize=True):
    """Normalised anchors [z1; z2] (as given with normalize=False), gathered columns [Z1; Z2],
    own and positive columns."""
    dist_on, n, off = _gather_layout(z1, gather_distributed)
    b = z1.shape[0]
    # the concatenation normalised as one (row-wise, so the same values): the halves are views
    # of the one saved operand, not two more B x D tensors kept alive beside it
    rows = torch.cat([z1, z2], 0)
    if normalize:
        rows = _normalize(rows)
    h1, h2 = rows[:b], rows[b:]
    if dist_on:
        cols = torch.cat([dist_utils.gather(h1, name="z1"), dist_utils.gather(h2, name="z2")], 0)
    else:
        cols = rows
    ar = torch.arange(b, device=z1.device)
    self_col = torch.cat([off + ar, n + off + ar])
    pos_col = torch.cat([n + off + ar, off + ar])
    return rows, cols, self_col, pos_col, n


def _positive_logits(rows, scale=None):
    """<row i, its positive> for the anchors [h1; h2]: the positive is the other view of the
    same local sample, so both halves are one row-wise product of h1 and h2 (no [h2; h1] copy).
    With `scale`, the logits scale * <., .>, each anchor scaled before the product as the ops
    scale their operand (the anchor), so that they round as the op's logits of that anchor do
    (their difference is the loss) and swapping the views only swaps the halves."""
    b = rows.shape[0] // 2
    if scale is None:
        half = _rowdot(rows[:b], rows[b:])
        return torch.cat([half, half])
    scaled = rows.to(accumulation_dtype(rows)) * scale
    return torch.cat([_rowdot(scaled[:b], rows[b:]), _rowdot(scaled[b:], rows[:b])])


class _ScaleTap(torch.autograd.Function):
    """Identity on the operand `a` of a streaming op run at the float `scale`; its backward
    also returns the gradient of the op's logit scale, from the operand gradient the op's own
    backward already produced: with X = scale * a @ b.T, dL/da = scale * G @ b, so
    dL/dscale = sum(G * S) = <a, dL/da> / scale (O(B D), no N x N matrix; for the symmetric op,
    whose dz holds the row and the column term, half of that). On a rank of a gathered loss
    this is the rank's share (its rows' G)."""

    @staticmethod
    def forward(ctx, a, scale_t, scale, terms):
        ctx.save_for_backward(a)
        ctx.scale, ctx.terms = scale, terms
        ctx.scale_meta = (scale_t.dtype, scale_t.device)
        return a.view_as(a)

    @staticmethod
    def backward(ctx, da):
        (a,) = ctx.saved_tensors
        acc = accumulation_dtype(a)
        g = (a.to(acc) * da.to(acc)).sum() / (ctx.scale * ctx.terms)
        dtype, device = ctx.scale_meta
        return da, g.to(dtype=dtype, device=device), None, None


def _logit_scale(temperature, value: float):
    """(scale as a float for the ops, multiplier for the O(N) terms, tap for the op's operand).

    A float temperature: plain floats. A tensor temperature with gradient (a learnable
    temperature): the ops still run at the float value (their kernels take a float), the
    positive terms multiply by the tensor 1 / temperature, and the operand goes through
    `_ScaleTap`, which routes the op's share of d loss / d scale back to the tensor."""
    scale = 1.0 / value
    if isinstance(temperature, torch.Tensor) and temperature.requires_grad:
        scale_t = 1.0 / temperature

        def tap(a, terms=1):
            return _ScaleTap.apply(a, scale_t, scale, terms)
        return scale, scale_t, tap
    return scale, scale, (lambda a, terms=1: a)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

@public_loss("nt_xent", "contrastive", ops.TABLE, _reference.nt_xent)
def nt_xent(z1, z2, temperature=0.1, *, memory_bank=None, normalize=True,
            gather_distributed=False, backend):
    """SimCLR's NT-Xent (normalised temperature-scaled cross-entropy).

    The 2N anchors are the rows of z1 and z2 (L2-normalised inside); anchor i of z1 has one
    positive (row i of z2) and 2N-2 negatives (every other row of both views), and the other
    way round. loss = mean over anchors of -s(i, pos) + log sum_(j != i) exp s(i, j), with s
    the cosine similarity divided by `temperature`. Computed by a streaming log-sum-exp: no
    2N x 2N matrix is stored (forward or backward).

    Args:
        z1, z2: (B, D) raw embeddings of the two views (float32, bfloat16, float16 or float64;
            same shape, dtype and device).
        temperature: float > 0, or a 0-dim floating tensor (a learnable temperature,
            e.g. ``1 / logit_scale.exp()``: its gradient comes from the op's own backward,
            no N x N matrix; one host read of its value per call).
        memory_bank: optional (K, D) tensor of normalised keys (lightly's memory-bank form,
            ``NTXentLoss(memory_bank_size=K)`` keeps it): then the anchors are z1's rows
            only, anchor i's positive is row i of z2 and its negatives are the K bank rows
            (not the batch); loss = mean_i -s(i, pos) + log(exp s(i, pos) + sum_k exp s(i, k)).
            The bank carries no gradient; streamed as extra columns (no B x K matrix).
        normalize: bool. True (the default): z1 and z2 are L2-normalised inside. False: they
            are used as given (s = <z1_i, z2_j> / temperature; e.g. features a model has
            already normalised), which saves the normalisation and its backward.
        gather_distributed: bool. Across W > 1 ranks, the global batch (N = B * W) with
            the value and gradient promises of docs/api.md ("gather_distributed").

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs); gradients in the input dtype.

    Example::

        >>> z1, z2 = torch.randn(256, 128), torch.randn(256, 128)
        >>> loss = fastssl.functional.nt_xent(z1, z2, temperature=0.1)
    """
    t = check_nt_xent(z1, z2, temperature, gather_distributed, memory_bank, normalize)
    if memory_bank is not None:
        return _nt_xent_bank(z1, z2, temperature, t, memory_bank, gather_distributed, backend,
                             normalize)
    rows, cols, self_col, pos_col, n = _two_view_layout(z1, z2, gather_distributed, normalize)
    scale, scale_mul, tap = _logit_scale(temperature, t)
    sym = cols is rows and ops.use_gram(backend, rows.shape[0])
    if ops.has_same_pass(backend) and not sym:
        # the positive is column pos_col[i] of the logits: the op's cross-entropy sum (its
        # gradient P - onehot made in the same pass; a learnable temperature's through the tap)
        a = tap(rows, 2) if cols is rows else tap(rows)
        ce_sum = _cross_entropy_sum(a, a if cols is rows else cols, self_col, pos_col, scale,
                                    backend)
        return dist_utils.reduce_loss(ce_sum / (2 * n))
    if cols is rows:
        lse, _ = ops.contrastive_lse_sym(tap(rows, 2), self_col, pos_col, scale, False, False,
                                         backend)
        if sym:
            return dist_utils.reduce_loss(_sym_terms(lse, rows, scale_mul) / (2 * n))
    else:
        lse, _, _, _ = ops.contrastive_lse(tap(rows), cols, self_col, pos_col, scale,
                                           cols.shape[0], False, False, False, backend)
    pos = _positive_logits(rows) * scale_mul
    return dist_utils.reduce_loss(_sum_rows(lse - pos) / (2 * n))


_ROWDOT_BLOCK = 1024  # rows per float64 block of _HalvesDot64 (2 MiB of copies at D = 128)


class _HalvesDot64(torch.autograd.Function):
    """<h_i, h_{B+i}> of the two halves of rows = [h1; h2] (2B x D), in float64, formed over
    blocks of rows in both directions: no float64 copy of a half is kept or built whole, and the
    backward writes g_i h2_i and g_i h1_i straight into one 2B x D gradient (slicing rows in
    autograd would build a zero-filled 2B x D tensor per half). The positives of the symmetric
    schedule's losses; float64 copies and sliced gradients were half of symmetric InfoNCE's
    peak memory at B = 2048 (issue 25)."""

    @staticmethod
    def forward(ctx, rows):
        ctx.save_for_backward(rows)
        b = rows.shape[0] // 2
        out = rows.new_empty(b, dtype=torch.float64)
        for s in range(0, b, _ROWDOT_BLOCK):
            e = min(b, s + _ROWDOT_BLOCK)
            out[s:e] = (rows[s:e].to(torch.float64) * rows[b + s:b + e].to(torch.float64)).sum(-1)
        return out

    @staticmethod
    def backward(ctx, g):
        (rows,) = ctx.saved_tensors
        b = rows.shape[0] // 2
        grad = torch.empty_like(rows, memory_format=torch.contiguous_format)
        for s in range(0, b, _ROWDOT_BLOCK):
            e = min(b, s + _ROWDOT_BLOCK)
            gs = g[s:e, None]
            grad[s:e] = gs * rows[b + s:b + e].to(g.dtype)
            grad[b + s:b + e] = gs * rows[s:e].to(g.dtype)
        return grad


def _sym_terms(lse, rows, scale_mul, weigh=None):
    """sum_i lse_i - pos_i for the symmetric op's rows [h1; h2], pos_i = scale * <h_i, its
    positive> (weighted by `weigh`), in float64: the symmetric schedule returns lse, not the
    cross-entropy read at the positive, so the difference (small where the positive dominates,
    e.g. collinear views) is taken without a second rounding at the logits' magnitude."""
    half = _HalvesDot64.apply(rows)
    pos = torch.cat([half, half]) * scale_mul
    if weigh is not None:
        pos = weigh(pos)
    return (lse.to(torch.float64) - pos).sum().to(lse.dtype)


def _cross_entropy_sum(a, b, self_col, pos_col, scale, backend):
    """sum_i of the cross-entropy of row i of scale * a @ b.T (self_col masked) against its
    positive column pos_col[i], with its gradient from the same pass (ops.contrastive_lse_sum);
    a is b for the symmetric Z Z^T."""
    grad = torch.is_grad_enabled()
    total, _, _, _ = ops.contrastive_lse_sum(a, b, self_col, pos_col, scale, False, True,
                                             grad and a.requires_grad, grad and b.requires_grad,
                                             backend)
    return total


def _nt_xent_bank(z1, z2, temperature, t, memory_bank, gather_distributed, backend,
                  normalize=True):
    """lightly's memory-bank NT-Xent: z1's rows against [z2_i | bank], the bank as the op's
    columns (as SCE's queue), the per-row positive merged in by logaddexp."""
    _, n, _ = _gather_layout(z1, gather_distributed)
    h1, h2 = (_normalize(z1), _normalize(z2)) if normalize else (z1, z2)
    bank = memory_bank.detach().to(h1.dtype)
    scale, scale_mul, tap = _logit_scale(temperature, t)
    no_mask = torch.full((h1.shape[0],), -1, dtype=torch.long, device=h1.device)
    lse_bank, _, _, _ = ops.contrastive_lse(tap(h1), bank, no_mask, no_mask, scale,
                                            bank.shape[0], False, False, False, backend)
    # scaled before the product, as the op scales its operand: the positive and the bank
    # logits then round alike (all logits equal when the embeddings are collinear)
    pos = _rowdot(h1.to(accumulation_dtype(h1)) * scale_mul, h2)
    # logaddexp(lse, pos) - pos as softplus(lse - pos): no rounding at the logits' magnitude
    return dist_utils.reduce_loss(_sum_rows(F.softplus(lse_bank - pos)) / n)


@public_loss("info_nce", "contrastive", ops.TABLE, _reference.info_nce)
def info_nce(q, k, temperature=0.1, *, symmetric=False, normalize=True,
             gather_distributed=False, backend):
    """InfoNCE (MoCo v3 / CLIP): row i of q has its positive in row i of k.

    q and k are L2-normalised inside; loss = mean_i cross_entropy(q_i . k^T / temperature, i).
    With symmetric=True the k -> q direction is averaged in, both directions from ONE
    streaming pass over q @ k.T (row and column log-sum-exp together).

    Args:
        q, k: (B, D) raw query and key embeddings (float32, bfloat16, float16 or float64; same
            shape, dtype and device). Both receive gradients.
        temperature: float > 0, or a 0-dim floating tensor (a learnable temperature,
            e.g. ``1 / logit_scale.exp()``: its gradient comes from the op's own backward,
            no N x N matrix; one host read of its value per call).
        symmetric: bool, average the q -> k and k -> q losses.
        normalize: bool. True (the default): q and k are L2-normalised inside. False: they are
            used as given (open_clip's ClipLoss receives features its model has already
            normalised, with ``temperature = 1 / logit_scale``).
        gather_distributed: bool. Across W > 1 ranks, the global batch (N = B * W) with
            the value and gradient promises of docs/api.md ("gather_distributed").
            The keys (and, when symmetric, the queries) are gathered.

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.functional.info_nce(q, k, temperature=0.2, symmetric=True)
    """
    t = check_info_nce(q, k, temperature, symmetric, gather_distributed, normalize)
    dist_on, n, off = _gather_layout(q, gather_distributed)
    b = q.shape[0]
    labels = torch.arange(b, device=q.device) + off
    no_self = torch.full_like(labels, -1)
    scale, scale_mul, tap = _logit_scale(temperature, t)
    if symmetric and not dist_on and ops.use_gram(backend, 2 * b):
        # symmetric, one process: the symmetric schedule's cross mode over z = [q; k] forms
        # only the q k^T tiles, each giving its rows' (q -> k) and columns' (k -> q) statistics:
        # 1 product forward, 3 backward (two same-pass directions: 6). [q; k] is normalised as
        # one (row-wise: the same values), so no normalised q and k live beside z.
        z = torch.cat([q, k])
        z = _normalize(z) if normalize else z
        ar = torch.arange(b, device=q.device)
        lse, _ = ops.contrastive_lse_sym(tap(z, 2), torch.full((2 * b,), -1, dtype=torch.long,
                                                                device=q.device),
                                         torch.cat([ar + b, ar]), scale, False, False, backend,
                                         b)
        return _sym_terms(lse, z, scale_mul) / (2 * n)
    # the same-pass kernels keep only their gradients: qn and kn need not outlive the forward
    same_pass = ops.has_same_pass(backend) and not (symmetric and dist_on)
    qn, kn = (_normalize(q, same_pass), _normalize(k, same_pass)) if normalize else (q, k)
    k_all = dist_utils.gather(kn, name="k") if dist_on else kn
    if not symmetric and ops.has_same_pass(backend):
        # row i's positive is column labels[i] of the (gathered) keys
        ce_sum = _cross_entropy_sum(tap(qn), k_all, no_self, labels, scale, backend)
        return dist_utils.reduce_loss(ce_sum / n)
    if symmetric and not dist_on and ops.has_same_pass(backend):
        # symmetric, one process: each direction as the row cross-entropies of its own product
        # (q k^T, then k q^T), the per-row terms read from log_softmax at the positive as eager
        # cross-entropy does: float32 error at eager's (the one-pass forms take each term as
        # lse - pos, rounded at the logits' magnitude, about twice eager's error at these
        # sizes), for 6 products instead of 4; from GRAM_MIN_ROWS rows the symmetric schedule
        ce_qk = _cross_entropy_sum(tap(qn), kn, no_self, labels, scale, backend)
        ce_kq = _cross_entropy_sum(tap(kn), qn, no_self, labels, scale, backend)
        return 0.5 * (ce_qk + ce_kq) / n
    pos = _rowdot(qn, kn) * scale_mul
    # symmetric: one pass for the row and column statistics, one for both gradients (4
    # products; two same-pass calls would take 6)
    lse_row, _, _, col_lse = ops.contrastive_lse(tap(qn), k_all, no_self, labels, scale, n,
                                                 False, False, symmetric, backend)
    share = _sum_rows(lse_row - pos) / n
    if not symmetric:
        return dist_utils.reduce_loss(share)
    if dist_on:
        # col_lse covers only this rank's rows: merge the W partial log-sum-exps exactly. The
        # value uses the merged C; the gradient of each part is softmax over ranks times the
        # part's own gradient, so summed over ranks it is the gradient of C.
        parts = dist_utils.gather_no_grad(col_lse.detach().contiguous(), name="col_lse")
        merged = torch.logsumexp(parts.view(dist_utils.world_size(), n), dim=0)
        weight = torch.exp(col_lse.detach() - merged)
        carrier = (weight * (col_lse - col_lse.detach())).sum()
        col_share = carrier + _sum_rows(merged[off:off + b] - pos)
    else:
        col_share = _sum_rows(col_lse - pos)
    return dist_utils.reduce_loss(0.5 * (share + col_share / n))


def _weighted_positives(pos, rows, b, weight_fn):
    """pos (2B,) times weight_fn's weights: rows [h1; h2], direction z1 -> z2 then z2 -> z1."""
    if weight_fn is None:
        return pos
    h1, h2 = rows[:b], rows[b:]
    w = torch.cat([check_positive_weights(weight_fn(h1, h2), b, h1).expand(b),
                   check_positive_weights(weight_fn(h2, h1), b, h2).expand(b)])
    return pos * w.to(pos.dtype)


def _dcl_fused(z1, z2, temperature, t, weight_fn, gather_distributed, backend):
    rows, cols, self_col, pos_col, n = _two_view_layout(z1, z2, gather_distributed)
    scale, scale_mul, tap = _logit_scale(temperature, t)
    if cols is rows and ops.use_gram(backend, rows.shape[0]):
        # one process: the 2N-2 negatives of row i are its row of Z Z^T without the own and
        # the positive column, the symmetric schedule's exclude_pos (upper-triangle tiles)
        lse, _ = ops.contrastive_lse_sym(tap(rows, 2), self_col, pos_col, scale, True, False,
                                         backend)
        return dist_utils.reduce_loss(
            _sym_terms(lse, rows, scale_mul, lambda p: _weighted_positives(
                p, rows, z1.shape[0], weight_fn)) / (2 * n))
    # Columns [Z1 | Z2] split at N: one log-sum-exp per view (each without its masked column),
    # merged by logaddexp into the log-sum-exp over all 2N-2 negatives (no extra pass).
    lse_z1, lse_z2, _, _ = ops.contrastive_lse(tap(rows), cols, self_col, pos_col, scale, n,
                                               True, False, False, backend)
    pos = _weighted_positives(_positive_logits(rows, scale_mul), rows, z1.shape[0],
                              weight_fn)
    return dist_utils.reduce_loss(_sum_rows(torch.logaddexp(lse_z1, lse_z2) - pos) / (2 * n))


@public_loss("dcl", "contrastive", ops.TABLE, _reference.dcl)
def dcl(z1, z2, temperature=0.1, *, weight_fn=None, gather_distributed=False, backend):
    """Decoupled contrastive loss (DCL), as lightly's ``DCLLoss`` (>= 1.5.21) and the DCL
    paper (Yeh et al., ECCV 2022, Eq. 6).

    For each of the 2N anchors (every row of z1 and of z2, L2-normalised), with s the cosine
    similarity divided by `temperature`::

        loss_i = -w_i * s(i, positive) + log sum_{j in negatives(i)} exp s(i, j)

    where the positive of row i of z1 is row i of z2 (and the other way round) and the 2N-2
    negatives are every other row of both views (the positive is NOT in the denominator: the
    "decoupling"). Returns the mean over the 2N anchors.

    Args:
        z1, z2: (B, D) raw embeddings of the two views, float32/bfloat16/float16/float64, same
            shape, dtype and device. Normalised inside (callers never normalise).
        temperature: float > 0, or a 0-dim floating tensor (a learnable temperature,
            e.g. ``1 / logit_scale.exp()``: its gradient comes from the op's own backward,
            no N x N matrix; one host read of its value per call).
        weight_fn: optional callable ``(out0, out1) -> (B,)`` weights of the positive term,
            called on the normalised local rows once per direction (lightly's interface);
            None means weight 1. See :func:`dclw` for the von Mises-Fisher weighting.
        gather_distributed: bool. Across W > 1 ranks, the global batch (N = B * W) with
            the value and gradient promises of docs/api.md ("gather_distributed").

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs); gradients in the input dtype.

    Backends: triton, torch (streaming log-sum-exp, no N x N matrix), reference.

    Example::

        >>> z1, z2 = torch.randn(256, 128), torch.randn(256, 128)
        >>> loss = fastssl.functional.dcl(z1, z2, temperature=0.1)
    """
    t = check_dcl(z1, z2, temperature, weight_fn, gather_distributed)
    return _dcl_fused(z1, z2, temperature, t, weight_fn, gather_distributed, backend)


@public_loss("dclw", "contrastive", ops.TABLE, _reference.dclw)
def dclw(z1, z2, temperature=0.1, *, sigma=0.5, gather_distributed=False, backend):
    """Weighted decoupled contrastive loss, as lightly's ``DCLWLoss``: :func:`dcl` with the
    positive term of anchor i weighted by the von Mises-Fisher weight

        w_i = 2 - N * softmax_i(<ẑ1_i, ẑ2_i> / sigma)    (no gradient through w)

    over the N rows of the batch (ẑ the normalised rows), so that positives that are already
    close weigh less. Same fused statistics as :func:`dcl` (one extra O(N) softmax).

    Args:
        z1, z2: (B, D) raw embeddings of the two views (see :func:`dcl`).
        temperature: float > 0, or a 0-dim floating tensor (a learnable temperature,
            e.g. ``1 / logit_scale.exp()``: its gradient comes from the op's own backward,
            no N x N matrix; one host read of its value per call).
        sigma: float > 0, the vMF concentration's inverse (lightly's default 0.5).
        gather_distributed: bool (see :func:`dcl`). The softmax runs over the global batch,
            so the value equals the single-process value on the global batch (lightly's
            weight runs over each rank's local rows instead).

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.functional.dclw(z1, z2, temperature=0.1, sigma=0.5)
    """
    t = check_dclw(z1, z2, temperature, sigma, gather_distributed)

    def weight_fn(out0, out1):
        return _reference.vmf_weights(out0, out1, sigma, gather_distributed=gather_distributed)

    return _dcl_fused(z1, z2, temperature, t, weight_fn, gather_distributed, backend)


@public_loss("sogclr", "contrastive", ops.TABLE, _reference.sogclr)
def sogclr(z1, z2, index, u, *, gamma=0.9, temperature=0.1, gather_distributed=False,
           backend):
    """SogCLR (global contrastive loss with a per-sample moving-average estimator).

    Per anchor i (rows of z1 and z2, L2-normalised), the 2(N-1) negatives' exp(s_ij / T) are
    averaged into the batch estimator g_i, and u[index_i] is updated in place as upstream
    does: u <- (1 - gamma) u + gamma g (gamma forced to 1 when u[index].sum() == 0, i.e. the
    batch was never seen), storing the mean of the two views. The returned value is upstream's
    surrogate -s(i, pos) + T * sum_j (exp(s_ij / T) / u_i) s_ij / 2(N-1), whose gradient is
    GCL's gradient.

    Args:
        z1, z2: (B, D) raw embeddings of the two views (same shape, dtype and device).
        index: (B,) int64/int32/int16/int8 sample ids in [0, num_samples) (uint8 and bool are
            refused: PyTorch reads them as masks). Checked on the host for CPU tensors or under
            ``fastssl.set_check_finite(True)``; otherwise on the device.
        u: (num_samples,) float32 estimator buffer on z1's device (not a stride-0 view),
            updated in place.
        gamma: float in (0, 1].
        temperature: float > 0.
        gather_distributed: bool. Across W > 1 ranks, the global batch (N = B * W) with
            the value and gradient promises of docs/api.md ("gather_distributed").
            Every rank writes the gathered update, so u stays identical on all ranks.

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs).

    Example::

        >>> u = torch.zeros(len(dataset))
        >>> loss = fastssl.functional.sogclr(z1, z2, index, u, gamma=0.9, temperature=0.1)
    """
    index = check_sogclr(z1, z2, index, u, gamma, temperature, gather_distributed)
    dist_on = gather_distributed and dist_utils.is_distributed()
    rows, cols, self_col, pos_col, n = _two_view_layout(z1, z2, gather_distributed)
    b = z1.shape[0]
    acc = accumulation_dtype(z1)
    t = temperature
    num_neg = 2 * (n - 1)
    # Negatives: every column but the own one and the positive (2(N-1) per anchor).
    if cols is rows:
        lse, wmean = ops.contrastive_lse_sym(rows, self_col, pos_col, 1.0 / t, True, True, backend)
    else:
        lse, _, wmean, _ = ops.contrastive_lse(rows, cols, self_col, pos_col, 1.0 / t,
                                               cols.shape[0], True, True, False, backend)
    with torch.no_grad():
        u_old = u[index].to(acc)
        g = torch.where(u_old.sum() == 0, torch.ones((), dtype=acc, device=u.device),
                        torch.full((), gamma, dtype=acc, device=u.device))
        u_old2 = torch.cat([u_old, u_old])
        log_batch = lse.detach() - math.log(num_neg)            # log of the batch estimator
        u_new = (1 - g) * u_old2 + g * torch.exp(log_batch)     # u1 (first B) and u2 (last B)
        # ratio = batch estimator / u, in logs so that neither exp(lse) nor u = 0 overflows.
        ratio = 1.0 / (g + (1 - g) * torch.exp(torch.log(u_old2) - log_batch))
        u_mean = (u_new[:b] + u_new[b:]) / 2
        index_all = dist_utils.gather_no_grad(index, name="index") if dist_on else index
        u_all = dist_utils.gather_no_grad(u_mean, name="u") if dist_on else u_mean
        u[index_all] = u_all.to(u.dtype)
    # Surrogate: sum_j p_ij s_ij / 2(N-1) with p_ij = exp(s_ij/T) / u_i detached equals
    # T * ratio_i * wmean_i in value; its gradient T * ratio_i * softmax_ij is that of lse_i.
    neg_term = t * ratio * (wmean.detach() + lse - lse.detach())
    pos = _positive_logits(rows)
    return dist_utils.reduce_loss(_sum_rows(neg_term - pos) / n)


@public_loss("sce", "contrastive", ops.TABLE, _reference.sce)
def sce(q, k, queue, *, coeff=0.5, temperature=0.1, temperature_m=0.07, use_keys=False,
        gather_distributed=False, backend):
    """SCE (similarity contrastive estimation).

    q and k are L2-normalised; the columns are [keys | queue] (keys only with use_keys=True).
    target = coeff * onehot + (1 - coeff) * softmax(k . cols / temperature_m) (the own key
    masked out), prediction = log_softmax(q . cols / temperature); loss = mean over rows of
    -<target, prediction>. k and the queue carry no gradient.

    Args:
        q: (B, D) raw query embeddings (receives the gradient).
        k: (B, D) raw key embeddings (momentum encoder; detached).
        queue: (K, D) float tensor of normalised keys, or None (then use_keys=True is needed).
        coeff: float in [0, 1]. temperature, temperature_m: floats > 0.
        use_keys: bool, use the (gathered) keys of the batch as columns too.
        gather_distributed: bool. Across W > 1 ranks, the global batch (N = B * W) with
            the value and gradient promises of docs/api.md ("gather_distributed").
            The keys are gathered (no gradient).

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.functional.sce(q, k, queue, coeff=0.5, temperature=0.1)
    """
    queue = check_sce(q, k, queue, coeff, temperature, temperature_m, use_keys,
                      gather_distributed)
    dist_on, n, off = _gather_layout(q, gather_distributed)
    b = q.shape[0]
    qn = _normalize(q)
    kn = _normalize(k.detach())
    scale_s, scale_t = 1.0 / temperature, 1.0 / temperature_m
    pos = _rowdot(qn, kn) * scale_s
    queue_cols = None if queue is None else queue.detach().to(qn.dtype)
    if use_keys:
        k_all = dist_utils.gather_no_grad(kn, name="k") if dist_on else kn
        cols = k_all if queue_cols is None else torch.cat([k_all, queue_cols], 0)
        self_col = torch.arange(b, device=q.device) + off
    else:
        cols = queue_cols
        self_col = torch.full((b,), -1, dtype=torch.long, device=q.device)
    same_pass = torch.is_grad_enabled() and qn.requires_grad and ops.has_same_pass(backend)
    lse_s, lse_t, wmean, _, _ = ops.sce_stats(qn, kn, cols, self_col, scale_s, scale_t, same_pass,
                                              backend)
    if not use_keys:
        # Column 0 is per-row: student logit q.k/T, teacher logit 0 (unmasked, as upstream).
        zero = torch.zeros_like(lse_t)
        lse_s = torch.logaddexp(lse_s, pos)
        lse_t_all = torch.logaddexp(lse_t, zero)
        wmean = torch.exp(lse_t - lse_t_all) * wmean + torch.exp(zero - lse_t_all) * pos
    loss = lse_s - coeff * pos - (1 - coeff) * wmean
    return dist_utils.reduce_loss(_sum_rows(loss) / n)
