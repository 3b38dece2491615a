"""The input checks of the DINO family (dino, dino_center, ibot_patch, koleo), shared by the
reference, the functional layer and the modules. Kept apart from :mod:`fastssl._checks` so
the families can grow without merge conflicts; built from the same primitives, and every
message names the argument (docs/api.md, "Bad input").
"""
from __future__ import annotations

import torch

from fastssl._validation import (
    accumulation_dtype,
    check_choice,
    check_embeddings,
    check_flag,
    check_int,
    check_positive,
    check_range,
    check_reciprocal,
    check_same_device,
    check_tensor,
)

CENTERINGS = ("softmax", "sinkhorn_knopp")


def _crop_list(name: str, crops) -> list[torch.Tensor]:
    if isinstance(crops, torch.Tensor) or not isinstance(crops, (list, tuple)):
        raise TypeError(f"{name}: expected a list or tuple of (B, K) tensors, one per crop, "
                        f"got {type(crops).__name__}")
    if len(crops) == 0:
        raise ValueError(f"{name}: expected at least one crop, got an empty list")
    out = []
    for i, c in enumerate(crops):
        check_embeddings(f"{name}[{i}]", c)
        out.append(c)
    return out


def _check_temperature(name: str, value, acc: torch.dtype) -> float:
    return check_reciprocal(name, check_positive(name, value), acc)


def check_center(center, K: int, like: torch.Tensor) -> torch.Tensor | None:
    """None, or a (1, K) (or (K,)) float tensor on the logits' device; returns it as (1, K)."""
    if center is None:
        return None
    check_tensor("center", center, min_rows=1)
    if tuple(center.shape) not in ((1, K), (K,)):
        raise ValueError(f"center: expected shape (1, {K}) (one value per prototype), got "
                         f"{tuple(center.shape)}")
    check_same_device([("logits", like), ("center", center)])
    return center.reshape(1, K)


def check_centering(centering, center, sinkhorn_iterations) -> str:
    check_choice("centering", centering, CENTERINGS)
    check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=0)
    if centering == "sinkhorn_knopp" and center is not None:
        raise ValueError("center: not used with centering='sinkhorn_knopp' (the Sinkhorn-Knopp "
                         "targets need no center); pass center=None")
    return centering


def check_dino(student_out, teacher_out, center, student_temp, teacher_temp, centering,
               sinkhorn_iterations, ignore_diagonal, gather_distributed):
    """Returns (students, teachers, center as (1, K) or None, student_temp, teacher_temp, pairs)
    with pairs the list of (teacher crop, student crop) index pairs of the loss."""
    students = _crop_list("student_out", student_out)
    teachers = _crop_list("teacher_out", teacher_out)
    if len(teachers) > len(students):
        raise ValueError(f"teacher_out: expected at most as many crops as student_out "
                         f"({len(students)}: the teacher sees the global crops, the student "
                         f"all crops), got {len(teachers)}")
    B, K = students[0].shape
    for name, crops in (("student_out", students), ("teacher_out", teachers)):
        for i, c in enumerate(crops):
            if tuple(c.shape) != (B, K):
                raise ValueError(f"{name}[{i}]: expected shape ({B}, {K}) (the shape of "
                                 f"student_out[0]: every crop has the same batch size B and "
                                 f"number of prototypes K), got {tuple(c.shape)}")
    check_same_device([(f"student_out[{i}]", c) for i, c in enumerate(students)]
                      + [(f"teacher_out[{i}]", c) for i, c in enumerate(teachers)])
    for i, c in enumerate(students[1:], start=1):
        if c.dtype != students[0].dtype:
            raise TypeError(f"student_out[{i}]: expected dtype {students[0].dtype} (the dtype "
                            f"of student_out[0]), got {c.dtype}")
    for i, c in enumerate(teachers[1:], start=1):
        if c.dtype != teachers[0].dtype:
            raise TypeError(f"teacher_out[{i}]: expected dtype {teachers[0].dtype} (the dtype "
                            f"of teacher_out[0]), got {c.dtype}")
    acc = accumulation_dtype(students[0])
    st = _check_temperature("student_temp", student_temp, acc)
    tt = _check_temperature("teacher_temp", teacher_temp, accumulation_dtype(teachers[0]))
    check_centering(centering, center, sinkhorn_iterations)
    center = check_center(center, K, students[0])
    check_flag("ignore_diagonal", ignore_diagonal)
    check_flag("gather_distributed", gather_distributed)
    pairs = [(i, j) for i in range(len(teachers)) for j in range(len(students))
             if not (ignore_diagonal and i == j)]
    if not pairs:
        raise ValueError("student_out: expected at least two crops in all with "
                         "ignore_diagonal=True (the pair of a crop with itself is skipped, so "
                         "one teacher crop and one student crop leave no term)")
    return students, teachers, center, st, tt, pairs


def check_dino_center(teacher_out, center, momentum, gather_distributed):
    """Returns (teachers, center as (1, K))."""
    teachers = _crop_list("teacher_out", teacher_out)
    B, K = teachers[0].shape
    for i, c in enumerate(teachers[1:], start=1):
        if tuple(c.shape) != (B, K):
            raise ValueError(f"teacher_out[{i}]: expected shape ({B}, {K}) (the shape of "
                             f"teacher_out[0]), got {tuple(c.shape)}")
    check_same_device([(f"teacher_out[{i}]", c) for i, c in enumerate(teachers)])
    if center is None:
        raise TypeError("center: expected a (1, K) tensor, got None")
    center = check_center(center, K, teachers[0])
    check_range("momentum", momentum, 0.0, 1.0)
    check_flag("gather_distributed", gather_distributed)
    return teachers, center


def check_ibot_patch(student_patches, teacher_patches, masks, center, student_temp,
                     teacher_temp, centering, sinkhorn_iterations, gather_distributed):
    """Returns (center as (1, K) or None, student_temp, teacher_temp)."""
    check_tensor("student_patches", student_patches, ndim=3)
    check_tensor("teacher_patches", teacher_patches, ndim=3)
    if student_patches.shape[2] < 1 or student_patches.shape[1] < 1:
        raise ValueError(f"student_patches: expected a non-empty (B, P, K) tensor, got shape "
                         f"{tuple(student_patches.shape)}")
    if teacher_patches.shape != student_patches.shape:
        raise ValueError(f"teacher_patches: expected shape {tuple(student_patches.shape)} (the "
                         f"shape of student_patches), got {tuple(teacher_patches.shape)}")
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks: expected a (B, P) bool tensor, got {type(masks).__name__}")
    if masks.dtype != torch.bool:
        raise TypeError(f"masks: expected dtype torch.bool, got {masks.dtype}")
    B, P, K = student_patches.shape
    if tuple(masks.shape) != (B, P):
        raise ValueError(f"masks: expected shape ({B}, {P}) (one flag per patch of "
                         f"student_patches), got {tuple(masks.shape)}")
    check_same_device([("student_patches", student_patches),
                       ("teacher_patches", teacher_patches), ("masks", masks)])
    st = _check_temperature("student_temp", student_temp, accumulation_dtype(student_patches))
    tt = _check_temperature("teacher_temp", teacher_temp, accumulation_dtype(teacher_patches))
    check_centering(centering, center, sinkhorn_iterations)
    center = check_center(center, K, student_patches)
    check_flag("gather_distributed", gather_distributed)
    return center, st, tt


def check_ibot_patch_masked(student_tokens, teacher_tokens, masks, center, student_temp,
                            teacher_temp, centering, sinkhorn_iterations, gather_distributed):
    """The masked-token form (DINOv2's forward_masked, lightly's IBOTPatchLoss): (M, K) tokens
    and a (B, ...) bool mask with M True entries. Returns (center, student_temp, teacher_temp)."""
    check_tensor("student_tokens", student_tokens, ndim=2, min_rows=0)
    check_tensor("teacher_tokens", teacher_tokens, ndim=2, min_rows=0)
    if teacher_tokens.shape != student_tokens.shape:
        raise ValueError(f"teacher_tokens: expected shape {tuple(student_tokens.shape)} (the "
                         f"shape of student_tokens), got {tuple(teacher_tokens.shape)}")
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks: expected a (B, ...) bool tensor, got {type(masks).__name__}")
    if masks.dtype != torch.bool:
        raise TypeError(f"masks: expected dtype torch.bool, got {masks.dtype}")
    if masks.dim() < 2 or masks.shape[0] < 1:
        raise ValueError(f"masks: expected a (B, ...) tensor with B >= 1 and one flag per "
                         f"patch, got shape {tuple(masks.shape)}")
    check_same_device([("student_tokens", student_tokens), ("teacher_tokens", teacher_tokens),
                       ("masks", masks)])
    n = int(masks.sum())  # one host read: the tokens must be the masked ones
    if n != student_tokens.shape[0]:
        raise ValueError(f"masks: expected {student_tokens.shape[0]} True entries (one per row "
                         f"of student_tokens), got {n}")
    K = student_tokens.shape[1]
    st = _check_temperature("student_temp", student_temp, accumulation_dtype(student_tokens))
    tt = _check_temperature("teacher_temp", teacher_temp, accumulation_dtype(teacher_tokens))
    check_centering(centering, center, sinkhorn_iterations)
    center = check_center(center, K, student_tokens)
    check_flag("gather_distributed", gather_distributed)
    return center, st, tt


def check_koleo(z, eps, gather_distributed) -> float:
    """Returns eps as a float."""
    check_embeddings("z", z)
    eps = check_positive("eps", eps)
    check_flag("gather_distributed", gather_distributed)
    return eps


def check_koleo_rows(z, rows: int) -> None:
    """KoLeo needs another row to be a neighbour: at least 2 rows in the (global) batch."""
    if rows < 2:
        raise ValueError(f"z: koleo needs a (global) batch of at least 2 rows (each row's "
                         f"nearest other row), got shape {tuple(z.shape)}")
