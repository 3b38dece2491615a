"""SwAV ops: ``torch.ops.fastssl.sinkhorn`` (Sinkhorn-Knopp codes) and
``torch.ops.fastssl.swav_cross_entropy`` (the swapped-prediction cross-entropy), each with its
one backend table.

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
(one process) instead caches exp(x - column max) in the codes buffer, so each score costs one
exp and the iterations are multiply-add passes, reading float16/bfloat16 scores as they are
(csrc/swav_cpu.cpp, sinkhorn_cached_cpu; rows at risk of underflow are redone in the log domain). Every exponent is shifted by a max (pass 0: the column max; the others:
the row max), so there is no overflow at any epsilon or in float16/bfloat16 (computed in
float32; float64 end to end for float64). Once a is set, each prototype's column of
softmax probabilities has mass >= 1/(B K), so log S cannot underflow either.
With gather_distributed, the column statistics are all-reduced between passes (pass 0: max
then sum; then one K-vector sum per iteration, as upstream's one (K, 1) all-reduce).

Codes come back in the accumulation dtype (float32, or float64 for float64 scores), as
upstream's under autocast, where exp runs in float32.

swav_cross_entropy(scores, targets, T) = -sum_b <targets[b], log_softmax(scores[b] / T)>, the
sum over rows of one crop's prediction loss. Its gradient in the scores has the closed form
(softmax(s / T) * sum_k targets - targets) / T, so no log_softmax, product or softmax backward
is materialised. The Triton and torch backends write it in the forward, while the row's
exponentials are at hand (the one B x K tensor autograd keeps, as log_softmax keeps its
output), and the backward only scales it. The C++ backend keeps nothing: its backward
recomputes the gradient in one pass over the scores and targets (its rows run on vector
kernels compiled for the CPU's widest ISA, csrc/swav_cpu.cpp), which on CPU costs less than
writing and keeping a gradient per crop.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from fastssl import distributed as D
from fastssl._backend import choose
from fastssl._validation import accumulation_dtype
from fastssl.ops._entry import entry
from fastssl.reference.swav import sinkhorn as _reference_sinkhorn


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


def _log_domain_sinkhorn(colstats: Callable, rowpass: Callable, scores: torch.Tensor,
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


# ---- torch: the same passes as vectorised PyTorch (any device) -------------------------------

def _torch_colstats(scores, epsilon):
    x = scores.to(accumulation_dtype(scores)) / epsilon
    M = x.amax(dim=0)
    return M, torch.exp(x - M).sum(dim=0)


def _torch_rowpass(scores, epsilon, a, write_codes):
    p = torch.softmax(scores.to(accumulation_dtype(scores)) / epsilon + a, dim=1)
    return p if write_codes else p.sum(dim=0)


def _sinkhorn_torch(scores, epsilon, iterations, distributed):
    return _log_domain_sinkhorn(_torch_colstats, _torch_rowpass, scores, epsilon, iterations,
                                distributed)


# ---- cpp: fastssl._C (OpenMP and vector kernels; sinkhorn reads float16/bfloat16 as they are,
# swav_cross_entropy upcasts them first) -------------------------------------------------------

def _cpp_input(scores):
    # float32/float64 contiguous scores go in as they are (to/contiguous return them, no copy)
    return scores.to(accumulation_dtype(scores)).contiguous()


def _sinkhorn_cpp(scores, epsilon, iterations, distributed):
    from fastssl import _C
    if not distributed and iterations > 0:
        # One call: scores read in their own dtype (no float32 copy of float16/bfloat16), the
        # exponentials computed once and cached in the codes (csrc/swav_cpu.cpp).
        return _C.sinkhorn_cached_cpu(scores.contiguous(), float(epsilon), int(iterations))
    s = _cpp_input(scores)
    return _log_domain_sinkhorn(lambda x, e: _C.sinkhorn_colstats_cpu(x, e),
                                lambda x, e, a, w: _C.sinkhorn_rowpass_cpu(x, e, a.contiguous(), w),
                                s, epsilon, iterations, distributed)


# ---- cuda: csrc/swav_cuda.cu through csrc/swav_cuda_glue.cpp -------------------------

def _sinkhorn_cuda(scores, epsilon, iterations, distributed):
    from fastssl import _C
    s = scores.contiguous()
    return _log_domain_sinkhorn(lambda x, e: _C.sinkhorn_colstats_cuda(x, e),
                                lambda x, e, a, w: _C.sinkhorn_rowpass_cuda(x, e, a.contiguous(), w),
                                s, epsilon, iterations, distributed)


# ---- triton: kernels/swav.py ---------------------------------------------------------------

def _sinkhorn_triton(scores, epsilon, iterations, distributed):
    from fastssl.kernels import swav as K
    s = scores.contiguous()
    return _log_domain_sinkhorn(K.colstats, lambda x, e, a, w: K.rowpass(x, e, a.contiguous(), w),
                                s, epsilon, iterations, distributed)


# ---- reference: fastssl.reference (upstream arithmetic, in the input dtype) ---------------------

def _sinkhorn_reference(scores, epsilon, iterations, distributed):
    codes = _reference_sinkhorn(scores, epsilon=epsilon, iterations=iterations,
                         gather_distributed=distributed)
    return codes.to(accumulation_dtype(scores))


# The entry check of each registered op (fastssl/ops/_entry.py): devices, ranks, backend.
_SINKHORN_SPEC = dict(ranks={"scores": 2}, backends=("reference", "torch", "cpp", "cuda", "triton"))
_CE_SPEC = dict(ranks={"scores": 2, "targets": 2}, backends=("reference", "torch", "cpp", "triton"))


@torch.library.custom_op("fastssl::sinkhorn", mutates_args=())
@entry("sinkhorn", **_SINKHORN_SPEC)
def _sinkhorn_op(scores: torch.Tensor, epsilon: float, iterations: int,
                 gather_distributed: bool, backend: str) -> torch.Tensor:
    distributed = bool(gather_distributed) and D.is_distributed()
    return TABLE[backend].sinkhorn(scores, float(epsilon), int(iterations), distributed)


@_sinkhorn_op.register_fake
@entry("sinkhorn", **_SINKHORN_SPEC)
def _sinkhorn_fake(scores, epsilon, iterations, gather_distributed, backend):
    return scores.new_empty(scores.shape, dtype=accumulation_dtype(scores))


def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int,
             gather_distributed: bool = False, backend: str | None = None) -> torch.Tensor:
    """Codes (B, K) of validated scores; no gradient flows (upstream detaches the scores).
    `backend`: a name chosen by :func:`backend_for` (None: choose now)."""
    if backend is None:
        backend = backend_for("sinkhorn", scores.device)
    return torch.ops.fastssl.sinkhorn(scores.detach(), float(epsilon), int(iterations),
                                      bool(gather_distributed), backend)


# ---- swav_cross_entropy: -sum_b <q_b, log_softmax(s_b / T)> and its gradient in s -------------

# Each backend's cross_entropy(scores, targets, temperature, compute_grad, grad_scale=None): the
# gradient comes back multiplied by grad_scale (a one-element tensor) where one is given.

def _scaled(grad, grad_scale):
    return grad if grad_scale is None else grad * grad_scale.to(grad.dtype)


def _ce_torch(scores, targets, temperature, compute_grad, grad_scale=None):
    acc = accumulation_dtype(scores)
    log_p = torch.log_softmax(scores.to(acc) / temperature, dim=1)
    q = targets.to(acc)
    loss = -(q * log_p).sum()
    if not compute_grad:
        return loss, log_p.new_empty((0,))
    grad = (torch.exp(log_p) * q.sum(dim=1, keepdim=True) - q) / temperature
    return loss, _scaled(grad, grad_scale)


def _ce_cpp(scores, targets, temperature, compute_grad, grad_scale=None):
    from fastssl import _C
    acc = accumulation_dtype(scores)
    # the scale is folded into the kernel's gradient pass, its value read in C++ (a CPU
    # tensor: no device sync, and no host read in the traced Python)
    if grad_scale is None:
        return tuple(_C.swav_cross_entropy_cpu(_cpp_input(scores), targets.to(acc).contiguous(),
                                               temperature, compute_grad))
    return tuple(_C.swav_cross_entropy_scaled_cpu(_cpp_input(scores), targets.to(acc).contiguous(),
                                                  temperature, compute_grad,
                                                  grad_scale.detach().reshape(1)))


def _ce_triton(scores, targets, temperature, compute_grad, grad_scale=None):
    from fastssl.kernels import swav as K
    acc = accumulation_dtype(scores)
    loss, grad = K.swav_cross_entropy(scores.contiguous(), targets.to(acc).contiguous(),
                                      temperature, compute_grad)
    return loss, _scaled(grad, grad_scale) if compute_grad else grad


def _ce_reference(scores, targets, temperature, compute_grad, grad_scale=None):
    # upstream's arithmetic (fastssl.reference.swav's loss term) in the input dtype; the
    # gradient is the closed form of log_softmax's (op bodies run below autograd)
    acc = accumulation_dtype(scores)
    x = scores / temperature
    loss = -torch.sum(targets * torch.log_softmax(x, dim=1)).to(acc)
    if not compute_grad:
        return loss, scores.new_empty((0,), dtype=acc)
    grad = (torch.softmax(x, dim=1) * targets.sum(dim=1, keepdim=True) - targets) / temperature
    return loss, _scaled(grad.to(acc), grad_scale)


class _Backend:
    """One entry of the family's table: `sinkhorn` and, where the backend has it, `cross_entropy`."""

    def __init__(self, sinkhorn, cross_entropy=None):
        self.sinkhorn = sinkhorn
        if cross_entropy is not None:
            self.cross_entropy = cross_entropy


# The family's backend table (docs/design.md): name -> namespace. "cuda" has no
# cross_entropy (no hand-written CUDA kernel for it): forcing "cuda" on swav_cross_entropy
# raises, it never falls back (under auto, CUDA tensors take the Triton kernel).
TABLE = {
    "reference": _Backend(_sinkhorn_reference, _ce_reference),
    "torch": _Backend(_sinkhorn_torch, _ce_torch),
    "cpp": _Backend(_sinkhorn_cpp, _ce_cpp),
    "cuda": _Backend(_sinkhorn_cuda),
    "triton": _Backend(_sinkhorn_triton, _ce_triton),
}
_METHOD = {"sinkhorn": "sinkhorn", "swav_cross_entropy": "cross_entropy"}


def backend_for(op: str, device: torch.device) -> str:
    """The backend that serves `op` ("sinkhorn", "swav_cross_entropy", or the loss "swav",
    which needs both) on `device` now; the public function calls it once per op."""
    return choose(op, device, TABLE, _METHOD.get(op, "cross_entropy"), family="swav")


def backend_name(device: torch.device) -> str:
    """The backend that serves sinkhorn on `device` now (kept for the benchmarks)."""
    return backend_for("sinkhorn", device)


@torch.library.custom_op("fastssl::swav_cross_entropy", mutates_args=())
@entry("swav_cross_entropy", **_CE_SPEC)
def _swav_ce_op(scores: torch.Tensor, targets: torch.Tensor, temperature: float,
                compute_grad: bool, backend: str,
                grad_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    # grad_scale: the gradient comes back multiplied by it (the backward passes its incoming
    # gradient, so the C++ kernel scales while it writes, without another pass)
    if grad_scale is None:
        return TABLE[backend].cross_entropy(scores, targets, float(temperature), bool(compute_grad))
    if grad_scale.numel() != 1 or grad_scale.device != scores.device:
        raise ValueError("grad_scale: expected a one-element tensor on the scores' device "
                         f"({scores.device}), got shape {tuple(grad_scale.shape)} on "
                         f"{grad_scale.device}")
    return TABLE[backend].cross_entropy(scores, targets, float(temperature), bool(compute_grad),
                                        grad_scale)


@_swav_ce_op.register_fake
@entry("swav_cross_entropy", **_CE_SPEC)
def _swav_ce_fake(scores, targets, temperature, compute_grad, backend, grad_scale=None):
    acc = accumulation_dtype(scores)
    grad_shape = scores.shape if compute_grad else (0,)
    return scores.new_empty((), dtype=acc), scores.new_empty(grad_shape, dtype=acc)


def _swav_ce_setup_context(ctx, inputs, output):
    scores, targets, temperature, _, backend, _ = inputs
    ctx.temperature = temperature
    ctx.backend = backend
    ctx.score_dtype = scores.dtype
    ctx.target_dtype = targets.dtype
    ctx.save_for_backward(output[1], scores, targets)


def _swav_ce_backward(ctx, grad_loss, _grad_of_grad):
    saved_grad, scores, targets = ctx.saved_tensors
    g_scores = g_targets = None
    if ctx.needs_input_grad[0]:
        if saved_grad.dim() != 2:  # forward ran without compute_grad
            # the forward's backend (never a new selection on the autograd thread)
            s, q = scores.detach(), targets.detach()
            if torch.is_grad_enabled():  # a recorded backward: grad_loss stays differentiable
                _, grad = _swav_ce_op(s, q, ctx.temperature, True, ctx.backend)
                g_scores = (grad_loss * grad).to(ctx.score_dtype)
            else:  # grad_loss folded into the gradient as it is written
                _, grad = _swav_ce_op(s, q, ctx.temperature, True, ctx.backend, grad_loss.detach())
                g_scores = grad.to(ctx.score_dtype)
        else:
            g_scores = (grad_loss * saved_grad).to(ctx.score_dtype)
    if ctx.needs_input_grad[1]:
        acc = accumulation_dtype(scores)
        log_p = torch.log_softmax(scores.to(acc) / ctx.temperature, dim=1)
        g_targets = (-grad_loss * log_p).to(ctx.target_dtype)
    return g_scores, g_targets, None, None, None, None


_swav_ce_op.register_autograd(_swav_ce_backward, setup_context=_swav_ce_setup_context)


# Backends whose forward keeps no gradient: the backward recomputes it from the scores and
# targets (one more pass with exp over each row). On CPU, with the vector exp, that pass costs
# less than writing and keeping a B x K gradient per crop, which would hold more memory than
# eager's one log_softmax output per crop (SwAV's 8 crops share one summed target).
_GRAD_IN_BACKWARD = {"cpp"}


def swav_cross_entropy(scores: torch.Tensor, targets: torch.Tensor,
                       temperature: float, backend: str | None = None) -> torch.Tensor:
    """-sum_b <targets[b], log_softmax(scores[b] / temperature)> (a scalar in the accumulation
    dtype) of validated (B, K) scores and targets; differentiable in both. `backend`: a name
    chosen by :func:`backend_for` (None: choose now)."""
    if backend is None:
        backend = backend_for("swav_cross_entropy", scores.device)
    compute_grad = bool(scores.requires_grad) and backend not in _GRAD_IN_BACKWARD
    loss, _ = torch.ops.fastssl.swav_cross_entropy(scores, targets, float(temperature),
                                                   compute_grad, backend)
    return loss
