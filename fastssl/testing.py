"""Test helpers shared by the test suite and usable by anyone checking a kernel.

* Tolerances: per-dtype tables (:data:`TOLERANCES`), :func:`assert_close`, and
  :func:`assert_lowp_rule`, the flash-attention rule for bf16/fp16: the error of the fast
  path against an fp32 (or fp64) reference is at most ``factor`` (2) times the error of the
  reference itself computed in the low precision, plus a small floor.
* :func:`run_torchrun`: run a function under ``torchrun --nproc_per_node=W`` with gloo on
  CPU and collect what each rank returns.
"""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
from typing import Any, Mapping

import torch

# (rtol, atol) for comparing a fast path with the reference in the same dtype.
TOLERANCES: Mapping[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-4, 2e-5),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (5e-3, 2e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 rtol: float | None = None, atol: float | None = None, msg: str = "") -> None:
    """torch.testing.assert_close with the per-dtype table (dtype of `expected` by default)."""
    dtype = dtype or expected.dtype
    r, a = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    torch.testing.assert_close(actual.to(expected.dtype), expected,
                               rtol=r if rtol is None else rtol, atol=a if atol is None else atol,
                               msg=(lambda m: f"{msg}\n{m}") if msg else None)


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_lowp_rule(fast: torch.Tensor, ref_lowp: torch.Tensor, ref_high: torch.Tensor, *,
                     factor: float = 2.0, floor: float = 1e-5, msg: str = "") -> None:
    """Flash-attention rule: |fast - ref_high| <= factor * |ref_lowp - ref_high| + floor.

    `fast` is the fast path on low-precision inputs, `ref_lowp` the reference on the same
    low-precision inputs, `ref_high` the reference on those inputs upcast to fp32/fp64.
    """
    err_fast = max_abs_err(fast, ref_high)
    err_ref = max_abs_err(ref_lowp, ref_high)
    bound = factor * err_ref + floor
    assert err_fast <= bound, (f"{msg} low-precision error {err_fast:.3e} exceeds {factor} x the "
                               f"reference's own error {err_ref:.3e} (+{floor:.0e})")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(target: str, nproc: int, kwargs: dict[str, Any] | None = None, *,
                 timeout: float = 300.0, env: Mapping[str, str] | None = None) -> list[Any]:
    """Run ``path/to/file.py:function`` on `nproc` gloo ranks; return each rank's result.

    The function is called as ``function(**kwargs)`` after the process group is initialised
    (gloo, CPU); what it returns must be picklable (tensors are fine). A failing rank makes
    this raise with the ranks' output.
    """
    path, func = target.rsplit(":", 1)
    with tempfile.TemporaryDirectory(prefix="fastssl_torchrun_") as tmp:
        with open(os.path.join(tmp, "kwargs.pkl"), "wb") as f:
            pickle.dump(kwargs or {}, f)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "fastssl._torchrun_worker", os.path.abspath(path), func, tmp]
        run_env = dict(os.environ)
        run_env.setdefault("OMP_NUM_THREADS", "1")
        run_env.update(env or {})
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env)
        if proc.returncode != 0:
            raise RuntimeError(
                f"torchrun {target} with {nproc} ranks failed (exit "
                f"{proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
            )
        results = []
        for r in range(nproc):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
