"""SwAV Sinkhorn-Knopp op: ``torch.ops.fastssl.sinkhorn`` and its one backend table.

Log-domain form. Upstream scales Q = exp(x).T, x = scores / epsilon, alternately by global
prototype (row) sums and local sample (column) sums; after its last sample normalisation
each code is a softmax over prototypes, codes[b] = softmax_k(x[b] + a), where a[k] is the
log of the accumulated prototype scalings (all constant factors, 1/K, 1/B and the global sum,
cancel in the softmax). The recursion for a, with n = iterations:

    a  = -logsumexp_b x[b, k]                                       (pass 0, "colstats")
    a -= log sum_b softmax_k(x[b] + a)[k]        n - 1 times        ("rowpass", column sums)
    codes = softmax_k(x + a)                                         ("rowpass", write codes)

Each pass streams the (B, K) scores once (the row pass revisits each row while it is in
cache) and keeps only K-vectors; nothing B x K is written before the codes. The C++ path
upcasts float16/bfloat16 scores to float32 first (one copy). Every exponent is shifted by a max (pass 0: the column max; the others:
the row max), so there is no overflow at any epsilon or in float16/bfloat16 (computed in
float32; float64 end to end for float64). Once a is set, each prototype's column of
softmax probabilities has mass >= 1/(B K), so log S cannot underflow either.
With gather_distributed, the column statistics are all-reduced between passes (pass 0: max
then sum; then one K-vector sum per iteration, as upstream's one (K, 1) all-reduce).

Codes come back in the accumulation dtype (float32, or float64 for float64 scores), as
upstream's under autocast, where exp runs in float32.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastssl import distributed as D
from fastssl._backend import select


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _combine_colstats(M: torch.Tensor, S: torch.Tensor, distributed: bool) -> torch.Tensor:
    """a = -logsumexp over all ranks' rows, from the local column max M and shifted sum S."""
    if distributed:
        M_global = D.all_reduce_max(M.clone())
        S = D.all_reduce_sum(S * torch.exp(M - M_global))
        M = M_global
    return -(M + torch.log(S))


def _log_domain_sinkhorn(colstats: Callable, rowpass: Callable, scores: torch.Tensor,
                         epsilon: float, iterations: int, distributed: bool) -> torch.Tensor:
    M, S = colstats(scores, epsilon)
    a = _combine_colstats(M, S, distributed)
    for _ in range(iterations - 1):
        S = rowpass(scores, epsilon, a, False)
        if distributed:
            D.all_reduce_sum(S)
        a = a - torch.log(S)
    return rowpass(scores, epsilon, a, True)


# ---- torch: the same passes as vectorised PyTorch (any device) -------------------------------

def _torch_colstats(scores, epsilon):
    x = scores.to(accumulation_dtype(scores.dtype)) / epsilon
    M = x.amax(dim=0)
    return M, torch.exp(x - M).sum(dim=0)


def _torch_rowpass(scores, epsilon, a, write_codes):
    p = torch.softmax(scores.to(accumulation_dtype(scores.dtype)) / epsilon + a, dim=1)
    return p if write_codes else p.sum(dim=0)


def _sinkhorn_torch(scores, epsilon, iterations, distributed):
    return _log_domain_sinkhorn(_torch_colstats, _torch_rowpass, scores, epsilon, iterations,
                                distributed)


# ---- cpp: fastssl._C (OpenMP, float32/float64; float16/bfloat16 are upcast first) ------------

def _cpp_input(scores):
    return scores.to(accumulation_dtype(scores.dtype)).contiguous()


def _sinkhorn_cpp(scores, epsilon, iterations, distributed):
    from fastssl import _C
    s = _cpp_input(scores)
    return _log_domain_sinkhorn(lambda x, e: _C.sinkhorn_colstats_cpu(x, e),
                                lambda x, e, a, w: _C.sinkhorn_rowpass_cpu(x, e, a.contiguous(), w),
                                s, epsilon, iterations, distributed)


# ---- cuda: csrc/sinkhorn_cuda.cu through csrc/sinkhorn_cuda_glue.cpp -------------------------

def _sinkhorn_cuda(scores, epsilon, iterations, distributed):
    from fastssl import _C
    s = scores.contiguous()
    return _log_domain_sinkhorn(lambda x, e: _C.sinkhorn_colstats_cuda(x, e),
                                lambda x, e, a, w: _C.sinkhorn_rowpass_cuda(x, e, a.contiguous(), w),
                                s, epsilon, iterations, distributed)


# ---- triton: kernels/sinkhorn.py ---------------------------------------------------------------

def _sinkhorn_triton(scores, epsilon, iterations, distributed):
    from fastssl.kernels import sinkhorn as K
    s = scores.contiguous()
    return _log_domain_sinkhorn(K.colstats, lambda x, e, a, w: K.rowpass(x, e, a.contiguous(), w),
                                s, epsilon, iterations, distributed)


# ---- reference: fastssl.reference (upstream arithmetic, in the input dtype) ---------------------

def _sinkhorn_reference(scores, epsilon, iterations, distributed):
    from fastssl.reference.swav import sinkhorn as ref_sinkhorn
    codes = ref_sinkhorn(scores, epsilon=epsilon, iterations=iterations,
                         gather_distributed=distributed)
    return codes.to(accumulation_dtype(scores.dtype))


SINKHORN_BACKENDS = {
    "reference": _sinkhorn_reference,
    "torch": _sinkhorn_torch,
    "cpp": _sinkhorn_cpp,
    "cuda": _sinkhorn_cuda,
    "triton": _sinkhorn_triton,
}


@torch.library.custom_op("fastssl::sinkhorn", mutates_args=())
def _sinkhorn_op(scores: torch.Tensor, epsilon: float, iterations: int,
                 gather_distributed: bool) -> torch.Tensor:
    _, impl = select("sinkhorn", scores.device, SINKHORN_BACKENDS)
    distributed = bool(gather_distributed) and D.is_distributed()
    return impl(scores, float(epsilon), int(iterations), distributed)


@_sinkhorn_op.register_fake
def _sinkhorn_fake(scores, epsilon, iterations, gather_distributed):
    return scores.new_empty(scores.shape, dtype=accumulation_dtype(scores.dtype))


def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int,
             gather_distributed: bool = False) -> torch.Tensor:
    """Codes (B, K) of validated scores; no gradient flows (upstream detaches the scores)."""
    return torch.ops.fastssl.sinkhorn(scores.detach(), float(epsilon), int(iterations),
                                      bool(gather_distributed))


def backend_name(device: torch.device) -> str:
    """The backend that serves sinkhorn on `device` under the current setting (benchmarks)."""
    return select("sinkhorn", device, SINKHORN_BACKENDS)[0]
