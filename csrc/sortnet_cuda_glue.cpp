// sortnet family, torch-facing glue for the CUDA kernels (builds only against a CUDA torch).
#include <torch/extension.h>

void init_sortnet_cuda(pybind11::module_& m) {}
