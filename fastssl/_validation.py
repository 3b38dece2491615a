"""Input validation primitives shared by every public function (the bad-input rules of
docs/api.md); the per-loss checks built from them are in :mod:`fastssl._checks`.

Every message names the argument, what was expected and what was given. This module imports
nothing from fastssl (it is the leaf every other layer may import).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


_check_finite = False


def set_check_finite(enabled: bool) -> None:
    """Raise ValueError on non-finite inputs and out-of-range indices (costs a device sync per
    call; off by default)."""
    global _check_finite
    _check_finite = bool(check_flag("enabled", enabled))


def check_finite_enabled() -> bool:
    return _check_finite


def check_flag(name: str, value) -> bool:
    """A Python bool: anything else, e.g. the string "no" (truthy), is rejected, never read."""
    if isinstance(value, bool):
        return value
    raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def check_tensor(name: str, x, *, ndim: int | None = None, float_only: bool = True,
                 min_rows: int = 1) -> torch.Tensor:
    """A tensor of floating dtype, `ndim` dimensions and at least `min_rows` rows."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(x.shape)}")
    if float_only and x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected dtype float32, bfloat16, float16 or float64, got {x.dtype}"
        )
    if x.dim() >= 1 and x.shape[0] < min_rows:
        raise ValueError(f"{name}: expected at least {min_rows} row(s), got shape {tuple(x.shape)}")
    if x.dim() >= 2 and x.shape[1] < 1:
        raise ValueError(
            f"{name}: expected a non-empty feature dimension, got shape {tuple(x.shape)}"
        )
    if float_only and check_finite_enabled() and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains non-finite values (NaN or inf)")
    return x


def check_embeddings(name: str, x, *, min_rows: int = 1) -> torch.Tensor:
    """A (B, D) float embedding batch."""
    return check_tensor(name, x, ndim=2, min_rows=min_rows)


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: expected the shape of {name_a} {tuple(a.shape)}, "
                         f"got {tuple(b.shape)}")


def check_same_device(tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
    if not tensors:
        return
    ref_name, ref = tensors[0]
    for name, t in tensors[1:]:
        if t.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), "
                             f"got {t.device}")


def check_same_dtype(tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
    if not tensors:
        return
    ref_name, ref = tensors[0]
    for name, t in tensors[1:]:
        if t.dtype != ref.dtype:
            raise TypeError(
                f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}"
            )


def check_pair(name_a: str, a, name_b: str, b, *, min_rows: int = 1) -> None:
    """Two (B, D) embedding batches of the same shape, dtype and device."""
    check_embeddings(name_a, a, min_rows=min_rows)
    check_embeddings(name_b, b, min_rows=min_rows)
    check_same_shape(name_a, a, name_b, b)
    check_same_device([(name_a, a), (name_b, b)])
    check_same_dtype([(name_a, a), (name_b, b)])


def check_positive(name: str, value) -> float:
    """A finite number > 0 (temperatures, epsilon, steepness, scales)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a positive number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    return float(value)


def check_nonnegative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number >= 0, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value}")
    return float(value)


def check_range(name: str, value, lo: float, hi: float, *, lo_open: bool = False,
                hi_open: bool = False) -> float:
    """A number in [lo, hi] (open ends where asked), e.g. gamma in (0, 1], coeff in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    bad = (not math.isfinite(value) or value < lo or value > hi
           or (lo_open and value == lo) or (hi_open and value == hi))
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{name}: expected a value in {lb}{lo}, {hi}{rb}, got {value}")
    return float(value)


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: expected an int <= {maximum}, got {value}")
    return value


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_weights(name: str, weights) -> tuple[float, ...]:
    """A non-empty sequence of finite numbers (SFRIK's polynomial weights)."""
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"{name}: expected a sequence of numbers, got {type(weights).__name__}")
    if len(weights) == 0:
        raise ValueError(f"{name}: expected at least one weight, got an empty sequence")
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"{name}: expected finite numbers, got {list(weights)!r}")
        out.append(float(w))
    return tuple(out)


def check_views(name: str, views, *, min_views: int = 2, min_rows: int = 1) -> list[torch.Tensor]:
    """A sequence of (B, D) tensors, all of one shape, dtype and device."""
    if isinstance(views, torch.Tensor) or not isinstance(views, (list, tuple)):
        raise TypeError(
            f"{name}: expected a list or tuple of (B, D) tensors, got {type(views).__name__}"
        )
    if len(views) < min_views:
        raise ValueError(f"{name}: expected at least {min_views} views, got {len(views)}")
    views = list(views)
    for i, v in enumerate(views):
        check_embeddings(f"{name}[{i}]", v, min_rows=min_rows)
    for i, v in enumerate(views[1:], start=1):
        check_same_shape(f"{name}[0]", views[0], f"{name}[{i}]", v)
    check_same_device([(f"{name}[{i}]", v) for i, v in enumerate(views)])
    check_same_dtype([(f"{name}[{i}]", v) for i, v in enumerate(views)])
    return views


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32 (docs/api.md)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# numerics at the edges (issue 22)

# Room left above a temperature's (or epsilon's) reciprocal in the accumulation dtype: logits
# reach 1/T, and the losses sum and differentiate them over up to 2^24 rows without overflow.
RECIPROCAL_HEADROOM = 2.0 ** 24


def check_reciprocal(name: str, value: float, acc: torch.dtype, *, upper: bool = False) -> float:
    """`value` (already a finite number > 0) whose reciprocal -- and, with `upper`, itself --
    stays below the accumulation dtype's maximum by RECIPROCAL_HEADROOM: e.g. temperature
    <= 1e-39 in float32 would make every logit inf and the loss NaN. A named ValueError."""
    big = torch.finfo(acc).max / RECIPROCAL_HEADROOM
    lo = 1.0 / big
    if value < lo:
        raise ValueError(f"{name}: expected a value >= {lo:.3g} (its reciprocal must stay "
                         f"finite in {acc} with room for the sums), got {value}")
    if upper and value > big:
        raise ValueError(f"{name}: expected a value <= {big:.3g} (it must stay finite in {acc} "
                         f"with room for the sums), got {value}")
    return value


def row_norms(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, 1) L2 norms of the rows of a (B, D) tensor, in `dtype` (default x's), exact for any
    finite x: each row is scaled by its largest magnitude before squaring (torch's norm squares
    as is, so |x| ~ 1e20 in float32 gives inf and |x| ~ 1e-30 gives 0). The scale is detached:
    the norm does not depend on it, so autograd sees d|x| = x / |x| as before."""
    out = x.dtype if dtype is None else dtype
    if out in (torch.float16, torch.bfloat16):  # scaled in float32 (no rounding of x / s)
        return row_norms(x, torch.float32).to(out)
    xt = x if x.dtype == out else x.to(out)
    xd = xt.detach()
    # max |x| as max(max x, -min x): the same value, and about 10x faster on CPU than the
    # ord=inf norm (2.1 ms vs 0.23 ms at 512 x 1024 float32, one thread)
    m = torch.maximum(xd.amax(dim=1, keepdim=True), xd.amin(dim=1, keepdim=True).neg())
    # a power of two (m = f * 2^e, f in [0.5, 1); s = 2^(e-1) stays finite at the dtype's max):
    # x / s and the final * s are exact, so the norm rounds as torch's unscaled one does
    s = torch.ldexp(torch.ones_like(m), torch.frexp(m).exponent - 1)
    s = torch.where(m > 0, s, torch.ones_like(m))  # a zero row keeps the norm 0
    return torch.linalg.vector_norm(xt / s, dim=1, keepdim=True) * s


def normalize_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """F.normalize(x, dim=1, eps=eps) in x's dtype, with the overflow-safe :func:`row_norms`."""
    return x / row_norms(x).clamp_min(eps)
