"""Contrastive losses: NT-Xent, InfoNCE, DCL, SogCLR, SCE (api.md signatures).

Each loss validates its inputs (the ``check_*`` helpers below, shared with
``fastssl.reference``), picks its backend once through the family table
(``fastssl.ops.contrastive.backend_for``), and then either calls the reference or runs the fused
path: L2-normalise, gather the columns (``gather_distributed``), compute the O(N) statistics with
the streaming ops (no N x N matrix), compose the loss from them, ``reduce_loss``.

Layout shared by NT-Xent, DCL and SogCLR: the anchors are the local rows ``[z1; z2]`` (2B), the
columns the global ``[Z1; Z2]`` (2N); row i of z1 has its own column at ``off + i`` and its
positive at ``N + off + i``, and the other way round for z2 (``off`` = rank * B). In a single
process the columns are the rows and the masks are symmetric, so NT-Xent and SogCLR use the
symmetric op (one backward pass).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastssl import distributed as dist_utils
from fastssl._validation import (accumulation_dtype, check_embeddings, check_index, check_pair,
                                 check_positive, check_range, check_same_device)

# ----------------------------------------------------------------------------------------------
# Validation (shared with fastssl.reference.contrastive)
# ----------------------------------------------------------------------------------------------


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def _global_rows(x: torch.Tensor, gather_distributed: bool) -> int:
    if gather_distributed and dist_utils.is_distributed():
        return x.shape[0] * dist_utils.world_size()
    return x.shape[0]


def _check_min_global(loss: str, name: str, x: torch.Tensor, gather_distributed: bool,
                      minimum: int, why: str) -> None:
    n = _global_rows(x, gather_distributed)
    if n < minimum:
        raise ValueError(f"{name}: {loss} needs a (global) batch of at least {minimum} rows "
                         f"({why}), got shape {tuple(x.shape)}")


def check_nt_xent(z1, z2, temperature, gather_distributed) -> None:
    check_pair("z1", z1, "z2", z2)
    check_positive("temperature", temperature)
    _check_flag("gather_distributed", gather_distributed)


def check_info_nce(q, k, temperature, symmetric, gather_distributed) -> None:
    check_pair("q", q, "k", k)
    check_positive("temperature", temperature)
    _check_flag("symmetric", symmetric)
    _check_flag("gather_distributed", gather_distributed)


def check_dcl(z1, z2, temperature, gather_distributed) -> None:
    check_pair("z1", z1, "z2", z2)
    check_positive("temperature", temperature)
    _check_flag("gather_distributed", gather_distributed)
    _check_min_global("dcl", "z1", z1, gather_distributed, 2, "each anchor needs a negative")


def check_sogclr(z1, z2, index, u, gamma, temperature, gather_distributed) -> None:
    check_pair("z1", z1, "z2", z2)
    check_index("index", index, rows=z1.shape[0], device=z1.device)
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u: expected a torch.Tensor, got {type(u).__name__}")
    if not u.is_floating_point():
        raise TypeError(f"u: expected a floating dtype (float32), got {u.dtype}")
    if u.dim() != 1 or u.shape[0] < 1:
        raise ValueError(f"u: expected shape (num_samples,), got {tuple(u.shape)}")
    check_same_device([("z1", z1), ("u", u)])
    check_range("gamma", gamma, 0.0, 1.0, lo_open=True)
    check_positive("temperature", temperature)
    _check_flag("gather_distributed", gather_distributed)
    _check_min_global("sogclr", "z1", z1, gather_distributed, 2,
                      "the estimator averages over 2(N-1) negatives")


def check_sce(q, k, queue, coeff, temperature, temperature_m, use_keys, gather_distributed):
    """Validates SCE's inputs; returns the queue, with an empty (0, D) queue read as None."""
    check_pair("q", q, "k", k)
    if queue is not None:
        check_embeddings("queue", queue, min_rows=0)
        if queue.shape[1] != q.shape[1]:
            raise ValueError(f"queue: expected shape (K, {q.shape[1]}) (the feature dimension "
                             f"of q), got {tuple(queue.shape)}")
        check_same_device([("q", q), ("queue", queue)])
        if queue.shape[0] == 0:
            queue = None
    check_range("coeff", coeff, 0.0, 1.0)
    check_positive("temperature", temperature)
    check_positive("temperature_m", temperature_m)
    _check_flag("use_keys", use_keys)
    _check_flag("gather_distributed", gather_distributed)
    if queue is None and not use_keys:
        raise ValueError("queue: SCE with queue=None (or an empty queue) and use_keys=False has "
                         "no negatives; pass a (K, D) queue or use_keys=True")
    if queue is None:
        _check_min_global("sce", "q", q, gather_distributed, 2,
                          "use_keys=True without a queue needs another key besides the own one")
    return queue


# ----------------------------------------------------------------------------------------------
# Fused path helpers
# ----------------------------------------------------------------------------------------------

def _ops():
    from fastssl.ops import contrastive
    return contrastive


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise in the accumulation dtype, back to the input dtype (the kernels' operand)."""
    return F.normalize(x.to(accumulation_dtype(x)), dim=1).to(x.dtype)


def _gather_layout(x: torch.Tensor, gather_distributed: bool):
    if gather_distributed and dist_utils.is_distributed():
        b = x.shape[0]
        return True, b * dist_utils.world_size(), dist_utils.row_offset(b)
    return False, x.shape[0], 0


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    acc = accumulation_dtype(a)
    return (a.to(acc) * b.to(acc)).sum(-1)


def _two_view_layout(z1, z2, gather_distributed):
    """Normalised anchors [z1; z2], gathered columns [Z1; Z2], own and positive columns."""
    dist_on, n, off = _gather_layout(z1, gather_distributed)
    b = z1.shape[0]
    h1, h2 = _normalize(z1), _normalize(z2)
    rows = torch.cat([h1, h2], 0)
    if dist_on:
        cols = torch.cat([dist_utils.gather(h1, name="z1"), dist_utils.gather(h2, name="z2")], 0)
    else:
        cols = rows
    ar = torch.arange(b, device=z1.device)
    self_col = torch.cat([off + ar, n + off + ar])
    pos_col = torch.cat([n + off + ar, off + ar])
    # The positive's embedding is the other view of the same local sample.
    positives = torch.cat([h2, h1], 0)
    return rows, cols, self_col, pos_col, positives, n


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

def nt_xent(z1, z2, temperature=0.1, *, gather_distributed=False):
    """SimCLR NT-Xent: 2N anchors, each with 1 positive and 2N-2 negatives; mean over anchors."""
    check_nt_xent(z1, z2, temperature, gather_distributed)
    ops = _ops()
    backend = ops.backend_for("nt_xent", z1.device)
    if backend == "reference":
        return ops.TABLE["reference"].nt_xent(z1, z2, temperature,
                                              gather_distributed=gather_distributed)
    rows, cols, self_col, pos_col, positives, n = _two_view_layout(z1, z2, gather_distributed)
    scale = 1.0 / temperature
    if cols is rows:
        lse, _ = ops.contrastive_lse_sym(rows, self_col, pos_col, scale, False, False, backend)
    else:
        lse, _, _, _ = ops.contrastive_lse(rows, cols, self_col, pos_col, scale, cols.shape[0],
                                           False, False, False, backend)
    pos = _rowdot(rows, positives) * scale
    return dist_utils.reduce_loss((lse - pos).sum() / (2 * n))


def info_nce(q, k, temperature=0.1, *, symmetric=False, gather_distributed=False):
    """InfoNCE, positives on the diagonal; symmetric=True averages q->k and k->q, both from one
    streaming pass over q @ k.T (row and column log-sum-exp together)."""
    check_info_nce(q, k, temperature, symmetric, gather_distributed)
    ops = _ops()
    backend = ops.backend_for("info_nce", q.device)
    if backend == "reference":
        return ops.TABLE["reference"].info_nce(q, k, temperature, symmetric=symmetric,
                                               gather_distributed=gather_distributed)
    dist_on, n, off = _gather_layout(q, gather_distributed)
    b = q.shape[0]
    qn, kn = _normalize(q), _normalize(k)
    k_all = dist_utils.gather(kn, name="k") if dist_on else kn
    labels = torch.arange(b, device=q.device) + off
    no_self = torch.full_like(labels, -1)
    scale = 1.0 / temperature
    lse_row, _, _, col_lse = ops.contrastive_lse(qn, k_all, no_self, labels, scale, n, False,
                                                 False, symmetric, backend)
    pos = _rowdot(qn, kn) * scale
    share = (lse_row - pos).sum() / n
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
        col_share = carrier + (merged[off:off + b] - pos).sum()
    else:
        col_share = (col_lse - pos).sum()
    return dist_utils.reduce_loss(0.5 * (share + col_share / n))


def dcl(z1, z2, temperature=0.1, *, gather_distributed=False):
    """Decoupled contrastive loss as lightly DCLLoss (no weight function): per anchor,
    -pos + LSE over the same-view negatives + LSE over the other view without the positive,
    averaged over both directions."""
    check_dcl(z1, z2, temperature, gather_distributed)
    ops = _ops()
    backend = ops.backend_for("dcl", z1.device)
    if backend == "reference":
        return ops.TABLE["reference"].dcl(z1, z2, temperature,
                                          gather_distributed=gather_distributed)
    rows, cols, self_col, pos_col, positives, n = _two_view_layout(z1, z2, gather_distributed)
    scale = 1.0 / temperature
    # Columns [Z1 | Z2] split at N: one log-sum-exp per view, each missing one masked column.
    lse_z1, lse_z2, _, _ = ops.contrastive_lse(rows, cols, self_col, pos_col, scale, n, True,
                                               False, False, backend)
    pos = _rowdot(rows, positives) * scale
    return dist_utils.reduce_loss((lse_z1 + lse_z2 - pos).sum() / (2 * n))


def sogclr(z1, z2, index, u, *, gamma=0.9, temperature=0.1, gather_distributed=False):
    """SogCLR (GCL with the moving-average estimator u, updated in place as upstream)."""
    check_sogclr(z1, z2, index, u, gamma, temperature, gather_distributed)
    ops = _ops()
    backend = ops.backend_for("sogclr", z1.device)
    if backend == "reference":
        return ops.TABLE["reference"].sogclr(z1, z2, index, u, gamma=gamma,
                                             temperature=temperature,
                                             gather_distributed=gather_distributed)
    dist_on = gather_distributed and dist_utils.is_distributed()
    rows, cols, self_col, pos_col, positives, n = _two_view_layout(z1, z2, gather_distributed)
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
    pos = _rowdot(rows, positives)
    return dist_utils.reduce_loss((neg_term - pos).sum() / n)


def sce(q, k, queue, *, coeff=0.5, temperature=0.1, temperature_m=0.07, use_keys=False,
        gather_distributed=False):
    """SCE: target = coeff*onehot + (1-coeff)*softmax(k @ [keys|queue] / temperature_m);
    prediction = log_softmax(q @ [keys|queue] / temperature); k and queue carry no gradient."""
    queue = check_sce(q, k, queue, coeff, temperature, temperature_m, use_keys,
                      gather_distributed)
    ops = _ops()
    backend = ops.backend_for("sce", q.device)
    if backend == "reference":
        return ops.TABLE["reference"].sce(q, k, queue, coeff=coeff, temperature=temperature,
                                          temperature_m=temperature_m, use_keys=use_keys,
                                          gather_distributed=gather_distributed)
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
    lse_s, lse_t, wmean = ops.sce_stats(qn, kn, cols, self_col, scale_s, scale_t, backend)
    if not use_keys:
        # Column 0 is per-row: student logit q.k/T, teacher logit 0 (unmasked, as upstream).
        zero = torch.zeros_like(lse_t)
        lse_s = torch.logaddexp(lse_s, pos)
        lse_t_all = torch.logaddexp(lse_t, zero)
        wmean = torch.exp(lse_t - lse_t_all) * wmean + torch.exp(zero - lse_t_all) * pos
    loss = lse_s - coeff * pos - (1 - coeff) * wmean
    return dist_utils.reduce_loss(loss.sum() / n)
