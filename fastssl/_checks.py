"""The input checks of every public loss and op, in one place (functional, losses, reference).

Built from the primitives of :mod:`fastssl._validation`; imports nothing else from fastssl but
:mod:`fastssl.distributed` (for the global batch size under ``gather_distributed``), so that
``reference/``, ``functional/`` and ``losses/`` all import it without an import cycle.
Every message names the argument (docs/api.md, "Bad input").
"""
from __future__ import annotations

import math

import torch

from fastssl import distributed as dist_utils
from fastssl._validation import (accumulation_dtype, check_choice, check_embeddings,
                                 check_finite_enabled, check_flag, check_int, check_nonnegative,
                                 check_pair, check_positive, check_range, check_reciprocal,
                                 check_same_device, check_views, check_weights)

# ---------------------------------------------------------------------------------------------
# contrastive family


def _global_rows(x: torch.Tensor, gather_distributed: bool) -> int:
    if gather_distributed and dist_utils.is_distributed():
        return x.shape[0] * dist_utils.world_size()
    return x.shape[0]


def _check_min_global(loss: str, name: str, x: torch.Tensor, gather_distributed: bool,
                      minimum: int, why: str) -> None:
    n = _global_rows(x, gather_distributed)
    if n < minimum:
        raise ValueError(f"{name}: {loss} needs a (global) batch of at least {minimum} rows "
                         f"({why}), got shape {tuple(x.shape)}")


def check_temperature(temperature, like: torch.Tensor | None = None) -> float:
    """A temperature: a finite number > 0, or a 0-dim floating tensor holding one (a learnable
    temperature, e.g. ``1 / logit_scale.exp()``). Returns its value as a float (for a tensor,
    one host read). A tensor must sit on the inputs' device (or the CPU)."""
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0 or not temperature.is_floating_point():
            raise TypeError(f"temperature: expected a number or a 0-dim floating tensor, got a "
                            f"{temperature.dtype} tensor of shape {tuple(temperature.shape)}")
        if (like is not None and temperature.device != like.device
                and temperature.device.type != "cpu"):
            raise ValueError(f"temperature: expected a tensor on {like.device} or the CPU, got "
                             f"{temperature.device}")
        value = float(temperature.detach())
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"temperature: expected a finite value > 0, got {value}")
    else:
        value = check_positive("temperature", temperature)
    if like is not None:  # 1 / temperature scales every logit
        check_reciprocal("temperature", value, accumulation_dtype(like))
    return value


def check_nt_xent(z1, z2, temperature, gather_distributed, memory_bank=None,
                  normalize=True) -> float:
    """Returns the temperature's value as a float."""
    check_pair("z1", z1, "z2", z2)
    t = check_temperature(temperature, z1)
    check_flag("normalize", normalize)
    check_flag("gather_distributed", gather_distributed)
    if memory_bank is not None:
        check_embeddings("memory_bank", memory_bank)
        if memory_bank.shape[1] != z1.shape[1]:
            raise ValueError(f"memory_bank: expected shape (K, {z1.shape[1]}) (the feature "
                             f"dimension of z1), got {tuple(memory_bank.shape)}")
        check_same_device([("z1", z1), ("memory_bank", memory_bank)])
    return t


def check_info_nce(q, k, temperature, symmetric, gather_distributed, normalize=True) -> float:
    """Returns the temperature's value as a float."""
    check_pair("q", q, "k", k)
    t = check_temperature(temperature, q)
    check_flag("symmetric", symmetric)
    check_flag("normalize", normalize)
    check_flag("gather_distributed", gather_distributed)
    return t


def check_dcl(z1, z2, temperature, weight_fn, gather_distributed) -> float:
    """Returns the temperature's value as a float."""
    check_pair("z1", z1, "z2", z2)
    t = check_temperature(temperature, z1)
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(f"weight_fn: expected a callable (out0, out1) -> (B,) weights or None, "
                        f"got {type(weight_fn).__name__}")
    check_flag("gather_distributed", gather_distributed)
    _check_min_global("dcl", "z1", z1, gather_distributed, 2, "each anchor needs a negative")
    return t


def check_dclw(z1, z2, temperature, sigma, gather_distributed) -> float:
    """Returns the temperature's value as a float."""
    t = check_dcl(z1, z2, temperature, None, gather_distributed)
    check_reciprocal("sigma", check_positive("sigma", sigma), accumulation_dtype(z1))
    return t


def check_positive_weights(w, rows: int, ref: torch.Tensor) -> torch.Tensor:
    """What DCL's weight_fn returned: a (B,) (or 0-dim) float tensor on the anchors' device."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"weight_fn: expected it to return a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"weight_fn: expected a floating result, got {w.dtype}")
    if w.shape not in ((rows,), ()):
        raise ValueError(f"weight_fn: expected a result of shape ({rows},) (one weight per "
                         f"anchor), got {tuple(w.shape)}")
    if w.device != ref.device:
        raise ValueError(f"weight_fn: expected a result on {ref.device}, got {w.device}")
    if check_finite_enabled() and w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError("weight_fn: returned non-finite weights (NaN or inf)")
    return w


INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8)


def check_index(name: str, index, *, rows: int, size: int, device: torch.device) -> torch.Tensor:
    """A 1-D integer index with one entry per row, each in [0, size) (SogCLR's sample ids).

    uint8 is refused (PyTorch reads a uint8 index as a boolean mask). The range costs a device
    sync, so it is checked on the host only with ``set_check_finite(True)``; otherwise on the
    device, where an out-of-range entry raises at the first host read (torch's device assert).
    """
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(index).__name__}")
    if index.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected dtype int64, int32, int16 or int8, got {index.dtype}")
    if index.dim() != 1 or index.shape[0] != rows:
        raise ValueError(f"{name}: expected shape ({rows},), got {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name}: expected device {device}, got {index.device}")
    if (index.device.type == "cpu" or check_finite_enabled()) and not torch.compiler.is_compiling():
        # on CPU the check is free of any device sync
        if rows and (bool((index < 0).any()) or bool((index >= size).any())):
            lo, hi = int(index.min()), int(index.max())
            raise ValueError(f"{name}: expected entries in [0, {size}) (the rows of u), "
                             f"got values in [{lo}, {hi}]")
    else:
        torch._assert_async(((index >= 0) & (index < size)).all(),
                            f"{name}: entries out of range [0, {size}) (the rows of u)")
    return index


def check_sogclr(z1, z2, index, u, gamma, temperature, gather_distributed) -> torch.Tensor:
    """Returns the index as int64 (int8/int16 tensors cannot index u; a no-op for int64)."""
    check_pair("z1", z1, "z2", z2)
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u: expected a torch.Tensor, got {type(u).__name__}")
    if u.dtype != torch.float32:
        raise TypeError(f"u: expected dtype float32 (the estimator buffer), got {u.dtype}")
    if u.dim() != 1 or u.shape[0] < 1:
        raise ValueError(f"u: expected shape (num_samples,), got {tuple(u.shape)}")
    if u.shape[0] > 1 and u.stride(0) == 0:
        raise ValueError("u: expected a writable buffer, got an expanded (stride 0) tensor "
                         "whose rows share one element")
    check_same_device([("z1", z1), ("u", u)])
    if check_finite_enabled() and not bool(torch.isfinite(u).all()):
        raise ValueError("u: contains non-finite values (NaN or inf)")
    check_index("index", index, rows=z1.shape[0], size=u.shape[0], device=z1.device)
    check_range("gamma", gamma, 0.0, 1.0, lo_open=True)
    # 1 / T scales the logits and T multiplies the surrogate: both must stay finite
    check_reciprocal("temperature", check_positive("temperature", temperature),
                     accumulation_dtype(z1), upper=True)
    check_flag("gather_distributed", gather_distributed)
    _check_min_global("sogclr", "z1", z1, gather_distributed, 2,
                      "the estimator averages over 2(N-1) negatives")
    return index.long()


def check_sce(q, k, queue, coeff, temperature, temperature_m, use_keys, gather_distributed):
    """Validates SCE's inputs; returns the queue, with an empty (0, D) queue read as None."""
    check_pair("q", q, "k", k)
    if queue is not None:
        check_embeddings("queue", queue, min_rows=0)
        if queue.shape[1] != q.shape[1]:
            raise ValueError(f"queue: expected shape (K, {q.shape[1]}) (the feature dimension "
                             f"of q), got {tuple(queue.shape)}")
        check_same_device([("q", q), ("queue", queue)])
        if queue.shape[0] == 0:
            queue = None
    check_range("coeff", coeff, 0.0, 1.0)
    acc = accumulation_dtype(q)
    check_reciprocal("temperature", check_positive("temperature", temperature), acc)
    check_reciprocal("temperature_m", check_positive("temperature_m", temperature_m), acc)
    check_flag("use_keys", use_keys)
    check_flag("gather_distributed", gather_distributed)
    if queue is None and not use_keys:
        raise ValueError("queue: SCE with queue=None (or an empty queue) and use_keys=False has "
                         "no negatives; pass a (K, D) queue or use_keys=True")
    if queue is None:
        _check_min_global("sce", "q", q, gather_distributed, 2,
                          "use_keys=True without a queue needs another key besides the own one")
    return queue


# ---------------------------------------------------------------------------------------------
# sphere family


def check_sphere_dim(name: str, z: torch.Tensor) -> int:
    """The Gegenbauer normalisation divides by D - 1: D = 1 has no such polynomials."""
    d = z.shape[1]
    if d < 2:
        raise ValueError(f"{name}: the Gegenbauer kernel needs an embedding dimension D >= 2, "
                         f"got shape {tuple(z.shape)}")
    return d


def check_sfrik_mmd(z, weights, gather_distributed):
    check_embeddings("z", z)
    weights = check_weights("weights", weights)
    check_sphere_dim("z", z)
    check_flag("gather_distributed", gather_distributed)
    return weights


def check_sfrik(z1, z2, weights, sim_coeff, mmd_coeff, gather_distributed):
    """Returns (weights, sim_coeff, mmd_coeff) as floats."""
    check_pair("z1", z1, "z2", z2)
    weights = check_weights("weights", weights)
    check_sphere_dim("z1", z1)
    sim_coeff = check_nonnegative("sim_coeff", sim_coeff)
    mmd_coeff = check_nonnegative("mmd_coeff", mmd_coeff)
    check_flag("gather_distributed", gather_distributed)
    return weights, sim_coeff, mmd_coeff


def check_auh(z1, z2, sim_coeff, unif_coeff, scale, gather_distributed):
    """Returns (sim_coeff, unif_coeff, scale) as floats."""
    check_pair("z1", z1, "z2", z2)
    sim_coeff = check_nonnegative("sim_coeff", sim_coeff)
    unif_coeff = check_nonnegative("unif_coeff", unif_coeff)
    scale = check_positive("scale", scale)
    check_flag("gather_distributed", gather_distributed)
    w = dist_utils.world_size() if gather_distributed and dist_utils.is_distributed() else 1
    if z1.shape[0] * w < 2:
        raise ValueError(f"z1: the uniformity term needs a global batch of at least 2 rows, "
                         f"got shape {tuple(z1.shape)} on {w} rank(s)")
    return sim_coeff, unif_coeff, scale


# ---------------------------------------------------------------------------------------------
# sortnet family

NETWORKS = ("odd_even", "bitonic")
DISTRIBUTIONS = ("cauchy", "reciprocal", "optimal", "logistic", "logistic_phi", "gaussian")


def check_sort_args(network, steepness, distribution, art_lambda) -> float:
    """Sorting-network hyperparameters; returns steepness as a float. art_lambda (the exponent
    of logistic_phi) must be a finite number >= 0: nan, inf or < 0 give NaN results."""
    check_choice("network", network, NETWORKS)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    steepness = check_positive("steepness", steepness)
    check_nonnegative("art_lambda", art_lambda)
    return steepness


def check_soft_sort(x, network, steepness, distribution, art_lambda, return_permutation):
    """Returns steepness as a float."""
    check_embeddings("x", x)
    if x.shape[1] < 2:
        raise ValueError(f"x: expected at least 2 columns to sort, got shape {tuple(x.shape)}")
    steepness = check_sort_args(network, steepness, distribution, art_lambda)
    check_flag("return_permutation", return_permutation)
    return steepness


def check_groco_args(views, topk_neg, steepness, n_pos_views, network, distribution,
                     gather_distributed):
    """Validate GroCo's arguments; returns (views, steepness, n_pos_views, distributed on?)."""
    views = check_views("views", views, min_views=2)
    check_int("topk_neg", topk_neg, minimum=1)
    steepness = check_sort_args(network, steepness, distribution, 0.25)
    check_flag("gather_distributed", gather_distributed)
    n_views = len(views)
    if n_pos_views is None:
        n_pos_views = n_views
    check_int("n_pos_views", n_pos_views, minimum=2, maximum=n_views)
    dist_on = gather_distributed and dist_utils.is_distributed()
    world = dist_utils.world_size() if dist_on else 1
    b_global = views[0].shape[0] * world
    if b_global < topk_neg + 1:
        raise ValueError(f"views: GroCo needs a batch of at least topk_neg + 1 = {topk_neg + 1} "
                         f"rows (each anchor needs topk_neg other images), got {b_global} "
                         f"(shape {tuple(views[0].shape)} on {world} rank(s))")
    return views, steepness, n_pos_views, dist_on


# ---------------------------------------------------------------------------------------------
# swav family


def check_sinkhorn(scores, epsilon, iterations, gather_distributed) -> None:
    check_embeddings("scores", scores)
    check_reciprocal("epsilon", check_positive("epsilon", epsilon), accumulation_dtype(scores))
    check_int("iterations", iterations, minimum=0)  # 0: the normalisation only (lightly, SwAV)
    check_flag("gather_distributed", gather_distributed)


def check_queue_scores(queue_scores, n_assign_crops: int, ref: torch.Tensor) -> list:
    if isinstance(queue_scores, torch.Tensor) or not isinstance(queue_scores, (list, tuple)):
        raise TypeError(f"queue_scores: expected a list of (Q, K) tensors or None, "
                        f"got {type(queue_scores).__name__}")
    if len(queue_scores) != n_assign_crops:
        raise ValueError(f"queue_scores: expected {n_assign_crops} tensors (one per assigned "
                         f"crop), got {len(queue_scores)}")
    out = []
    for i, q in enumerate(queue_scores):
        if q is None:
            out.append(None)
            continue
        check_embeddings(f"queue_scores[{i}]", q)
        if q.shape[1] != ref.shape[1]:
            raise ValueError(f"queue_scores[{i}]: expected {ref.shape[1]} prototype columns "
                             f"(as scores), got shape {tuple(q.shape)}")
        check_same_device([("scores[0]", ref), (f"queue_scores[{i}]", q)])
        out.append(q)
    return out


def check_swav(scores, n_assign_crops, temperature, epsilon, sinkhorn_iterations, queue_scores,
               gather_distributed):
    """Returns (views, queue_scores)."""
    views = check_views("scores", scores, min_views=2)
    check_int("n_assign_crops", n_assign_crops, minimum=1, maximum=len(views))
    acc = accumulation_dtype(views[0])
    check_reciprocal("temperature", check_positive("temperature", temperature), acc)
    check_reciprocal("epsilon", check_positive("epsilon", epsilon), acc)
    check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=0)
    check_flag("gather_distributed", gather_distributed)
    if queue_scores is not None:
        queue_scores = check_queue_scores(queue_scores, n_assign_crops, views[0])
    return views, queue_scores


