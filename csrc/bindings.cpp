// fastssl._C: one pybind11 module; each kernel family registers its functions from its own file.
#include <torch/extension.h>

void init_contrastive_cpu(pybind11::module_& m);
void init_sortnet_cpu(pybind11::module_& m);
void init_swav_cpu(pybind11::module_& m);
void init_dino_cpu(pybind11::module_& m);
#ifdef FASTSSL_WITH_CUDA
void init_sortnet_cuda(pybind11::module_& m);
void init_swav_cuda(pybind11::module_& m);
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastssl C++ (CPU, OpenMP) and CUDA kernels";
  m.def("with_cuda", []() {
#ifdef FASTSSL_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "whether the CUDA kernels were built");
  m.def("with_openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "whether the CPU kernels were built with OpenMP");
  init_contrastive_cpu(m);
  init_sortnet_cpu(m);
  init_swav_cpu(m);
  init_dino_cpu(m);
#ifdef FASTSSL_WITH_CUDA
  init_sortnet_cuda(m);
  init_swav_cuda(m);
#endif
}
