// DINO family, CPU (C++ / OpenMP): KoLeo's nearest-neighbour search.
//
// For each row i of x (N x D) the index j in x_all (M x D) with the largest inner product
// <x_i, x_all_j>, j != offset + i (the row itself in the gathered batch), the first index
// among ties. Tiled over GEMM blocks: S = x_I x_all_J^T (at::mm, the BLAS: the search runs at
// matrix-product speed; a scalar dot loop ran at a quarter of eager's full x x^T), reduced to a
// running maximum per row, so nothing N x M is held (one bs x bs tile at a time). In a single
// process (x is x_all) S is symmetric: only the tiles J >= I are formed, each serving its rows
// (row maxima) and, transposed, the rows of block J (column maxima): half the products. The
// tiles reach every row in increasing column order and a maximum replaces the running one only
// when strictly larger, so ties keep the first index, as torch.argmax. The teacher targets
// reuse the SwAV row pass (csrc/swav_cpu.cpp).
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Rows per tile side: a 1024 x 1024 float32 tile is 4 MiB, and 1024-row products keep the
// BLAS near its peak at D = 128-1024.
constexpr int64_t kTile = 1024;

// The running maximum of rows [r0, r0 + n) updated with the tile's maxima (v, a + col0).
void update(torch::Tensor& best, torch::Tensor& arg, int64_t r0, const torch::Tensor& v,
            const torch::Tensor& a, int64_t col0) {
  const int64_t n = v.size(0);
  auto b = best.narrow(0, r0, n);
  auto g = arg.narrow(0, r0, n);
  auto take = v.gt(b).logical_or_(g.lt(0));
  b.copy_(torch::where(take, v, b));
  g.copy_(torch::where(take, a + col0, g));
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
  const double ninf = -std::numeric_limits<double>::infinity();
  auto best = torch::full({N}, ninf, x.options());
  auto out = torch::full({N}, -1, x.options().dtype(torch::kLong));
  const bool symmetric = N == M && offset == 0 && x.data_ptr() == x_all.data_ptr();
  for (int64_t r0 = 0; r0 < N; r0 += kTile) {
    const int64_t rn = std::min(kTile, N - r0);
    auto xi = x.narrow(0, r0, rn);
    // symmetric: the tiles left of the diagonal were formed as the transposes of earlier ones
    for (int64_t c0 = symmetric ? r0 : 0; c0 < M; c0 += kTile) {
      const int64_t cn = std::min(kTile, M - c0);
      auto s = at::mm(xi, x_all.narrow(0, c0, cn).t());
      // the row itself: entry (k, k + d) of the tile, row r0 + k against column offset + r0 + k
      const int64_t d = offset + r0 - c0;
      if (d > -rn && d < cn) s.diagonal(d).fill_(ninf);
      auto rows = s.max(1);
      update(best, out, r0, std::get<0>(rows), std::get<1>(rows), c0);
      if (symmetric && c0 > r0) {
        auto cols = s.max(0);  // the rows of block c0 against the columns of block r0
        update(best, out, c0, std::get<0>(cols), std::get<1>(cols), r0);
      }
    }
  }
  return out;
}

}  // namespace

void init_dino_cpu(pybind11::module_& m) {
  m.def("koleo_nearest_cpu", &koleo_nearest_cpu,
        "KoLeo: index of each row's largest inner product in x_all, its own row excluded",
        pybind11::arg("x"), pybind11::arg("x_all"), pybind11::arg("offset"));
}
