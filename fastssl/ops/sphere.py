"""Sphere-family ops: pair reductions over the Gram matrix of normalised rows, never stored.

* ``series_sum(x, y=None, weights)``: sum over all pairs (i, j) of
  psi(<x_i/|x_i|, y_j/|y_j|>), psi = sum_k w_k P_k (normalised Gegenbauer, dimension D).
  ``y=None`` means y = x (all N*N pairs, diagonal included; mirrored tiles computed once).
* ``gauss_lse(x, y=None, scale, diag_offset)``: log of the sum over pairs (i, j) with
  j != i + diag_offset of exp(2*scale*(<x̂_i, ŷ_j> - 1)) (AUH's uniformity before the mean).

Each is a torch.library custom op (forward and backward ops, fake kernels, autograd) taking
the backend name as an argument (chosen once by the public function through
:func:`backend_for`; the backward uses the forward's name, docs/design.md) from the family's
table ``TABLE``:
``triton`` (kernels/sphere.py) and ``torch`` (blocks of rows in PyTorch, never the full N x N;
serves CPU and float64; fastssl/backends/torch/sphere.py), each the family's interface
(fastssl/backends/interfaces.py). The reference (full matrices) is not a backend here: the
public losses choose it (``fastssl._backend.public_loss``).
Inputs are raw rows; the normalisation is part of the op (its backward projects the gradient).
A caller that has normalised the rows for another term of its loss (the mse of SFRIK and AUH)
passes their inverse norms (`x_inv_norm`, `y_inv_norm`, from :func:`inv_norms`), so the rows
are normalised once per loss, not once per term.
The scalar is float32 for fp32/bf16/fp16 inputs and float64 for float64.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from fastssl._backend import check_backend_name, choose
from fastssl._validation import accumulation_dtype
from fastssl.backends import LazyBackend
from fastssl.backends.torch.sphere import TorchSphere, _inv_norm, _norm, _project
from fastssl.ops._entry import entry


# The family's backend table (docs/design.md): name -> the family's interface; the torch entry
# also has the same-pass methods.
TABLE = {
    "triton": LazyBackend("fastssl.kernels.sphere", "TritonSphere",
                          ("series_forward", "series_grad_hat", "gauss_forward",
                           "gauss_grad_hat")),
    "torch": TorchSphere,
}


def backend_for(op: str, device: torch.device) -> str:
    """The backend that serves `op` ("sfrik", "auh", ...) on `device` now (the one dispatch
    point of the family: the public function calls it once and passes the name to the ops)."""
    return choose(op, device, TABLE, family="sphere")


# ---------------------------------------------------------------------------------------------
# the entry check of each registered op (fastssl/ops/_entry.py): devices, ranks, backend, and
# the feature dimension (the Gegenbauer recurrence divides by D - 1)

_BACKENDS = ("triton", "torch")


def _check_inv_norm(name: str, r, rows_name: str, rows) -> None:
    if r is None or rows is None:
        return
    acc = accumulation_dtype(rows)
    if r.shape != (rows.shape[0],) or r.dtype != acc:
        raise ValueError(f"{name}: expected the {rows.shape[0]} inverse norms of {rows_name} "
                         f"as a vector of {acc}, got shape {tuple(r.shape)} and {r.dtype}")


def _pair_limits(first: str, second: str, gegenbauer: bool):
    def limits(args):
        a, b = args[first], args[second]
        if b is not None and b.shape[1] != a.shape[1]:
            raise ValueError(f"{second}: expected {a.shape[1]} columns (the feature dimension "
                             f"of {first}), got shape {tuple(b.shape)}")
        _check_inv_norm("rx", args.get("rx"), first, a)
        _check_inv_norm("ry", args.get("ry"), second, b)
        if b is None and args.get("ry") is not None:
            raise ValueError(f"ry: expected None when {second} is None (the symmetric sum)")
        if gegenbauer:
            if a.shape[1] < 2:
                raise ValueError(f"{first}: the Gegenbauer kernel needs an embedding dimension "
                                 f"D >= 2, got shape {tuple(a.shape)}")
            w = args["weights"]
            if len(w) == 0 or not all(math.isfinite(v) for v in w):
                raise ValueError(f"weights: expected at least one finite weight, got {list(w)}")
    return limits


_SERIES_SPEC = dict(ranks={"x": 2, "y": 2, "rx": 1, "ry": 1}, backends=_BACKENDS,
                    limits=_pair_limits("x", "y", True))
_SERIES_BWD_SPEC = dict(ranks={"grad": 0, "a": 2, "b": 2}, backends=_BACKENDS,
                        limits=_pair_limits("a", "b", True))
_GAUSS_SPEC = dict(ranks={"x": 2, "y": 2, "rx": 1, "ry": 1}, backends=_BACKENDS,
                   limits=_pair_limits("x", "y", False))
_GAUSS_BWD_SPEC = dict(ranks={"grad": 0, "a": 2, "b": 2, "lse": 0}, backends=_BACKENDS,
                       limits=_pair_limits("a", "b", False))
_SERIES_GRAD_SPEC = dict(ranks={"x": 2, "y": 2, "rx": 1, "ry": 1}, backends=("torch",),
                         limits=_pair_limits("x", "y", True))
_GAUSS_GRAD_SPEC = dict(ranks={"x": 2, "y": 2, "rx": 1, "ry": 1}, backends=("torch",),
                        limits=_pair_limits("x", "y", False))


# ---------------------------------------------------------------------------------------------
# torch.library ops

def _scalar_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((), dtype=accumulation_dtype(x))


@torch.library.custom_op("fastssl::sphere_series_sum", mutates_args=())
@entry("sphere_series_sum", **_SERIES_SPEC)
def _series_sum_op(x: torch.Tensor, y: Optional[torch.Tensor], weights: list[float],
                   backend: str, rx: Optional[torch.Tensor] = None,
                   ry: Optional[torch.Tensor] = None) -> torch.Tensor:
    return TABLE[backend].series_forward(x, y, list(weights), x.shape[1], rx, ry)


@_series_sum_op.register_fake
@entry("sphere_series_sum", **_SERIES_SPEC)
def _(x, y, weights, backend, rx=None, ry=None):
    return _scalar_like(x)


@torch.library.custom_op("fastssl::sphere_series_backward", mutates_args=())
@entry("sphere_series_backward", **_SERIES_BWD_SPEC)
def _series_grad_op(grad: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor],
                    weights: list[float], backend: str) -> torch.Tensor:
    grad_hat, ra = TABLE[backend].series_grad_hat(a, b, list(weights), a.shape[1])
    return _project(grad_hat, a, ra, grad)


@_series_grad_op.register_fake
@entry("sphere_series_backward", **_SERIES_BWD_SPEC)
def _(grad, a, b, weights, backend):
    return torch.empty_like(a)


def _series_setup(ctx, inputs, output):
    x, y, weights, backend = inputs[:4]
    ctx.save_for_backward(x, y)
    ctx.weights, ctx.backend = weights, backend


def _series_backward(ctx, grad):
    # The forward's backend, never a new selection: the autograd engine may run this on a
    # thread that does not see the use_backend context.
    x, y = ctx.saved_tensors
    w, be = ctx.weights, ctx.backend
    if y is None:
        return _series_grad_op(grad, x, None, w, be), None, None, None, None, None
    gx = _series_grad_op(grad, x, y, w, be) if ctx.needs_input_grad[0] else None
    gy = _series_grad_op(grad, y, x, w, be) if ctx.needs_input_grad[1] else None
    return gx, gy, None, None, None, None


_series_sum_op.register_autograd(_series_backward, setup_context=_series_setup)


@torch.library.custom_op("fastssl::sphere_gauss_lse", mutates_args=())
@entry("sphere_gauss_lse", **_GAUSS_SPEC)
def _gauss_lse_op(x: torch.Tensor, y: Optional[torch.Tensor], scale: float,
                  diag_offset: int, backend: str, rx: Optional[torch.Tensor] = None,
                  ry: Optional[torch.Tensor] = None) -> torch.Tensor:
    return TABLE[backend].gauss_forward(x, y, scale, diag_offset, rx, ry)


@_gauss_lse_op.register_fake
@entry("sphere_gauss_lse", **_GAUSS_SPEC)
def _(x, y, scale, diag_offset, backend, rx=None, ry=None):
    return _scalar_like(x)


@torch.library.custom_op("fastssl::sphere_gauss_backward", mutates_args=())
@entry("sphere_gauss_backward", **_GAUSS_BWD_SPEC)
def _gauss_grad_op(grad: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor], scale: float,
                   diag_offset: int, lse: torch.Tensor, backend: str) -> torch.Tensor:
    grad_hat, ra = TABLE[backend].gauss_grad_hat(a, b, scale, diag_offset, lse)
    return _project(grad_hat, a, ra, grad)


@_gauss_grad_op.register_fake
@entry("sphere_gauss_backward", **_GAUSS_BWD_SPEC)
def _(grad, a, b, scale, diag_offset, lse, backend):
    return torch.empty_like(a)


def _gauss_setup(ctx, inputs, output):
    x, y, scale, diag_offset, backend = inputs[:5]
    ctx.save_for_backward(x, y, output)
    ctx.scale, ctx.diag_offset, ctx.backend = scale, diag_offset, backend


def _gauss_backward(ctx, grad):
    x, y, lse = ctx.saved_tensors
    s, off, be = ctx.scale, ctx.diag_offset, ctx.backend
    if y is None:
        return _gauss_grad_op(grad, x, None, s, 0, lse, be), None, None, None, None, None, None
    gx = _gauss_grad_op(grad, x, y, s, off, lse, be) if ctx.needs_input_grad[0] else None
    # The transposed pairs: row j of y meets column i of x, excluded when i == j - offset.
    gy = _gauss_grad_op(grad, y, x, s, -off, lse, be) if ctx.needs_input_grad[1] else None
    return gx, gy, None, None, None, None, None


_gauss_lse_op.register_autograd(_gauss_backward, setup_context=_gauss_setup)


# Same-pass ops (the entries with `series_forward_grad` / `gauss_forward_grad`): the forward
# returns the unprojected gradients in x̂ and ŷ as extra outputs; the backward only projects
# them through the normalisation and scales them.
SAME_PASS_BACKENDS = tuple(n for n, impl in TABLE.items() if hasattr(impl, "series_forward_grad"))


@torch.library.custom_op("fastssl::sphere_series_sum_grad", mutates_args=())
@entry("sphere_series_sum_grad", **_SERIES_GRAD_SPEC)
def _series_sum_grad_op(x: torch.Tensor, y: Optional[torch.Tensor], weights: list[float],
                        backend: str, rx: Optional[torch.Tensor] = None,
                        ry: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, gx_hat, gy_hat): sphere_series_sum with its gradients in x̂ (and ŷ; empty when y
    is None) from the same pass."""
    if backend not in SAME_PASS_BACKENDS:
        raise RuntimeError(f"fastssl::sphere_series_sum_grad: backend {backend!r} has no "
                           f"same-pass kernels (expected one of {SAME_PASS_BACKENDS})")
    total, gx, gy = TABLE[backend].series_forward_grad(x, y, list(weights), x.shape[1], rx, ry)
    return total, gx.contiguous(), gy.contiguous()


@_series_sum_grad_op.register_fake
@entry("sphere_series_sum_grad", **_SERIES_GRAD_SPEC)
def _(x, y, weights, backend, rx=None, ry=None):
    acc = accumulation_dtype(x)
    return (_scalar_like(x), x.new_empty(x.shape, dtype=acc),
            x.new_empty(y.shape if y is not None else (0,), dtype=acc))


@torch.library.custom_op("fastssl::sphere_gauss_lse_grad", mutates_args=())
@entry("sphere_gauss_lse_grad", **_GAUSS_GRAD_SPEC)
def _gauss_lse_grad_op(x: torch.Tensor, y: Optional[torch.Tensor], scale: float,
                       diag_offset: int, backend: str, rx: Optional[torch.Tensor] = None,
                       ry: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, gx_hat, gy_hat): sphere_gauss_lse with its gradients in x̂ (and ŷ) from the same
    pass."""
    if backend not in SAME_PASS_BACKENDS:
        raise RuntimeError(f"fastssl::sphere_gauss_lse_grad: backend {backend!r} has no "
                           f"same-pass kernels (expected one of {SAME_PASS_BACKENDS})")
    lse, gx, gy = TABLE[backend].gauss_forward_grad(x, y, scale, diag_offset, rx, ry)
    return lse, gx.contiguous(), gy.contiguous()


@_gauss_lse_grad_op.register_fake
@entry("sphere_gauss_lse_grad", **_GAUSS_GRAD_SPEC)
def _(x, y, scale, diag_offset, backend, rx=None, ry=None):
    acc = accumulation_dtype(x)
    return (_scalar_like(x), x.new_empty(x.shape, dtype=acc),
            x.new_empty(y.shape if y is not None else (0,), dtype=acc))


def _same_pass_setup(ctx, inputs, output):
    x, y = inputs[0], inputs[1]
    rx, ry = inputs[-2], inputs[-1]
    _value, gx, gy = output
    ctx.mark_non_differentiable(gx, gy)
    ctx.save_for_backward(x, y, gx, gy, rx, ry)


def _same_pass_backward(ctx, grad, _g_gx, _g_gy):
    x, y, gx, gy, rx, ry = ctx.saved_tensors
    # the caller's inverse norms where it gave them (no second normalisation)
    rx = _inv_norm(x) if rx is None else rx
    # _project updates its first argument in place: a copy keeps the saved gradient intact
    # (a second backward with retain_graph sees the same values)
    dx = _project(gx.clone(), x, rx, grad) if ctx.needs_input_grad[0] else None
    dy = (_project(gy.clone(), y, _inv_norm(y) if ry is None else ry, grad)
          if y is not None and ctx.needs_input_grad[1] else None)
    return (dx, dy) + (None,) * (len(ctx.needs_input_grad) - 2)


_series_sum_grad_op.register_autograd(_same_pass_backward, setup_context=_same_pass_setup)
_gauss_lse_grad_op.register_autograd(_same_pass_backward, setup_context=_same_pass_setup)


def _wants_same_pass(backend: str, x: torch.Tensor, y: torch.Tensor | None) -> bool:
    needs_grad = x.requires_grad or (y is not None and y.requires_grad)
    return backend in SAME_PASS_BACKENDS and torch.is_grad_enabled() and needs_grad


# ---------------------------------------------------------------------------------------------
# public entry points

def norms(z: torch.Tensor) -> torch.Tensor:
    """The L2 norms of the rows of z, (B,) in the accumulation dtype, clamped at 1e-12 as the
    ops clamp them (overflow-safe); differentiable. Their reciprocals (detached) are the
    ops' inverse norms, equal to :func:`inv_norms` bit for bit; dividing by them, not
    multiplying by the reciprocals, keeps the gradient's radial part in float32 at |z| ~ 1e20
    (d(1/n) = -dn / n^2 would underflow there)."""
    return _norm(z)


def inv_norms(z: torch.Tensor) -> torch.Tensor:
    """The inverse L2 norms of the rows of z, (B,) in the accumulation dtype, as the ops
    compute them (overflow-safe, clamped at 1e-12); differentiable. A loss that normalises the
    rows for another term computes them once with this and passes them (detached) to the ops
    as `x_inv_norm` / `y_inv_norm`."""
    return _inv_norm(z)


def _detached(r: torch.Tensor | None) -> torch.Tensor | None:
    # the ops differentiate through the normalisation themselves (their backward projects)
    return None if r is None else r.detach()


def series_sum(x: torch.Tensor, y: torch.Tensor | None = None, *,
               weights: Sequence[float], backend: str | None = None,
               x_inv_norm: torch.Tensor | None = None,
               y_inv_norm: torch.Tensor | None = None) -> torch.Tensor:
    """sum_{i,j} sum_k w_k P_k(<x̂_i, ŷ_j>) in dimension D (y None: y = x, all N*N pairs).

    `backend`: a name chosen by :func:`backend_for` (None: choose now). `x_inv_norm`,
    `y_inv_norm`: the rows' :func:`inv_norms` where the caller has them (None: computed here)."""
    if backend is None:
        backend = backend_for("sphere_series_sum", x.device)
    check_backend_name("fastssl.ops.sphere.series_sum", backend, TABLE)
    w = [float(v) for v in weights]
    rx, ry = _detached(x_inv_norm), _detached(y_inv_norm)
    if _wants_same_pass(backend, x, y):
        return _series_sum_grad_op(x, y, w, backend, rx, ry)[0]
    return _series_sum_op(x, y, w, backend, rx, ry)


def gauss_lse(x: torch.Tensor, y: torch.Tensor | None = None, *, scale: float,
              diag_offset: int = 0, backend: str | None = None,
              x_inv_norm: torch.Tensor | None = None,
              y_inv_norm: torch.Tensor | None = None) -> torch.Tensor:
    """log sum_{(i,j): j != i + diag_offset} exp(2 scale (<x̂_i, ŷ_j> - 1)) (y None: y = x).

    `backend`: a name chosen by :func:`backend_for` (None: choose now). `x_inv_norm`,
    `y_inv_norm`: the rows' :func:`inv_norms` where the caller has them (None: computed here)."""
    if backend is None:
        backend = backend_for("sphere_gauss_lse", x.device)
    check_backend_name("fastssl.ops.sphere.gauss_lse", backend, TABLE)
    rx, ry = _detached(x_inv_norm), _detached(y_inv_norm)
    if _wants_same_pass(backend, x, y):
        return _gauss_lse_grad_op(x, y, float(scale), int(diag_offset), backend, rx, ry)[0]
    return _gauss_lse_op(x, y, float(scale), int(diag_offset), backend, rx, ry)
