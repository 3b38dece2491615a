"""Timing and memory measurement shared by every benchmark module.

An op spec (`OpSpec`) gives an op's sizes per device, its providers, and how to build one
provider's inputs and callable. Providers: ``fastssl`` (backend "auto"), ``fastssl:<backend>``
(forced), ``reference``, ``reference:compile`` (GPU) and the baselines of bench/baselines.py.
Modes: ``forward`` (no_grad), ``backward`` (from an untimed forward), ``forward+backward``; the
trainer's ``step``.

Every provider of one (op, shape, dtype) is measured in one process, interleaved (call k of
every provider before call k+1 of any), so that no ratio comes from the order of measurement
or a change of load. As in a training loop, the previous call's output and gradients stay
alive while the next call runs. Quantiles p20/p50/p80 of per-call times (CPU perf_counter; CUDA
events, synchronised, L2 flushed). Peak memory is the growth above what was allocated before
the call: CUDA max_memory_allocated; CPU its analogue, the highest running sum of the tensor
allocations and frees that the torch profiler reports (c10's CPU allocator, which the C++
extension's at::empty buffers use too). The process's RSS high-water growth (VmHWM reset through
/proc/self/clear_refs after gc and malloc_trim) is recorded beside it (rss_growth_mb): it also
holds glibc's heap fragmentation, which varied by a quarter from call to call (issue 25).
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
FULL = ("forward+backward",)


class Skip(Exception):
    """The provider does not apply here (recorded as status "skipped" with the message)."""


@dataclass
class Size:
    """One shape; `modes`/`providers` restrict what runs at it (the largest sizes)."""
    shape: dict
    modes: tuple[str, ...] | None = None
    providers: tuple[str, ...] | None = None


@dataclass
class Prepared:
    """forward() runs the op; backward(output) its backward (None: no gradient); leaves get
    their .grad reset between calls; extras(record, config) adds fields (trainer's images/s)."""
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
        (torch.float32,) if dev == "cpu" or quick else (torch.bfloat16, torch.float32))
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
    def for_run(cls, quick: bool, reps: int | None = None) -> "BenchConfig":
        if quick:
            return cls(quick=True, min_reps=1, max_reps=2, min_time_s=0.0, max_time_s=0.5,
                       cuda_warmup_ms=5, cuda_rep_ms=20)
        # --reps N: at least N interleaved calls per provider, long calls included
        return cls() if reps is None else cls(min_reps=reps, max_reps=max(reps, 20),
                                              long_call_reps=reps)


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
    """Force fastssl's backend, the backward included: the public functions choose it once and
    their backward keeps that choice on any thread (docs/design.md)."""
    with fastssl.use_backend(name):
        yield


def provider_backend(provider: str) -> str | None:
    """The fastssl backend a provider forces ("auto" for fastssl), None for the others."""
    if provider == "fastssl":
        return "auto"
    return provider.split(":", 1)[1] if provider.startswith("fastssl:") else None


def _provider_ctx(provider: str):
    backend = provider_backend(provider)
    return backend_forced(backend) if backend is not None else contextlib.nullcontext()


def _with_ctx(provider: str, run: Callable, state):
    with _provider_ctx(provider):
        return run(state)


def baseline_providers(op: str) -> tuple[str, ...]:
    """The eager providers and the op's peers (bench/baselines.py) offered to an op spec."""
    eager = EAGER_PROVIDERS if op in baselines.EAGER else ()
    return eager + tuple(f"peer:{p}" for p in baselines.PEERS.get(op, ()) if p != "diffsort")


def resolve_op(provider: str, op: str | None, fastssl_fn: Callable, reference_fn: Callable,
               device: torch.device | None = None) -> Callable:
    """The callable of a provider: fastssl's (the backend is forced around the case), the
    reference, or (op not None) eager, eager:compile (GPU) and peer:<library>."""
    if op is not None and provider in EAGER_PROVIDERS:
        if op not in baselines.EAGER:
            raise Skip(f"no eager baseline for {op}")
        if provider == "eager":
            return baselines.EAGER[op]
        if device.type != "cuda":
            raise Skip("torch.compile of the eager loss is measured on GPU only")
        torch._dynamo.reset()
        return torch.compile(baselines.EAGER[op], dynamic=False)
    if op is not None and provider.startswith("peer:"):
        try:
            return baselines.peer(op, provider.split(":", 1)[1])
        except baselines.PeerMissing as e:
            raise Skip(str(e)) from None
    if provider_backend(provider) is not None:
        return fastssl_fn
    if provider == "reference":
        return reference_fn
    if provider == "reference:compile":
        # Static shapes, compiled in the warm-up; the dynamo cache reset first: past the
        # recompile limit dynamo would silently run the function eagerly.
        torch._dynamo.reset()
        return torch.compile(reference_fn, dynamic=False)
    raise Skip(f"provider {provider!r} does not apply to this op")


def embeddings(b: int, d: int, dtype: torch.dtype, device: torch.device, *, seed: int,
               requires_grad: bool = True) -> torch.Tensor:
    """Raw projector-like outputs (not normalised: the losses normalise)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(b, d, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def percentile_summary(times_ms: list[float]) -> dict:
    q = torch.quantile(torch.tensor(times_ms, dtype=torch.float64),
                       torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return {"p20_ms": q[0], "p50_ms": q[1], "p80_ms": q[2], "reps": len(times_ms)}


def _mode_steps(prep: Prepared, mode: str) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    """(setup, run) for a mode: setup is untimed, resets the leaves' grads and returns the
    state run needs (the backward mode's recorded forward)."""
    def reset():
        for t in prep.leaves:
            t.grad = None
    if mode in ("step", "forward", "forward+backward"):
        def no_grad_fwd(_):
            with torch.no_grad():
                return prep.forward()
        def fwd_bwd(_):   # returns the loss: the caller keeps it alive, as a loop does
            out = prep.forward()
            prep.backward(out)
            return out
        run = {"step": lambda _: prep.forward(), "forward": no_grad_fwd,
               "forward+backward": fwd_bwd}[mode]
        if mode == "forward+backward" and prep.backward is None:
            raise Skip(f"mode {mode!r}: the op has no gradient")
        return reset, run
    if mode == "backward":
        if prep.backward is None:
            raise Skip(f"mode {mode!r}: the op has no gradient")
        return lambda: (reset(), prep.forward())[1], lambda out: prep.backward(out)
    raise ValueError(f"unknown mode {mode!r}")


def time_cpu(setup: Callable, run: Callable, cfg: BenchConfig) -> list[float]:
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < cfg.max_reps:
        state = setup()
        t0 = time.perf_counter()
        run(state)
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= cfg.min_reps and (sum(times) >= cfg.min_time_s * 1e3
                                           or time.perf_counter() - started >= cfg.max_time_s):
            break
    return times


_L2_FLUSH: torch.Tensor | None = None


def _cuda_call(run: Callable, state) -> tuple[Any, float]:
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    _L2_FLUSH.zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = run(state)
    end.record()
    torch.cuda.synchronize()
    return out, start.elapsed_time(end)


def time_cuda_events(setup: Callable, run: Callable, cfg: BenchConfig) -> list[float]:
    """Per-call CUDA-event timing, L2 flushed before each call."""
    times: list[float] = []
    while not (len(times) >= max(cfg.min_reps, 5)
               and (sum(times) >= cfg.cuda_rep_ms or len(times) >= 1000)):
        times.append(_cuda_call(run, setup())[1])
    return times


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(key + ":")), None)
    except OSError:
        return None


def cpu_peak_growth(setup: Callable, run: Callable) -> int | None:
    """Peak RSS growth (bytes) of one call of run(setup()); None where the kernel's high-water
    mark cannot be reset (not Linux)."""
    state = setup()
    gc.collect()
    with contextlib.suppress(Exception):   # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    rss0 = _status_kb("VmRSS")
    out = run(state)
    hwm = _status_kb("VmHWM")
    del out, state
    return None if rss0 is None or hwm is None else max(0, hwm - rss0) * 1024


def cpu_alloc_peak(setup: Callable, run: Callable) -> tuple[int, int | None]:
    """(allocated peak, RSS peak growth) in bytes of one call of run(setup()) on CPU.

    The first is the CPU analogue of CUDA's max_memory_allocated growth: the running sum of
    the tensor allocations and frees the torch profiler reports (c10's CPU allocator: every
    ATen op and every at::empty of the C++ kernels, worker threads included) from the call's
    start, at its highest. The second is the process's RSS high-water growth: it also holds
    glibc's heap fragmentation, which for the same call varied 72-98 MiB (eager symmetric
    InfoNCE, B = 2048) and 11-16 MiB (fastssl) from call to call (issue 25), so the verdicts
    use the allocated peak."""
    from torch.profiler import ProfilerActivity, profile
    state = setup()
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        rss = cpu_peak_growth(lambda s=state: s, run)
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    del state
    return peak, rss


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


def classify_failure(exc: BaseException) -> str:
    if isinstance(exc, Skip):
        return "skipped"
    if isinstance(exc, NotImplementedError):
        return "not_implemented"
    oom = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                            getattr(torch.cuda, "OutOfMemoryError", None), MemoryError) if t)
    msg = str(exc)
    if isinstance(exc, oom) or "out of memory" in msg.lower() or "can't allocate memory" in msg:
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


def _interleaved(steps: dict, device: torch.device, cfg: BenchConfig, leaves: dict) -> dict:
    """Per-call times (ms) of every provider's (setup, run), call k of each before call k+1 of
    any; the previous call's output and gradients stay alive while the next one runs."""
    times = {p: [] for p in steps}
    alive: dict = {}
    started = time.perf_counter()
    while True:
        for p, (setup, run) in steps.items():
            grads = [t.grad for t in leaves[p]]   # kept, as a loop keeps them until zero_grad
            state = setup()
            if device.type == "cuda":
                out, ms = _cuda_call(run, state)
            else:
                t0 = time.perf_counter()
                out = run(state)
                ms = (time.perf_counter() - t0) * 1e3
            alive[p] = (out, state, grads)
            times[p].append(ms)
        n = len(next(iter(times.values())))
        budget_s = cfg.cuda_rep_ms / 1e3 if device.type == "cuda" else cfg.min_time_s
        if n >= cfg.max_reps * (50 if device.type == "cuda" else 1) or n >= cfg.min_reps and (
                min(sum(t) for t in times.values()) >= budget_s * 1e3
                or time.perf_counter() - started >= cfg.max_time_s):
            return times


def run_group(spec: OpSpec, providers: Sequence[str], size: Size, dtype: torch.dtype,
              device: torch.device, cfg: BenchConfig) -> Iterator[dict]:
    """Measure one (op, shape, dtype) for every provider, interleaved, in every mode; yields
    one partial record per (provider, mode)."""
    base = {"op": spec.name, "family": spec.family, "shape": dict(size.shape),
            "x": size.shape.get(spec.x_key), "x_key": spec.x_key,
            "dtype": str(dtype).replace("torch.", ""), "device": device.type}
    preps, warm, long_call = {}, {}, False
    for p in providers:
        try:
            with _provider_ctx(p):
                prep = spec.build(p, size.shape, dtype, device)
                modes = prep.modes or size.modes or spec.modes
                # Warm-up on the heaviest mode: JIT, compile, lazily built tables, thread pools.
                wmode = "forward+backward" if "forward+backward" in modes and prep.backward \
                    else modes[0]
                setup, run = _mode_steps(prep, wmode)
                warm_s = 0.0
                for i in range(cfg.warmup):
                    t0, mem = time.perf_counter(), None
                    if i == 0 and device.type == "cpu":
                        mem = cpu_alloc_peak(setup, run)
                    else:
                        run(setup())
                    warm_s = time.perf_counter() - t0
                    warm.setdefault(p, (wmode, mem))
            if device.type == "cuda":
                torch.cuda.synchronize()
            # A call of seconds: fewer calls, its memory from the warm-up call (one-time
            # allocations are negligible next to the gigabytes such a call allocates).
            long_call |= device.type == "cpu" and warm_s > cfg.long_call_s
            preps[p] = (prep, modes)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, the run goes on
            for m in size.modes or spec.modes:
                yield {**base, "provider": p, "mode": m, "status": classify_failure(exc),
                       "note": failure_note(exc)}
            free_device_memory(device)
    tcfg = replace(cfg, min_reps=cfg.long_call_reps, max_reps=cfg.long_call_reps) \
        if long_call else cfg
    for mode in dict.fromkeys(m for _, modes in preps.values() for m in modes):
        steps, recs = {}, {}
        for p, (prep, modes) in preps.items():
            if mode not in modes:
                continue
            rec = recs[p] = {**base, "provider": p, "mode": mode}
            try:
                setup, run = _mode_steps(prep, mode)
                with _provider_ctx(p):
                    if device.type == "cuda":
                        mem, rec["mem_method"] = cuda_peak_growth(setup, run), "max_memory_" \
                            "allocated-growth"
                    else:
                        wmode, mem = warm.get(p, (None, None))
                        if not (long_call and mode == wmode and mem is not None):
                            mem = cpu_alloc_peak(setup, run)
                        mem, rss = mem
                        rec["mem_method"] = "cpu-allocated-peak (torch.profiler memory events)"
                        rec["rss_growth_mb"] = None if rss is None else rss / 2**20
                rec["peak_mem_mb"] = None if mem is None else mem / 2**20
                steps[p] = (setup, lambda s, run=run, p=p: _with_ctx(p, run, s))
            except Exception as exc:  # noqa: BLE001
                rec.update(status=classify_failure(exc), note=failure_note(exc))
                free_device_memory(device)
        try:
            times = _interleaved(steps, device, tcfg, {p: preps[p][0].leaves for p in steps})
        except Exception as exc:  # noqa: BLE001 - one provider failed: each is timed alone
            times = {}
            for p, st in steps.items():
                try:
                    times[p] = _interleaved({p: st}, device, tcfg, {p: preps[p][0].leaves})[p]
                except Exception as exc1:  # noqa: BLE001
                    recs[p].update(status=classify_failure(exc1), note=failure_note(exc1))
                    free_device_memory(device)
            del exc
        for p, rec in recs.items():
            if p in times:
                rec.update(status="ok", note="", **percentile_summary(times[p]))
                if preps[p][0].extras is not None:
                    try:
                        rec.update(preps[p][0].extras(rec, cfg))
                    except Exception as exc:  # noqa: BLE001
                        rec.update(status=classify_failure(exc), note=failure_note(exc))
            rec["loadavg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            yield rec
    del preps
    free_device_memory(device)


def run_case(spec: OpSpec, provider: str, size: Size, dtype: torch.dtype, device: torch.device,
             cfg: BenchConfig) -> Iterator[dict]:
    """run_group for one provider."""
    return run_group(spec, (provider,), size, dtype, device, cfg)
