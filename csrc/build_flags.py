"""Compiler flags of fastssl._C: one list, read by setup.py (the build) and by bench/static.py
(the static GPU build check), so the check compiles exactly what a GPU install builds.

No --use_fast_math: the CUDA kernels keep IEEE expf/logf/division, the arithmetic the tests'
tolerances against the float64 reference were set for.
"""

CUDA_ARCHS = (80, 90)

CXX_FLAGS = ["-O3", "-std=c++17"]

NVCC_FLAGS = ["-O3", "-std=c++17"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
