"""Timing and memory measurement shared by every benchmark module.

An op spec (`OpSpec`) gives one docs/api.md op's sizes per device, its providers and how to
build inputs and the callable for one provider. Providers: ``fastssl`` (backend "auto"),
``fastssl:<backend>`` (forced), ``reference`` (fastssl.reference), ``reference:compile`` (GPU),
and the baselines of bench/baselines.py (``eager``, ``peer:<library>``, ``diffsort``). Modes:
``forward`` (under no_grad), ``backward`` (from an untimed forward), ``forward+backward``; the
trainer uses ``step``.

Timing: warm-up calls first (they pay torch.compile and Triton JIT). CUDA: triton.testing.do_bench
(synchronised, L2 flushed) for forward and forward+backward, CUDA events around each backward.
CPU: time.perf_counter over repeated calls until a minimum count and time. Quantiles p20/p50/p80.

Peak memory is the peak above what was allocated just before the call. CUDA:
max_memory_allocated after reset_peak_memory_stats. CPU: the growth of VmHWM, the kernel's
high-water mark, reset to the current RSS through /proc/self/clear_refs after gc.collect() and
malloc_trim(0) (ru_maxrss never decreases); it counts every allocation, the C++ extension's too.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import textwrap
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch

import fastssl

from . import baselines
from .common import EAGER_PROVIDERS, STANDARD_PROVIDERS

MODES = ("forward", "backward", "forward+backward")



class Skip(Exception):
    """The provider does not apply here (recorded as status "skipped" with the message)."""


@dataclass
class Size:
    """One shape to measure. `modes`/`providers` restrict what is run at this shape (e.g. the
    largest sizes only forward+backward, a max-batch probe only for fastssl)."""
    shape: dict
    modes: tuple[str, ...] | None = None
    providers: tuple[str, ...] | None = None


@dataclass
class Prepared:
    """What a provider needs to run one case.

    forward() runs the op and returns its output; backward(output) runs the backward from it
    (None when the op has no gradient); leaves are the tensors whose .grad is reset between
    calls; extras(record, config) may add fields to each measured record (the trainer's
    images/s)."""

    forward: Callable[[], Any]
    backward: Callable[[Any], Any] | None = None
    leaves: Sequence[torch.Tensor] = ()
    extras: Callable[[dict, "BenchConfig"], dict] | None = None
    modes: tuple[str, ...] | None = None  # overrides the spec's modes (e.g. trainer "step")


@dataclass
class OpSpec:
    name: str
    family: str
    build: Callable[[str, dict, torch.dtype, torch.device], Prepared]
    sizes: Callable[[str, bool], list[Size]]   # (device type, quick) -> sizes
    providers: tuple[str, ...] = STANDARD_PROVIDERS
    dtypes: Callable[[str, bool], tuple[torch.dtype, ...]] = lambda dev, quick: (
        (torch.float32,) if dev == "cpu" or quick else (torch.bfloat16, torch.float32)
    )
    modes: tuple[str, ...] = MODES
    x_key: str = "B"          # the shape entry plotted on the x axis (the batch size)
    x_label: str = "batch size B (per view)"


@dataclass
class BenchConfig:
    quick: bool = False
    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 20
    min_time_s: float = 1.0    # CPU: keep calling until this much time was measured...
    max_time_s: float = 20.0   # ...but stop after this much (big reference cases)
    cuda_warmup_ms: int = 25
    cuda_rep_ms: int = 100
    long_call_s: float = 3.0    # CPU: a warm-up call longer than this...
    long_call_reps: int = 2     # ...gets this many timed calls

    @classmethod
    def for_run(cls, quick: bool) -> "BenchConfig":
        if quick:
            return cls(quick=True, warmup=1, min_reps=1, max_reps=2, min_time_s=0.0,
                       max_time_s=0.5, cuda_warmup_ms=5, cuda_rep_ms=20)
        return cls()


# ----------------------------------------------------------------------------------------------
# providers


def static_skip(provider: str, device_type: str) -> str | None:
    """Why `provider` is not measured on this device type at all, or None."""
    if provider == "fastssl:triton" and device_type == "cpu":
        return ("Triton on CPU runs only under the interpreter (TRITON_INTERPRET=1), a correctness "
                "tool that is orders of magnitude slower than compiled code: not a speed provider")
    if provider == "fastssl:cuda" and device_type != "cuda":
        return "the CUDA backend serves CUDA tensors only"
    if provider == "fastssl:cpp" and device_type != "cpu":
        return "the C++ backend serves CPU tensors only"
    if provider in ("reference:compile", "eager:compile") and device_type != "cuda":
        return "torch.compile is measured on GPU only"
    return None


@contextlib.contextmanager
def backend_forced(name: str) -> Iterator[None]:
    """Force fastssl's backend for everything run inside, the backward included: the public
    functions choose the backend once and their ops' backward uses that choice on whatever
    thread the autograd engine runs it (docs/design.md), so the context alone is enough."""
    with fastssl.use_backend(name):
        yield


def provider_backend(provider: str) -> str | None:
    """The fastssl backend a provider forces ("auto" for fastssl), None for the others."""
    if provider == "fastssl":
        return "auto"
    if provider.startswith("fastssl:"):
        return provider.split(":", 1)[1]
    return None


def baseline_providers(op: str) -> tuple[str, ...]:
    """The eager providers and the op's peers (bench/baselines.py) offered to an op spec."""
    eager = EAGER_PROVIDERS if op in baselines.EAGER else ()
    return eager + tuple(f"peer:{p}" for p in baselines.PEERS.get(op, ()) if p != "diffsort")


def resolve_op(provider: str, op: str | None, fastssl_fn: Callable, reference_fn: Callable,
               device: torch.device | None = None) -> Callable:
    """The callable computing an op for a provider: fastssl's (run_case forces the backend),
    the reference, or (unless op is None: a spec with baselines of its own) the baselines users
    would otherwise run: ``eager`` (bench/baselines.py), ``eager:compile`` (torch.compile of it,
    GPU only) and ``peer:<library>``."""
    if op is None:
        pass
    elif provider in EAGER_PROVIDERS:
        if op not in baselines.EAGER:
            raise Skip(f"no eager baseline for {op}")
        fn = baselines.EAGER[op]
        if provider == "eager":
            return fn
        if device.type != "cuda":
            raise Skip("torch.compile of the eager loss is measured on GPU only")
        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False)
    elif provider.startswith("peer:"):
        try:
            return baselines.peer(op, provider.split(":", 1)[1])
        except baselines.PeerMissing as e:
            raise Skip(str(e)) from None
    if provider_backend(provider) is not None:   # the backend is forced around the case
        return fastssl_fn
    if provider == "reference":
        return reference_fn
    if provider == "reference:compile":
        # Static shapes: each benchmark shape is compiled once during the warm-up calls. The
        # dynamo cache is reset first: every case recompiles the same reference function, and
        # past the recompile limit dynamo would silently run it eagerly.
        torch._dynamo.reset()
        return torch.compile(reference_fn, dynamic=False)
    raise Skip(f"provider {provider!r} does not apply to this op")


# ----------------------------------------------------------------------------------------------
# inputs


def embeddings(b: int, d: int, dtype: torch.dtype, device: torch.device, *, seed: int,
               requires_grad: bool = True) -> torch.Tensor:
    """Raw projector-like outputs (not normalised: the losses normalise)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(b, d, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def scalar_backward(out: torch.Tensor) -> None:
    out.backward()


def cotangent_backward(outputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor]) -> None:
    torch.autograd.backward([o for o in outputs if o is not None],
                            [c for o, c in zip(outputs, cotangents) if o is not None])


# ----------------------------------------------------------------------------------------------
# timing


def _reset_grads(leaves: Sequence[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(times_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def _mode_steps(prep: Prepared, mode: str) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    """(setup, run) for a mode: setup is untimed and returns the state run needs."""
    leaves = prep.leaves
    if mode == "step":
        def setup():
            _reset_grads(leaves)
        return setup, lambda _: prep.forward()
    if mode == "forward":
        # The loss evaluated, not trained on: no autograd graph (for every provider alike). In
        # training only forward+backward compares: fastssl's same-pass ops make the gradient
        # during a recorded forward (bench/compare.py, MODES_NOTE).
        def setup_fwd():
            _reset_grads(leaves)

        def run_fwd(_):
            with torch.no_grad():
                return prep.forward()
        return setup_fwd, run_fwd
    if prep.backward is None:
        raise Skip(f"mode {mode!r}: the op has no gradient")
    if mode == "backward":
        def setup_bwd():
            _reset_grads(leaves)
            return prep.forward()
        return setup_bwd, lambda out: prep.backward(out)
    if mode == "forward+backward":
        def setup_full():
            _reset_grads(leaves)
        return setup_full, lambda _: prep.backward(prep.forward())
    raise ValueError(f"unknown mode {mode!r}")


def time_cpu(setup: Callable, run: Callable, cfg: BenchConfig) -> list[float]:
    times: list[float] = []
    started = time.perf_counter()
    while True:
        state = setup()
        t0 = time.perf_counter()
        run(state)
        times.append((time.perf_counter() - t0) * 1e3)
        del state
        n = len(times)
        if n >= cfg.max_reps:
            break
        if n >= cfg.min_reps and (sum(times) >= cfg.min_time_s * 1e3
                                  or time.perf_counter() - started >= cfg.max_time_s):
            break
    return times


_L2_FLUSH: torch.Tensor | None = None


def _flush_l2() -> None:
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    _L2_FLUSH.zero_()


def time_cuda_events(setup: Callable, run: Callable, cfg: BenchConfig) -> list[float]:
    """Per-call CUDA-event timing (used where an untimed setup must precede each call)."""
    pairs = []
    budget_ms = cfg.cuda_rep_ms
    spent = 0.0
    while True:
        state = setup()
        _flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(state)
        end.record()
        torch.cuda.synchronize()
        pairs.append(start.elapsed_time(end))
        spent += pairs[-1]
        del state
        if len(pairs) >= max(cfg.min_reps, 5) and (spent >= budget_ms or len(pairs) >= 1000):
            break
    return pairs


def time_cuda(prep: Prepared, mode: str, setup: Callable, run: Callable, cfg: BenchConfig
              ) -> tuple[tuple[float, float, float], int]:
    if mode != "backward":
        try:
            import triton.testing
        except Exception:  # no triton: CUDA events do the same job
            triton = None
        if triton is not None:
            q = triton.testing.do_bench(
                lambda: run(None),
                warmup=cfg.cuda_warmup_ms,
                rep=cfg.cuda_rep_ms,
                grad_to_none=list(prep.leaves) or None,
                quantiles=[0.2, 0.5, 0.8],
            )
            # do_bench estimates its call count from the rep budget and a first timing.
            est = q[1] if q[1] > 0 else 1.0
            return (float(q[0]), float(q[1]), float(q[2])), max(1, int(cfg.cuda_rep_ms / est))
    times = time_cuda_events(setup, run, cfg)
    return _quantiles(times), len(times)


# ----------------------------------------------------------------------------------------------
# memory


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # not glibc: nothing to trim
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


CPU_MEM_METHOD = "rss-hwm-growth"
CUDA_MEM_METHOD = "max_memory_allocated-growth"


def cpu_peak_growth(setup: Callable, run: Callable) -> int | None:
    """Peak RSS growth (bytes) of one call of run(setup()); None where the kernel's high-water
    mark cannot be reset (not Linux)."""
    state = setup()
    gc.collect()
    _malloc_trim()
    if not _reset_hwm():
        return None
    rss0 = _proc_status_kb("VmRSS")
    out = run(state)
    hwm = _proc_status_kb("VmHWM")
    del out, state
    if rss0 is None or hwm is None:
        return None
    return max(0, hwm - rss0) * 1024


def cuda_peak_growth(setup: Callable, run: Callable) -> int:
    state = setup()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run(state)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out, state
    return max(0, int(peak))


# ----------------------------------------------------------------------------------------------
# one case


def classify_failure(exc: BaseException) -> str:
    if isinstance(exc, Skip):
        return "skipped"
    if isinstance(exc, NotImplementedError):
        return "not_implemented"
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None), MemoryError) if t)
    msg = str(exc)
    if (
        isinstance(exc, oom_types)
        or "out of memory" in msg.lower()
        or "can't allocate memory" in msg
    ):
        return "oom"
    if "has no implementation of this op" in msg or "cannot serve" in msg:
        return "unsupported"
    return "error"


def failure_note(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return textwrap.shorten(f"{type(exc).__name__}: {first}", 300, placeholder=" ...")


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(spec: OpSpec, provider: str, size: Size, dtype: torch.dtype, device: torch.device,
             cfg: BenchConfig) -> Iterator[dict]:
    """Measure one (op, provider, shape, dtype) in every applicable mode; yields one partial
    record per mode (op, provider, mode, status, note, timing and memory fields)."""
    modes = size.modes or spec.modes
    base = {"op": spec.name, "family": spec.family, "provider": provider, "shape": dict(size.shape),
            "x": size.shape.get(spec.x_key), "x_key": spec.x_key,
            "dtype": str(dtype).replace("torch.", ""), "device": device.type}

    def failed(mode_list, exc):
        for m in mode_list:
            yield {**base, "mode": m, "status": classify_failure(exc), "note": failure_note(exc)}

    backend = provider_backend(provider)
    ctx = backend_forced(backend) if backend is not None else contextlib.nullcontext()
    with ctx:
        try:
            prep = spec.build(provider, size.shape, dtype, device)
            modes = prep.modes or modes
            # Warm-up on the heaviest mode: JIT, torch.compile, lazily built tables, thread pools.
            warm_mode = (
                "forward+backward" if "forward+backward" in modes and prep.backward else modes[0]
            )
            setup, run = _mode_steps(prep, warm_mode)
            warm_mem, warm_s = None, 0.0
            for i in range(cfg.warmup):
                t0 = time.perf_counter()
                if i == 0 and device.type == "cpu":
                    warm_mem = cpu_peak_growth(setup, run)
                else:
                    run(setup())
                warm_s = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.synchronize()
            # A call of several seconds (the big CPU reference cases) is measured with fewer
            # repetitions, and its memory is taken from the warm-up call (one-time allocations
            # are negligible next to the gigabytes such a call allocates).
            long_call = device.type == "cpu" and warm_s > cfg.long_call_s
            timing_cfg = (
                replace(cfg, min_reps=cfg.long_call_reps, max_reps=cfg.long_call_reps)
                if long_call
                else cfg
            )
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, the run goes on
            prep = None
            yield from failed(modes, exc)
            free_device_memory(device)
            return

        for mode in modes:
            rec = {**base, "mode": mode}
            try:
                setup, run = _mode_steps(prep, mode)
                if device.type == "cuda":
                    mem = cuda_peak_growth(setup, run)
                    (p20, p50, p80), reps = time_cuda(prep, mode, setup, run, cfg)
                    mem_method = CUDA_MEM_METHOD
                else:
                    if long_call and mode == warm_mode and warm_mem is not None:
                        mem = warm_mem
                    else:
                        mem = cpu_peak_growth(setup, run)
                    times = time_cpu(setup, run, timing_cfg)
                    (p20, p50, p80), reps = _quantiles(times), len(times)
                    mem_method = CPU_MEM_METHOD if mem is not None else None
                rec.update(status="ok", note="", p20_ms=p20, p50_ms=p50, p80_ms=p80, reps=reps,
                           peak_mem_mb=None if mem is None else mem / 2**20, mem_method=mem_method)
                if prep.extras is not None:
                    rec.update(prep.extras(rec, cfg))
            except Exception as exc:  # noqa: BLE001
                rec.update(status=classify_failure(exc), note=failure_note(exc))
                free_device_memory(device)
            rec["loadavg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            yield rec
    del prep
    free_device_memory(device)


def percentile_summary(times_ms: list[float]) -> dict:
    p20, p50, p80 = _quantiles(times_ms)
    return {"p20_ms": p20, "p50_ms": p50, "p80_ms": p80, "reps": len(times_ms)}
