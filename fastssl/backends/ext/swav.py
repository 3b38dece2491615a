"""The cpp and cuda backends of the swav family: glue over fastssl._C (csrc/swav_cpu.cpp:
OpenMP and vector kernels, the Sinkhorn and the cross-entropy reading float16/bfloat16 as
they are; csrc/swav_cuda.cu through csrc/swav_cuda_glue.cpp)."""
from __future__ import annotations

import torch

from fastssl import _C
from fastssl._validation import accumulation_dtype
from fastssl.backends.torch.swav import log_domain_sinkhorn


_HALF = (torch.float16, torch.bfloat16)


def _cpp_input(scores):
    # float32/float64 contiguous scores go in as they are (to/contiguous return them, no copy)
    return scores.to(accumulation_dtype(scores)).contiguous()


class CppSwav:
    @staticmethod
    def sinkhorn(scores, epsilon, iterations, distributed):
        if not distributed and iterations > 0:
            # One call: scores read in their own dtype (no float32 copy of float16/bfloat16),
            # the exponentials computed once and cached in the codes (csrc/swav_cpu.cpp).
            return _C.sinkhorn_cached_cpu(scores.contiguous(), float(epsilon), int(iterations))
        return log_domain_sinkhorn(
            lambda x, e: _C.sinkhorn_colstats_cpu(x, e),
            lambda x, e, a, w: _C.sinkhorn_rowpass_cpu(x, e, a.contiguous(), w),
            _cpp_input(scores), epsilon, iterations, distributed)

    @staticmethod
    def cross_entropy(scores, targets, temperature, compute_grad, grad_scale=None):
        acc = accumulation_dtype(scores)
        # float16/bfloat16 scores go in as they are (the kernel widens them per vector: no
        # float32 copy); the targets (Sinkhorn codes, float32 already) in the float dtype
        s = scores.contiguous() if scores.dtype in _HALF else _cpp_input(scores)
        q = targets.to(acc).contiguous()
        # the scale is folded into the kernel's gradient pass, its value read in C++ (a CPU
        # tensor: no device sync, and no host read in the traced Python)
        if grad_scale is None:
            return tuple(_C.swav_cross_entropy_cpu(s, q, temperature, compute_grad))
        return tuple(_C.swav_cross_entropy_scaled_cpu(s, q, temperature, compute_grad,
                                                      grad_scale.detach().reshape(1)))


class CudaSwav:
    """Sinkhorn only: there is no hand-written CUDA cross-entropy (forcing cuda on it raises)."""

    @staticmethod
    def sinkhorn(scores, epsilon, iterations, distributed):
        return log_domain_sinkhorn(
            lambda x, e: _C.sinkhorn_colstats_cuda(x, e),
            lambda x, e, a, w: _C.sinkhorn_rowpass_cuda(x, e, a.contiguous(), w),
            scores.contiguous(), epsilon, iterations, distributed)
