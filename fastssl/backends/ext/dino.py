"""The C++ entry of the DINO family's table (fastssl/ops/dino.py), glue over ``fastssl._C``:
the teacher softmax is SwAV's row pass (csrc/swav_cpu.cpp) with the prototype offsets
a = -center / teacher_temp; the neighbour search is csrc/dino_cpu.cpp."""
from __future__ import annotations

import torch

from fastssl import _C
from fastssl._validation import accumulation_dtype


class CppDino:
    """teacher_softmax and nearest_neighbor on CPU tensors."""

    @staticmethod
    def teacher_softmax(teacher: torch.Tensor, center: torch.Tensor,
                        teacher_temp: float) -> torch.Tensor:
        acc = accumulation_dtype(teacher)
        # softmax_k(t / T + a) with a = -center / T: the row pass's codes
        a = (-center.to(acc) / teacher_temp).contiguous()
        return _C.sinkhorn_rowpass_cpu(teacher.to(acc).contiguous(), float(teacher_temp), a,
                                       True)

    @staticmethod
    def nearest_neighbor(x: torch.Tensor, x_all: torch.Tensor, offset: int) -> torch.Tensor:
        return _C.koleo_nearest_cpu(x.contiguous(), x_all.contiguous(), int(offset))
