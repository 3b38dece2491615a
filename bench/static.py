"""Static GPU build check: compile every GPU kernel of fastssl for sm_80 and sm_90, no GPU needed.

    python -m bench.static --out bench/results/static

Triton: the real launchers (kernels/*.py) run on ``meta`` tensors inside
``fastssl.kernels._launch.static_capture(cc)``: they pick their configuration for that compute
capability through their family's ``config`` function and record each launch instead of running
it, so what is compiled here is exactly what would run (same constexprs, num_warps, num_stages,
argument specialisation). Each launch is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))`` and its PTX is run through the ptxas of the triton wheel
with -v. Recorded per case: compiled or the first line of the error, registers, spill bytes,
stack frame, shared memory, tensor-core instructions (wgmma on sm_90, mma on sm_80) and scalar
float32 FMAs.

CUDA: csrc/*_cuda.cu with exactly setup.py's nvcc flags (csrc/build_flags.py) and -Xptxas -v;
csrc/*_cuda_glue.cpp compiled (-fsyntax-only) against the include/ of the CUDA build of the
pinned torch (downloaded once with pip into ~/.cache/fastssl/, only include/ kept) and the CUDA
toolkit's headers.

Also a source check: in every @triton.jit function, a product with a runtime integer argument
(a size or stride) is formed in 64 bits, so no address computation wraps at 2**31 elements.

Results are cached in ~/.cache/fastssl/static/ keyed by the kernel sources, the triton version
and the case, so a rerun only compiles what changed.
"""
from __future__ import annotations

import argparse
import ast
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
                               "contrastive,sphere,swav,sortnet").split(","))


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
    for dn, dt in dtypes.items():
        x = torch.empty(n, d, dtype=dt, **meta)
        r = torch.empty(n, dtype=torch.float32, **meta)
        coef = torch.empty(7, dtype=torch.float32, **meta)
        lse = torch.empty(1, dtype=torch.float32, **meta)
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
    for dn, dt in dtypes.items():
        for bsz in (256, 4096):
            s = torch.empty(bsz, k, dtype=dt, **meta)
            acc = torch.float32
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

    # sortnet: float32 (the ops' dtype on a GPU); every distribution (a constexpr branch);
    # the row kernels' tiles follow n: GroCo's n = 32 rows and a 1024-wide soft sort.
    from fastssl.kernels.sortnet import DIST_IDS
    for dist_name, dist in DIST_IDS.items():
        for nn in (32, 1024):
            bsz, c = 256, nn * 4
            x = torch.empty(bsz, nn, dtype=torch.float32, **meta)
            net = torch.empty(4, c, dtype=torch.int32, **meta)
            dd = torch.empty(bsz, c, dtype=torch.float32, **meta)
            gp = torch.empty(bsz, nn, nn, dtype=torch.float32, **meta)
            size = f"B={bsz},n={nn}"
            out.append(("sortnet", f"soft_sort_fwd[{dist_name}]", "fp32", size,
                        lambda x=x, net=net, dist=dist: KS.soft_sort_forward(
                            x, net, dist, 1.0, 0.25, 1.0, True)))
            out.append(("sortnet", f"soft_sort_bwd[{dist_name}]", "fp32", size,
                        lambda x=x, gp=gp, dd=dd, net=net, dist=dist, nn=nn:
                        KS.soft_sort_backward(x, gp, dd, net, dist, 1.0, 0.25, 1.0, nn)))
            if nn == 32:
                out.append(("sortnet", f"groco_rows_fwd[{dist_name}]", "fp32", size,
                            lambda x=x, net=net, dist=dist: KS.groco_rows_forward(
                                x, 4, net, dist, 1.0, 0.25, 1.0)))
                out.append(("sortnet", f"groco_rows_bwd[{dist_name}]", "fp32", size,
                            lambda x=x, net=net, dist=dist, bsz=bsz: KS.groco_rows_backward(
                                torch.empty(bsz, dtype=torch.float32, device="meta"), x, 4, net,
                                dist, 1.0, 0.25, 1.0)))
    return out


# Bump when what a cached row records changes.
ROW_VERSION = "2"


def _sources_digest(family: str) -> str:
    """Hash of what a family's compiled rows depend on: its kernel file, the launch module,
    this check's row format and the triton version (so an edit recompiles only its family)."""
    import triton
    h = hashlib.sha256((triton.__version__ + ROW_VERSION).encode())
    for name in (f"{family}.py", "_launch.py"):
        with open(os.path.join(ROOT, "kernels", name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


def _capture(cc: int):
    """[(family, label, dtype, size, launch)] of every launch the cases make on target cc."""
    from fastssl.kernels._launch import static_capture
    rows = []
    for family, label, dn, size, thunk in _cases():
        if family not in FAMILIES:
            continue
        with static_capture(cc) as launches:
            thunk()
        seen = set()
        for launch in launches:
            # A launcher that cuts a batch into several equal launches: one row.
            key = (launch.kernel.__name__, repr(sorted(launch.kwargs.items())))
            if key not in seen:
                seen.add(key)
                rows.append((family, label, dn, size, launch))
    return rows


# ---------------------------------------------------------------------------------------------
# Compiling one Triton launch
# ---------------------------------------------------------------------------------------------

def _ptxas(cc: int) -> str:
    # The ptxas Triton itself uses for this target (the wheel ships two).
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(cc).path


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


def _compile_launch(job: dict) -> dict:
    """Compile one recorded launch for one target; a JSON-able result row."""
    _env_for_compile()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    cc = job["cc"]
    kernel, args, kwargs = job["kernel"], job["args"], dict(job["kwargs"])
    tgt = GPUTarget("cuda", cc, 32)
    backend = make_backend(tgt)
    row = {k: job[k] for k in ("family", "case", "kernel_name", "dtype", "size", "cc")}
    try:
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec,
                                                                  opts)
        row["num_warps"], row["num_stages"] = options.num_warps, options.num_stages
        row["constexprs"] = {kernel.arg_names[p[0]]: v for p, v in constexprs.items()
                             if isinstance(v, (int, float, str, bool))}
        src = ASTSource(kernel, signature, constexprs, attrs)
        compiled = triton.compile(src, target=tgt, options=options.__dict__)
    except Exception as e:  # the first line of the compiler's message is the finding
        # Triton's CompilationError reads "at L:C:", the source, then the cause: keep both ends.
        msg = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [""]
        cause = next((ln for ln in reversed(msg) if "Error" in ln), msg[-1])
        where = f" ({msg[0]})" if msg[0] != cause else ""
        row.update(compiled=False, error=f"{type(e).__name__}: {cause}{where}"[:300])
        return row
    ptx = compiled.asm["ptx"]
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas(cc), f"-arch={arch}", "-v", path, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    if res.returncode != 0:
        row.update(compiled=False, error="ptxas: " + (res.stderr.strip().splitlines() or ["?"])[0])
        return row
    row.update(compiled=True, error=None, shared_bytes=int(compiled.metadata.shared),
               **_parse_ptxas(res.stdout + res.stderr), **_count_ptx(ptx))
    return row


_JOBS: list = []


def _compile_index(i: int) -> dict:
    return _compile_launch(_JOBS[i])


def _job_key(job: dict, digest: str) -> str:
    kw = {k: (str(v) if not isinstance(v, (int, float, str, bool)) else v)
          for k, v in sorted(job["kwargs"].items())}
    args = []
    for a in job["args"]:
        if hasattr(a, "dtype") and hasattr(a, "shape"):
            args.append(f"T{a.dtype}")
        else:
            args.append(repr(a) if not isinstance(a, int) else f"i{a}")
    blob = json.dumps([digest, job["kernel_name"], job["cc"], args, kw], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def triton_rows(workers: int = 2, use_cache: bool = True) -> list[dict]:
    _env_for_compile()
    cache_dir = os.path.join(CACHE, "static")
    os.makedirs(cache_dir, exist_ok=True)
    jobs = []
    for cc in TARGETS:
        for family, label, dn, size, launch in _capture(cc):
            jobs.append(dict(family=family, case=label, kernel_name=launch.kernel.__name__,
                             dtype=dn, size=size, cc=cc, kernel=launch.kernel,
                             args=launch.args, kwargs=launch.kwargs))
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
                results = list(pool.map(_compile_index, range(len(unique))))
        else:
            results = [_compile_launch(jobs[i]) for i in unique]
        for i, res in zip(unique, results):
            with open(os.path.join(cache_dir, jobs[i]["key"] + ".json"), "w") as f:
                json.dump(res, f)
            rows[i] = res
    for i in todo:
        if rows[i] is None:
            src = rows[first_of[jobs[i]["key"]]]
            rows[i] = dict(src, **{k: jobs[i][k] for k in ("family", "case", "dtype", "size")})
    for i, row in enumerate(rows):
        row.update({k: jobs[i][k] for k in ("family", "case", "dtype", "size", "cc")})
        row["kind"] = "triton"
    return rows


# ---------------------------------------------------------------------------------------------
# Verdicts on a Triton row
# ---------------------------------------------------------------------------------------------

# Kernels whose inner loop is a GEMM (tile of a matrix product): they must use tensor cores.
GEMM_KERNELS = {"_lse_fwd_kernel", "_lse_bwd_rows_kernel", "_lse_bwd_cols_kernel",
                "_sce_fwd_kernel", "_sce_bwd_kernel", "_pair_forward_kernel",
                "_pair_backward_kernel"}


def tensor_cores(row: dict) -> int:
    return row.get("wgmma", 0) + row.get("mma", 0)


# float32 spills accepted, each with the reason (kernel, case prefix, target) -> (bytes, why).
ACCEPTED_FP32_SPILLS = {
    ("_ss_bwd_perm_kernel", "soft_sort_bwd[", 80): (
        16, "8 bytes kept on the stack at 80 of 255 registers for the erf / pow distributions at "
            "n = 32 on sm_80: not register pressure (2 and 4 warps give the same); its cost "
            "cannot be measured without a GPU"),
}


def accepted_spill(row: dict) -> str | None:
    """The reason a float32 row's spill is accepted, or None."""
    if row.get("dtype") != "fp32":
        return None
    for (kname, prefix, cc), (limit, why) in ACCEPTED_FP32_SPILLS.items():
        if (row.get("kernel_name") == kname and row.get("case", "").startswith(prefix)
                and row.get("cc") == cc
                and row["spill_store_bytes"] + row["spill_load_bytes"] <= limit):
            return why
    return None


def verdicts(row: dict) -> list[str]:
    """What is wrong with one compiled row (empty: nothing)."""
    bad = []
    if not row.get("compiled"):
        return [f"does not compile: {row.get('error')}"]
    spill = row["spill_store_bytes"] + row["spill_load_bytes"]
    if spill:
        why = accepted_spill(row)
        if why is None:
            bad.append(f"spills {spill} bytes")
        else:
            row["note"] = f"spills {spill} bytes: {why}"
    if row["shared_bytes"] > SMEM_LIMIT[row["cc"]]:
        bad.append(f"shared memory {row['shared_bytes']} > {SMEM_LIMIT[row['cc']]}")
    if row["kernel_name"] in GEMM_KERNELS:
        if tensor_cores(row) == 0:
            bad.append("GEMM loop without tensor cores")
        elif row["cc"] >= 90 and row["wgmma"] == 0 and row["kernel_name"] in WGMMA_EXPECTED:
            bad.append("no wgmma on sm_90")
    return bad


# GEMM kernels where Triton emits wgmma on Hopper (both operands from memory tiles).
WGMMA_EXPECTED = {"_lse_fwd_kernel", "_sce_fwd_kernel", "_pair_forward_kernel"}


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


def torch_cuda_include(download: bool = True) -> str | None:
    """include/ of the CUDA build of torch==TORCH_VERSION, fetched once into the cache."""
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
        subprocess.run([sys.executable, "-m", "pip", "download", f"torch==={TORCH_VERSION}",
                        "--no-deps", "-d", wheel_dir], check=True)
        wheels = [w for w in os.listdir(wheel_dir) if w.startswith(f"torch-{TORCH_VERSION}-")]
    import zipfile
    with zipfile.ZipFile(os.path.join(wheel_dir, wheels[0])) as z:
        for n in z.namelist():
            if n.startswith("torch/include/"):
                z.extract(n, root)
    return inc if os.path.exists(marker) else None


def glue_rows(download: bool = True) -> list[dict]:
    """csrc/*_cuda_glue.cpp compiled against the CUDA torch's and the toolkit's headers."""
    srcs = sorted(os.path.join(ROOT, "csrc", n) for n in os.listdir(os.path.join(ROOT, "csrc"))
                  if n.endswith("_cuda_glue.cpp"))
    return _file_cached("glue", srcs + [os.path.join(ROOT, "csrc", "build_flags.py")],
                        TORCH_VERSION + str(_nvcc()), lambda: _glue_rows(download))


def _glue_rows(download: bool) -> list[dict]:
    inc = torch_cuda_include(download)
    nvcc = _nvcc()
    if inc is None or nvcc is None:
        return [dict(kind="glue", family="csrc", case="headers", compiled=False,
                     error="no CUDA torch include/ or no CUDA toolkit")]
    homes = [os.environ.get("CUDA_HOME", ""),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    cuda_inc = next((os.path.join(h, "include") for h in homes
                     if h and os.path.exists(os.path.join(h, "include", "cuda_runtime.h"))), None)
    if cuda_inc is None:
        return [dict(kind="glue", family="csrc", case="headers", compiled=False,
                     error="no CUDA toolkit include/cuda_runtime.h")]
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
                         compiled=res.returncode == 0, error=err))
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def summary(rows: list[dict]) -> dict:
    tri = [r for r in rows if r["kind"] == "triton"]
    gemm = [r for r in tri if r.get("kernel_name") in GEMM_KERNELS]
    out = {"triton_cases": len(tri),
           "compiled": sum(bool(r.get("compiled")) for r in tri),
           "spilling": sum(bool(r.get("compiled")) and
                           (r["spill_store_bytes"] + r["spill_load_bytes"]) > 0 for r in tri),
           "spilling_unexplained": sum(any(v.startswith("spills") for v in verdicts(r))
                                       for r in tri),
           "over_smem": sum(bool(r.get("compiled")) and r["shared_bytes"] > SMEM_LIMIT[r["cc"]]
                            for r in tri),
           "gemm_cases": len(gemm),
           "gemm_tensor_cores": sum(bool(r.get("compiled")) and tensor_cores(r) > 0 for r in gemm),
           "gemm_sm90_wgmma": sum(bool(r.get("compiled")) and r.get("wgmma", 0) > 0
                                  for r in gemm if r["cc"] >= 90),
           "gemm_sm90": sum(1 for r in gemm if r["cc"] >= 90),
           "cuda_kernels": sum(r["kind"] == "cuda" and bool(r.get("compiled")) for r in rows),
           "cuda_spilling": sum(r["kind"] == "cuda" and bool(r.get("compiled")) and
                                (r["spill_store_bytes"] + r["spill_load_bytes"]) > 0 for r in rows),
           "glue_compiled": sum(r["kind"] == "glue" and bool(r.get("compiled")) for r in rows),
           "glue_files": sum(r["kind"] == "glue" for r in rows)}
    return out


def _fmt(v):
    return "-" if v is None else str(v)


def markdown(rows: list[dict], offsets: list[str]) -> str:
    for r in rows:
        if r["kind"] == "triton":
            verdicts(r)  # sets the notes of accepted findings
    s = summary(rows)
    lines = ["# Static GPU build check", "",
             "Generated by `python -m bench.static --out bench/results/static` (no GPU: "
             "Triton's compiler and ptxas -v for sm_80 and sm_90). Shared memory limit per "
             "block: 163 KiB (sm_80), 227 KiB (sm_90). TC = tensor-core instructions in the PTX "
             "(mma.sync on sm_80, wgmma on sm_90), FMA = scalar fp32 FMAs.", "",
             "## Summary", "",
             f"- Triton cases (kernel x configuration x dtype x size x target): "
             f"{s['triton_cases']}; compiled: {s['compiled']}; spilling: {s['spilling']} "
             f"({s['spilling_unexplained']} without a stated reason); "
             f"over the shared-memory limit: {s['over_smem']}",
             f"- GEMM-loop cases with tensor cores: {s['gemm_tensor_cores']} of "
             f"{s['gemm_cases']}; sm_90 GEMM cases with wgmma: {s['gemm_sm90_wgmma']} of "
             f"{s['gemm_sm90']}",
             f"- CUDA kernels (csrc/*_cuda.cu, setup.py's nvcc flags): {s['cuda_kernels']} "
             f"compiled, {s['cuda_spilling']} spilling; glue files compiled against the CUDA "
             f"torch {TORCH_VERSION} headers: {s['glue_compiled']} of {s['glue_files']}",
             f"- 32-bit address products in kernel sources: {len(offsets)}", ""]
    notes = [r for r in rows if r.get("note")]
    if notes:
        lines += ["## Notes", ""] + [f"- {r['case']} ({r['dtype']}, sm_{r['cc']}): {r['note']}"
                                     for r in notes] + [""]
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
            lines.append(
                f"| {r['family']} | {r['case']} | {r['kernel_name']} | {r['dtype']} | {r['size']}"
                f" | {r['cc']} | {r['num_warps']} | {r['num_stages']} | yes | {r['registers']} |"
                f" {r['spill_store_bytes'] + r['spill_load_bytes']} | {r['stack_bytes']} |"
                f" {r['shared_bytes']} | {tensor_cores(r)} | {r['scalar_fma']} | {find} |")
        else:
            lines.append(f"| {r['family']} | {r['case']} | {r.get('kernel_name')} | {r['dtype']} |"
                         f" {r['size']} | {r['cc']} | {_fmt(r.get('num_warps'))} |"
                         f" {_fmt(r.get('num_stages'))} | no | | | | | | | {find} |")
    lines += ["", "## CUDA kernels (csrc/*_cuda.cu)", "",
              "| family | kernel | dtype | sm | ok | regs | spill B | stack B | smem B |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "cuda":
            if r.get("compiled"):
                lines.append(f"| {r['family']} | `{r['case']}` | {r['dtype']} | {r['cc']} | yes |"
                             f" {r['registers']} | {r['spill_store_bytes'] + r['spill_load_bytes']}"
                             f" | {r['stack_bytes']} | {r['shared_bytes']} |")
            else:
                lines.append(f"| {r['family']} | {r['case']} | | | no: {r['error']} | | | | |")
    lines += ["", "## CUDA glue (csrc/*_cuda_glue.cpp)", "", "| file | compiles | error |",
              "|---|---|---|"]
    for r in rows:
        if r["kind"] == "glue":
            lines.append(f"| {r['case']} | {'yes' if r['compiled'] else 'no'} |"
                         f" {_fmt(r.get('error'))} |")
    return "\n".join(lines) + "\n"


def run(out_dir: str | None, workers: int = 2, with_cuda: bool = True,
        download: bool = True) -> tuple[list[dict], list[str]]:
    _env_for_compile()
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    rows = triton_rows(workers)
    offsets = offset_rows([c for cc in TARGETS[:1] for c in _capture(cc)])
    if with_cuda:
        rows += cuda_rows() + glue_rows(download)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "static.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps({k: v for k, v in r.items() if k != "key"}, sort_keys=True)
                        + "\n")
            for o in offsets:
                f.write(json.dumps({"kind": "offset32", "finding": o}) + "\n")
        with open(os.path.join(out_dir, "static.md"), "w") as f:
            f.write(markdown(rows, offsets))
    return rows, offsets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "static"))
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--no-cuda", action="store_true", help="skip csrc/*.cu and the glue")
    p.add_argument("--no-download", action="store_true",
                   help="do not fetch the CUDA torch headers when they are not cached")
    a = p.parse_args(argv)
    rows, offsets = run(a.out, a.workers, not a.no_cuda, not a.no_download)
    s = summary(rows)
    print(json.dumps(s))
    bad = [(r, v) for r in rows if r["kind"] == "triton" for v in verdicts(r)]
    for r, v in bad:
        print(f"sm_{r['cc']} {r['family']} {r['case']} {r['dtype']} {r['size']}: {v}")
    for o in offsets:
        print("32-bit address product:", o)
    return 1 if bad or offsets else 0


if __name__ == "__main__":
    sys.exit(main())
