"""Static GPU build check: compile every GPU kernel of fastssl for sm_80 and sm_90, no GPU needed.

    python -m bench.static --out bench/results/static
    PYTHONPATH=<triton 3.6 site> python -m bench.static --out bench/results/static/triton-3.6

Triton: the real launchers run on ``meta`` tensors under ``static_capture(cc)``, which records
each launch at the configuration the launcher picks; each distinct binary is compiled afresh by
``triton.compile``, its figures (registers, spills, stack, shared memory, tensor-core
instructions, scalar FMAs) taken from the ptxas run Triton itself makes (``tritons_ptxas_runs``).
CUDA: csrc/*_cuda.cu with setup.py's nvcc flags and -Xptxas -v; csrc/*_cuda_glue.cpp
(-fsyntax-only) against a CUDA torch's include/ ($FASTSSL_TORCH_CUDA_INCLUDE, or torch==
TORCH_VERSION's cached, fetched only with --download-headers). A source check: products with a
runtime integer argument in @triton.jit functions are formed in 64 bits. Results are cached in
~/.cache/fastssl/static by sources, triton version and specialisation.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import inspect
import json
import multiprocessing as mp
import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import torch

from fastssl.kernels import contrastive as KC, dino as KD, sortnet as KS, sphere as KP, swav as KW
from fastssl.kernels._launch import static_capture
from fastssl.kernels.sortnet import DIST_IDS
from fastssl.ops.sortnet import network_tensor

from .common import PKG, table

KERNEL_MODULES = {"contrastive": KC, "sphere": KP, "swav": KW, "sortnet": KS, "dino": KD}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CACHE = os.path.expanduser(os.environ.get("FASTSSL_CACHE", "~/.cache/fastssl"))
TORCH_VERSION = "2.13.0"
TARGETS = (80, 90)
# Largest shared memory one block may use (opt-in maximum): A100 163 KiB, H100/H200 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
FAMILIES = tuple(os.environ.get("FASTSSL_STATIC_FAMILIES",
                                "contrastive,sphere,swav,sortnet,dino").split(","))
ROW_VERSION = "3"  # bump when what a cached row records changes (3: Triton's own ptxas run)
# Kernels whose inner loop is a GEMM tile: they must use tensor cores; those with both operands
# from memory tiles get wgmma on Hopper (float64 has no wgmma form: mma.sync there too).
GEMM_KERNELS = {"_lse_fwd_kernel", "_lse_bwd_rows_kernel", "_lse_bwd_cols_kernel",
                "_gram_fwd_kernel", "_gram_max_kernel", "_gram_bwd_kernel",
                "_sce_fwd_kernel", "_sce_bwd_kernel", "_pair_forward_kernel",
                "_pair_backward_kernel"}
WGMMA_EXPECTED = {"_lse_fwd_kernel", "_sce_fwd_kernel", "_pair_forward_kernel",
                  "_gram_fwd_kernel", "_gram_max_kernel", "_gram_bwd_kernel"}


def _env_for_compile():
    # The real compiler, never the interpreter; no escape hatches.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _cases():
    """(family, label, dtype name, size label, thunk) for every launcher configuration."""
    m = lambda *shape, dtype: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    f32, f64 = torch.float32, torch.float64
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": f32}
    # float64: the sphere, swav and sortnet launchers accept it (the gradcheck dtype);
    # the contrastive lse launchers reject it ("use the torch backend"), the gram ones take it.
    dtypes64 = dict(dtypes, fp64=f64)
    out = []
    # contrastive: (exclude_pos, split, weighted, col_stats) as the losses call them; tiles do
    # not depend on the size (the feature loop is masked): one size.
    combos = {"nt_xent": (False, False, False, False), "info_nce_sym": (False, False, False, True),
              "info_nce_queue": (False, True, False, False), "dcl": (True, True, False, False),
              "sogclr": (True, False, True, False)}
    n, d = 1024, 256
    for dn, dt in dtypes.items():
        a, b, idx = m(n, d, dtype=dt), m(2 * n, d, dtype=dt), m(n, dtype=torch.int64)
        vec, cvec, empty = m(n, dtype=f32), m(2 * n, dtype=f32), m(0, dtype=f32)
        size = f"n={n},D={d}"
        for name, (ex, sp, w, cs) in combos.items():
            split, v, c = n if sp else 2 * n, vec if sp else empty, cvec if cs else empty
            out += [("contrastive", f"lse_fwd[{name}]", dn, size,
                     partial(KC.lse_forward, a, b, idx, idx, 1.0, split, ex, w, cs)),
                    ("contrastive", f"lse_bwd[{name}]", dn, size,
                     partial(KC.lse_backward, a, b, idx, idx, 1.0, split, ex, vec, v, c, vec, v,
                             c))]
        out += [("contrastive", "sce_fwd", dn, size,
                 partial(KC.sce_forward, a, a, b, idx, 10.0, 20.0)),
                ("contrastive", "sce_bwd", dn, size,
                 partial(KC.sce_backward, a, a, b, idx, 10.0, 20.0, vec, vec, vec, vec))]
    # the symmetric schedule (issue 25) as NT-Xent, DCL, SogCLR and symmetric InfoNCE (cross
    # mode, cross = n: a runtime argument that is not specialised, so it shares their binaries)
    # call it, float64 included; a forward launches three binaries (the shifted pass and the
    # exact fallback's two)
    for dn, dt in dtypes64.items():
        z, zidx = m(2 * n, d, dtype=dt), m(2 * n, dtype=torch.int64)
        zvec = m(2 * n, dtype=f64 if dt == f64 else f32)
        for name, (ex, w, cross) in {"nt_xent": (False, False, 0), "dcl": (True, False, 0),
                                     "sogclr": (True, True, 0),
                                     "info_nce_sym": (False, False, n)}.items():
            out += [("contrastive", f"gram_fwd[{name}]", dn, f"M={2 * n},D={d}",
                     partial(KC.gram_lse_forward, z, zidx, zidx, 1.0, ex, w, cross)),
                    ("contrastive", f"gram_bwd[{name}]", dn, f"M={2 * n},D={d}",
                     partial(KC.gram_lse_backward, z, zidx, zidx, 1.0, ex, zvec, zvec, cross))]
    # sphere: SFRIK's series (kind 0, 3 Gegenbauer degrees) and AUH's Gaussian (kind 1), each
    # symmetric (x against itself) and not; tiles do not depend on the size.
    n, d = 4096, 32768
    for dn, dt in dtypes64.items():
        acc = f64 if dt == f64 else f32
        x, r, coef, lse = m(n, d, dtype=dt), m(n, dtype=acc), m(7, dtype=acc), m(1, dtype=acc)
        for kind, cname in ((0, "series"), (1, "gauss")):
            kw = dict(kind=kind, coef=coef if kind == 0 else None, num_w=3 if kind == 0 else 1,
                      two_scale=4.0)
            out += [("sphere", label, dn, f"n={n},D={d}", fn) for label, fn in (
                (f"pair_fwd[{cname},sym]", partial(KP.pair_forward, x, None, r, None, **kw)),
                (f"pair_fwd[{cname}]", partial(KP.pair_forward, x, x, r, r, **kw)),
                (f"pair_bwd[{cname}]", partial(KP.pair_backward, x, x, r, r, lse=lse, **kw)))]
    # swav: rows per program and prototype chunk follow B and K: a small local batch and the
    # large one, K = 3000 prototypes.
    for dn, dt in dtypes64.items():
        for bsz in (256, 4096):
            acc = f64 if dt == f64 else f32
            s, a, q = m(bsz, 3000, dtype=dt), m(3000, dtype=acc), m(bsz, 3000, dtype=acc)
            out += [("swav", label, dn, f"B={bsz},K=3000", fn) for label, fn in (
                ("colstats", partial(KW.colstats, s, 0.05)),
                ("rowpass[colsum]", partial(KW.rowpass, s, 0.05, a, False)),
                ("rowpass[codes]", partial(KW.rowpass, s, 0.05, a, True)),
                ("cross_entropy[loss]", partial(KW.swav_cross_entropy, s, q, 0.1, False)),
                ("cross_entropy[grad]", partial(KW.swav_cross_entropy, s, q, 0.1, True)))]
    # dino: KoLeo's neighbour search (the teacher softmax is swav's rowpass): a small batch
    # (16-row tiles, 32-wide feature chunks) and the large one.
    for dn, dt in (("fp32", f32), ("fp64", f64)):
        for n, d in ((16, 32), (8192, 256)):
            x = m(n, d, dtype=dt)
            out.append(("dino", "nearest", dn, f"N={n},D={d}",
                        partial(KD.nearest_neighbor, x, x, 0)))
    # sortnet: float32 (half inputs run in float32) and float64; every distribution (a constexpr
    # branch); the real comparator tables of the benchmark and GroCo sizes, since their counts
    # and the P backward's chunk offsets are specialised arguments (distinct binaries). GroCo:
    # rows of topk_neg = 10 negatives and 1 (2 views) or 3 (4 views) positives, B = 1024.
    sort_sizes = (("odd_even", 32, 1024), ("odd_even", 32, 4096), ("odd_even", 32, 16384),
                  ("bitonic", 32, 4096), ("bitonic", 1024, 256))
    groco_sizes = (("odd_even", 11), ("bitonic", 11), ("odd_even", 13), ("bitonic", 13))
    for dn, dt in (("fp32", f32), ("fp64", f64)):
        for dist_name, dist in DIST_IDS.items():
            for network, nn, bsz in sort_sizes:
                net = network_tensor(network, nn, torch.device("cpu")).to("meta")
                x, size = m(bsz, nn, dtype=dt), f"{network},B={bsz},n={nn}"
                out += [("sortnet", f"soft_sort_fwd[{dist_name}]", dn, size,
                         partial(KS.soft_sort_forward, x, net, dist, 1.0, 0.25, 1.0, True)),
                        ("sortnet", f"soft_sort_bwd[{dist_name}]", dn, size,
                         partial(KS.soft_sort_backward, x, m(bsz, nn, nn, dtype=dt),
                                 m(bsz, net.shape[1], dtype=dt), net, dist, 1.0, 0.25, 1.0, nn))]
            for network, nn in groco_sizes:
                net = network_tensor(network, nn, torch.device("cpu")).to("meta")
                x, size = m(1024, nn, dtype=dt), f"{network},B=1024,n={nn}"
                out += [("sortnet", f"groco_rows_fwd[{dist_name}]", dn, size,
                         partial(KS.groco_rows_forward, x, 10, net, dist, 1.0, 0.25, 1.0)),
                        ("sortnet", f"groco_rows_bwd[{dist_name}]", dn, size,
                         partial(KS.groco_rows_backward, m(1024, dtype=dt), x, 10, net, dist, 1.0,
                                 0.25, 1.0))]
    return out


def _sources_digest(family: str) -> str:
    """Hash of what a family's rows depend on: its kernel file, the launch module, the row
    format and the triton version (an edit recompiles only its family)."""
    import triton
    h = hashlib.sha256((triton.__version__ + ROW_VERSION).encode())
    for name in (f"{family}.py", "_launch.py"):
        with open(os.path.join(ROOT, "kernels", name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


def _specialisation(launch, cc: int) -> str:
    """What makes Triton build a distinct binary: kernel, constexprs, argument types and
    specialisation attributes, warps and stages."""
    try:
        src, _tgt, options, _c = _source(dict(kernel=launch.kernel, args=launch.args,
                                              kwargs=launch.kwargs, cc=cc))
    except Exception as e:  # compiled (and reported) later: keep the launch
        return f"{launch.kernel.__name__}:unbound:{type(e).__name__}:{e}"
    return repr((launch.kernel.__name__, sorted(src.signature.items()),
                 sorted((k, repr(v)) for k, v in src.constants.items()),
                 sorted((k, repr(v)) for k, v in src.attrs.items()),
                 options.num_warps, options.num_stages, options.num_ctas))


def _capture(cc: int):
    """[(family, label, dtype, size, launch, specialisation, also)] on target cc: one entry per
    distinct binary (the first case that launches it; other cases' sizes in ``also``). An integer
    argument equal to 1 or a multiple of 16 gives another binary; equal binaries compile once."""
    rows, index = [], {}
    for family, label, dn, size, thunk in _cases():
        if family not in FAMILIES:
            continue
        with static_capture(cc) as launches:
            thunk()
        for launch in launches:
            key = _specialisation(launch, cc)
            if key in index:
                entry = rows[index[key]]
                if size != entry[3] and size not in entry[6]:
                    entry[6].append(size)
                continue
            index[key] = len(rows)
            rows.append((family, label, dn, size, launch, key, []))
    return rows


def toolchain() -> dict:
    """triton's version and, per target, the ptxas Triton runs for it (the wheel ships two)."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    return {"triton_version": triton.__version__,
            "ptxas_version": {str(cc): get_ptxas(cc).version for cc in TARGETS}}


_PTXAS_RE = {"registers": r"Used (\d+) registers", "stack_bytes": r"(\d+) bytes stack frame",
             "spill_store_bytes": r"(\d+) bytes spill stores",
             "spill_load_bytes": r"(\d+) bytes spill loads"}


def _parse_ptxas(text: str) -> dict:
    return {k: max(map(int, re.findall(rx, text)), default=0) for k, rx in _PTXAS_RE.items()}


def ptxas_options(argv) -> list[str]:
    """A ptxas command line without the executable and its files (the PTX in, the ``-o``
    cubin out): the options, comparable across machines and runs."""
    args = list(argv[1:])
    drop = {i + 1 for i, a in enumerate(args) if a == "-o"} | {
        i for i, a in enumerate(args) if a == "-o" or a.endswith(".ptx")}
    return [a for i, a in enumerate(args) if i not in drop]


class _PtxasRecorder:
    """Stands in for ``subprocess`` inside Triton's NVIDIA compiler during one compile: calls
    pass through; a ptxas run on a PTX file is recorded with its command line and the log it
    wrote (Triton keeps ptxas's stderr only on failure). Those are the figures of the cubin
    Triton loads: a second ptxas run with other options can differ."""

    def __init__(self, real):
        self._real, self.runs = real, []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def run(self, cmd, *args, **kwargs):
        if not (isinstance(cmd, (list, tuple)) and any(str(c).endswith(".ptx") for c in cmd[1:])):
            return self._real.run(cmd, *args, **kwargs)   # ptxas --version and the like
        rec = {"argv": [str(c) for c in cmd], "log": "", "returncode": None}
        self.runs.append(rec)
        try:
            res = self._real.run(cmd, *args, **kwargs)
            rec["returncode"] = res.returncode
            return res
        except self._real.CalledProcessError as e:
            rec["returncode"] = e.returncode
            raise
        finally:   # Triton passes an open log file as stderr: read what ptxas wrote there
            name = getattr(kwargs.get("stderr"), "name", None)
            if isinstance(name, str) and os.path.exists(name):
                with open(name, errors="replace") as f:
                    rec["log"] = f.read()


@contextlib.contextmanager
def tritons_ptxas_runs():
    """Every ``triton.compile`` inside compiles afresh (a cached kernel runs no ptxas), and the
    list yielded receives each ptxas run Triton makes."""
    from triton import knobs
    from triton.backends.nvidia import compiler as nvc
    rec, saved = _PtxasRecorder(nvc.subprocess), knobs.compilation.always_compile
    nvc.subprocess, knobs.compilation.always_compile = rec, True
    try:
        yield rec.runs
    finally:
        nvc.subprocess, knobs.compilation.always_compile = rec._real, saved


def _source(job: dict):
    """(ASTSource, target, options, constexprs) of one launch, specialised as ``kernel[grid]``
    would (the same binding and packing)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    kernel, kwargs = job["kernel"], dict(job["kwargs"])
    tgt = GPUTarget("cuda", job["cc"], 32)
    backend = make_backend(tgt)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*job["args"], **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return ASTSource(kernel, signature, constexprs, attrs), tgt, options, constexprs


def _compile_launch(job: dict) -> dict:
    """One launch compiled for one target by ``triton.compile``, with the figures of the ptxas
    run Triton makes for the cubin: a JSON-able row."""
    _env_for_compile()
    import triton
    row = {k: job[k] for k in ("family", "case", "kernel_name", "dtype", "size", "cc")}
    row["triton_version"], runs = triton.__version__, []
    try:
        src, tgt, options, constexprs = _source(job)
        row["num_warps"], row["num_stages"] = options.num_warps, options.num_stages
        row["constexprs"] = {job["kernel"].arg_names[p[0]]: v for p, v in constexprs.items()
                             if isinstance(v, (int, float, str, bool))}
        with tritons_ptxas_runs() as runs:
            compiled = triton.compile(src, target=tgt, options=options.__dict__)
    except Exception as e:  # the compiler's message is the finding
        # Triton's CompilationError reads "at L:C:", the source, then the cause: keep both ends.
        msg = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [""]
        cause = next((ln for ln in reversed(msg) if "Error" in ln), msg[-1])
        where = f" ({msg[0]})" if msg[0] != cause else ""
        row.update(compiled=False, error=f"{type(e).__name__}: {cause}{where}"[:300])
        if runs:
            row["ptxas_options"] = ptxas_options(runs[-1]["argv"])
        return row
    if len(runs) != 1:
        return dict(row, compiled=False, error=f"expected one ptxas run by Triton, saw {len(runs)}")
    ptx = compiled.asm["ptx"]
    return dict(row, compiled=True, error=None, shared_bytes=int(compiled.metadata.shared),
                ptxas_options=ptxas_options(runs[0]["argv"]),
                ptxas=os.path.basename(runs[0]["argv"][0]), **_parse_ptxas(runs[0]["log"]),
                wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
                mma=len(re.findall(r"\bmma\.sync\.aligned", ptx)),
                scalar_fma=len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", ptx)))


_JOBS: list = []


def _compile_index(i: int) -> dict:
    return _compile_launch(_JOBS[i])


def _job_key(job: dict, digest: str) -> str:
    """Cache key: the family's sources, triton, Triton's ptxas options from the environment,
    and the launch's specialisation (what makes the binary)."""
    extra = [os.environ.get(k, "") for k in ("PTXAS_OPTIONS", "DISABLE_PTXAS_OPT",
                                             "TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH")]
    blob = json.dumps([digest, job["kernel_name"], job["cc"], job["spec"], extra])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def triton_rows(workers: int = 2, use_cache: bool = True) -> list[dict]:
    _env_for_compile()
    cache_dir = os.path.join(CACHE, "static")
    os.makedirs(cache_dir, exist_ok=True)
    jobs = [dict(family=fam, case=label, kernel_name=launch.kernel.__name__, dtype=dn, size=size,
                 cc=cc, kernel=launch.kernel, args=launch.args, kwargs=launch.kwargs, spec=spec,
                 also=also)
            for cc in TARGETS for fam, label, dn, size, launch, spec, also in _capture(cc)]
    rows: dict[str, dict] = {}   # by cache key: identical launches compile once
    for job in jobs:
        job["key"] = _job_key(job, _sources_digest(job["family"]))
        path = os.path.join(cache_dir, job["key"] + ".json")
        if use_cache and job["key"] not in rows and os.path.exists(path):
            with open(path) as f:
                rows[job["key"]] = json.load(f)
    todo = list({j["key"]: j for j in jobs if j["key"] not in rows}.values())
    global _JOBS
    _JOBS = todo   # JITFunctions are not picklable: forked workers read the jobs by index
    with (ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) if workers > 1 and todo
          else contextlib.nullcontext()) as pool:
        results = (pool.map if pool else map)(_compile_index, range(len(todo)))
        for job, res in zip(todo, results):   # cached as they come: a cut-off run keeps them
            with open(os.path.join(cache_dir, job["key"] + ".json"), "w") as f:
                json.dump(res, f)
            rows[job["key"]] = res
    return [dict(rows[j["key"]], kind="triton", **{k: j[k] for k in (
        "family", "case", "dtype", "size", "cc", "also")}) for j in jobs]


def tensor_cores(row: dict) -> int:
    return row.get("wgmma", 0) + row.get("mma", 0)


def wgmma_expected(row: dict) -> bool:
    """wgmma has no float64 form: float64 GEMMs use mma.sync (DMMA) on Hopper as on sm_80."""
    return row["kernel_name"] in WGMMA_EXPECTED and row["dtype"] != "fp64"


def verdicts(row: dict) -> list[str]:
    """What is wrong with one compiled row (empty: nothing)."""
    if not row.get("compiled"):
        return [f"does not compile: {row.get('error')}"]
    bad = []
    if spill := row["spill_store_bytes"] + row["spill_load_bytes"]:   # any spill, any dtype
        bad.append(f"spills {spill} bytes")
    if row["shared_bytes"] > SMEM_LIMIT[row["cc"]]:
        bad.append(f"shared memory {row['shared_bytes']} > {SMEM_LIMIT[row['cc']]}")
    if row["kernel_name"] in GEMM_KERNELS and tensor_cores(row) == 0:
        bad.append("GEMM loop without tensor cores")
    elif (row["kernel_name"] in GEMM_KERNELS and row["cc"] >= 90 and row["wgmma"] == 0
          and wgmma_expected(row)):
        bad.append("no wgmma on sm_90")
    return bad


def _is_int64_cast(node) -> bool:
    """x.to(tl.int64) or tl.cast(x, tl.int64)."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return False
    at = {"to": 0, "cast": 1}.get(node.func.attr)
    dt = node.args[at] if at is not None and len(node.args) > at else None
    return isinstance(dt, ast.Attribute) and dt.attr == "int64"


def _names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _wide(node, wide: set[str]) -> bool:
    """Computed in 64 bits: it contains an int64 cast or a 64-bit name."""
    return any(_is_int64_cast(n) for n in ast.walk(node)) or bool(_names(node) & wide)


def offset_findings(module, runtime_ints: set[str]) -> list[str]:
    """Products of a runtime integer argument (``runtime_ints``: sizes, strides) with a
    non-constant, both in 32 bits: each a possible address computation that wraps at 2**31."""
    findings = []
    for fn in ast.parse(inspect.getsource(module)).body:
        if not (isinstance(fn, ast.FunctionDef)
                and any("jit" in ast.unparse(d) for d in fn.decorator_list)):
            continue
        wide: set[str] = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and _wide(node.value, wide):
                wide |= {n for t in node.targets for n in _names(t)}
        for node in ast.walk(fn):
            if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult)):
                continue
            sides = (node.left, node.right)
            if (not any(isinstance(s, ast.Constant) for s in sides)
                    and any(_names(s) & runtime_ints for s in sides)
                    and not any(_wide(s, wide) for s in sides)):
                findings.append(f"{module.__name__.split('.')[-1]}.py:"
                                f"{fn.lineno + node.lineno - 1} {fn.name}: {ast.unparse(node)}")
    return findings


def offset_rows(captured) -> list[str]:
    """offset_findings over every kernel family, with the integer arguments the launches pass."""
    ints: dict[str, set[str]] = {f: set() for f in FAMILIES}
    for family, _label, _dn, _size, launch in captured:
        ints[family] |= {name for name, val in zip(launch.kernel.arg_names, launch.args)
                         if isinstance(val, int) and not isinstance(val, bool)}
    return [f for family in FAMILIES for f in offset_findings(KERNEL_MODULES[family],
                                                              ints[family])]


def _nvcc() -> str | None:
    return shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc")
                                    and "/usr/local/cuda/bin/nvcc") or None


def _file_cached(kind: str, suffix: str, extra: str, compute):
    """compute() cached in CACHE/static under the contents of csrc/*<suffix>, the build flags
    and ``extra``; failures are recomputed (e.g. once the headers are fetched)."""
    paths = [os.path.join(CSRC, n) for n in sorted(os.listdir(CSRC)) if n.endswith(suffix)]
    h = hashlib.sha256((kind + extra + ROW_VERSION).encode())
    for p in paths + [os.path.join(CSRC, "build_flags.py")]:
        with open(p, "rb") as f:
            h.update(f.read())
    path = os.path.join(CACHE, "static", f"{kind}-{h.hexdigest()[:24]}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    rows = compute([os.path.basename(p) for p in paths])
    if all(r.get("compiled") for r in rows):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(rows, f)
    return rows


def _first_error(stderr: str) -> str:
    return next((ln for ln in stderr.splitlines() if "error" in ln), stderr[:200])


def cuda_rows() -> list[dict]:
    """ptxas -v figures of every kernel of csrc/*_cuda.cu, built with setup.py's nvcc flags."""
    nvcc = _nvcc()
    version = subprocess.run([nvcc, "--version"], capture_output=True,
                             text=True).stdout if nvcc else ""
    return _file_cached("cuda", "_cuda.cu", (nvcc or "") + version, _cuda_rows)


def _cuda_rows(names) -> list[dict]:
    if (nvcc := _nvcc()) is None:
        return [dict(kind="cuda", family="csrc", case="nvcc", compiled=False,
                     error="nvcc not found")]
    flags, rows = runpy.run_path(os.path.join(CSRC, "build_flags.py"))["NVCC_FLAGS"], []
    for name in names:
        family = name[: -len("_cuda.cu")]
        with tempfile.TemporaryDirectory() as tmp:
            res = subprocess.run([nvcc, *flags, "-Xptxas", "-v", "-c", os.path.join(CSRC, name),
                                  "-o", os.path.join(tmp, "x.o")], capture_output=True, text=True)
        if res.returncode != 0:
            rows.append(dict(kind="cuda", family=family, case=name, compiled=False,
                             error=_first_error(res.stderr)))
            continue
        # ptxas prints, per entry: "Compiling entry function 'X' for 'sm_80'", then its figures.
        for blk in re.split(r"(?=ptxas info\s*: Compiling entry function)", res.stderr):
            if not (m := re.search(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'", blk)):
                continue
            mangled, arch = m.groups()
            demangled = subprocess.run(["c++filt", mangled], capture_output=True,
                                       text=True).stdout.strip() or mangled
            smem = re.search(r"(\d+) bytes smem", blk)
            short = re.sub(r"^void\s+", "", demangled).replace("(anonymous namespace)::", "")
            dtype = next((n for k, n in (("__nv_bfloat16", "bf16"), ("__half", "fp16"),
                                         ("double", "fp64"), ("float", "fp32"))
                          if k in demangled), "-")
            rows.append(dict(kind="cuda", family=family, case=short.split("(")[0],
                             kernel_name=demangled, dtype=dtype, size="-", cc=int(arch[3:5]),
                             compiled=True, error=None, shared_bytes=int(smem.group(1)) if smem
                             else 0, wgmma=0, mma=0, scalar_fma=None, num_warps=None,
                             num_stages=None, **_parse_ptxas(blk)))
    return rows


def _header_torch_version(inc: str) -> str | None:
    """The version a torch include/ tree belongs to (its version.h)."""
    for parts in (("torch", "headeronly", "version.h"),
                  ("torch", "csrc", "api", "include", "torch", "version.h")):
        with contextlib.suppress(OSError), open(os.path.join(inc, *parts)) as f:
            if m := re.search(r"#define TORCH_VERSION\s*\\?\s*\"([^\"]+)\"", f.read()):
                return m.group(1)
    return None


def torch_cuda_include(download: bool = False) -> str | None:
    """include/ of a CUDA build of torch: $FASTSSL_TORCH_CUDA_INCLUDE, else torch==TORCH_VERSION's
    cached in CACHE, fetched with pip only when ``download`` (the check runs offline)."""
    marker = ("c10", "cuda", "CUDAStream.h")
    if explicit := os.environ.get("FASTSSL_TORCH_CUDA_INCLUDE"):
        return explicit if os.path.exists(os.path.join(explicit, *marker)) else None
    root = os.path.join(CACHE, f"torch-{TORCH_VERSION}")
    inc = os.path.join(root, "torch", "include")
    if os.path.exists(os.path.join(inc, *marker)) or not download:
        return inc if os.path.exists(os.path.join(inc, *marker)) else None
    wheel_dir = os.path.join(CACHE, "torchwheel")
    os.makedirs(wheel_dir, exist_ok=True)
    find = lambda: [w for w in os.listdir(wheel_dir) if w.startswith(f"torch-{TORCH_VERSION}-")]  # noqa
    if not find():   # "===": the exact version, never the local "+cpu" build of the CPU index
        subprocess.run([sys.executable, "-m", "pip", "download", f"torch==={TORCH_VERSION}",
                        "--no-deps", "-d", wheel_dir], capture_output=True, text=True)
    if not find():   # offline or no such wheel: the glue rows say so
        return None
    with zipfile.ZipFile(os.path.join(wheel_dir, find()[0])) as z:
        z.extractall(root, [n for n in z.namelist() if n.startswith("torch/include/")])
    return inc if os.path.exists(os.path.join(inc, *marker)) else None


def glue_rows(download: bool = False) -> list[dict]:
    """csrc/*_cuda_glue.cpp compiled against a CUDA torch's and the toolkit's headers."""
    inc = torch_cuda_include(download)
    return _file_cached("glue", "_cuda_glue.cpp",
                        f"{inc}:{inc and _header_torch_version(inc)}:{_nvcc()}",
                        lambda names: _glue_rows(inc, names))


def _glue_rows(inc: str | None, names) -> list[dict]:
    nvcc = _nvcc()
    homes = [os.environ.get("CUDA_HOME", ""),
             nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    cuda_inc = next((os.path.join(h, "include") for h in homes
                     if h and os.path.exists(os.path.join(h, "include", "cuda_runtime.h"))), None)
    why = ((inc is None and f"no CUDA torch include/ (cached torch {TORCH_VERSION} headers, "
            "$FASTSSL_TORCH_CUDA_INCLUDE, or --download-headers)")
           or (nvcc is None and "no CUDA toolkit (nvcc)")
           or (cuda_inc is None and "no CUDA toolkit include/cuda_runtime.h"))
    if why:
        return [dict(kind="glue", family="csrc", case="headers", compiled=False, skipped=True,
                     error=f"skipped: {why}")]
    cxx, flags = os.environ.get("CXX", "c++"), runpy.run_path(
        os.path.join(CSRC, "build_flags.py"))["CXX_FLAGS"]
    rows = []
    for name in names:
        res = subprocess.run([cxx, *flags, "-fsyntax-only", "-DFASTSSL_WITH_CUDA",
                              "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
                              "-D_GLIBCXX_USE_CXX11_ABI=1", f"-I{inc}",
                              f"-I{os.path.join(inc, 'torch', 'csrc', 'api', 'include')}",
                              f"-I{cuda_inc}", f"-I{sysconfig.get_paths()['include']}",
                              os.path.join(CSRC, name)], capture_output=True, text=True)
        rows.append(dict(kind="glue", family=name[: -len("_cuda_glue.cpp")], case=name,
                         compiled=res.returncode == 0, torch_headers=_header_torch_version(inc),
                         error=_first_error(res.stderr).replace(ROOT + "/", "")
                         if res.returncode else None))
    return rows


def summary(rows: list[dict]) -> dict:
    tri = [r for r in rows if r["kind"] == "triton"]
    ok = [r for r in tri if r.get("compiled")]
    gemm = [r for r in tri if r.get("kernel_name") in GEMM_KERNELS]
    # wgmma has no float64 form: float64 GEMMs (mma.sync) are not in the sm_90 count.
    gemm90 = [r for r in gemm if r["cc"] >= 90 and r["dtype"] != "fp64"]
    cuda = [r for r in rows if r["kind"] == "cuda" and r.get("compiled")]
    glue = [r for r in rows if r["kind"] == "glue"]
    spills = lambda r: r["spill_store_bytes"] + r["spill_load_bytes"] > 0  # noqa: E731
    return {"triton_version": next((r.get("triton_version") for r in tri), None),
            "triton_cases": len(tri), "compiled": len(ok), "spilling": sum(map(spills, ok)),
            "over_smem": sum(r["shared_bytes"] > SMEM_LIMIT[r["cc"]] for r in ok),
            "gemm_cases": len(gemm),
            "gemm_tensor_cores": sum(bool(r.get("compiled")) and tensor_cores(r) > 0 for r in gemm),
            "gemm_sm90_wgmma": sum(bool(r.get("compiled")) and r.get("wgmma", 0) > 0
                                   for r in gemm90),
            "gemm_sm90": len(gemm90), "cuda_kernels": len(cuda),
            "cuda_spilling": sum(map(spills, cuda)),
            "glue_compiled": sum(bool(r.get("compiled")) for r in glue),
            "glue_files": sum(not r.get("skipped") for r in glue),
            "glue_skipped": sum(bool(r.get("skipped")) for r in glue)}


def ptxas_command_lines(rows: list[dict]) -> dict[int, list[list[str]]]:
    """Per target, the distinct ptxas option lists the Triton rows come from (one expected)."""
    out: dict[int, list[list[str]]] = {}
    for r in rows:
        if r["kind"] == "triton" and r.get("ptxas_options") is not None:
            if r["ptxas_options"] not in (opts := out.setdefault(r["cc"], [])):
                opts.append(r["ptxas_options"])
    return out


def markdown(rows: list[dict], offsets: list[str], tools: dict, out_arg: str) -> str:
    s, cmds = summary(rows), ptxas_command_lines(rows)
    fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
    spill = lambda r: r["spill_store_bytes"] + r["spill_load_bytes"]  # noqa: E731
    headers = next((r["torch_headers"] for r in rows if r.get("torch_headers")), "-")
    glue_line = (f"glue files compiled against the CUDA torch {headers} headers: "
                 f"{s['glue_compiled']} of {s['glue_files']}")
    if s["glue_skipped"]:
        glue_line = "glue: " + next(r["error"] for r in rows if r.get("skipped"))
    has_cuda = any(r["kind"] == "cuda" for r in rows)
    lines = ["# Static GPU build check", "",
             f"Generated by `python -m bench.static --out {out_arg}` with triton "
             f"{tools['triton_version']} (no GPU). Each Triton case is compiled by "
             "`triton.compile` for its target, and its registers, spills and stack come from "
             "the log of the ptxas run Triton itself makes for the cubin it would load, with "
             "Triton's own command line:", ""]
    lines += [f"- sm_{cc} (ptxas {tools['ptxas_version'].get(str(cc))}): "
              f"`ptxas {' '.join(opts)} <kernel>.ptx -o <kernel>.cubin`"
              for cc in TARGETS for opts in cmds.get(cc, [])]
    lines += ["", "Shared memory limit per block: 163 KiB (sm_80), 227 KiB (sm_90). TC = "
              "tensor-core instructions in the PTX (mma.sync on sm_80, wgmma on sm_90), FMA = "
              "scalar fp32 FMAs.", "", "## Summary", "",
              f"- Triton cases (kernel x configuration x dtype x size x target, one per distinct "
              f"binary): {s['triton_cases']}; compiled: {s['compiled']}; spilling: "
              f"{s['spilling']}; over the shared-memory limit: {s['over_smem']}",
              f"- GEMM-loop cases with tensor cores: {s['gemm_tensor_cores']} of "
              f"{s['gemm_cases']}; sm_90 GEMM cases with wgmma: {s['gemm_sm90_wgmma']} of "
              f"{s['gemm_sm90']} (float64 excluded: wgmma has no float64 form, its GEMMs use "
              f"mma.sync on both targets)"]
    lines += [f"- CUDA kernels (csrc/*_cuda.cu, setup.py's nvcc flags): {s['cuda_kernels']} "
              f"compiled, {s['cuda_spilling']} spilling; {glue_line}"] * has_cuda
    lines += [f"- 32-bit address products in kernel sources: {len(offsets)}", ""]
    if offsets:
        lines += ["## 32-bit address products", ""] + [f"- `{o}`" for o in offsets] + [""]
    tri_rows = []
    for r in (r for r in rows if r["kind"] == "triton"):
        size = r["size"] + (f" (+{len(r['also'])})" if r.get("compiled") and r.get("also") else "")
        head = [r["family"], r["case"], r.get("kernel_name"), r["dtype"], size, r["cc"],
                fmt(r.get("num_warps")), fmt(r.get("num_stages"))]
        figures = (["yes", r["registers"], spill(r), r["stack_bytes"], r["shared_bytes"],
                    tensor_cores(r), r["scalar_fma"]] if r.get("compiled") else ["no"] + [""] * 6)
        tri_rows.append(head + figures + ["; ".join(verdicts(r)) or "-"])
    lines += ["## Triton kernels", ""] + table(
        ["family", "case", "kernel", "dtype", "size", "sm", "warps", "stages", "ok", "regs",
         "spill B", "stack B", "smem B", "TC", "FMA", "findings"], tri_rows)
    if has_cuda:
        lines += ["", "## CUDA kernels (csrc/*_cuda.cu)", ""] + table(
            ["family", "kernel", "dtype", "sm", "ok", "regs", "spill B", "stack B", "smem B"],
            [[r["family"], f"`{r['case']}`", r["dtype"], r["cc"], "yes", r["registers"], spill(r),
              r["stack_bytes"], r["shared_bytes"]] if r.get("compiled") else
             [r["family"], r["case"], "", "", f"no: {r['error']}", "", "", "", ""]
             for r in rows if r["kind"] == "cuda"])
        lines += ["", "## CUDA glue (csrc/*_cuda_glue.cpp)", ""] + table(
            ["file", "compiles", "error"],
            [[r["case"], "skipped" if r.get("skipped") else ("yes" if r["compiled"] else "no"),
              fmt(r.get("error"))] for r in rows if r["kind"] == "glue"])
    return "\n".join(lines) + "\n"


def run(out_dir: str | None, workers: int = 2, with_cuda: bool = True,
        download: bool = False) -> tuple[list[dict], list[str]]:
    _env_for_compile()
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    tools = toolchain()
    rows = triton_rows(workers) + (cuda_rows() + glue_rows(download) if with_cuda else [])
    offsets = offset_rows([c[:5] for c in _capture(TARGETS[0])])
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "static.jsonl"), "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in
                         [dict(kind="toolchain", **tools)] + rows
                         + [{"kind": "offset32", "finding": o} for o in offsets])
        rel = os.path.relpath(os.path.abspath(out_dir), ROOT)
        with open(os.path.join(out_dir, "static.md"), "w") as f:
            f.write(markdown(rows, offsets, tools, out_dir if rel.startswith("..") else rel))
    return rows, offsets


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET"):
        # The kernels were imported as interpreted functions: the real compiler needs them
        # imported afresh, in a process without the interpreter.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", f"{PKG}.static",
                                *(sys.argv[1:] if argv is None else argv)], env=env)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "static"),
                   help="folder for static.jsonl and static.md (e.g. one per triton version)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--no-cuda", action="store_true", help="skip csrc/*.cu and the glue")
    p.add_argument("--download-headers", action="store_true",
                   help=f"fetch torch=={TORCH_VERSION}'s CUDA wheel with pip for the glue "
                        "headers when they are not cached (never done otherwise)")
    a = p.parse_args(argv)
    rows, offsets = run(a.out, a.workers, not a.no_cuda, a.download_headers)
    print(json.dumps(summary(rows)))
    bad = [(r, v) for r in rows if r["kind"] == "triton" for v in verdicts(r)]
    for r, v in bad:
        print(f"sm_{r['cc']} {r['family']} {r['case']} {r['kernel_name']} {r['dtype']} "
              f"{r['size']}: {v}")
    for o in offsets:
        print("32-bit address product:", o)
    for r in rows:
        if r["kind"] == "glue" and r.get("skipped"):
            print("glue:", r["error"])
    return 1 if bad or offsets else 0


if __name__ == "__main__":
    sys.exit(main())
