"""Shared fixtures: backends, devices, markers.

Triton kernels run on CPU tensors through the interpreter; it must be switched on before
triton decorates any kernel, so it is set here, before fastssl is imported.
"""
import os

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

from fastssl._backend import can_serve  # noqa: E402

HAS_CUDA = _HAS_CUDA

# diffsort (the reference sorting networks) is in the dev extra; the GPU machine has it only when
# bench.gpu_run installs the carried wheel, so the tests that need it skip with this reason.
try:
    import diffsort
except ImportError:  # not on the GPU machine unless its wheel travels in .whl/ (bench.gpu_run)
    diffsort = None
needs_diffsort = pytest.mark.skipif(
    diffsort is None, reason="diffsort is not installed: pip install diffsort==0.2.0 (the dev "
    "extra), or carry its wheel in .whl/ for python -m bench.gpu_run")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (still part of the full suite)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "distributed: runs torchrun with several gloo ranks")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (none on this machine)"))


def backend_params(*names: str):
    """pytest params ``(backend, device)`` for the backends an op implements.

    CPU: reference, torch, cpp, triton (interpreter). CUDA (when present): triton, cuda, torch,
    reference. A pair that cannot run here is skipped with the reason shown.
    """
    params = []
    for name in names:
        for dev in ("cpu", "cuda"):
            if dev == "cpu" and name == "cuda":
                continue
            if dev == "cuda" and name == "cpp":
                continue
            marks = []
            if dev == "cuda" and not HAS_CUDA:
                marks.append(pytest.mark.skip(reason="no CUDA device on this machine"))
            else:
                ok, why = can_serve(name, torch.device(dev))
                if not ok:
                    marks.append(pytest.mark.skip(reason=f"{name} on {dev}: {why}"))
            params.append(pytest.param(name, dev, marks=marks, id=f"{name}-{dev}"))
    return params


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
