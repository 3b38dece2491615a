"""Static GPU build check: compile every GPU kernel of fastssl for sm_80 and sm_90, no GPU needed.

    python -m bench.static --out bench/results/static
    PYTHONPATH=<triton 3.6 site> python -m bench.static --out bench/results/static/triton-3.6

Triton: the real launchers (kernels/*.py) run on ``meta`` tensors inside
``fastssl.kernels._launch.static_capture(cc)``: they pick their configuration for that compute
capability through their family's ``config`` function and record each launch instead of running
it, so what is compiled here is exactly what would run (same constexprs, num_warps, num_stages,
argument specialisation; one row per distinct binary). Each is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, afresh (no cache hit),
and the figures come from the ptxas run Triton itself makes for the cubin it would load: its
command line and its log are captured as Triton runs them (``tritons_ptxas_runs``), so the
options are Triton's own (triton 3.9: ``--regAllocOptLevel=2`` among them, which changes the
spills) and are recorded in every row, with the triton and ptxas versions. Recorded per case:
compiled or the first line of the error, registers, spill bytes, stack frame, shared memory,
tensor-core instructions (wgmma on sm_90, mma on sm_80) and scalar float32 FMAs.

CUDA: csrc/*_cuda.cu with exactly setup.py's nvcc flags (csrc/build_flags.py) and -Xptxas -v;
csrc/*_cuda_glue.cpp compiled (-fsyntax-only) against the include/ of a CUDA build of torch
($FASTSSL_TORCH_CUDA_INCLUDE, or torch==TORCH_VERSION's cached in ~/.cache/fastssl/, fetched
with pip only under --download-headers: nothing is downloaded otherwise, and without headers
the glue rows are marked skipped) and the CUDA toolkit's headers.

Also a source check: in every @triton.jit function, a product with a runtime integer argument
(a size or stride) is formed in 64 bits, so no address computation wraps at 2**31 elements.

Results are cached in ~/.cache/fastssl/static keyed by the kernel sources, the triton version
and the launch's specialisation, so a rerun only compiles what changed.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import inspect
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.path.expanduser(os.environ.get("FASTSSL_CACHE", "~/.cache/fastssl")))
TORCH_VERSION = "2.13.0"
TARGETS = (80, 90)
# Largest shared memory one block may use (opt-in maximum): A100 163 KiB, H100/H200 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
FAMILIES = tuple(os.environ.get("FASTSSL_STATIC_FAMILIES",
                               "contrastive,sphere,swav,sortnet,dino").split(","))


def _env_for_compile():
    # The real compiler, never the interpreter; no escape hatches.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


# ---------------------------------------------------------------------------------------------
# Cases: the launchers called with meta tensors, one call per configuration the ops use on a GPU
# ---------------------------------------------------------------------------------------------

def _cases():
    """(family, label, dtype name, size label, thunk) for every launcher configuration."""
    import torch
    from fastssl.kernels import contrastive as KC, sortnet as KS, sphere as KP, swav as KW

    meta = dict(device="meta")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    # float64: accepted by the sphere, swav and sortnet launchers (the ops' gradcheck dtype);
    # contrastive rejects it ("use the torch backend"), so it has no float64 binary.
    dtypes64 = dict(dtypes, fp64=torch.float64)
    out = []

    # contrastive: (exclude_pos, split, weighted, col_stats) as the losses call them; tiles do
    # not depend on the size (the feature loop is masked), so one size: n = 1024, D = 256.
    combos = {"nt_xent": (False, False, False, False), "info_nce_sym": (False, False, False, True),
              "info_nce_queue": (False, True, False, False), "dcl": (True, True, False, False),
              "sogclr": (True, False, True, False)}
    n, d = 1024, 256
    for dn, dt in dtypes.items():
        a = torch.empty(n, d, dtype=dt, **meta)
        b = torch.empty(2 * n, d, dtype=dt, **meta)
        idx = torch.empty(n, dtype=torch.int64, **meta)
        vec = torch.empty(n, dtype=torch.float32, **meta)
        cvec = torch.empty(2 * n, dtype=torch.float32, **meta)
        empty = torch.empty(0, dtype=torch.float32, **meta)
        for name, (ex, sp, w, cs) in combos.items():
            split = n if sp else 2 * n
            out.append(("contrastive", f"lse_fwd[{name}]", dn, f"n={n},D={d}",
                        lambda ex=ex, split=split, w=w, cs=cs, a=a, b=b, idx=idx:
                        KC.lse_forward(a, b, idx, idx, 1.0, split, ex, w, cs)))
            out.append(("contrastive", f"lse_bwd[{name}]", dn, f"n={n},D={d}",
                        lambda ex=ex, split=split, sp=sp, cs=cs, a=a, b=b, idx=idx, vec=vec,
                        cvec=cvec, empty=empty:
                        KC.lse_backward(a, b, idx, idx, 1.0, split, ex, vec, vec if sp else empty,
                                        cvec if cs else empty, vec, vec if sp else empty,
                                        cvec if cs else empty)))
        out.append(("contrastive", "sce_fwd", dn, f"n={n},D={d}",
                    lambda a=a, b=b, idx=idx: KC.sce_forward(a, a, b, idx, 10.0, 20.0)))
        out.append(("contrastive", "sce_bwd", dn, f"n={n},D={d}",
                    lambda a=a, b=b, idx=idx, vec=vec:
                    KC.sce_backward(a, a, b, idx, 10.0, 20.0, vec, vec, vec, vec)))

    # sphere: SFRIK's series (kind 0, 3 Gegenbauer degrees) and AUH's Gaussian (kind 1), each
    # symmetric (x against itself) and not; tiles do not depend on the size.
    n, d = 4096, 32768
    for dn, dt in dtypes64.items():
        acc = torch.float64 if dt == torch.float64 else torch.float32
        x = torch.empty(n, d, dtype=dt, **meta)
        r = torch.empty(n, dtype=acc, **meta)
        coef = torch.empty(7, dtype=acc, **meta)
        lse = torch.empty(1, dtype=acc, **meta)
        for kind, cname in ((0, "series"), (1, "gauss")):
            c = coef if kind == 0 else None
            nw = 3 if kind == 0 else 1
            out.append(("sphere", f"pair_fwd[{cname},sym]", dn, f"n={n},D={d}",
                        lambda x=x, r=r, kind=kind, c=c, nw=nw:
                        KP.pair_forward(x, None, r, None, kind=kind, coef=c, num_w=nw,
                                        two_scale=4.0)))
            out.append(("sphere", f"pair_fwd[{cname}]", dn, f"n={n},D={d}",
                        lambda x=x, r=r, kind=kind, c=c, nw=nw:
                        KP.pair_forward(x, x, r, r, kind=kind, coef=c, num_w=nw, two_scale=4.0)))
            out.append(("sphere", f"pair_bwd[{cname}]", dn, f"n={n},D={d}",
                        lambda x=x, r=r, kind=kind, c=c, nw=nw, lse=lse:
                        KP.pair_backward(x, x, r, r, kind=kind, coef=c, num_w=nw,
                                         two_scale=4.0, lse=lse)))

    # swav: rows per program and prototype chunk follow B and K: a small local batch and the
    # large one, K = 3000 prototypes.
    k = 3000
    for dn, dt in dtypes64.items():
        for bsz in (256, 4096):
            s = torch.empty(bsz, k, dtype=dt, **meta)
            acc = torch.float64 if dt == torch.float64 else torch.float32
            a = torch.empty(k, dtype=acc, **meta)
            q = torch.empty(bsz, k, dtype=acc, **meta)
            size = f"B={bsz},K={k}"
            out.append(("swav", "colstats", dn, size, lambda s=s: KW.colstats(s, 0.05)))
            out.append(("swav", "rowpass[colsum]", dn, size,
                        lambda s=s, a=a: KW.rowpass(s, 0.05, a, False)))
            out.append(("swav", "rowpass[codes]", dn, size,
                        lambda s=s, a=a: KW.rowpass(s, 0.05, a, True)))
            out.append(("swav", "cross_entropy[loss]", dn, size,
                        lambda s=s, q=q: KW.swav_cross_entropy(s, q, 0.1, False)))
            out.append(("swav", "cross_entropy[grad]", dn, size,
                        lambda s=s, q=q: KW.swav_cross_entropy(s, q, 0.1, True)))

    # dino: KoLeo's neighbour search (float32 and float64 rows; the teacher softmax is swav's
    # rowpass above): a small batch (16-row tiles, 32-wide feature chunks) and the large one.
    from fastssl.kernels import dino as KD
    for dn, dt in (("fp32", torch.float32), ("fp64", torch.float64)):
        for n, d in ((16, 32), (8192, 256)):
            x = torch.empty(n, d, dtype=dt, **meta)
            out.append(("dino", "nearest", dn, f"N={n},D={d}",
                        lambda x=x: KD.nearest_neighbor(x, x, 0)))

    # sortnet: float32 (the ops' dtype on a GPU; half inputs run in float32) and float64; every
    # distribution (a constexpr branch); the real comparator tables of the benchmark and GroCo
    # sizes, since their counts (C, the checkpoint spacing K, S) and the P backward's chunk
    # offsets are specialised arguments (1, a multiple of 16, or neither: distinct binaries).
    from fastssl.kernels.sortnet import DIST_IDS
    from fastssl.ops.sortnet import network_tensor
    cpu = torch.device("cpu")
    sort_sizes = (("odd_even", 32, 1024), ("odd_even", 32, 4096), ("odd_even", 32, 16384),
                  ("bitonic", 32, 4096), ("bitonic", 1024, 256))
    # GroCo: rows of topk_neg = 10 negatives and 1 (2 views) or 3 (4 views) positives
    groco_sizes = (("odd_even", 11), ("bitonic", 11), ("odd_even", 13), ("bitonic", 13))
    for dn, dt in (("fp32", torch.float32), ("fp64", torch.float64)):
        for dist_name, dist in DIST_IDS.items():
            for network, nn, bsz in sort_sizes:
                net = network_tensor(network, nn, cpu).to("meta")
                c = net.shape[1]
                x = torch.empty(bsz, nn, dtype=dt, **meta)
                dd = torch.empty(bsz, c, dtype=dt, **meta)
                gp = torch.empty(bsz, nn, nn, dtype=dt, **meta)
                size = f"{network},B={bsz},n={nn}"
                out.append(("sortnet", f"soft_sort_fwd[{dist_name}]", dn, size,
                            lambda x=x, net=net, dist=dist: KS.soft_sort_forward(
                                x, net, dist, 1.0, 0.25, 1.0, True)))
                out.append(("sortnet", f"soft_sort_bwd[{dist_name}]", dn, size,
                            lambda x=x, gp=gp, dd=dd, net=net, dist=dist, nn=nn:
                            KS.soft_sort_backward(x, gp, dd, net, dist, 1.0, 0.25, 1.0, nn)))
            for network, nn in groco_sizes:
                bsz = 1024
                net = network_tensor(network, nn, cpu).to("meta")
                x = torch.empty(bsz, nn, dtype=dt, **meta)
                size = f"{network},B={bsz},n={nn}"
                out.append(("sortnet", f"groco_rows_fwd[{dist_name}]", dn, size,
                            lambda x=x, net=net, dist=dist: KS.groco_rows_forward(
                                x, 10, net, dist, 1.0, 0.25, 1.0)))
                out.append(("sortnet", f"groco_rows_bwd[{dist_name}]", dn, size,
                            lambda x=x, net=net, dist=dist, bsz=bsz, dt=dt:
                            KS.groco_rows_backward(
                                torch.empty(bsz, dtype=dt, device="meta"), x, 10, net,
                                dist, 1.0, 0.25, 1.0)))
    return out


# Bump when what a cached row records changes.
ROW_VERSION = "3"  # 3: figures from Triton's own ptxas run


def _sources_digest(family: str) -> str:
    """Hash of what a family's compiled rows depend on: its kernel file, the launch module,
    this check's row format and the triton version (so an edit recompiles only its family)."""
    import triton
    h = hashlib.sha256((triton.__version__ + ROW_VERSION).encode())
    for name in (f"{family}.py", "_launch.py"):
        with open(os.path.join(ROOT, "kernels", name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


def _specialisation(launch, cc: int) -> str:
    """What makes Triton build a distinct binary for a launch: kernel, constexprs, argument
    types and specialisation attributes, warps and stages."""
    job = dict(kernel=launch.kernel, args=launch.args, kwargs=launch.kwargs, cc=cc)
    try:
        src, _tgt, options, _c = _source(job)
    except Exception as e:  # compiled (and reported) later: keep the launch
        return f"{launch.kernel.__name__}:unbound:{type(e).__name__}:{e}"
    return repr((launch.kernel.__name__, sorted(src.signature.items()),
                 sorted((k, repr(v)) for k, v in src.constants.items()),
                 sorted((k, repr(v)) for k, v in src.attrs.items()),
                 options.num_warps, options.num_stages, options.num_ctas))


def _capture(cc: int):
    """[(family, label, dtype, size, launch, specialisation)] on target cc: one entry per distinct
    binary (the first case that launches it; the other cases' sizes are kept in ``also``)."""
    from fastssl.kernels._launch import static_capture
    rows, index = [], {}
    for family, label, dn, size, thunk in _cases():
        if family not in FAMILIES:
            continue
        with static_capture(cc) as launches:
            thunk()
        for launch in launches:
            # One row per distinct binary, i.e. per specialisation: an integer argument equal
            # to 1 or a multiple of 16 gives another binary (a launcher that cuts a batch into
            # chunks launches two: chunk offset 0 and, say, 14); equal binaries of several
            # cases or sizes compile once.
            key = _specialisation(launch, cc)
            if key in index:
                entry = rows[index[key]]
                if size != entry[3] and size not in entry[6]:
                    entry[6].append(size)
                continue
            index[key] = len(rows)
            rows.append((family, label, dn, size, launch, key, []))
    return rows


# ---------------------------------------------------------------------------------------------
# Compiling one Triton launch: Triton's own compile, Triton's own ptxas run
# ---------------------------------------------------------------------------------------------

def toolchain() -> dict:
    """The compiler the rows come from: triton's version and, per target, the version of the
    ptxas Triton runs for it (the wheel ships two)."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    return {"triton_version": triton.__version__,
            "ptxas_version": {str(cc): get_ptxas(cc).version for cc in TARGETS}}


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
}


def _parse_ptxas(text: str) -> dict:
    out = {}
    for key, rx in _PTXAS_RE.items():
        vals = [int(v) for v in rx.findall(text)]
        out[key] = max(vals) if vals else 0
    return out


def _count_ptx(ptx: str) -> dict:
    return {"wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
            "mma": len(re.findall(r"\bmma\.sync\.aligned", ptx)),
            "scalar_fma": len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", ptx))}


def ptxas_options(argv) -> list[str]:
    """A ptxas command line with its file arguments (the PTX in, ``-o`` cubin out) and the
    executable's path left out: the options, comparable across machines and runs."""
    args = list(argv[1:])
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "-o":
            skip = True
            continue
        if a.endswith(".ptx"):
            continue
        out.append(a)
    return out


class _PtxasRecorder:
    """Stands in for the ``subprocess`` module inside Triton's NVIDIA compiler while one kernel
    compiles: every call passes through unchanged; a ptxas run on a PTX file is recorded with
    its exact command line and the log ptxas wrote (Triton sends ptxas's stderr to a file and
    keeps it only on failure). Those are the figures of the cubin Triton loads: a second ptxas
    run with other options (``-arch -v`` without ``--regAllocOptLevel=2``, say) can differ."""

    def __init__(self, real):
        self._real = real
        self.runs: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def run(self, cmd, *args, **kwargs):
        # Triton's compiler runs ptxas on a .ptx file (and ptxas --version, passed through).
        is_ptxas = (isinstance(cmd, (list, tuple)) and len(cmd) > 1
                    and any(str(c).endswith(".ptx") for c in cmd[1:]))
        if not is_ptxas:
            return self._real.run(cmd, *args, **kwargs)
        rec = {"argv": [str(c) for c in cmd], "log": "", "returncode": None}
        self.runs.append(rec)
        err = kwargs.get("stderr")
        try:
            res = self._real.run(cmd, *args, **kwargs)
            rec["returncode"] = res.returncode
            return res
        except self._real.CalledProcessError as e:
            rec["returncode"] = e.returncode
            raise
        finally:
            # Triton passes an open log file as stderr: read what ptxas wrote there.
            name = getattr(err, "name", None)
            if isinstance(name, str) and os.path.exists(name):
                with open(name, errors="replace") as f:
                    rec["log"] = f.read()


@contextlib.contextmanager
def tritons_ptxas_runs():
    """Within this block every ``triton.compile`` compiles afresh (no cache hit: a cached
    kernel runs no ptxas) and the list yielded receives each ptxas run Triton makes."""
    from triton import knobs
    from triton.backends.nvidia import compiler as nvc
    rec = _PtxasRecorder(nvc.subprocess)
    saved = knobs.compilation.always_compile
    nvc.subprocess = rec
    knobs.compilation.always_compile = True
    try:
        yield rec.runs
    finally:
        nvc.subprocess = rec._real
        knobs.compilation.always_compile = saved


def _source(job: dict):
    """(ASTSource, target, options) of one recorded launch, exactly as the launch would
    specialise it (``kernel[grid](...)`` does the same binding and packing)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, args, kwargs = job["kernel"], job["args"], dict(job["kwargs"])
    tgt = GPUTarget("cuda", job["cc"], 32)
    backend = make_backend(tgt)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return ASTSource(kernel, signature, constexprs, attrs), tgt, options, constexprs


def _compile_launch(job: dict) -> dict:
    """Compile one recorded launch for one target with ``triton.compile``; the figures come
    from the log of the ptxas run Triton itself makes for the cubin. A JSON-able row."""
    _env_for_compile()
    import triton

    kernel = job["kernel"]
    row = {k: job[k] for k in ("family", "case", "kernel_name", "dtype", "size", "cc")}
    row["triton_version"] = triton.__version__
    runs: list[dict] = []
    try:
        src, tgt, options, constexprs = _source(job)
        row["num_warps"], row["num_stages"] = options.num_warps, options.num_stages
        row["constexprs"] = {kernel.arg_names[p[0]]: v for p, v in constexprs.items()
                             if isinstance(v, (int, float, str, bool))}
        with tritons_ptxas_runs() as runs:
            compiled = triton.compile(src, target=tgt, options=options.__dict__)
    except Exception as e:  # the first line of the compiler's message is the finding
        # Triton's CompilationError reads "at L:C:", the source, then the cause: keep both ends.
        msg = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [""]
        cause = next((ln for ln in reversed(msg) if "Error" in ln), msg[-1])
        where = f" ({msg[0]})" if msg[0] != cause else ""
        row.update(compiled=False, error=f"{type(e).__name__}: {cause}{where}"[:300])
        if runs:
            row["ptxas_options"] = ptxas_options(runs[-1]["argv"])
        return row
    if len(runs) != 1:
        row.update(compiled=False, error=f"expected one ptxas run by Triton, saw {len(runs)}")
        return row
    run_ = runs[0]
    row.update(compiled=True, error=None, shared_bytes=int(compiled.metadata.shared),
               ptxas_options=ptxas_options(run_["argv"]),
               ptxas=os.path.basename(run_["argv"][0]),
               **_parse_ptxas(run_["log"]), **_count_ptx(compiled.asm["ptx"]))
    return row


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
    jobs = []
    for cc in TARGETS:
        for family, label, dn, size, launch, spec, also in _capture(cc):
            jobs.append(dict(family=family, case=label, kernel_name=launch.kernel.__name__,
                             dtype=dn, size=size, cc=cc, kernel=launch.kernel,
                             args=launch.args, kwargs=launch.kwargs, spec=spec, also=also))
    rows: list[dict | None] = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        job["key"] = _job_key(job, _sources_digest(job["family"]))
        path = os.path.join(cache_dir, job["key"] + ".json")
        if use_cache and os.path.exists(path):
            with open(path) as f:
                rows[i] = json.load(f)
        else:
            todo.append(i)
    # Identical launches (same key) compile once.
    first_of: dict[str, int] = {}
    unique = []
    for i in todo:
        first_of.setdefault(jobs[i]["key"], i)
        if first_of[jobs[i]["key"]] == i:
            unique.append(i)
    if unique:
        if workers > 1:
            # The jobs hold JITFunctions (not picklable): forked workers read them by index.
            import multiprocessing as mp
            global _JOBS
            _JOBS = [jobs[i] for i in unique]
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                results = pool.map(_compile_index, range(len(unique)))
                _store(cache_dir, jobs, unique, results, rows)
        else:
            _store(cache_dir, jobs, unique, (_compile_launch(jobs[i]) for i in unique), rows)
    for i in todo:
        if rows[i] is None:
            src = rows[first_of[jobs[i]["key"]]]
            rows[i] = dict(src, **{k: jobs[i][k] for k in ("family", "case", "dtype", "size")})
    for i, row in enumerate(rows):
        row.update({k: jobs[i][k] for k in ("family", "case", "dtype", "size", "cc", "also")})
        row["kind"] = "triton"
    return rows


def _store(cache_dir, jobs, unique, results, rows) -> None:
    # Each result is cached as it arrives: an interrupted run keeps what it compiled.
    for i, res in zip(unique, results):
        with open(os.path.join(cache_dir, jobs[i]["key"] + ".json"), "w") as f:
            json.dump(res, f)
        rows[i] = res


# ---------------------------------------------------------------------------------------------
# Verdicts on a Triton row
# ---------------------------------------------------------------------------------------------

# Kernels whose inner loop is a GEMM (tile of a matrix product): they must use tensor cores.
GEMM_KERNELS = {"_lse_fwd_kernel", "_lse_bwd_rows_kernel", "_lse_bwd_cols_kernel",
                "_sce_fwd_kernel", "_sce_bwd_kernel", "_pair_forward_kernel",
                "_pair_backward_kernel"}


def tensor_cores(row: dict) -> int:
    return row.get("wgmma", 0) + row.get("mma", 0)


def verdicts(row: dict) -> list[str]:
    """What is wrong with one compiled row (empty: nothing)."""
    bad = []
    if not row.get("compiled"):
        return [f"does not compile: {row.get('error')}"]
    spill = row["spill_store_bytes"] + row["spill_load_bytes"]
    if spill:  # any spill, any dtype: the launchers' configurations are chosen to have none
        bad.append(f"spills {spill} bytes")
    if row["shared_bytes"] > SMEM_LIMIT[row["cc"]]:
        bad.append(f"shared memory {row['shared_bytes']} > {SMEM_LIMIT[row['cc']]}")
    if row["kernel_name"] in GEMM_KERNELS:
        if tensor_cores(row) == 0:
            bad.append("GEMM loop without tensor cores")
        elif row["cc"] >= 90 and row["wgmma"] == 0 and wgmma_expected(row):
            bad.append("no wgmma on sm_90")
    return bad


# GEMM kernels where Triton emits wgmma on Hopper (both operands from memory tiles).
WGMMA_EXPECTED = {"_lse_fwd_kernel", "_sce_fwd_kernel", "_pair_forward_kernel"}


def wgmma_expected(row: dict) -> bool:
    """wgmma has no float64 form: float64 GEMMs use mma.sync (DMMA) on Hopper as on sm_80."""
    return row["kernel_name"] in WGMMA_EXPECTED and row["dtype"] != "fp64"


# ---------------------------------------------------------------------------------------------
# 64-bit address arithmetic (source check)
# ---------------------------------------------------------------------------------------------

def _is_int64_cast(node) -> bool:
    """x.to(tl.int64) or tl.cast(x, tl.int64)."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return False
    if node.func.attr == "to" and node.args:
        dt = node.args[0]
    elif node.func.attr == "cast" and len(node.args) >= 2:
        dt = node.args[1]
    else:
        return False
    return isinstance(dt, ast.Attribute) and dt.attr == "int64"


def _names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _wide(node, wide: set[str]) -> bool:
    """The expression is computed in 64 bits: it contains an int64 cast or a 64-bit name."""
    return any(_is_int64_cast(n) for n in ast.walk(node)) or bool(_names(node) & wide)


def offset_findings(module, runtime_ints: set[str]) -> list[str]:
    """Products of a runtime integer argument with a non-constant, both in 32 bits: each a
    possible address computation that wraps at 2**31. ``runtime_ints``: the names of the
    kernels' integer arguments (sizes, strides)."""
    src = textwrap.dedent(inspect.getsource(module))
    tree = ast.parse(src)
    findings = []
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        if not any("jit" in ast.unparse(d) for d in fn.decorator_list):
            continue
        wide: set[str] = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and _wide(node.value, wide):
                for t in node.targets:
                    wide |= _names(t)
        for node in ast.walk(fn):
            if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult)):
                continue
            sides = (node.left, node.right)
            if any(isinstance(s, ast.Constant) for s in sides):
                continue
            if not any(_names(s) & runtime_ints for s in sides):
                continue
            if any(_wide(s, wide) for s in sides):
                continue
            findings.append(f"{module.__name__.split('.')[-1]}.py:{fn.lineno + node.lineno - 1}"
                            f" {fn.name}: {ast.unparse(node)}")
    return findings


def offset_rows(captured) -> list[str]:
    """offset_findings over every kernel family, with the integer arguments the launches pass."""
    import importlib
    ints: dict[str, set[str]] = {f: set() for f in FAMILIES}
    for family, _label, _dn, _size, launch in captured:
        names = launch.kernel.arg_names
        for name, val in zip(names, launch.args):
            if isinstance(val, int) and not isinstance(val, bool):
                ints[family].add(name)
    out = []
    for family in FAMILIES:
        mod = importlib.import_module(f"fastssl.kernels.{family}")
        out += offset_findings(mod, ints[family])
    return out


# ---------------------------------------------------------------------------------------------
# CUDA sources
# ---------------------------------------------------------------------------------------------

def _build_flags() -> dict:
    return runpy.run_path(os.path.join(ROOT, "csrc", "build_flags.py"))


def _nvcc() -> str | None:
    return shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc")
                                    and "/usr/local/cuda/bin/nvcc") or None


_PTXAS_FN = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'")


def _file_cached(kind: str, paths: list[str], extra: str, compute):
    """compute() cached in CACHE/static under the contents of ``paths`` and ``extra``."""
    h = hashlib.sha256((kind + extra + ROW_VERSION).encode())
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    path = os.path.join(CACHE, "static", f"{kind}-{h.hexdigest()[:24]}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    rows = compute()
    if all(r.get("compiled") for r in rows):  # failures are recomputed (e.g. headers fetched)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(rows, f)
    return rows


def cuda_rows() -> list[dict]:
    """ptxas -v figures of every kernel of csrc/*_cuda.cu, built with setup.py's nvcc flags."""
    srcs = sorted(os.path.join(ROOT, "csrc", n) for n in os.listdir(os.path.join(ROOT, "csrc"))
                  if n.endswith("_cuda.cu"))
    nvcc = _nvcc() or ""
    return _file_cached("cuda", srcs + [os.path.join(ROOT, "csrc", "build_flags.py")],
                        nvcc + subprocess.run([nvcc, "--version"], capture_output=True,
                                              text=True).stdout if nvcc else "", _cuda_rows)


def _cuda_rows() -> list[dict]:
    nvcc = _nvcc()
    if nvcc is None:
        return [dict(kind="cuda", family="csrc", case="nvcc", compiled=False,
                     error="nvcc not found")]
    flags = _build_flags()["NVCC_FLAGS"]
    rows = []
    for name in sorted(os.listdir(os.path.join(ROOT, "csrc"))):
        if not name.endswith("_cuda.cu"):
            continue
        src = os.path.join(ROOT, "csrc", name)
        with tempfile.TemporaryDirectory() as tmp:
            res = subprocess.run([nvcc, *flags, "-Xptxas", "-v", "-c", src, "-o",
                                  os.path.join(tmp, "x.o")], capture_output=True, text=True)
        family = name[: -len("_cuda.cu")]
        if res.returncode != 0:
            err = next((ln for ln in res.stderr.splitlines() if "error" in ln), res.stderr[:200])
            rows.append(dict(kind="cuda", family=family, case=name, compiled=False, error=err))
            continue
        # ptxas prints, per entry: "Compiling entry function 'X' for 'sm_80'", then its figures.
        blocks = re.split(r"(?=ptxas info\s*: Compiling entry function)", res.stderr)
        for blk in blocks:
            m = _PTXAS_FN.search(blk)
            if not m:
                continue
            mangled, arch = m.groups()
            demangled = subprocess.run(["c++filt", mangled], capture_output=True,
                                       text=True).stdout.strip() or mangled
            smem = re.search(r"(\d+) bytes smem", blk)
            short = re.sub(r"^void\s+", "", demangled).replace("(anonymous namespace)::", "")
            rows.append(dict(kind="cuda", family=family, case=short.split("(")[0],
                             kernel_name=demangled, dtype=_cuda_dtype(demangled), size="-",
                             cc=int(arch[3:5]), compiled=True, error=None,
                             shared_bytes=int(smem.group(1)) if smem else 0,
                             wgmma=0, mma=0, scalar_fma=None, num_warps=None, num_stages=None,
                             **_parse_ptxas(blk)))
    return rows


def _cuda_dtype(demangled: str) -> str:
    for key, name in (("__nv_bfloat16", "bf16"), ("__half", "fp16"), ("double", "fp64"),
                      ("float", "fp32")):
        if key in demangled:
            return name
    return "-"


def _header_torch_version(inc: str) -> str | None:
    """The version a torch include/ tree belongs to (its version.h)."""
    for parts in (("torch", "headeronly", "version.h"),
                  ("torch", "csrc", "api", "include", "torch", "version.h")):
        try:
            with open(os.path.join(inc, *parts)) as f:
                m = re.search(r"#define TORCH_VERSION\s*\\?\s*\"([^\"]+)\"", f.read())
        except OSError:
            continue
        if m:
            return m.group(1)
    return None


def torch_cuda_include(download: bool = False) -> str | None:
    """include/ of a CUDA build of torch: $FASTSSL_TORCH_CUDA_INCLUDE if set, else the copy of
    torch==TORCH_VERSION's cached in CACHE; fetched with pip only when ``download`` (never by
    default: the check runs offline, and the glue rows then say the headers are missing)."""
    explicit = os.environ.get("FASTSSL_TORCH_CUDA_INCLUDE")
    if explicit:
        ok = os.path.exists(os.path.join(explicit, "c10", "cuda", "CUDAStream.h"))
        return explicit if ok else None
    root = os.path.join(CACHE, f"torch-{TORCH_VERSION}")
    inc = os.path.join(root, "torch", "include")
    marker = os.path.join(inc, "c10", "cuda", "CUDAStream.h")
    if os.path.exists(marker):
        return inc
    if not download:
        return None
    wheel_dir = os.path.join(CACHE, "torchwheel")
    os.makedirs(wheel_dir, exist_ok=True)
    wheels = [w for w in os.listdir(wheel_dir) if w.startswith(f"torch-{TORCH_VERSION}-")]
    if not wheels:
        # "===" : the exact version, never the local "+cpu" build of the CPU index.
        res = subprocess.run([sys.executable, "-m", "pip", "download", f"torch==={TORCH_VERSION}",
                              "--no-deps", "-d", wheel_dir], capture_output=True, text=True)
        if res.returncode != 0:  # offline or no such wheel: the glue rows say so
            return None
        wheels = [w for w in os.listdir(wheel_dir) if w.startswith(f"torch-{TORCH_VERSION}-")]
    import zipfile
    with zipfile.ZipFile(os.path.join(wheel_dir, wheels[0])) as z:
        for n in z.namelist():
            if n.startswith("torch/include/"):
                z.extract(n, root)
    return inc if os.path.exists(marker) else None


def glue_rows(download: bool = False) -> list[dict]:
    """csrc/*_cuda_glue.cpp compiled against a CUDA torch's and the toolkit's headers."""
    srcs = sorted(os.path.join(ROOT, "csrc", n) for n in os.listdir(os.path.join(ROOT, "csrc"))
                  if n.endswith("_cuda_glue.cpp"))
    inc = torch_cuda_include(download)
    return _file_cached("glue", srcs + [os.path.join(ROOT, "csrc", "build_flags.py")],
                        f"{inc}:{inc and _header_torch_version(inc)}:{_nvcc()}",
                        lambda: _glue_rows(inc))


def _glue_rows(inc: str | None) -> list[dict]:
    nvcc = _nvcc()
    if inc is None:
        return [dict(kind="glue", family="csrc", case="headers", compiled=False, skipped=True,
                     error=f"skipped: no CUDA torch include/ (cached torch {TORCH_VERSION} "
                           "headers, $FASTSSL_TORCH_CUDA_INCLUDE, or --download-headers)")]
    if nvcc is None:
        return [dict(kind="glue", family="csrc", case="headers", compiled=False, skipped=True,
                     error="skipped: no CUDA toolkit (nvcc)")]
    torch_version = _header_torch_version(inc)
    homes = [os.environ.get("CUDA_HOME", ""),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    cuda_inc = next((os.path.join(h, "include") for h in homes
                     if h and os.path.exists(os.path.join(h, "include", "cuda_runtime.h"))), None)
    if cuda_inc is None:
        return [dict(kind="glue", family="csrc", case="headers", compiled=False, skipped=True,
                     error="skipped: no CUDA toolkit include/cuda_runtime.h")]
    cxx = os.environ.get("CXX", "c++")
    flags = _build_flags()["CXX_FLAGS"]
    rows = []
    for name in sorted(os.listdir(os.path.join(ROOT, "csrc"))):
        if not name.endswith("_cuda_glue.cpp"):
            continue
        cmd = [cxx, *flags, "-fsyntax-only", "-DFASTSSL_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
               "-DTORCH_API_INCLUDE_EXTENSION_H", "-D_GLIBCXX_USE_CXX11_ABI=1",
               f"-I{inc}", f"-I{os.path.join(inc, 'torch', 'csrc', 'api', 'include')}",
               f"-I{cuda_inc}", f"-I{sysconfig.get_paths()['include']}",
               os.path.join(ROOT, "csrc", name)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        err = None
        if res.returncode != 0:
            err = next((ln for ln in res.stderr.splitlines() if "error" in ln),
                       res.stderr[:200]).replace(ROOT + "/", "")
        rows.append(dict(kind="glue", family=name[: -len("_cuda_glue.cpp")], case=name,
                         compiled=res.returncode == 0, error=err, torch_headers=torch_version))
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def summary(rows: list[dict]) -> dict:
    tri = [r for r in rows if r["kind"] == "triton"]
    gemm = [r for r in tri if r.get("kernel_name") in GEMM_KERNELS]
    out = {"triton_version": next((r.get("triton_version") for r in tri), None),
           "triton_cases": len(tri),
           "compiled": sum(bool(r.get("compiled")) for r in tri),
           "spilling": sum(bool(r.get("compiled")) and
                           (r["spill_store_bytes"] + r["spill_load_bytes"]) > 0 for r in tri),
           "over_smem": sum(bool(r.get("compiled")) and r["shared_bytes"] > SMEM_LIMIT[r["cc"]]
                            for r in tri),
           "gemm_cases": len(gemm),
           "gemm_tensor_cores": sum(bool(r.get("compiled")) and tensor_cores(r) > 0 for r in gemm),
           # wgmma has no float64 form: float64 GEMMs (mma.sync) are not in this count.
           "gemm_sm90_wgmma": sum(bool(r.get("compiled")) and r.get("wgmma", 0) > 0
                                  for r in gemm if r["cc"] >= 90 and r["dtype"] != "fp64"),
           "gemm_sm90": sum(1 for r in gemm if r["cc"] >= 90 and r["dtype"] != "fp64"),
           "cuda_kernels": sum(r["kind"] == "cuda" and bool(r.get("compiled")) for r in rows),
           "cuda_spilling": sum(r["kind"] == "cuda" and bool(r.get("compiled")) and
                                (r["spill_store_bytes"] + r["spill_load_bytes"]) > 0 for r in rows),
           "glue_compiled": sum(r["kind"] == "glue" and bool(r.get("compiled")) for r in rows),
           "glue_files": sum(r["kind"] == "glue" and not r.get("skipped") for r in rows),
           "glue_skipped": sum(r["kind"] == "glue" and bool(r.get("skipped")) for r in rows)}
    return out


def _fmt(v):
    return "-" if v is None else str(v)


def ptxas_command_lines(rows: list[dict]) -> dict[int, list[list[str]]]:
    """Per target, the distinct ptxas option lists the Triton rows come from (one expected)."""
    out: dict[int, list[list[str]]] = {}
    for r in rows:
        if r["kind"] == "triton" and r.get("ptxas_options") is not None:
            opts = out.setdefault(r["cc"], [])
            if r["ptxas_options"] not in opts:
                opts.append(r["ptxas_options"])
    return out


def markdown(rows: list[dict], offsets: list[str], tools: dict, out_arg: str) -> str:
    s = summary(rows)
    cmds = ptxas_command_lines(rows)
    glue_line = (f"glue files compiled against the CUDA torch "
                 f"{next((r.get('torch_headers') for r in rows if r['kind'] == 'glue' and r.get('torch_headers')), '-')}"
                 f" headers: {s['glue_compiled']} of {s['glue_files']}")
    if s["glue_skipped"]:
        glue_line = "glue: " + next(r["error"] for r in rows if r["kind"] == "glue"
                                    and r.get("skipped"))
    lines = ["# Static GPU build check", "",
             f"Generated by `python -m bench.static --out {out_arg}` with triton "
             f"{tools['triton_version']} (no GPU). Each Triton case is compiled by "
             "`triton.compile` for its target, and its registers, spills and stack come from "
             "the log of the ptxas run Triton itself makes for the cubin it would load, with "
             "Triton's own command line:", ""]
    for cc in TARGETS:
        for opts in cmds.get(cc, []):
            lines.append(f"- sm_{cc} (ptxas {tools['ptxas_version'].get(str(cc))}): "
                         f"`ptxas {' '.join(opts)} <kernel>.ptx -o <kernel>.cubin`")
    lines += ["",
              "Shared memory limit per block: 163 KiB (sm_80), 227 KiB (sm_90). TC = "
              "tensor-core instructions in the PTX (mma.sync on sm_80, wgmma on sm_90), FMA = "
              "scalar fp32 FMAs.", "",
              "## Summary", "",
              f"- Triton cases (kernel x configuration x dtype x size x target, one per distinct "
              f"binary): {s['triton_cases']}; compiled: {s['compiled']}; spilling: "
              f"{s['spilling']}; over the shared-memory limit: {s['over_smem']}",
              f"- GEMM-loop cases with tensor cores: {s['gemm_tensor_cores']} of "
              f"{s['gemm_cases']}; sm_90 GEMM cases with wgmma: {s['gemm_sm90_wgmma']} of "
              f"{s['gemm_sm90']} (float64 excluded: wgmma has no float64 form, its GEMMs use "
              f"mma.sync on both targets)"]
    if any(r["kind"] == "cuda" for r in rows):
        lines.append(f"- CUDA kernels (csrc/*_cuda.cu, setup.py's nvcc flags): "
                     f"{s['cuda_kernels']} compiled, {s['cuda_spilling']} spilling; {glue_line}")
    lines += [f"- 32-bit address products in kernel sources: {len(offsets)}", ""]
    if offsets:
        lines += ["## 32-bit address products", ""] + [f"- `{o}`" for o in offsets] + [""]
    lines += ["## Triton kernels", "",
              "| family | case | kernel | dtype | size | sm | warps | stages | ok | regs | "
              "spill B | stack B | smem B | TC | FMA | findings |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "triton":
            continue
        find = "; ".join(verdicts(r)) or "-"
        if r.get("compiled"):
            size = r["size"] + (f" (+{len(r['also'])})" if r.get("also") else "")
            lines.append(
                f"| {r['family']} | {r['case']} | {r['kernel_name']} | {r['dtype']} | {size}"
                f" | {r['cc']} | {r['num_warps']} | {r['num_stages']} | yes | {r['registers']} |"
                f" {r['spill_store_bytes'] + r['spill_load_bytes']} | {r['stack_bytes']} |"
                f" {r['shared_bytes']} | {tensor_cores(r)} | {r['scalar_fma']} | {find} |")
        else:
            lines.append(f"| {r['family']} | {r['case']} | {r.get('kernel_name')} | {r['dtype']} |"
                         f" {r['size']} | {r['cc']} | {_fmt(r.get('num_warps'))} |"
                         f" {_fmt(r.get('num_stages'))} | no | | | | | | | {find} |")
    if any(r["kind"] == "cuda" for r in rows):
        lines += ["", "## CUDA kernels (csrc/*_cuda.cu)", "",
                  "| family | kernel | dtype | sm | ok | regs | spill B | stack B | smem B |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["kind"] == "cuda":
                if r.get("compiled"):
                    lines.append(f"| {r['family']} | `{r['case']}` | {r['dtype']} | {r['cc']} |"
                                 f" yes | {r['registers']} |"
                                 f" {r['spill_store_bytes'] + r['spill_load_bytes']}"
                                 f" | {r['stack_bytes']} | {r['shared_bytes']} |")
                else:
                    lines.append(f"| {r['family']} | {r['case']} | | | no: {r['error']} |"
                                 " | | | |")
        lines += ["", "## CUDA glue (csrc/*_cuda_glue.cpp)", "", "| file | compiles | error |",
                  "|---|---|---|"]
        for r in rows:
            if r["kind"] == "glue":
                ok = "skipped" if r.get("skipped") else ("yes" if r["compiled"] else "no")
                lines.append(f"| {r['case']} | {ok} | {_fmt(r.get('error'))} |")
    return "\n".join(lines) + "\n"


def run(out_dir: str | None, workers: int = 2, with_cuda: bool = True,
        download: bool = False) -> tuple[list[dict], list[str]]:
    _env_for_compile()
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    tools = toolchain()
    rows = triton_rows(workers)
    offsets = offset_rows([c[:5] for cc in TARGETS[:1] for c in _capture(cc)])
    if with_cuda:
        rows += cuda_rows() + glue_rows(download)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "static.jsonl"), "w") as f:
            f.write(json.dumps(dict(kind="toolchain", **tools), sort_keys=True) + "\n")
            for r in rows:
                f.write(json.dumps({k: v for k, v in r.items() if k != "key"}, sort_keys=True)
                        + "\n")
            for o in offsets:
                f.write(json.dumps({"kind": "offset32", "finding": o}) + "\n")
        rel = os.path.relpath(os.path.abspath(out_dir), ROOT)
        with open(os.path.join(out_dir, "static.md"), "w") as f:
            f.write(markdown(rows, offsets, tools, rel if not rel.startswith("..") else out_dir))
    return rows, offsets


def main(argv=None) -> int:
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
    s = summary(rows)
    print(json.dumps(s))
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
