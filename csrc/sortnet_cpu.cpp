// sortnet family, CPU (C++ / OpenMP). Placeholder until the family's kernels land.
#include <torch/extension.h>

void init_sortnet_cpu(pybind11::module_& m) {}
