"""The PyTorch entry of the DINO family's table (fastssl/ops/dino.py): chunked, any device.

Chunks of rows bound the temporaries (each at most ``_CHUNK`` elements), so neither the
teacher softmax nor KoLeo's neighbour search holds more than one chunk beyond its output.
"""
from __future__ import annotations

import torch

from fastssl._validation import accumulation_dtype

# elements per temporary chunk (16 MB of float32)
_CHUNK = 1 << 22


def _rows_per_chunk(cols: int) -> int:
    return max(1, _CHUNK // max(1, cols))


class TorchDino:
    """teacher_softmax and nearest_neighbor in chunks of rows."""

    @staticmethod
    def teacher_softmax(teacher: torch.Tensor, center: torch.Tensor,
                        teacher_temp: float) -> torch.Tensor:
        """softmax((teacher - center) / teacher_temp) per row, in the accumulation dtype;
        center a (K,) tensor in that dtype."""
        acc = accumulation_dtype(teacher)
        B, K = teacher.shape
        out = torch.empty((B, K), dtype=acc, device=teacher.device)
        step = _rows_per_chunk(K)
        for r0 in range(0, B, step):
            x = teacher[r0:r0 + step].to(acc) - center
            torch.softmax(x / teacher_temp, dim=1, out=out[r0:r0 + step])
        return out

    @staticmethod
    def nearest_neighbor(x: torch.Tensor, x_all: torch.Tensor, offset: int) -> torch.Tensor:
        """For each row i of x (N, D), the index in x_all (M, D) of its largest inner product,
        row offset + i excluded (itself); the first index among ties. int64 (N,)."""
        N, M = x.shape[0], x_all.shape[0]
        out = torch.empty((N,), dtype=torch.int64, device=x.device)
        step = _rows_per_chunk(M)
        for r0 in range(0, N, step):
            sims = x[r0:r0 + step] @ x_all.t()
            own = torch.arange(sims.shape[0], device=x.device)
            sims[own, own + (offset + r0)] = float("-inf")
            out[r0:r0 + step] = sims.argmax(dim=1)
        return out
