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
(csrc/swav_cpu.cpp, sinkhorn_cached_cpu; rows at risk of underflow are redone in the log
domain). Every exponent is shifted by a max (pass 0: the column max; the others: the row max),
so there is no overflow at any epsilon or in float16/bfloat16 (computed in float32; float64 end
to end for float64). Once a is set, each prototype's column of
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

from typing import Optional

import torch

from fastssl import distributed as D
from fastssl._backend import choose
from fastssl._validation import accumulation_dtype
from fastssl.backends import LazyBackend
from fastssl.backends.torch.swav import TorchSwav
from fastssl.ops._entry import entry


# The entry check of each registered op (fastssl/ops/_entry.py): devices, ranks, backend.
_SINKHORN_SPEC = dict(ranks={"scores": 2}, backends=("torch", "cpp", "cuda", "triton"))
_CE_SPEC = dict(ranks={"scores": 2, "targets": 2}, backends=("torch", "cpp", "triton"))


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

# The family's backend table (docs/design.md): name -> the family's interface
# (fastssl/backends/interfaces.py): `sinkhorn` and, where the backend has it, `cross_entropy`
# (the gradient comes back times the one-element grad_scale where one is given). "cuda" has no
# cross_entropy (no hand-written CUDA kernel for it): forcing "cuda" on swav_cross_entropy
# raises, it never falls back (under auto, CUDA tensors take the Triton kernel).
TABLE = {
    "torch": TorchSwav,
    "cpp": LazyBackend("fastssl.backends.ext.swav", "CppSwav", ("sinkhorn", "cross_entropy")),
    "cuda": LazyBackend("fastssl.backends.ext.swav", "CudaSwav", ("sinkhorn",)),
    "triton": LazyBackend("fastssl.kernels.swav", "TritonSwav", ("sinkhorn", "cross_entropy")),
}
_METHOD = {"sinkhorn": "sinkhorn", "swav_cross_entropy": "cross_entropy"}


def backend_for(op: str, device: torch.device) -> str:
    """The backend that serves `op` ("sinkhorn", "swav_cross_entropy", or the loss "swav",
    which needs both) on `device` now; the public function calls it once per op."""
    return choose(op, device, TABLE, _METHOD.get(op, "cross_entropy"), family="swav")


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
