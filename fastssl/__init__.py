"""fastssl: fused kernels for self-supervised pretraining losses.

    import fastssl
    loss = fastssl.functional.nt_xent(z1, z2, temperature=0.1)
    with fastssl.use_backend("reference"):   # force a backend (tests, benchmarks)
        ...
"""
from fastssl.version import __version__
from fastssl._backend import BACKENDS, current_backend, set_check_finite, use_backend
from fastssl import distributed, functional, losses, ops, reference  # noqa: E402

__all__ = ["__version__", "BACKENDS", "current_backend", "set_check_finite", "use_backend",
           "distributed", "functional", "losses", "ops", "reference"]
