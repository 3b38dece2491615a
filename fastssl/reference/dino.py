"""DINO family reference: DINO / DINOv2 cross-entropy, the center update, the iBOT patch loss,
the Sinkhorn-Knopp teacher and KoLeo, step by step with the full matrices.

Follows the authors' code (facebookresearch/dino ``DINOLoss``; facebookresearch/dinov2
``DINOLoss.sinkhorn_knopp_teacher``, ``iBOTPatchLoss.forward_masked``, ``KoLeoLoss``), written
from the formulas: the softmax targets and the student log-softmax in the input dtype's own
arithmetic; the Sinkhorn-Knopp teacher in float32 (float64 for float64) with exp(t / temp)
taken as is, so it overflows where DINOv2's does (teacher_temp = 0.04 and logits above ~3.5).
Ground truth for the fast paths; never the fast path itself.

Under ``gather_distributed`` the value is the single-process value of the global batch and the
gradient (after DDP's average over W ranks) the single-process gradient, as every loss in
docs/api.md: the center's batch mean, the Sinkhorn-Knopp sums and KoLeo's neighbour search run
over every rank's rows.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fastssl import distributed as dist_utils
from fastssl._checks_dino import (
    check_dino,
    check_dino_center,
    check_ibot_patch,
    check_ibot_patch_masked,
    check_koleo,
    check_koleo_rows,
)
from fastssl._validation import accumulation_dtype, check_flag, check_int, check_positive


def _use_dist(gather_distributed: bool) -> bool:
    return bool(gather_distributed) and dist_utils.is_distributed()


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_output: torch.Tensor, teacher_temp: float,
                           n_iterations: int = 3, *, n_rows: torch.Tensor | int | None = None,
                           gather_distributed: bool = False) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp teacher targets of (N, K) teacher logits; rows sum to 1.

    Q = exp(t / temp)^T (K x N), divided by its total; then `n_iterations` times each prototype
    (row of Q) is scaled to total mass 1/K (sums over all ranks) and each sample (column) to
    1/B, with B the global number of rows (`n_rows`: iBOT passes its global count of masked
    tokens); finally Q * B. Computed in float32 (float64 stays float64), as DINOv2 does.
    """
    check_positive("teacher_temp", teacher_temp)
    check_int("n_iterations", n_iterations, minimum=0)
    check_flag("gather_distributed", gather_distributed)
    use_dist = _use_dist(gather_distributed)
    t = teacher_output.detach().to(accumulation_dtype(teacher_output))
    Q = torch.exp(t / teacher_temp).t()  # (K, N)
    if n_rows is None:
        B = Q.shape[1] * (dist_utils.world_size() if use_dist else 1)
    else:
        B = n_rows
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    if use_dist:
        dist_utils.all_reduce_sum(sum_Q)
    Q = Q / sum_Q
    for _ in range(n_iterations):
        # prototypes: total mass 1/K each, over the global batch
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        if use_dist:
            dist_utils.all_reduce_sum(sum_of_rows)
        Q = Q / sum_of_rows
        Q = Q / K
        # samples: total mass 1/B each (local columns)
        Q = Q / torch.sum(Q, dim=0, keepdim=True)
        Q = Q / B
    Q = Q * B
    return Q.t()


@torch.no_grad()
def softmax_center_teacher(teacher_output: torch.Tensor, center: torch.Tensor | None,
                           teacher_temp: float) -> torch.Tensor:
    """DINO's targets: softmax((t - center) / teacher_temp) over the prototypes."""
    t = teacher_output.detach()
    if center is not None:
        t = t - center.to(t.dtype)
    return F.softmax(t / teacher_temp, dim=-1)


def dino(student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor], *,
         center: torch.Tensor | None = None, student_temp: float = 0.1,
         teacher_temp: float = 0.04, centering: str = "softmax", sinkhorn_iterations: int = 3,
         ignore_diagonal: bool = True, gather_distributed: bool = False) -> torch.Tensor:
    """DINO / DINOv2 cross-entropy over every (teacher crop i, student crop j) pair.

    Targets per teacher crop: softmax((t - center) / teacher_temp), or, for "sinkhorn_knopp",
    DINOv2's Sinkhorn-Knopp over all teacher crops concatenated (the global batch under
    gather_distributed), split back per crop. loss = mean over the pairs (j != i when
    ignore_diagonal) of mean_b -sum_k target_i[b, k] log_softmax(s_j[b] / student_temp)[k].
    """
    students, teachers, center, st, tt, pairs = check_dino(
        student_out, teacher_out, center, student_temp, teacher_temp, centering,
        sinkhorn_iterations, ignore_diagonal, gather_distributed)
    use_dist = _use_dist(gather_distributed)
    if use_dist:
        dist_utils.check_equal_batch("student_out[0]", students[0])
    with torch.no_grad():
        if centering == "softmax":
            targets = [softmax_center_teacher(t, center, tt) for t in teachers]
        else:
            q = sinkhorn_knopp_teacher(torch.cat([t.detach() for t in teachers]), tt,
                                       sinkhorn_iterations, gather_distributed=use_dist)
            targets = list(q.chunk(len(teachers)))
    # DINO: student_out / student_temp, one log_softmax per crop, then every pair
    log_p = [F.log_softmax(s / st, dim=-1) for s in students]
    total = 0
    for i, j in pairs:
        loss = torch.sum(-targets[i] * log_p[j], dim=-1)
        total = total + loss.mean()
    total = total / len(pairs)
    if use_dist:
        total = dist_utils.reduce_loss(total / dist_utils.world_size())
    return total


@torch.no_grad()
def dino_center(teacher_out: Sequence[torch.Tensor], center: torch.Tensor, *,
                momentum: float = 0.9, gather_distributed: bool = False) -> torch.Tensor:
    """DINO's ``update_center``: center * momentum + (1 - momentum) * mean of all teacher rows
    (every crop, every rank). Returns the new (1, K) center in the center's dtype."""
    teachers, c = check_dino_center(teacher_out, center, momentum, gather_distributed)
    use_dist = _use_dist(gather_distributed)
    t = torch.cat([x.detach() for x in teachers])
    batch_center = torch.sum(t.to(accumulation_dtype(t)), dim=0, keepdim=True)
    n = t.shape[0]
    if use_dist:
        dist_utils.check_equal_batch("teacher_out[0]", teachers[0])
        dist_utils.all_reduce_sum(batch_center)
        n = n * dist_utils.world_size()
    batch_center = batch_center / n
    new = c.to(batch_center.dtype) * momentum + batch_center * (1 - momentum)
    return new.to(center.dtype)


def ibot_patch(student_patches: torch.Tensor, teacher_patches: torch.Tensor,
               masks: torch.Tensor, *, center: torch.Tensor | None = None,
               student_temp: float = 0.1, teacher_temp: float = 0.04,
               centering: str = "softmax", sinkhorn_iterations: int = 3,
               gather_distributed: bool = False) -> torch.Tensor:
    """iBOT / DINOv2 masked-patch loss (DINOv2's ``forward_masked``).

    The masked tokens of student and teacher are selected; per token the cross-entropy of the
    teacher target (softmax centering, or Sinkhorn-Knopp over the masked teacher tokens of every
    rank) against log_softmax(student / student_temp); each token weighted by 1 / its image's
    number of masked tokens (at least 1); summed and divided by B (the global B under
    gather_distributed).
    """
    center, st, tt = check_ibot_patch(student_patches, teacher_patches, masks, center,
                                      student_temp, teacher_temp, centering,
                                      sinkhorn_iterations, gather_distributed)
    return _ibot_masked(student_patches[masks], teacher_patches[masks], masks, center, st, tt,
                        centering, sinkhorn_iterations, gather_distributed)


def ibot_patch_masked(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor,
                      masks: torch.Tensor, *, center: torch.Tensor | None = None,
                      student_temp: float = 0.1, teacher_temp: float = 0.04,
                      centering: str = "softmax", sinkhorn_iterations: int = 3,
                      gather_distributed: bool = False) -> torch.Tensor:
    """:func:`ibot_patch` on the masked tokens already selected (DINOv2's ``forward_masked``,
    lightly's ``IBOTPatchLoss``): (M, K) tokens in the order of ``masks``' True entries, masks
    (B, ...) bool with M True entries."""
    center, st, tt = check_ibot_patch_masked(student_tokens, teacher_tokens, masks, center,
                                             student_temp, teacher_temp, centering,
                                             sinkhorn_iterations, gather_distributed)
    return _ibot_masked(student_tokens, teacher_tokens, masks.flatten(1), center, st, tt,
                        centering, sinkhorn_iterations, gather_distributed)


def _ibot_masked(s, t, masks, center, st, tt, centering, sinkhorn_iterations,
                 gather_distributed):
    use_dist = _use_dist(gather_distributed)
    if use_dist:
        dist_utils.check_equal_batch("masks", masks)
    B = masks.shape[0]
    with torch.no_grad():
        t = t.detach()
        if centering == "softmax":
            target = softmax_center_teacher(t, center, tt)
        else:
            n_masked = masks.sum().to(accumulation_dtype(t))
            if use_dist:
                dist_utils.all_reduce_sum(n_masked)
            target = sinkhorn_knopp_teacher(t, tt, sinkhorn_iterations, n_rows=n_masked,
                                            gather_distributed=use_dist)
    loss = torch.sum(target * F.log_softmax(s / st, dim=-1), dim=-1)  # (M,)
    # the counts in the logits' accumulation dtype (DINOv2's float32 division would round 1/3)
    counts = masks.sum(-1).clamp(min=1).to(accumulation_dtype(s))
    weight = (1 / counts).unsqueeze(-1).expand_as(masks)[masks]
    total = -(loss * weight).sum() / B
    if use_dist:
        total = dist_utils.reduce_loss(total / dist_utils.world_size())
    return total


def koleo(z: torch.Tensor, *, eps: float = 1e-8, gather_distributed: bool = False
          ) -> torch.Tensor:
    """DINOv2's KoLeo regulariser: x = normalize(z, eps); each row's nearest other row by inner
    product (the diagonal of x x^T filled below any cosine); loss = -mean log(pdist + eps) with
    pdist = ||x_i - x_nn(i) + eps|| (torch's PairwiseDistance). Under gather_distributed the
    neighbour is searched among the rows of every rank and the mean is over the global batch."""
    return koleo_lp(z, p=2.0, eps=eps, gather_distributed=gather_distributed)


def koleo_lp(z: torch.Tensor, *, p: float = 2.0, eps: float = 1e-8,
             gather_distributed: bool = False) -> torch.Tensor:
    """:func:`koleo` with the distance to the neighbour in the p-norm (lightly's KoLeoLoss(p));
    the neighbour is still the largest inner product."""
    eps = check_koleo(z, eps, gather_distributed)
    p = check_positive("p", p)
    use_dist = _use_dist(gather_distributed)
    x = F.normalize(z, eps=eps, p=2, dim=-1)
    if use_dist:
        x_all = dist_utils.gather(x, name="z")
        offset = dist_utils.row_offset(x.shape[0])
    else:
        x_all, offset = x, 0
    check_koleo_rows(z, x_all.shape[0])
    dots = torch.mm(x.detach(), x_all.detach().t())  # (N_local, N_global)
    n = x.shape[0]
    own = torch.arange(n, device=z.device)
    dots[own, own + offset] = -2.0  # never its own neighbour (cosines are >= -1)
    _, idx = torch.max(dots, dim=1)
    distances = F.pairwise_distance(x, x_all[idx], p=p, eps=eps)
    loss = -torch.log(distances + eps)
    if use_dist:
        return dist_utils.reduce_loss(loss.sum() / x_all.shape[0])
    return loss.mean()
