"""Backend selection: the one place that decides which implementation serves an op.

A family declares a table ``{backend_name: implementation}`` (``fastssl.ops.<family>.TABLE``);
:func:`choose` picks the name for the current backend setting and the tensor's device, and
:func:`public_loss` does it once per public call, choosing the reference there. ``"auto"``
prefers, on CUDA tensors, the fused kernels that the test suite has executed (``triton``: every
test runs them under the interpreter) over those that have only been compiled (``cuda``), per
family (see ``AUTO_CUDA_ORDER``), and the C++ extension on CPU (``cpp`` then ``torch``). A
forced backend that cannot serve the input raises; it never falls back silently.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
from typing import Callable, Iterator, Mapping

import torch

from fastssl._validation import check_finite_enabled as _check_finite_enabled
from fastssl._validation import set_check_finite as _set_check_finite

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch", "reference")

_AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpp", "torch"),
}

# `auto` on CUDA tensors, per kernel family (docs/design.md, "auto"): a backend comes first only
# once its kernels have been executed and found equal to the reference. The Triton kernels run in
# every test (interpreter) and compile for sm_80/sm_90 (bench.static); the hand-written CUDA
# kernels (csrc/*_cuda.cu) are compiled but have not run on a GPU yet. A family moves `cuda`
# first when a GPU run (`python -m bench.backend_choice`, part of `python -m bench.gpu_run`)
# shows its CUDA tests passing and `cuda` faster than `triton` on that device.
AUTO_CUDA_ORDER: dict[str, tuple[str, ...]] = {
    "contrastive": ("triton", "torch"),
    "sphere": ("triton", "torch"),
    "sortnet": ("triton", "cuda", "torch"),
    "swav": ("triton", "cuda", "torch"),
}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastssl_backend",
                                                                     default=None)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def check_backend_name(op: str, name, names) -> str:
    """A backend name passed to an op or an ops-layer function: one of `names` (the backends
    that serve it), else a ValueError naming the argument (never a raw KeyError)."""
    names = tuple(names)
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"backend: expected one of {names} for {op}, got {name!r}")
    return name


def current_backend() -> str:
    """The backend in force: a `use_backend` context, else $FASTSSL_BACKEND, else "auto"."""
    forced = _forced.get()
    if forced is not None:
        return forced
    env = os.environ.get("FASTSSL_BACKEND", "auto") or "auto"
    try:
        return _check_name(env)
    except ValueError as e:
        raise ValueError(f"FASTSSL_BACKEND: {e}") from None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Force a backend inside a ``with`` block (tests and benchmarks)."""
    token = _forced.set(_check_name(name))
    try:
        yield name
    finally:
        _forced.reset(token)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def cpp_available() -> bool:
    try:
        from fastssl import _C  # noqa: F401
    except Exception:
        return False
    return True


def cuda_ext_available() -> bool:
    try:
        from fastssl import _C
    except Exception:
        return False
    return bool(getattr(_C, "with_cuda", lambda: False)())


def can_serve(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether `backend` can run on tensors of `device`, and if not, why."""
    if backend in ("torch", "reference"):
        return True, ""
    if backend == "cpp":
        if device.type != "cpu":
            return False, "the C++ backend serves CPU tensors only"
        return (True, "") if cpp_available() else (False, "fastssl._C is not built")
    if backend == "cuda":
        if device.type != "cuda":
            return False, "the CUDA backend serves CUDA tensors only"
        return (True, "") if cuda_ext_available() else (False, "fastssl._C was built without CUDA")
    if backend == "triton":
        if not triton_available():
            return False, "triton is not installed"
        if device.type == "cpu" and not triton_interpreter_enabled():
            return False, ("triton on CPU tensors needs TRITON_INTERPRET=1 set before fastssl "
                           "is imported")
        if device.type not in ("cpu", "cuda"):
            return False, f"triton does not serve {device.type} tensors"
        return True, ""
    return False, f"unknown backend {backend!r}"


def auto_order(device_type: str, family: str | None = None) -> tuple[str, ...]:
    """The backends `auto` tries, in order, for `family` on tensors of `device_type`."""
    if device_type == "cuda" and family in AUTO_CUDA_ORDER:
        return AUTO_CUDA_ORDER[family]
    return _AUTO_ORDER.get(device_type, ("torch",))


def _mark_constant_result(fn):
    """What ``torch.compiler.assume_constant_result`` does (it sets this one attribute), without
    importing torch._dynamo (about 1 s) when fastssl is imported; tests/test_import_graph.py
    checks that the public decorator still does exactly this."""
    fn._dynamo_marked_constant = True
    return fn


# torch.compile cannot trace the ContextVar and environment reads behind the choice: it takes
# the choice as a constant of the traced graph (a compiled step keeps the backend it was traced
# with, like any other configuration read at trace time).
@_mark_constant_result
def _selected_name(op: str, device_type: str, names: tuple[str, ...],
                   family: str | None = None) -> str:
    device = torch.device(device_type)
    want = current_backend()
    if want == "auto":
        for name in auto_order(device.type, family):
            if name in names and can_serve(name, device)[0]:
                return name
        return "torch" if "torch" in names else "reference"
    if want not in names:
        raise RuntimeError(f"fastssl.{op}: backend {want!r} has no implementation of this op "
                           f"(available: {list(names)})")
    ok, why = can_serve(want, device)
    if not ok:
        raise RuntimeError(f"fastssl.{op}: backend {want!r} cannot serve {device.type} tensors: "
                           f"{why}")
    return want


# The check-finite switch lives with the validation primitives (fastssl._validation, a leaf
# module); re-exported here and as fastssl.set_check_finite.
set_check_finite = _set_check_finite
check_finite_enabled = _check_finite_enabled


def choose(op: str, device: torch.device, table: Mapping[str, object],
           method: str | None = None, family: str | None = None) -> str:
    """The name of the backend that serves `op` on `device` under the current setting.

    `table` is a family's backend table (name -> namespace); with `method`, only the entries
    that define it count (an op that one backend lacks is refused when forced, never replaced).
    `family` names the kernel family, whose `AUTO_CUDA_ORDER` entry `auto` follows on CUDA.
    The public function calls this once and passes the name to the op (docs/design.md).
    """
    names = tuple(sorted(n for n, impl in table.items()
                         if method is None or hasattr(impl, method)))
    return _selected_name(op, device.type, names, family)


def _first_device(args, kwargs) -> torch.device:
    """The device of the first tensor among the arguments (lists and tuples searched, as for
    SwAV's crops); CPU when there is none (the loss's own checks then name the bad argument)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
        if isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    return item.device
    return torch.device("cpu")


def public_loss(op: str, family: str, table: Mapping[str, object], reference: Callable,
                method: str | None = None):
    """Decorator of a public loss: the one place where the reference is chosen.

    The decorated function is the fused path, called as ``fused(*args, backend=name, **kwargs)``
    with `name` the backend that serves `op` (chosen once, from the family's kernel `table` plus
    "reference", see :func:`choose`); when the backend in force is "reference" the call goes to
    ``reference(*args, **kwargs)`` instead (``fastssl.reference``, the full matrices). So the
    ops and kernels never import the test oracle, and no loss tests the backend name itself.
    """

    def decorate(fused: Callable) -> Callable:
        @functools.wraps(fused)
        def loss(*args, **kwargs):
            names = tuple(sorted({*(n for n, impl in table.items()
                                    if method is None or hasattr(impl, method)), "reference"}))
            name = _selected_name(op, _first_device(args, kwargs).type, names, family)
            if name == "reference":
                return loss.reference(*args, **kwargs)
            return loss.fused(*args, backend=name, **kwargs)
        # the public signature: the fused path's without the backend it is given
        sig = inspect.signature(fused)
        loss.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values()
                                                     if p.name != "backend"])
        loss.fused = fused
        loss.reference = reference
        return loss
    return decorate
