"""DINOLoss, IBOTPatchLoss, KoLeoLoss: the DINO family as modules (docs/api.md signatures),
the center as a buffer, the teacher temperature warm-up as DINO's."""
from __future__ import annotations

from typing import Sequence

import torch

from fastssl import distributed as dist_utils
from fastssl._checks_dino import CENTERINGS
from fastssl._validation import (accumulation_dtype, check_choice, check_flag, check_int,
                                 check_positive, check_range)
from fastssl.functional.dino import dino, dino_center, ibot_patch, koleo

__all__ = ["DINOLoss", "IBOTPatchLoss", "KoLeoLoss", "teacher_temp_schedule"]

# lightly's call form, criterion(teacher_out, student_out): the teacher list comes first
_LIGHTLY_HINT = ("; fastssl.losses.DINOLoss takes (student_out, teacher_out, epoch=None): for "
                 "lightly's order (teacher_out, student_out, teacher_temp=None, epoch=None) use "
                 "fastssl.compat.lightly.DINOLoss")


def teacher_temp_schedule(epoch: int, teacher_temp: float, warmup_teacher_temp: float,
                          warmup_teacher_temp_epochs: int) -> float:
    """DINO's teacher temperature at `epoch`: linspace(warmup_teacher_temp, teacher_temp,
    warmup_teacher_temp_epochs)[epoch] during the warm-up, teacher_temp after it (numpy's
    linspace: start + epoch * step, its last point exactly the end)."""
    n = warmup_teacher_temp_epochs
    if epoch >= n:
        return teacher_temp
    if epoch == n - 1 and n > 1:
        return teacher_temp
    if n == 1:
        return warmup_teacher_temp
    step = (teacher_temp - warmup_teacher_temp) / (n - 1)
    return warmup_teacher_temp + epoch * step


def _check_lists(student_out, teacher_out) -> None:
    for name, value in (("student_out", student_out), ("teacher_out", teacher_out)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name}: expected a list of (B, K) tensors, one per crop, got "
                            f"{type(value).__name__}")
    if len(teacher_out) > len(student_out):
        raise TypeError(f"teacher_out: got {len(teacher_out)} crops, more than student_out's "
                        f"{len(student_out)}" + _LIGHTLY_HINT)


class DINOLoss(torch.nn.Module):
    """DINO (and DINOv2 with ``centering="sinkhorn_knopp"``) cross-entropy with its center.

    Args:
        output_dim: K, the number of prototypes (the center's size).
        student_temp, teacher_temp: floats > 0.
        warmup_teacher_temp, warmup_teacher_temp_epochs: DINO's linear warm-up of the teacher
            temperature from warmup_teacher_temp to teacher_temp over that many epochs
            (``forward(..., epoch=e)``; epoch None: teacher_temp).
        center_momentum: float in [0, 1]; the buffer ``center`` (1, K) becomes
            center * m + (1 - m) * mean of the teacher rows after each loss ("softmax"
            centering; its batch mean is taken over every rank whenever torch.distributed is
            initialised, as DINO does, so the buffer is the same on every rank).
        centering: "softmax" (DINO) or "sinkhorn_knopp" (DINOv2: no center used or updated).
        sinkhorn_iterations: int >= 0.
        gather_distributed: as :func:`fastssl.functional.dino`.

    ``forward(student_out, teacher_out, epoch=None)``: lists of (B, K) logits (the student's
    every crop, global crops first; the teacher's global crops); returns a 0-dim float32
    tensor (float64 for float64 logits).

    Example::

        >>> loss_fn = fastssl.losses.DINOLoss(output_dim=65536, warmup_teacher_temp=0.04,
        ...                                   teacher_temp=0.07, warmup_teacher_temp_epochs=30)
        >>> loss = loss_fn(student_out, teacher_out, epoch=epoch)
    """

    def __init__(self, output_dim: int = 65536, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 0, center_momentum: float = 0.9,
                 centering: str = "softmax", sinkhorn_iterations: int = 3,
                 gather_distributed: bool = False):
        super().__init__()
        self.output_dim = check_int("output_dim", output_dim, minimum=1)
        self.student_temp = check_positive("student_temp", student_temp)
        self.teacher_temp = check_positive("teacher_temp", teacher_temp)
        self.warmup_teacher_temp = check_positive("warmup_teacher_temp", warmup_teacher_temp)
        self.warmup_teacher_temp_epochs = check_int("warmup_teacher_temp_epochs",
                                                    warmup_teacher_temp_epochs, minimum=0)
        self.center_momentum = check_range("center_momentum", center_momentum, 0.0, 1.0)
        self.centering = check_choice("centering", centering, CENTERINGS)
        self.sinkhorn_iterations = check_int("sinkhorn_iterations", sinkhorn_iterations,
                                             minimum=0)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        self.register_buffer("center", torch.zeros(1, output_dim))

    def teacher_temperature(self, epoch: int | None = None) -> float:
        """The teacher temperature DINO uses at `epoch` (None: teacher_temp)."""
        if epoch is None:
            return self.teacher_temp
        check_int("epoch", epoch, minimum=0)
        return teacher_temp_schedule(epoch, self.teacher_temp, self.warmup_teacher_temp,
                                     self.warmup_teacher_temp_epochs)

    def forward(self, student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor],
                epoch: int | None = None) -> torch.Tensor:
        _check_lists(student_out, teacher_out)
        temp = self.teacher_temperature(epoch)
        softmax = self.centering == "softmax"
        loss = dino(list(student_out), list(teacher_out),
                    center=self.center if softmax else None, student_temp=self.student_temp,
                    teacher_temp=temp, centering=self.centering,
                    sinkhorn_iterations=self.sinkhorn_iterations,
                    gather_distributed=self.gather_distributed)
        if softmax:
            self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Sequence[torch.Tensor]) -> None:
        """The EMA step of the center buffer (DINO's update_center)."""
        new = dino_center(list(teacher_out), self.center, momentum=self.center_momentum,
                          gather_distributed=True)
        self.center.copy_(new)


class IBOTPatchLoss(torch.nn.Module):
    """iBOT / DINOv2 masked-patch loss with its center.

    Args:
        output_dim: K. student_temp, teacher_temp: floats > 0.
        center_momentum: float in [0, 1]; the buffer ``center`` (1, K) becomes
            center * m + (1 - m) * mean of the masked teacher tokens (of every rank whenever
            torch.distributed is initialised) after each loss ("softmax" centering).
        centering: "softmax" or "sinkhorn_knopp" (over the masked teacher tokens; no center).
        gather_distributed: as :func:`fastssl.functional.ibot_patch`.

    ``forward(student_patches, teacher_patches, masks)``: (B, P, K) logits and the (B, P) bool
    mask; returns a 0-dim float32 tensor (float64 for float64 logits).

    Example::

        >>> loss_fn = fastssl.losses.IBOTPatchLoss(output_dim=8192)
        >>> loss = loss_fn(student_patches, teacher_patches, masks)
    """

    def __init__(self, output_dim: int = 65536, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, center_momentum: float = 0.9,
                 centering: str = "softmax", gather_distributed: bool = False):
        super().__init__()
        self.output_dim = check_int("output_dim", output_dim, minimum=1)
        self.student_temp = check_positive("student_temp", student_temp)
        self.teacher_temp = check_positive("teacher_temp", teacher_temp)
        self.center_momentum = check_range("center_momentum", center_momentum, 0.0, 1.0)
        self.centering = check_choice("centering", centering, CENTERINGS)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        self.register_buffer("center", torch.zeros(1, output_dim))

    def forward(self, student_patches: torch.Tensor, teacher_patches: torch.Tensor,
                masks: torch.Tensor) -> torch.Tensor:
        softmax = self.centering == "softmax"
        loss = ibot_patch(student_patches, teacher_patches, masks,
                          center=self.center if softmax else None,
                          student_temp=self.student_temp, teacher_temp=self.teacher_temp,
                          centering=self.centering, gather_distributed=self.gather_distributed)
        if softmax:
            self.update_center(teacher_patches, masks)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_patches: torch.Tensor, masks: torch.Tensor) -> None:
        """center * m + (1 - m) * the mean of the masked teacher tokens (all ranks)."""
        acc = accumulation_dtype(teacher_patches)
        t = teacher_patches.detach()[masks]
        total = t.sum(dim=0, keepdim=True, dtype=acc)
        count = torch.full((1, 1), t.shape[0], dtype=acc, device=t.device)
        if dist_utils.is_distributed():
            dist_utils.all_reduce_sum(total)
            dist_utils.all_reduce_sum(count)
        # no masked token anywhere: the batch mean is taken as the current center (no move)
        mean = torch.where(count > 0, total / count.clamp(min=1), self.center.to(acc))
        m = self.center_momentum
        self.center.copy_(self.center.to(acc) * m + mean * (1 - m))


class KoLeoLoss(torch.nn.Module):
    """DINOv2's KoLeo regulariser (:func:`fastssl.functional.koleo`).

    Args:
        eps: float > 0 (the normalisation's, the distance's and the logarithm's).
        gather_distributed: the nearest neighbour among every rank's rows, the mean over the
            global batch.

    ``forward(z)``: (N, D) embeddings (N >= 2 in the global batch); a 0-dim float32 tensor.

    Example::

        >>> reg = fastssl.losses.KoLeoLoss()(cls_tokens)
    """

    def __init__(self, eps: float = 1e-8, gather_distributed: bool = False):
        super().__init__()
        self.eps = check_positive("eps", eps)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return koleo(z, eps=self.eps, gather_distributed=self.gather_distributed)
