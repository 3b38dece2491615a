"""Compiler flags of fastssl._C: one list, read by setup.py (the build) and by bench/static.py
(the static GPU build check), so the check compiles exactly what a GPU install builds; and where
the CUDA toolkit is (setup.py and the GPU run's build part, bench/gpu_parts.py).

No --use_fast_math: the CUDA kernels keep IEEE expf/logf/division, the arithmetic the tests'
tolerances against the float64 reference were set for.

-g0: Python's own CFLAGS (which setuptools passes on) carry -g; debug info made each CPU source
take about half again as long to compile (36.8 s -> 24.4 s for one file), and nothing here
reads it.

FASTSSL_CUDA_ARCHS (e.g. "90"): build the CUDA part for these compute capabilities only; the
GPU run sets it to its device's, which halves nvcc's time. Unset: sm_80 and sm_90.
"""
import os

CUDA_ARCHS = (80, 90)

CXX_FLAGS = ["-O3", "-std=c++17", "-g0"]


def _gencode(archs):
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


NVCC_FLAGS = ["-O3", "-std=c++17"] + _gencode(CUDA_ARCHS)


def cuda_archs() -> tuple:
    """The compute capabilities to build for: $FASTSSL_CUDA_ARCHS or CUDA_ARCHS."""
    value = os.environ.get("FASTSSL_CUDA_ARCHS", "").replace(";", ",").strip()
    if not value:
        return CUDA_ARCHS
    try:
        archs = tuple(int(a.strip().replace(".", "")) for a in value.split(",") if a.strip())
    except ValueError:
        raise ValueError(f"FASTSSL_CUDA_ARCHS must be compute capabilities such as '90' or "
                         f"'80,90', got {value!r}") from None
    if not archs:
        raise ValueError(f"FASTSSL_CUDA_ARCHS names no compute capability: {value!r}")
    return archs


def nvcc_flags() -> list:
    return ["-O3", "-std=c++17"] + _gencode(cuda_archs())


def _which(name):
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(folder, name)
        if folder and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def cuda_home_candidates() -> list:
    """Folders that may hold the CUDA toolkit, most explicit first."""
    out = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = _which("nvcc")
    if nvcc:
        # The real nvcc's folder (a wrapper on PATH, e.g. /usr/local/bin/nvcc, is resolved
        # through its link; torch would guess its parent's parent, /usr/local).
        out.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        out.append(os.path.dirname(os.path.dirname(nvcc)))
    out.append("/usr/local/cuda")
    try:
        out += sorted((os.path.join("/usr/local", d) for d in os.listdir("/usr/local")
                       if d.startswith("cuda-")), reverse=True)
    except OSError:
        pass
    seen, uniq = set(), []
    for c in out:
        if c and c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def find_cuda_home():
    """(folder, note): the first candidate that really holds bin/nvcc and
    include/cuda_runtime.h, or (None, what was looked at)."""
    looked = []
    for c in cuda_home_candidates():
        ok_h = os.path.isfile(os.path.join(c, "include", "cuda_runtime.h"))
        ok_nvcc = os.path.isfile(os.path.join(c, "bin", "nvcc"))
        if ok_h and ok_nvcc:
            return c, f"CUDA_HOME={c}"
        looked.append(f"{c} ({'no include/cuda_runtime.h' if not ok_h else 'no bin/nvcc'})")
    return None, "no CUDA toolkit with bin/nvcc and include/cuda_runtime.h: looked at " + (
        ", ".join(looked) or "nothing (no nvcc on PATH, no /usr/local/cuda)")
