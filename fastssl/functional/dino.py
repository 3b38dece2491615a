"""The DINO family: DINO / DINOv2 cross-entropy, the center update, the iBOT patch loss and
KoLeo (docs/api.md signatures).

Each loss is a ``fastssl._backend.public_loss``: the decorator chooses the backend once (the
family table ``fastssl.ops.dino.TABLE``, or ``fastssl.reference``), and the function below is
the fused path run with that name, which it passes to every op it calls (the SwAV ops serve
the same backend names).

The fused DINO cross-entropy: with L_j = log_softmax(s_j / T_s), the loss is
sum over pairs (i, j) of -mean_b <q_i, L_j> = sum over student crops j of -mean_b <Q_j, L_j>,
Q_j the sum of the targets of the teacher crops paired with j. So each student crop is one
``swav_cross_entropy`` (one log-sum-exp pass per row and the closed-form gradient) against
Q_j: no (crops x B x K) softmax or log-softmax copy. The targets are made once per teacher
crop (``dino_teacher_softmax``, or ``sinkhorn`` at epsilon = teacher_temp over all teacher
crops concatenated, log-domain and stable in float16/bfloat16); every local crop shares one
Q (the sum of all targets), and a global crop's Q is the sum of the other teacher crops'.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fastssl import distributed as dist_utils
from fastssl._backend import public_loss
from fastssl._checks_dino import (check_dino, check_dino_center, check_ibot_patch,
                                  check_ibot_patch_masked, check_koleo, check_koleo_rows)
from fastssl._validation import accumulation_dtype, check_positive
from fastssl.ops import dino as _ops
from fastssl.ops import swav as _swav_ops
from fastssl.functional.swav import sum_tensors
from fastssl.reference.dino import dino as _ref_dino
from fastssl.reference.dino import dino_center as _ref_dino_center
from fastssl.reference.dino import ibot_patch as _ref_ibot_patch
from fastssl.reference.dino import ibot_patch_masked as _ref_ibot_patch_masked
from fastssl.reference.dino import koleo as _ref_koleo
from fastssl.reference.dino import koleo_lp as _ref_koleo_lp


def _use_dist(gather_distributed: bool) -> bool:
    return bool(gather_distributed) and dist_utils.is_distributed()


def _targets(teachers: list[torch.Tensor], center, teacher_temp: float, centering: str,
             iterations: int, use_dist: bool, backend: str) -> list[torch.Tensor]:
    """One (B, K) target per teacher crop, in the accumulation dtype, no gradient."""
    acc = accumulation_dtype(teachers[0])
    K = teachers[0].shape[1]
    if centering == "softmax":
        c = (center.reshape(K) if center is not None
             else torch.zeros(K, dtype=acc, device=teachers[0].device))
        return [_ops.teacher_softmax(t, c, teacher_temp, backend) for t in teachers]
    t = teachers[0] if len(teachers) == 1 else torch.cat([x.detach() for x in teachers])
    codes = _swav_ops.sinkhorn(t, teacher_temp, iterations, use_dist, backend)
    return [codes] if len(teachers) == 1 else list(codes.chunk(len(teachers)))


@public_loss("dino", "dino", _ops.TABLE, _ref_dino)
def dino(student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor], *,
         center: torch.Tensor | None = None, student_temp: float = 0.1,
         teacher_temp: float = 0.04, centering: str = "softmax", sinkhorn_iterations: int = 3,
         ignore_diagonal: bool = True, gather_distributed: bool = False,
         backend) -> torch.Tensor:
    """DINO / DINOv2 cross-entropy between teacher targets and student crops.

    Args:
        student_out: list of (B, K) student logits, one per crop (global crops first).
        teacher_out: list of (B, K) teacher logits of the global crops (at most as many as
            student crops); no gradient flows into them.
        center: None or the (1, K) center (``dino_center``), "softmax" centering only.
        student_temp, teacher_temp: floats > 0.
        centering: "softmax" (DINO: softmax((t - center) / teacher_temp)) or
            "sinkhorn_knopp" (DINOv2: Sinkhorn-Knopp at epsilon = teacher_temp over all teacher
            crops concatenated, over every rank's rows under gather_distributed).
        sinkhorn_iterations: int >= 0.
        ignore_diagonal: skip the pair (teacher crop i, student crop i).
        gather_distributed: the value is the global batch's, the gradient after DDP's average
            the single-process one.
        backend: not an argument of the public function: the backend that
            ``fastssl._backend.public_loss`` chose for this call.

    Returns:
        A 0-dim tensor, float32 (float64 for float64 logits): the mean over the pairs of
        mean_b -sum_k target_i[b, k] log_softmax(s_j[b] / student_temp)[k].

    Example::

        >>> loss = fastssl.functional.dino([s1, s2, s3], [t1, t2], center=c)
    """
    students, teachers, center, st, tt, pairs = check_dino(
        student_out, teacher_out, center, student_temp, teacher_temp, centering,
        sinkhorn_iterations, ignore_diagonal, gather_distributed)
    use_dist = _use_dist(gather_distributed)
    if use_dist:
        dist_utils.check_equal_batch("student_out[0]", students[0])
    B = students[0].shape[0]
    with torch.no_grad():
        targets = _targets(teachers, center, tt, centering, sinkhorn_iterations, use_dist,
                           backend)
    n_t = len(teachers)
    everything = None  # the target of every crop paired with all teacher crops, made once
    loss = None
    for j, s in enumerate(students):
        paired = [i for i, jj in pairs if jj == j]
        if not paired:
            continue
        if len(paired) == n_t:
            if everything is None:
                everything = sum_tensors(targets)
            q = everything
        else:
            q = sum_tensors([targets[i] for i in paired])
        term = _swav_ops.swav_cross_entropy(s, q, st, backend)
        loss = term if loss is None else loss + term
    loss = loss / (B * len(pairs))
    if use_dist:
        loss = dist_utils.reduce_loss(loss / dist_utils.world_size())
    return loss


@public_loss("dino_center", "dino", _ops.TABLE, _ref_dino_center)
@torch.no_grad()
def dino_center(teacher_out: Sequence[torch.Tensor], center: torch.Tensor, *,
                momentum: float = 0.9, gather_distributed: bool = False,
                backend) -> torch.Tensor:
    """DINO's center update: the new EMA center, center * momentum + (1 - momentum) * the mean
    of every teacher row. The inputs are not modified.

    Args:
        teacher_out: list of (B, K) teacher logits (every crop counts).
        center: the current (1, K) float center.
        momentum: float in [0, 1].
        gather_distributed: the mean is over every rank's rows (one all-reduce of a K-vector).
        backend: not an argument of the public function: the backend that
            ``fastssl._backend.public_loss`` chose for this call.

    Returns:
        The new (1, K) center in the center's dtype (float32 for a float32 center).

    Example::

        >>> center = fastssl.functional.dino_center([t1, t2], center, momentum=0.9)
    """
    del backend  # one sum per crop: no kernel of its own
    teachers, c = check_dino_center(teacher_out, center, momentum, gather_distributed)
    use_dist = _use_dist(gather_distributed)
    acc = accumulation_dtype(teachers[0])
    total = torch.zeros((1, c.shape[1]), dtype=acc, device=c.device)
    for t in teachers:
        total += t.detach().sum(dim=0, keepdim=True, dtype=acc)
    n = teachers[0].shape[0] * len(teachers)
    if use_dist:
        dist_utils.check_equal_batch("teacher_out[0]", teachers[0])
        dist_utils.all_reduce_sum(total)
        n = n * dist_utils.world_size()
    new = c.to(acc) * momentum + (total / n) * (1 - momentum)
    return new.to(center.dtype)


@public_loss("ibot_patch", "dino", _ops.TABLE, _ref_ibot_patch)
def ibot_patch(student_patches: torch.Tensor, teacher_patches: torch.Tensor,
               masks: torch.Tensor, *, center: torch.Tensor | None = None,
               student_temp: float = 0.1, teacher_temp: float = 0.04,
               centering: str = "softmax", sinkhorn_iterations: int = 3,
               gather_distributed: bool = False, backend) -> torch.Tensor:
    """iBOT / DINOv2 masked-patch loss over the masked tokens only.

    Args:
        student_patches, teacher_patches: (B, P, K) patch logits.
        masks: (B, P) bool, True where the student's patch was masked.
        center, student_temp, teacher_temp, centering, sinkhorn_iterations: as :func:`dino`
            ("sinkhorn_knopp" runs over the masked teacher tokens of every rank).
        gather_distributed: the value is the global batch's (B summed over ranks).
        backend: not an argument of the public function: the backend that
            ``fastssl._backend.public_loss`` chose for this call.

    Returns:
        A 0-dim float32 tensor (float64 for float64): sum over masked tokens of the
        cross-entropy, each weighted by 1 / its image's number of masked tokens, divided by B.

    Example::

        >>> loss = fastssl.functional.ibot_patch(s_patches, t_patches, masks, center=c)
    """
    center, st, tt = check_ibot_patch(student_patches, teacher_patches, masks, center,
                                      student_temp, teacher_temp, centering,
                                      sinkhorn_iterations, gather_distributed)
    return _ibot_masked(student_patches[masks], teacher_patches.detach()[masks], masks, center,
                        st, tt, centering, sinkhorn_iterations, gather_distributed, backend)


@public_loss("ibot_patch", "dino", _ops.TABLE, _ref_ibot_patch_masked)
def ibot_patch_masked(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor,
                      masks: torch.Tensor, *, center: torch.Tensor | None = None,
                      student_temp: float = 0.1, teacher_temp: float = 0.04,
                      centering: str = "softmax", sinkhorn_iterations: int = 3,
                      gather_distributed: bool = False, backend) -> torch.Tensor:
    """:func:`ibot_patch` on the masked tokens already selected (DINOv2's ``forward_masked``,
    lightly's ``IBOTPatchLoss``): (M, K) student and teacher tokens in the order of the True
    entries of ``masks`` ((B, ...) bool, M of them). Checking M costs one host read."""
    center, st, tt = check_ibot_patch_masked(student_tokens, teacher_tokens, masks, center,
                                             student_temp, teacher_temp, centering,
                                             sinkhorn_iterations, gather_distributed)
    return _ibot_masked(student_tokens, teacher_tokens.detach(), masks.flatten(1), center, st,
                        tt, centering, sinkhorn_iterations, gather_distributed, backend)


def _no_rows(s: torch.Tensor) -> bool:
    """Whether no token is masked. Under torch.compile the count is data-dependent: the traced
    graph assumes some token is, so a step compiles without a graph break (with dynamo's
    capture_dynamic_output_shape_ops for the boolean selection itself)."""
    return not torch.compiler.is_compiling() and s.shape[0] == 0


def _ibot_masked(s, t, masks, center, st, tt, centering, sinkhorn_iterations,
                 gather_distributed, backend):
    use_dist = _use_dist(gather_distributed)
    if use_dist:
        dist_utils.check_equal_batch("masks", masks)
    B = masks.shape[0]
    acc = accumulation_dtype(s)
    with torch.no_grad():
        counts = masks.sum(dim=1)
        # each token's weight, 1 / its image's masked count, folded into its target row: the
        # cross-entropy is linear in the target (and its gradient uses the row's target sum)
        w = (1.0 / counts.clamp(min=1).to(acc)).repeat_interleave(counts, output_size=s.shape[0])
        if _no_rows(s):
            q = torch.zeros((0, s.shape[1]), dtype=acc, device=s.device)
        else:
            q = _targets([t], center, tt, centering, sinkhorn_iterations, use_dist, backend)[0]
            q = q * w[:, None]
    if _no_rows(s):
        loss = (s.sum() * 0).to(acc)  # no masked token: zero, with a (zero) gradient
    else:
        loss = _swav_ops.swav_cross_entropy(s, q, st, backend) / B
    if use_dist:
        loss = dist_utils.reduce_loss(loss / dist_utils.world_size())
    return loss


@public_loss("koleo", "dino", _ops.TABLE, _ref_koleo)
def koleo(z: torch.Tensor, *, eps: float = 1e-8, gather_distributed: bool = False,
          backend) -> torch.Tensor:
    """DINOv2's KoLeo regulariser: -mean over rows of log(||x_i - x_nn(i) + eps|| + eps), with
    x = normalize(z) and nn(i) the nearest other row by inner product (searched tile by tile,
    no N x N matrix; the gradient flows through the chosen pair only). Under
    gather_distributed the neighbour is searched among every rank's rows.

    Args:
        z: (N, D) float tensor, at least 2 rows in the (global) batch. eps: float > 0.
        backend: not an argument of the public function: the backend that
            ``fastssl._backend.public_loss`` chose for this call.

    Returns:
        A 0-dim float32 tensor (float64 for float64 z).

    Example::

        >>> reg = fastssl.functional.koleo(cls_tokens)
    """
    return _koleo(z, 2.0, eps, gather_distributed, backend)


@public_loss("koleo", "dino", _ops.TABLE, _ref_koleo_lp)
def koleo_lp(z: torch.Tensor, *, p: float = 2.0, eps: float = 1e-8,
             gather_distributed: bool = False, backend) -> torch.Tensor:
    """:func:`koleo` with the distance to the neighbour in the p-norm (lightly's
    ``KoLeoLoss(p)``); the neighbour is still the largest inner product."""
    return _koleo(z, check_positive("p", p), eps, gather_distributed, backend)


def _koleo(z, p, eps, gather_distributed, backend):
    eps = check_koleo(z, eps, gather_distributed)
    use_dist = _use_dist(gather_distributed)
    x = F.normalize(z.to(accumulation_dtype(z)), eps=eps, p=2, dim=-1)
    if use_dist:
        x_all = dist_utils.gather(x, name="z")
        offset = dist_utils.row_offset(x.shape[0])
    else:
        x_all, offset = x, 0
    check_koleo_rows(z, x_all.shape[0])
    idx = _ops.nearest_neighbor(x, x_all, offset, backend)
    distances = F.pairwise_distance(x, x_all.index_select(0, idx), p=p, eps=eps)
    loss = -torch.log(distances + eps)
    if use_dist:
        return dist_utils.reduce_loss(loss.sum() / x_all.shape[0])
    return loss.mean()
