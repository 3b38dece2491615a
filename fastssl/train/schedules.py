"""Learning-rate scaling, warmup + cosine per iteration, and SCE's cosine momentum schedule."""
from __future__ import annotations

import math

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
