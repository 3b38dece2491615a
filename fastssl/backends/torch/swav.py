"""The torch backend of the swav family, and the log-domain Sinkhorn that every backend but
cpp's one-process cached path runs with its own column-statistics and row passes
(fastssl/ops/swav.py's docstring has the recursion).
"""
from __future__ import annotations

from typing import Callable

import torch

from fastssl import distributed as D
from fastssl._validation import accumulation_dtype


def _combine_colstats(M: torch.Tensor, S: torch.Tensor, distributed: bool) -> torch.Tensor:
    """a = -logsumexp over all ranks' rows, from the local column max M and shifted sum S."""
    if distributed:
        M_global = D.all_reduce_max(M.clone())
        S = D.all_reduce_sum(S * torch.exp(M - M_global))
        M = M_global
    return -(M + torch.log(S))


def _normalisation_only(a: torch.Tensor, scores: torch.Tensor, epsilon: float,
                        distributed: bool) -> torch.Tensor:
    """iterations = 0 (lightly and SwAV allow it): upstream divides Q = exp(x) by its total over
    all ranks and multiplies by the global sample count B, with no row or column scaling, so
    codes[b, k] = B exp(x[b, k] - logsumexp of all x). The total comes from the column
    statistics already taken, a[k] = -logsumexp_b x[b, k]; rows do not sum to 1 here."""
    total = torch.logsumexp(-a, dim=0)
    rows = scores.shape[0] * (D.world_size() if distributed else 1)
    x = scores.to(a.dtype) / epsilon
    return torch.exp(x - total) * rows


def log_domain_sinkhorn(colstats: Callable, rowpass: Callable, scores: torch.Tensor,
                         epsilon: float, iterations: int, distributed: bool) -> torch.Tensor:
    M, S = colstats(scores, epsilon)
    a = _combine_colstats(M, S, distributed)
    if iterations == 0:
        return _normalisation_only(a, scores, epsilon, distributed)
    for _ in range(iterations - 1):
        S = rowpass(scores, epsilon, a, False)
        if distributed:
            D.all_reduce_sum(S)
        # a column sums to >= 1/(B K) in exact arithmetic; at |scores / epsilon| ~ 1e9 rounding
        # can make it 0, and log 0 would turn every code into NaN (the smallest normal instead)
        a = a - torch.log(S.clamp_min(torch.finfo(S.dtype).tiny))
    return rowpass(scores, epsilon, a, True)



def scaled(grad, grad_scale):
    """The gradient times the one-element grad_scale (as it is, without one)."""
    return grad if grad_scale is None else grad * grad_scale.to(grad.dtype)


def _torch_colstats(scores, epsilon):
    x = scores.to(accumulation_dtype(scores)) / epsilon
    M = x.amax(dim=0)
    return M, torch.exp(x - M).sum(dim=0)


def _torch_rowpass(scores, epsilon, a, write_codes):
    p = torch.softmax(scores.to(accumulation_dtype(scores)) / epsilon + a, dim=1)
    return p if write_codes else p.sum(dim=0)



class TorchSwav:
    """The same passes as vectorised PyTorch (any device)."""

    @staticmethod
    def sinkhorn(scores, epsilon, iterations, distributed):
        return log_domain_sinkhorn(_torch_colstats, _torch_rowpass, scores, epsilon, iterations,
                                   distributed)

    @staticmethod
    def cross_entropy(scores, targets, temperature, compute_grad, grad_scale=None):
        acc = accumulation_dtype(scores)
        log_p = torch.log_softmax(scores.to(acc) / temperature, dim=1)
        q = targets.to(acc)
        loss = -(q * log_p).sum()
        if not compute_grad:
            return loss, log_p.new_empty((0,))
        grad = (torch.exp(log_p) * q.sum(dim=1, keepdim=True) - q) / temperature
        return loss, scaled(grad, grad_scale)
