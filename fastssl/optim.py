"""Optimisers and their schedules, for pretraining (fastssl.train), the linear probe
(fastssl.eval) and the methods' hooks (fastssl.methods): a multi-tensor LARS/LARC without host
syncs, SGD, learning-rate scaling, warmup + cosine, and SCE's cosine momentum.

LARS (VICReg / Barlow Twins / SFRIK / SogCLR / SCE rule, ``mode="lars"``), per parameter w with
gradient g, weight decay wd, trust coefficient eta, momentum m, learning rate lr:

    d   = g + wd * w
    r   = eta * |w| / |d|   if |w| > 0 and |d| > 0   else 1
    mu  = m * mu + r * d          (mu starts at 0)
    w  -= lr * mu

Parameters with ``ndim == 1`` (biases, norm affine parameters) are excluded from both the weight
decay and the adaptation when ``exclude_1d`` is on (the default): for them d = g, r = 1.

LARC (apex, used by SwAV with ``clip=False``; ``mode="larc"``): no exclusions by default and
``r = eta * |w| / (|g| + wd * |w| + eps)`` applied, together with the weight decay, only when
|w| > 0 and |g| > 0 (otherwise d = g: no decay, no scaling).

The trust ratios are computed for all parameters at once from ``torch._foreach_norm`` and
``torch.where``; nothing is read back to the host, so the step never synchronises.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

LARS_MODES = ("lars", "larc")


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.0, *, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, exclude_1d: bool = True, mode: str = "lars",
                 eps: float = 1e-8):
        if lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"LARS: trust_coefficient must be > 0, got {trust_coefficient}")
        if mode not in LARS_MODES:
            raise ValueError(f"LARS: mode must be one of {LARS_MODES}, got {mode!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, exclude_1d=exclude_1d, mode=mode,
                        eps=eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LARS does not support sparse gradients")
            wd, eta = group["weight_decay"], group["trust_coefficient"]
            adapted = [p for p in params if not (group["exclude_1d"] and p.ndim == 1)]
            # The update direction d is written into .grad in place (as apex LARC does).
            if adapted:
                self._adapt([p.grad for p in adapted], adapted, wd, eta, group["mode"],
                            group["eps"])
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            grads = [p.grad for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss

    @staticmethod
    def _adapt(grads: list, params: list, wd: float, eta: float, mode: str, eps: float) -> None:
        w_norm = torch.stack(torch._foreach_norm(params))
        one = torch.ones_like(w_norm)
        if mode == "lars":
            if wd != 0:
                torch._foreach_add_(grads, params, alpha=wd)
            d_norm = torch.stack(torch._foreach_norm(grads))
            ratio = torch.where((w_norm > 0) & (d_norm > 0), eta * w_norm / d_norm, one)
            torch._foreach_mul_(grads, list(ratio.unbind(0)))
        else:
            g_norm = torch.stack(torch._foreach_norm(grads))
            ok = (w_norm > 0) & (g_norm > 0)
            ratio = torch.where(ok, eta * w_norm / (g_norm + wd * w_norm + eps), one)
            decay = torch.where(ok, ratio * wd, torch.zeros_like(ratio))
            torch._foreach_mul_(grads, list(ratio.unbind(0)))
            if wd != 0:
                # d = ratio * (g + wd * w): the decay term carries the same ratio (0 when skipped).
                torch._foreach_add_(grads, torch._foreach_mul(params, list(decay.unbind(0))))


def build_optimizer(name: str, params: Iterable, *, lr: float = 0.0, weight_decay: float = 0.0,
                    momentum: float = 0.9, trust_coefficient: float = 0.001,
                    exclude_1d: bool = True) -> torch.optim.Optimizer:
    """``name``: "lars" (VICReg rule, 1-d params excluded), "larc" (apex/SwAV rule, nothing
    excluded unless exclude_1d) or "sgd" (torch SGD with momentum; weight decay on every
    parameter, as GroCo's recipe)."""
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               foreach=True)
    if name in LARS_MODES:
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                    trust_coefficient=trust_coefficient, exclude_1d=exclude_1d, mode=name)
    raise ValueError(f"optimizer: expected one of ('lars', 'larc', 'sgd'), got {name!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --- schedules ---------------------------------------------------------------------------------
LR_SCALINGS = ("linear", "linear32", "sqrt", "none")


def scale_lr(base_lr: float, batch_size: int, rule: str = "linear") -> float:
    """The peak learning rate for a global batch.

    linear: base * bs / 256 (SwAV, SCE, SFRIK, VICReg); linear32: base * bs / 32 (GroCo's
    ``base_lr * 32 * bs / 1024``); sqrt: base * sqrt(bs) (SogCLR, GroCo's sqrt); none: base.
    """
    if batch_size <= 0:
        raise ValueError(f"scale_lr: batch_size must be > 0, got {batch_size}")
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "linear32":
        return base_lr * batch_size / 32
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if rule == "none":
        return base_lr
    raise ValueError(f"lr_scaling: expected one of {LR_SCALINGS}, got {rule!r}")


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float,
                  final_lr: float = 0.0, start_lr: float = 0.0) -> float:
    """Linear warmup from start_lr (step 0) towards peak_lr (reached at step warmup_steps), then
    a half cosine from peak_lr down to final_lr at step total_steps; per iteration."""
    if total_steps <= 0:
        raise ValueError(f"warmup_cosine: total_steps must be > 0, got {total_steps}")
    warmup_steps = min(max(warmup_steps, 0), total_steps)
    if step < warmup_steps:
        return start_lr + (peak_lr - start_lr) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    t = min(step - warmup_steps, decay_steps) / max(decay_steps, 1)
    return final_lr + 0.5 * (peak_lr - final_lr) * (1.0 + math.cos(math.pi * t))


def cosine_momentum(step: int, *, total_steps: int, base_momentum: float) -> float:
    """SCE/BYOL momentum: m = 1 - (1 - m0) * (cos(pi * step / (total - 1)) + 1) / 2, m0 -> 1."""
    if total_steps <= 1:
        return base_momentum
    t = min(step, total_steps - 1) / (total_steps - 1)
    return 1.0 - (1.0 - base_momentum) * (math.cos(math.pi * t) + 1.0) / 2.0
