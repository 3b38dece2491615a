"""The one entry check of every registered op (``torch.ops.fastssl.*``), real and fake kernel.

``torch.ops.fastssl.*`` is public once fastssl is imported, and the dispatcher sends a call with
one tensor on ``meta`` and the others on the CPU to the fake kernel, which would return
uninitialised CPU memory (issue 22). So both kernels of every op go through :func:`entry`, which
checks before any kernel is chosen or anything allocated:

* every tensor argument on one device (meta included);
* the rank of each tensor argument (a 0-d or 3-d tensor where a matrix is expected is named,
  never an IndexError deep inside a kernel);
* the ``backend`` string against the backends that serve the op, and ``network`` /
  ``distribution`` against their choices (no raw KeyError);
* an op's own size limits (``limits``: e.g. k, n, self_offset), before a comparator network or
  an output is built from them.

Every message starts with the argument's name and ends with the op's name.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Mapping

import torch

from fastssl._backend import check_backend_name


def _rank_text(ranks) -> str:
    if isinstance(ranks, int):
        return f"a {ranks}-D tensor"
    return "a " + " or ".join(f"{r}-D" for r in ranks) + " tensor"


def check_call(op: str, args: Mapping[str, object], *, ranks: Mapping[str, object],
               backends: tuple[str, ...] | None = None,
               choices: Mapping[str, tuple] | None = None,
               limits: Callable[[Mapping[str, object]], None] | None = None) -> None:
    """Validate one call of `op` (its arguments by name); raises ValueError naming the argument."""
    ref_name, ref = None, None
    for name, value in args.items():
        if not isinstance(value, torch.Tensor):
            continue
        if ref is None:
            ref_name, ref = name, value
        elif value.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), "
                             f"got {value.device} (fastssl::{op}: all tensor arguments must "
                             f"share one device)")
    for name, want in ranks.items():
        value = args.get(name)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__} "
                            f"(fastssl::{op})")
        ok = value.dim() == want if isinstance(want, int) else value.dim() in want
        if not ok:
            raise ValueError(f"{name}: expected {_rank_text(want)}, got shape "
                             f"{tuple(value.shape)} (fastssl::{op})")
    if backends is not None and "backend" in args:
        check_backend_name(f"fastssl::{op}", args["backend"], backends)
    for name, allowed in (choices or {}).items():
        if name in args and args[name] not in allowed:
            raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {args[name]!r} "
                             f"(fastssl::{op})")
    if limits is not None:
        limits(args)


def entry(op: str, **spec):
    """Decorator for an op's real and fake kernel: :func:`check_call` on the bound arguments
    before the body runs (the same spec for both, so the two cannot drift apart)."""
    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            check_call(op, bound.arguments, **spec)
            return fn(*args, **kwargs)
        # the annotations resolved in fn's own module: torch.library infers the op's schema
        # from this signature (as strings they would be evaluated in this module)
        checked.__signature__ = inspect.signature(fn, eval_str=True)
        return checked
    return wrap


def check_count(op: str, name: str, value: int, *, minimum: int, maximum: int,
                why: str = "") -> None:
    """An int argument of an op inside [minimum, maximum] (both ends given as ints, so no
    arithmetic on `value` can overflow a C++ int64 later)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} (fastssl::{op})")
    if value < minimum or value > maximum:
        raise ValueError(f"{name}: expected an int in [{minimum}, {maximum}]{why}, got {value} "
                         f"(fastssl::{op})")
