"""fastssl: fused kernels for self-supervised pretraining losses.

    import fastssl
    loss = fastssl.functional.nt_xent(z1, z2, temperature=0.1)
    with fastssl.use_backend("reference"):   # force a backend (tests, benchmarks)
        ...
"""
import warnings as _warnings

import torch as _torch

from fastssl.version import __version__

try:
    from fastssl import _build_info  # written by setup.py when _C is built
except ImportError:  # a checkout without a build: nothing to compare
    _build_info = None


def _check_build_torch(built: str, loaded: str) -> str | None:
    """The warning to give when the extension was built against another torch, else None."""
    if built == loaded:
        return None
    return (f"fastssl's C++ extension (fastssl._C) was built against torch {built}, but torch "
            f"{loaded} is loaded: its ops may fail to load or crash. Install torch=={built}, "
            f"or rebuild fastssl against this torch (pip install --no-build-isolation "
            f"--force-reinstall --no-deps fastssl, or setup.py build_ext --inplace in a "
            f"checkout). The other backends (torch, triton, reference) are unaffected.")


def _warn_if_other_torch() -> None:
    if _build_info is None:
        return
    message = _check_build_torch(_build_info.TORCH_VERSION, _torch.__version__)
    if message:
        _warnings.warn(message, RuntimeWarning, stacklevel=3)


_warn_if_other_torch()
from fastssl._backend import BACKENDS, current_backend, set_check_finite, use_backend  # noqa: E402
from fastssl import distributed, functional, losses, ops, reference  # noqa: E402

__all__ = ["__version__", "BACKENDS", "current_backend", "set_check_finite", "use_backend",
           "distributed", "functional", "losses", "ops", "reference"]
