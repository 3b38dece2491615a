// sinkhorn family, CPU (C++ / OpenMP). Placeholder until the family's kernels land.
#include <torch/extension.h>

void init_sinkhorn_cpu(pybind11::module_& m) {}
