"""The cpp and cuda backends of the sortnet family: glue over fastssl._C (csrc/sortnet_cpu.cpp,
csrc/sortnet_cuda.cu). Both take the comparator table and the distribution's id as the Triton
kernels do; cpp also has the fully fused GroCo view (cosine, running top-k, network, BCE)."""
from __future__ import annotations

from fastssl import _C


class CppSortnet:
    """OpenMP kernels; the soft sort's forward saves (d | alpha | dalpha/dd) per comparator, so
    its backward evaluates no distribution again."""

    @staticmethod
    def soft_sort_forward(x, net, dist, steepness, art_lambda, sigma_bwd, want_p):
        return tuple(_C.soft_sort_forward(x, net, dist, steepness, art_lambda, sigma_bwd, want_p))

    @staticmethod
    def soft_sort_backward(gy, gP, d, net, dist, steepness, art_lambda, sigma_bwd, n):
        return _C.soft_sort_backward(gy, gP, d, net, dist, steepness, art_lambda, sigma_bwd)

    @staticmethod
    def groco_rows_forward(sims, k, net, dist, steepness, art_lambda, sigma_bwd):
        return _C.groco_rows_forward(sims, k, net, dist, steepness, art_lambda, sigma_bwd)

    @staticmethod
    def groco_rows_backward(grow, sims, k, net, dist, steepness, art_lambda, sigma_bwd):
        return _C.groco_rows_backward(grow, sims, k, net, dist, steepness, art_lambda, sigma_bwd)

    @staticmethod
    def groco_fused_forward(anchor, negatives, positives, self_offset, k, net, dist, steepness,
                            art_lambda, sigma_bwd):
        return tuple(_C.groco_fused_forward(anchor, negatives, positives, self_offset, k, net,
                                            dist, steepness, art_lambda, sigma_bwd))

    @staticmethod
    def groco_fused_backward(grow, sims, index, negatives, positives, k, net, dist, steepness,
                             art_lambda, sigma_bwd):
        return _C.groco_fused_backward(grow, sims, index, negatives, positives, k, net, dist,
                                       steepness, art_lambda, sigma_bwd)


class CudaSortnet:
    """The hand-written CUDA kernels (compiled, tested under a forced `cuda` backend)."""

    @staticmethod
    def soft_sort_forward(x, net, dist, steepness, art_lambda, sigma_bwd, want_p):
        return tuple(_C.soft_sort_forward_cuda(x, net, dist, steepness, art_lambda, sigma_bwd,
                                               want_p))

    @staticmethod
    def soft_sort_backward(gy, gP, d, net, dist, steepness, art_lambda, sigma_bwd, n):
        return _C.soft_sort_backward_cuda(gy, gP, d, net, dist, steepness, art_lambda, sigma_bwd,
                                          n)

    @staticmethod
    def groco_rows_forward(sims, k, net, dist, steepness, art_lambda, sigma_bwd):
        return _C.groco_rows_forward_cuda(sims, k, net, dist, steepness, art_lambda, sigma_bwd)

    @staticmethod
    def groco_rows_backward(grow, sims, k, net, dist, steepness, art_lambda, sigma_bwd):
        return _C.groco_rows_backward_cuda(grow, sims, k, net, dist, steepness, art_lambda,
                                           sigma_bwd)
