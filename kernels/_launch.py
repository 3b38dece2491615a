"""One launch path for every Triton kernel of fastssl.

* ``target(device)``: the compile target the launchers choose tiles for: the CUDA compute
  capability as an int (80, 90, ...), or None on CPU (the interpreter). Inside
  ``static_capture(cc)`` it is ``cc`` whatever the device, so ``bench/static.py`` can run the
  real launchers on ``meta`` tensors and read off exactly what they would launch on that GPU.
* ``launch(kernel, grid, *args, **kwargs)``: ``kernel[grid](*args, **kwargs)`` under
  ``torch.cuda.device(<device of the first tensor argument>)``, so a tensor on ``cuda:1`` runs
  on ``cuda:1`` whatever the current device is; under ``static_capture`` it records instead.
* ``check_*``: argument checks for the launchers (a kernel indexes raw pointers: a wrong shape,
  dtype or device reads out of bounds, so every launcher checks what it indexes with).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch


@dataclass
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


@dataclass
class _Capture:
    cc: int
    launches: list = field(default_factory=list)


_CAPTURE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar("fastssl_static_capture",
                                                                          default=None)


@contextlib.contextmanager
def static_capture(cc: int):
    """Within this block the launchers pick their configuration for compute capability ``cc``
    and record their launches (yielded list of ``Launch``) instead of running them."""
    cap = _Capture(cc)
    token = _CAPTURE.set(cap)
    try:
        yield cap.launches
    finally:
        _CAPTURE.reset(token)


def target(device: torch.device) -> int | None:
    """Compute capability (major * 10 + minor) the kernels are configured for; None: CPU."""
    cap = _CAPTURE.get()
    if cap is not None:
        return cap.cc
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return None


def _device_of(args) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def device_guard(device: torch.device | None):
    """``torch.cuda.device(device)`` for a CUDA device, else a no-op context."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, *args, **kwargs) -> None:
    cap = _CAPTURE.get()
    if cap is not None:
        cap.launches.append(Launch(kernel, tuple(grid), args, kwargs))
        return
    with device_guard(_device_of(args)):
        kernel[tuple(grid)](*args, **kwargs)


# ---- argument checks ---------------------------------------------------------------------------

class UnsupportedDtype(TypeError, RuntimeError):
    """A dtype the kernel does not serve: a TypeError (bad input), and a RuntimeError as the
    launchers raised before they checked every argument (callers catch either)."""


def check_tensor(name: str, t, *, dim: int | None = None, dtypes=None, device=None,
                 shape: tuple | None = None) -> None:
    """TypeError / ValueError naming ``name`` unless t is a tensor of that rank, dtype, device and
    shape (None entries of ``shape`` are free)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise UnsupportedDtype(f"{name} must have dtype in {[str(d) for d in dtypes]}, "
                               f"got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_range(name: str, value, lo, hi=None) -> None:
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bound}, got {value}")
