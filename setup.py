"""Build fastssl and its extension fastssl._C.

The CPU sources in csrc/*_cpu.cpp (plus csrc/bindings.cpp) always build, with OpenMP when the
compiler has it. The CUDA sources (csrc/*_cuda.cu: plain CUDA on raw pointers, and the torch glue
csrc/*_cuda_glue.cpp) build only against a CUDA build of torch with nvcc present.
FASTSSL_BUILD_CUDA=1 forces the CUDA part on (and fails loudly if it cannot build), =0 forces it
off.

Install with the pinned torch already present and without build isolation, so pip does not pull
a different torch into the build environment:
    pip install torch==2.13.0 && pip install --no-build-isolation -e ".[dev]"
The package's metadata is in pyproject.toml; this file holds the build.
"""
import glob
import os
import runpy
import shutil
import subprocess
import tempfile

import setuptools
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# pyproject.toml's license field is an SPDX expression (PEP 639): setuptools < 77 rejects it with
# "project.license must be valid", far from the cause. Without build isolation the installed
# setuptools is used, whatever [build-system] asks. A tree without pyproject.toml (the GPU run
# builds from one, bench/gpu_parts.py) builds with any setuptools.
_ST = tuple(int(x) for x in setuptools.__version__.split(".")[:2] if x.isdigit())
if os.path.exists(os.path.join(ROOT, "pyproject.toml")) and _ST < (77,):
    raise SystemExit(
        f"setup.py: setuptools {setuptools.__version__} is too old for pyproject.toml's license "
        "field (PEP 639): pip install 'setuptools>=77', or build with build isolation (pip "
        "install .)"
    )
# The one list of compiler flags, shared with the static GPU build check (bench/static.py).
FLAGS = runpy.run_path(os.path.join(ROOT, "csrc", "build_flags.py"))

# CUDA_HOME from a folder that really holds include/cuda_runtime.h, chosen before torch guesses
# one: with an nvcc wrapper on PATH (/usr/local/bin/nvcc) torch takes /usr/local and the build
# fails late on `cuda_runtime.h: No such file`.
if os.environ.get("FASTSSL_BUILD_CUDA", "auto").lower() not in ("0", "off", "false", "no"):
    _home, _note = FLAGS["find_cuda_home"]()
    if _home:
        os.environ["CUDA_HOME"] = _home
    else:
        os.environ.pop("CUDA_HOME", None)
        os.environ.pop("CUDA_PATH", None)
        print(f"setup.py: {_note}")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDA_HOME, CUDAExtension  # noqa: E402


def _has_openmp() -> bool:
    """Compile a tiny OpenMP program: the flag is only used where it works."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        res = subprocess.run([cxx, "-fopenmp", src, "-o", os.path.join(tmp, "a.out")],
                             capture_output=True)
        return res.returncode == 0


def _want_cuda() -> bool:
    flag = os.environ.get("FASTSSL_BUILD_CUDA", "auto").lower()
    if flag in ("0", "off", "false", "no"):
        return False
    available = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")))
    if flag in ("1", "on", "true", "yes"):
        if not available:
            raise RuntimeError(
                "FASTSSL_BUILD_CUDA=1 but torch has no CUDA build or nvcc is missing "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
            )
        return True
    return available


def _extension():
    def rel(paths):
        return sorted(os.path.relpath(p, ROOT) for p in paths)

    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*_cpu.cpp"))) + ["csrc/bindings.cpp"]
    depends = rel(glob.glob(os.path.join(ROOT, "csrc", "*.h")))  # rebuild when a header changes
    cxx_flags = list(FLAGS["CXX_FLAGS"])
    link_flags = []
    if _has_openmp():
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if _want_cuda():
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "*_cuda.cu")))
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "*_cuda_glue.cpp")))
        # FLAGS["NVCC_FLAGS"] (sm_80 and sm_90, what bench/static.py checks) unless
        # FASTSSL_CUDA_ARCHS names the GPU's own (the GPU run: half the nvcc time).
        nvcc_flags = (FLAGS["nvcc_flags"]() if os.environ.get("FASTSSL_CUDA_ARCHS")
                      else list(FLAGS["NVCC_FLAGS"]))
        return CUDAExtension("fastssl._C", sources,
                             extra_compile_args={"cxx": cxx_flags + ["-DFASTSSL_WITH_CUDA"],
                                                 "nvcc": nvcc_flags},
                             extra_link_args=link_flags, depends=depends)
    return CppExtension("fastssl._C", sources, extra_compile_args={"cxx": cxx_flags},
                        extra_link_args=link_flags, depends=depends)


def _torch_requirement() -> str:
    """The wheel's torch: the release series it is built against (fastssl._C links to that
    torch's C++ ABI; `import fastssl` warns if another torch is loaded)."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


class _BuildExtWithInfo(BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)):
    """build_ext that also writes fastssl/_build_info.py: the torch (and CUDA) the extension
    was compiled against, read by `import fastssl` to warn about a different torch."""

    def run(self):
        super().run()
        text = ('"""Written by setup.py when fastssl._C was built: the torch it was built '
                'against."""\n'
                f"TORCH_VERSION = {torch.__version__!r}\n"
                f"TORCH_CUDA = {torch.version.cuda!r}\n"
                f"WITH_CUDA = {_want_cuda()!r}\n"
                f"CUDA_ARCHS = {tuple(FLAGS['cuda_archs']()) if _want_cuda() else ()!r}\n")
        targets = [os.path.join(ROOT, "fastssl")]
        if not self.inplace:
            targets.append(os.path.join(self.build_lib, "fastssl"))
        for folder in targets:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "_build_info.py"), "w") as f:
                f.write(text)


# Name, version, description, license, URLs, extras and entry points: pyproject.toml.
setup(
    # The Triton kernels live in the top-level kernels/ folder and the benchmarks in bench/, but
    # install as fastssl.kernels and fastssl.bench: no top-level `kernels` or `bench` module
    # lands in site-packages.
    packages=[
        "fastssl",
        "fastssl.kernels",
        "fastssl.ops",
        "fastssl.functional",
        "fastssl.losses",
        "fastssl.reference",
        "fastssl.compat",
        "fastssl.models",
        "fastssl.data",
        "fastssl.methods",
        "fastssl.train",
        "fastssl.eval",
        "fastssl.bench",
        "fastssl.backends",
        "fastssl.backends.torch",
        "fastssl.backends.ext",
    ],
    package_dir={"fastssl": "fastssl", "fastssl.kernels": "kernels", "fastssl.bench": "bench"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExtWithInfo},
    install_requires=[_torch_requirement(), "numpy"],
    zip_safe=False,
)
