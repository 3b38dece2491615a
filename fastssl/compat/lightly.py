"""Drop-ins for lightly's losses (lightly 1.6.0): ``from fastssl.compat.lightly import
NTXentLoss`` instead of ``from lightly.loss import NTXentLoss``, and likewise ``DCLLoss``,
``DCLWLoss``, ``SwaVLoss``, ``sinkhorn`` and ``negative_mises_fisher_weights``.

Constructor signatures, defaults, forward call forms, return shapes and exceptions are
lightly's; the numbers are lightly's to float rounding, computed by fastssl's fused ops (no
N x N matrix). Under ``gather_distributed=True`` each rank returns lightly's per-rank value
(the mean over its own rows) and, after DDP's gradient average, the parameters get lightly's
gradient (the single-process gradient of the global batch).

lightly's DINO family: ``DINOLoss``, ``IBOTPatchLoss`` and ``KoLeoLoss`` (lightly 1.6.0's
signatures, call forms and center buffers), on fastssl's DINO ops.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastssl import distributed as dist_utils
from fastssl import functional
from fastssl.functional.dino import ibot_patch_masked as _ibot_patch_masked
from fastssl.functional.dino import koleo_lp as _koleo_lp

__all__ = ["NTXentLoss", "DCLLoss", "DCLWLoss", "SwaVLoss", "sinkhorn",
           "negative_mises_fisher_weights", "DINOLoss", "IBOTPatchLoss", "KoLeoLoss"]


def _check_distributed_available(name: str, flag: bool) -> None:
    # lightly's check and message (ValueError), run as lightly runs it: only when the flag is
    # set, reading torch.distributed.is_available at call time
    if flag and not torch.distributed.is_available():
        raise ValueError(
            f"{name} is True but torch.distributed is not available. Please set "
            "gather_distributed=False or install a torch version with distributed support.")


class _MemoryBank(nn.Module):
    """lightly 1.6.0 ``MemoryBankModule``'s state and FIFO rule, for NTXentLoss: ``size`` a
    (num_features, dim) tuple or 0, buffers ``bank`` (num_features, dim) float32 (random
    normalised at construction, drawn exactly as lightly draws it, so a seeded run consumes the
    same random numbers) and ``bank_ptr`` (1,), both non-persistent (not in the state_dict),
    as lightly's."""

    def __init__(self, size: Union[int, Sequence[int]], gather_distributed: bool = False,
                 feature_dim_first: bool = True):
        super().__init__()
        size_tuple = (size,) if isinstance(size, int) else tuple(size)
        if any(x < 0 for x in size_tuple):
            raise ValueError(
                f"Illegal memory bank size {size}, all entries must be non-negative.")
        if isinstance(size, int) and size > 0:
            raise ValueError(
                f"Memory bank size 'size={size}' does not specify the feature dimension. Set "
                f"it with 'size=({size}, dim)', or pass 'size=0' to disable the memory bank.")
        if size_tuple != (0,) and len(size_tuple) != 2:
            raise ValueError(
                f"Illegal memory bank size {size}, expected a (num_features, dim) tuple, or "
                "'size=0' to disable the memory bank.")
        self.size = size_tuple
        self.gather_distributed = gather_distributed
        self.feature_dim_first = feature_dim_first
        self.register_buffer("bank", torch.empty(size=size_tuple, dtype=torch.float),
                             persistent=False)
        self.register_buffer("bank_ptr", torch.empty(1, dtype=torch.long), persistent=False)
        if len(size_tuple) > 1:
            with torch.no_grad():
                self.bank = F.normalize(torch.randn(size_tuple).type_as(self.bank), dim=-1)
                self.bank_ptr = torch.zeros(1).type_as(self.bank_ptr)

    @torch.no_grad()
    def enqueue(self, batch: Tensor) -> None:
        """lightly's rule: write at the pointer; a batch reaching the end fills the bank to its
        end, the rest is dropped and the pointer returns to 0."""
        if self.gather_distributed and dist_utils.is_distributed():
            batch = dist_utils.gather_no_grad(batch.contiguous(), name="memory bank keys")
        n, size = batch.shape[0], self.size[0]
        ptr = int(self.bank_ptr)
        if ptr + n >= size:
            self.bank[ptr:] = batch[:size - ptr]
            self.bank_ptr.zero_()
        else:
            self.bank[ptr:ptr + n] = batch
            self.bank_ptr[0] = ptr + n


def _nt_xent_eager(out0: Tensor, out1: Tensor, temperature: float) -> Tensor:
    """The full-matrix NT-Xent, for a negative temperature only (lightly accepts one; fastssl's
    fused ops take a temperature > 0). Single process, no memory bank."""
    b = out0.shape[0]
    z = torch.cat([F.normalize(out0, dim=1), F.normalize(out1, dim=1)], 0)
    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device),
                                float("-inf"))
    labels = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(logits, labels)


class NTXentLoss(nn.Module):
    """lightly 1.6.0's ``NTXentLoss(temperature=0.5, memory_bank_size=0,
    gather_distributed=False)``, ``forward(out0, out1) -> Tensor`` (0-dim), on
    :func:`fastssl.functional.nt_xent` (streamed log-sum-exp, no 2N x 2N matrix).

    As lightly: default temperature 0.5; ``memory_bank_size`` 0 or a (num_features, dim)
    tuple (a bare int > 0 raises ``ValueError``, as lightly 1.6.0); the bank (submodule
    ``memory_bank``, buffer ``bank``, not saved in the state_dict) holds past normalised
    ``out1`` rows, is used as it was before the call and is updated when ``out0.requires_grad``;
    ``abs(temperature) < 1e-8`` and ``gather_distributed=True`` without
    ``torch.distributed`` raise ``ValueError``. With ``gather_distributed`` each rank
    returns the mean over its own rows, as lightly.

    Deliberate difference: a negative temperature (which lightly accepts) runs a full-matrix
    eager path, single process and without a memory bank (``ValueError`` otherwise); it has no
    use in training.
    """

    def __init__(self, temperature: float = 0.5,
                 memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False):
        super().__init__()
        self.memory_bank = _MemoryBank(size=memory_bank_size,
                                       gather_distributed=gather_distributed)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.eps = 1e-8
        if abs(self.temperature) < self.eps:
            raise ValueError("Illegal temperature: abs({}) < 1e-8".format(self.temperature))
        _check_distributed_available("gather_distributed", gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        use_bank = self.memory_bank.size[0] > 0
        if self.temperature < 0:
            if use_bank or (self.gather_distributed and dist_utils.is_distributed()):
                raise ValueError(f"temperature: a negative temperature ({self.temperature}) is "
                                 "supported only in a single process without a memory bank")
            return _nt_xent_eager(out0, out1, self.temperature)
        bank = self.memory_bank.bank.clone().to(out0.device) if use_bank else None
        with dist_utils.per_rank_values():
            loss = functional.nt_xent(out0, out1, self.temperature, memory_bank=bank,
                                      gather_distributed=self.gather_distributed)
        if use_bank and out0.requires_grad:  # lightly's update rule (not torch.is_grad_enabled)
            self.memory_bank.enqueue(F.normalize(out1.detach(), dim=1))
        return loss


def negative_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float = 0.5) -> Tensor:
    """lightly 1.6.0's DCLW weights, w_i = 2 - N softmax_i(<out0_i, out1_i> / sigma) over the
    (local) batch, without gradient."""
    similarity = (out0.detach() * out1.detach()).sum(dim=1) / sigma
    return (2 - out0.shape[0] * torch.softmax(similarity, dim=0)).detach()


class DCLLoss(nn.Module):
    """lightly 1.6.0's ``DCLLoss(temperature=0.1, weight_fn=None, gather_distributed=False)``,
    ``forward(out0, out1) -> Tensor`` (0-dim), on :func:`fastssl.functional.dcl`.

    As lightly: ``weight_fn(out0, out1)`` is called on the normalised local rows, once per
    direction; with ``gather_distributed`` the negatives come from every rank and each rank
    returns the mean over its own rows; ``gather_distributed=True`` without
    ``torch.distributed`` raises ``ValueError``.

    Deliberate differences: ``temperature <= 0`` raises ``ValueError`` (lightly returns nan
    or a meaningless value), and so does a (global) batch of one row (lightly: -inf, no
    negatives).
    """

    def __init__(self, temperature: float = 0.1,
                 weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 gather_distributed: bool = False):
        super().__init__()
        self.temperature = temperature
        self.weight_fn = weight_fn
        self.gather_distributed = gather_distributed
        _check_distributed_available("gather_distributed", gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        with dist_utils.per_rank_values():
            return functional.dcl(out0, out1, self.temperature,
                                  weight_fn=self.weight_fn if self.weight_fn else None,
                                  gather_distributed=self.gather_distributed)


class DCLWLoss(DCLLoss):
    """lightly 1.6.0's ``DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False)``:
    :class:`DCLLoss` with ``weight_fn = negative_mises_fisher_weights(sigma=sigma)``. As
    lightly, the weights' softmax runs over each rank's own rows (fastssl's native
    :class:`fastssl.losses.DCLWLoss` takes it over the global batch)."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5,
                 gather_distributed: bool = False):
        super().__init__(temperature=temperature,
                         weight_fn=functools.partial(negative_mises_fisher_weights, sigma=sigma),
                         gather_distributed=gather_distributed)


@torch.no_grad()
def sinkhorn(out: Tensor, iterations: int = 3, epsilon: float = 0.05,
             gather_distributed: bool = False) -> Tensor:
    """lightly 1.6.0's ``sinkhorn(out, iterations=3, epsilon=0.05, gather_distributed=False)``
    on :func:`fastssl.functional.sinkhorn` (log domain, so no overflow where lightly's
    ``exp(out / epsilon)`` overflows). ``iterations=0``: the initial normalisation only, as
    lightly. Deliberate difference: float16/bfloat16 scores give float32 codes (lightly's are
    in the input dtype)."""
    return functional.sinkhorn(out, epsilon=epsilon, iterations=iterations,
                               gather_distributed=gather_distributed)


class SwaVLoss(nn.Module):
    """lightly 1.6.0's ``SwaVLoss(temperature=0.1, sinkhorn_iterations=3,
    sinkhorn_epsilon=0.05, sinkhorn_gather_distributed=False)``,
    ``forward(high_resolution_outputs, low_resolution_outputs, queue_outputs=None)`` with
    lists of (B, K) prototype scores, returning a tensor of shape (1,) as lightly's; on
    :func:`fastssl.functional.swav` (one fused cross-entropy per crop, Sinkhorn in the log
    domain).

    As lightly: every high-resolution crop gets Sinkhorn codes (with ``queue_outputs[i]``
    joined before Sinkhorn and only the batch's codes kept), every other crop predicts them;
    ``sinkhorn_iterations=0`` is the normalisation only; with
    ``sinkhorn_gather_distributed`` Sinkhorn's sums run over every rank and each rank returns
    its own loss; ``sinkhorn_gather_distributed=True`` without ``torch.distributed`` raises
    ``ValueError``.

    Deliberate differences: temperature and epsilon must be > 0 and there must be at least two
    crops in all (``ValueError``; lightly returns nan or a meaningless value); float16/bfloat16
    scores give a float32 loss.
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3,
                 sinkhorn_epsilon: float = 0.05, sinkhorn_gather_distributed: bool = False):
        super().__init__()
        _check_distributed_available("sinkhorn_gather_distributed", sinkhorn_gather_distributed)
        self.temperature = temperature
        self.sinkhorn_iterations = sinkhorn_iterations
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_gather_distributed = sinkhorn_gather_distributed

    def forward(self, high_resolution_outputs: List[Tensor],
                low_resolution_outputs: List[Tensor],
                queue_outputs: Union[List[Tensor], None] = None) -> Tensor:
        for name, value in (("high_resolution_outputs", high_resolution_outputs),
                            ("low_resolution_outputs", low_resolution_outputs)):
            if not isinstance(value, (list, tuple)):
                raise TypeError(f"{name}: expected a list of (B, K) tensors, got "
                                f"{type(value).__name__}")
        n_high = len(high_resolution_outputs)
        queue = None
        if queue_outputs is not None:
            queue = list(queue_outputs[:n_high])  # lightly reads queue_outputs[i], i < n_high
        with dist_utils.per_rank_values():
            loss = functional.swav(list(high_resolution_outputs) + list(low_resolution_outputs),
                                   n_assign_crops=n_high, temperature=self.temperature,
                                   epsilon=self.sinkhorn_epsilon,
                                   sinkhorn_iterations=self.sinkhorn_iterations,
                                   queue_scores=queue,
                                   gather_distributed=self.sinkhorn_gather_distributed)
        return loss.reshape(1)


# ---- the DINO family -------------------------------------------------------------------------

_CENTER_MODES = ("mean",)


def _check_center_mode(center_mode: str) -> None:
    if center_mode not in _CENTER_MODES:
        raise ValueError(f"Unknown mode '{center_mode}'. Valid modes are {sorted(_CENTER_MODES)}.")


def _float32_value(x) -> float:
    """lightly holds temperatures as float32 tensors (torch.tensor(t), torch.linspace): the
    same rounded value, as a Python float."""
    return float(torch.tensor(float(x), dtype=torch.float32))


@torch.no_grad()
def _center_mean(x: Tensor) -> Tensor:
    """lightly's center_mean over every dimension but the last: the local mean, then averaged
    over ranks when torch.distributed is initialised."""
    batch_center = torch.mean(x, dim=tuple(range(x.dim() - 1)))
    if dist_utils.is_distributed():
        dist_utils.all_reduce_sum(batch_center)
        batch_center = batch_center / dist_utils.world_size()
    return batch_center


class DINOLoss(nn.Module):
    """lightly 1.6.0's ``DINOLoss(output_dim=65536, warmup_teacher_temp=0.04,
    teacher_temp=0.04, warmup_teacher_temp_epochs=30, student_temp=0.1, center_momentum=0.9,
    center_mode="mean")``, ``forward(teacher_out, student_out, teacher_temp=None, epoch=None)``
    with lists of (B, K) logits per view, on :func:`fastssl.functional.dino` (one fused
    cross-entropy per student view against its summed teacher targets, no stacked softmax or
    log-softmax copies).

    As lightly: the buffer ``center`` (1, 1, K) and the float32 ``teacher_temp_schedule``
    (``torch.linspace``); the temperature is ``teacher_temp`` when given, else the schedule's
    value at ``epoch`` during the warm-up, else the constructor's ``teacher_temp``; the pairs
    (teacher view i, student view j), j != i, averaged; the center updated after the loss with
    the mean of the teacher outputs (averaged over ranks when torch.distributed is
    initialised); each rank's value is its own batch's.

    Deliberate differences: more teacher views than student views is a ``ValueError`` (lightly
    accepts it); float16/bfloat16 logits give a float32 loss.
    """

    def __init__(self, output_dim: int = 65536, warmup_teacher_temp: float = 0.04,
                 teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 30,
                 student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_mode: str = "mean") -> None:
        super().__init__()
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        _check_center_mode(center_mode)
        self.center_mode = center_mode
        self.register_buffer("center", torch.zeros(1, 1, output_dim))
        self.center_momentum = center_momentum
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_schedule = torch.linspace(start=warmup_teacher_temp, end=teacher_temp,
                                                    steps=warmup_teacher_temp_epochs)

    def _temperature(self, teacher_temp, epoch) -> float:
        if teacher_temp is not None:
            return _float32_value(teacher_temp)
        if epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            return float(self.teacher_temp_schedule[epoch])
        return _float32_value(self.teacher_temp)

    def forward(self, teacher_out: List[Tensor], student_out: List[Tensor],
                teacher_temp: Optional[float] = None, epoch: Optional[int] = None) -> Tensor:
        for name, value in (("teacher_out", teacher_out), ("student_out", student_out)):
            if not isinstance(value, (list, tuple)):
                raise TypeError(f"{name}: expected a list of (batch_size, output_dim) tensors, "
                                f"one per view, got {type(value).__name__}")
        temp = self._temperature(teacher_temp, epoch)
        K = self.center.shape[-1]
        loss = functional.dino(list(student_out), list(teacher_out),
                               center=self.center.reshape(1, K), student_temp=self.student_temp,
                               teacher_temp=temp, centering="softmax", ignore_diagonal=True)
        self.update_center(torch.stack([t.detach() for t in teacher_out]))
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """lightly's moving-average update from the stacked (views, B, K) teacher outputs."""
        batch_center = _center_mean(teacher_out).reshape(self.center.shape)
        m = self.center_momentum
        self.center.data = self.center * m + batch_center * (1 - m)


class _Center(nn.Module):
    """lightly's ``Center`` (the buffer ``center`` of size (1, K), mean mode), so that the
    compat IBOTPatchLoss has lightly's state_dict keys (``center.center``)."""

    def __init__(self, size, mode: str = "mean", momentum: float = 0.9) -> None:
        super().__init__()
        _check_center_mode(mode)
        self.size = tuple(size)
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(self.size))

    @property
    def value(self) -> Tensor:
        return self.center

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        batch_center = _center_mean(x).reshape(self.center.shape)
        self.center = self.center * self.momentum + batch_center * (1 - self.momentum)


class IBOTPatchLoss(nn.Module):
    """lightly 1.6.0's ``IBOTPatchLoss(output_dim=65536, teacher_temp=0.04, student_temp=0.1,
    center_mode="mean", center_momentum=0.9)``, ``forward(teacher_out, student_out, mask,
    teacher_temp=None)``: (M, K) teacher and student outputs of the M masked tokens and the
    (B, H, W) bool mask with M True entries; on :func:`fastssl.functional.ibot_patch`'s fused
    path (per token the cross-entropy of softmax((t - center) / T_t) against the student's
    log-softmax, weighted by 1 / the image's masked count, summed and divided by B). The
    center (``center.center``, (1, K)) is updated after the loss with the mean teacher token.

    Deliberate differences: a mask whose True count is not M is a ``ValueError`` naming
    ``masks``; float16/bfloat16 outputs give a float32 loss.
    """

    def __init__(self, output_dim: int = 65536, teacher_temp: float = 0.04,
                 student_temp: float = 0.1, center_mode: str = "mean",
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center = _Center(size=(1, output_dim), mode=center_mode, momentum=center_momentum)

    def forward(self, teacher_out: Tensor, student_out: Tensor, mask: Tensor,
                teacher_temp: Optional[float] = None) -> Tensor:
        temp = _float32_value(self.teacher_temp if teacher_temp is None else teacher_temp)
        loss = _ibot_patch_masked(student_out, teacher_out, mask, center=self.center.value,
                                  student_temp=self.student_temp, teacher_temp=temp)
        self.center.update(teacher_out.detach())
        return loss


class KoLeoLoss(nn.Module):
    """lightly 1.6.0's ``KoLeoLoss(p=2, eps=1e-8)``, ``forward(x)`` on (B, D) features: each
    row's nearest other row (largest cosine, searched tile by tile, no B x B matrix), its
    p-norm distance with ``PairwiseDistance(p, eps)``, -mean log(distance + eps).
    Deliberate difference: float16/bfloat16 features give a float32 loss."""

    def __init__(self, p: float = 2, eps: float = 1e-8):
        super().__init__()
        self.p = p
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return _koleo_lp(x, p=float(self.p), eps=self.eps)
