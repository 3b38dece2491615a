// DINO family, CPU (C++ / OpenMP): KoLeo's nearest-neighbour search.
//
// For each row i of x (N x D) the index j in x_all (M x D) with the largest inner product
// <x_i, x_all_j>, j != offset + i (the row itself in the gathered batch), the first index
// among ties. Tiled: a block of rows is scored against every column row by row, so nothing
// N x M is ever held (one running maximum per row). The teacher targets reuse the SwAV row
// pass (csrc/swav_cpu.cpp).
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t kRowBlock = 8;

template <typename T>
void nearest_impl(const T* x, const T* xa, int64_t N, int64_t M, int64_t D, int64_t offset,
                  int64_t* out) {
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(static) if (N * M * D > 65536)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t r0 = blk * kRowBlock;
    const int64_t rn = std::min(kRowBlock, N - r0);
    T best[kRowBlock];
    int64_t arg[kRowBlock];
    for (int64_t r = 0; r < rn; ++r) {
      best[r] = -std::numeric_limits<T>::infinity();
      arg[r] = -1;
    }
    // each column row is loaded once per block of rows (kept in cache while scored)
    for (int64_t j = 0; j < M; ++j) {
      const T* c = xa + j * D;
      for (int64_t r = 0; r < rn; ++r) {
        const int64_t i = r0 + r;
        if (j == offset + i) continue;
        const T* a = x + i * D;
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += a[d] * c[d];
        // strict: the first index wins a tie, as torch.argmax
        if (dot > best[r] || arg[r] < 0) {
          best[r] = dot;
          arg[r] = j;
        }
      }
    }
    for (int64_t r = 0; r < rn; ++r) out[r0 + r] = arg[r];
  }
}

torch::Tensor koleo_nearest_cpu(const torch::Tensor& x, const torch::Tensor& x_all,
                                int64_t offset) {
  TORCH_CHECK(x.device().is_cpu() && x_all.device().is_cpu(),
              "koleo_nearest_cpu: x and x_all must be CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x_all.dim() == 2 && x.size(1) == x_all.size(1),
              "koleo_nearest_cpu: x (N, D) and x_all (M, D) expected, got ", x.sizes(), " and ",
              x_all.sizes());
  TORCH_CHECK(x.scalar_type() == x_all.scalar_type() &&
                  (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble),
              "koleo_nearest_cpu: x and x_all must both be float32 or both float64");
  TORCH_CHECK(x.is_contiguous() && x_all.is_contiguous(),
              "koleo_nearest_cpu: x and x_all must be contiguous");
  const int64_t N = x.size(0), M = x_all.size(0), D = x.size(1);
  TORCH_CHECK(M >= 2, "koleo_nearest_cpu: x_all needs at least 2 rows, got ", M);
  TORCH_CHECK(offset >= 0 && offset + N <= M,
              "koleo_nearest_cpu: offset must place x's rows inside x_all, got offset ", offset,
              " for ", N, " rows of ", M);
  auto out = torch::empty({N}, x.options().dtype(torch::kLong));
  if (x.scalar_type() == torch::kFloat) {
    nearest_impl<float>(x.data_ptr<float>(), x_all.data_ptr<float>(), N, M, D, offset,
                        out.data_ptr<int64_t>());
  } else {
    nearest_impl<double>(x.data_ptr<double>(), x_all.data_ptr<double>(), N, M, D, offset,
                         out.data_ptr<int64_t>());
  }
  return out;
}

}  // namespace

void init_dino_cpu(pybind11::module_& m) {
  m.def("koleo_nearest_cpu", &koleo_nearest_cpu,
        "KoLeo: index of each row's largest inner product in x_all, its own row excluded",
        pybind11::arg("x"), pybind11::arg("x_all"), pybind11::arg("offset"));
}
