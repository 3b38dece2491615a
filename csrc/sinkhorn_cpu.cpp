// SwAV Sinkhorn-Knopp, CPU (C++ / OpenMP), float32 and float64.
//
// Log-domain form (see fastssl/ops/sinkhorn.py): with x = s / eps, the codes after n
// iterations are softmax_k(x[b, :] + a) where the prototype log-scalings a come from
//   a  = -logsumexp_b x[b, k]                                  (colstats pass)
//   a -= log sum_b softmax_k(x[b, :] + a)[k]     (n - 1 times, rowpass with write_codes=false)
// so the B x K matrix is only ever read (never a Q matrix written), each pass one read,
// and every exponent is max-shifted (no overflow for any epsilon or input range).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Small problems run on one thread: a parallel region's start and barriers cost more than
// the work below ~32k elements (SwAV's per-GPU 64 x 3000 is above it).
int num_threads(int64_t elements) {
#ifdef _OPENMP
  return elements < 32768 ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// exp(x) for float without branches or calls, so that `omp simd` loops vectorise (std::exp
// does not): Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, the Cephes degree-5
// polynomial for e^r (about 1 ulp), and 2^n built in the exponent bits. Callers pass x <= 0.
__attribute__((always_inline)) inline float exp_simd(float x) {
  const float lo = -87.0f;  // below this e^x is under FLT_MIN: return 0
  const float xc = x < lo ? lo : x;
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * z + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = er * scale;
  return x < lo ? 0.0f : y;
}

__attribute__((always_inline)) inline float exp_t(float x) { return exp_simd(x); }
inline double exp_t(double x) { return std::exp(x); }

void check_scores(const torch::Tensor& s, const char* fn) {
  TORCH_CHECK(s.device().is_cpu(), fn, ": scores must be a CPU tensor, got ", s.device());
  TORCH_CHECK(s.dim() == 2, fn, ": scores must be 2-D (B, K), got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == torch::kFloat32 || s.scalar_type() == torch::kFloat64, fn,
              ": scores must be float32 or float64, got ", s.scalar_type());
  TORCH_CHECK(s.is_contiguous(), fn, ": scores must be contiguous");
  TORCH_CHECK(s.size(0) > 0 && s.size(1) > 0, fn, ": scores must be non-empty, got ", s.sizes());
}

// M[k] = max_b x[b, k], S[k] = sum_b exp(x[b, k] - M[k]), x = s / eps.
template <typename T>
void colstats_impl(const T* s, int64_t B, int64_t K, T eps, T* M, T* S) {
  const int nt = num_threads(B * K);
  std::vector<T> part(static_cast<size_t>(nt) * K);
  std::vector<T> row_total(nt, T(0));
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id();
    T* mine = part.data() + static_cast<size_t>(tid) * K;
    std::fill(mine, mine + K, -std::numeric_limits<T>::infinity());
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* row = s + b * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        const T v = row[k] / eps, cur = mine[k];
        mine[k] = v > cur ? v : cur;  // values, not std::max's references: vectorises
      }
    }
#pragma omp for schedule(static)
    for (int64_t k = 0; k < K; ++k) {
      T m = -std::numeric_limits<T>::infinity();
      for (int t = 0; t < nt; ++t) m = std::max(m, part[static_cast<size_t>(t) * K + k]);
      M[k] = m;
    }
    // implicit barrier: M is complete; reuse the per-thread buffer for the sums
    std::fill(mine, mine + K, T(0));
    std::vector<T> e(K);
    T* eb = e.data();
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* row = s + b * K;
      // gcc 12 vectorises this exp loop only in the form with a live reduction (as in
      // rowpass); the row total is kept per thread (row_total) so that it stays live
      T total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t k = 0; k < K; ++k) {
        const T p = exp_t(row[k] / eps - M[k]);
        eb[k] = p;
        total += p;
      }
      row_total[tid] += total;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) mine[k] += eb[k];
    }
#pragma omp for schedule(static)
    for (int64_t k = 0; k < K; ++k) {
      T acc = 0;
      for (int t = 0; t < nt; ++t) acc += part[static_cast<size_t>(t) * K + k];
      S[k] = acc;
    }
  }
}

// For each row b: p = softmax_k(x[b, :] + a). write_codes: codes[b, :] = p; otherwise
// colsum[k] = sum_b p[k]. One read of the row from memory; the exponentials are kept in a
// per-thread row buffer, so each element costs one exp.
template <typename T>
void rowpass_impl(const T* s, int64_t B, int64_t K, T eps, const T* a, T* codes, T* colsum) {
  const int nt = num_threads(B * K);
  std::vector<T> part(colsum ? static_cast<size_t>(nt) * K : 0);
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id();
    std::vector<T> e(K);
    T* mine = colsum ? part.data() + static_cast<size_t>(tid) * K : nullptr;
    if (mine) std::fill(mine, mine + K, T(0));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* row = s + b * K;
      T* eb = e.data();
      T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t k = 0; k < K; ++k) {
        const T v = row[k] / eps + a[k];
        eb[k] = v;
        m = std::max(m, v);
      }
      T l = 0;
#pragma omp simd reduction(+ : l)
      for (int64_t k = 0; k < K; ++k) {
        const T p = exp_t(eb[k] - m);
        eb[k] = p;
        l += p;
      }
      const T inv = T(1) / l;
      if (codes) {
        T* out = codes + b * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) out[k] = eb[k] * inv;
      } else {
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) mine[k] += eb[k] * inv;
      }
    }
    if (colsum) {
#pragma omp for schedule(static)
      for (int64_t k = 0; k < K; ++k) {
        T acc = 0;
        for (int t = 0; t < nt; ++t) acc += part[static_cast<size_t>(t) * K + k];
        colsum[k] = acc;
      }
    }
  }
}

std::vector<torch::Tensor> sinkhorn_colstats_cpu(const torch::Tensor& s, double eps) {
  check_scores(s, "sinkhorn_colstats_cpu");
  TORCH_CHECK(eps > 0, "sinkhorn_colstats_cpu: eps must be > 0, got ", eps);
  const int64_t B = s.size(0), K = s.size(1);
  auto M = torch::empty({K}, s.options());
  auto S = torch::empty({K}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "sinkhorn_colstats_cpu", [&] {
    colstats_impl<scalar_t>(s.data_ptr<scalar_t>(), B, K, static_cast<scalar_t>(eps),
                            M.data_ptr<scalar_t>(), S.data_ptr<scalar_t>());
  });
  return {M, S};
}

torch::Tensor sinkhorn_rowpass_cpu(const torch::Tensor& s, double eps, const torch::Tensor& a,
                                   bool write_codes) {
  check_scores(s, "sinkhorn_rowpass_cpu");
  TORCH_CHECK(eps > 0, "sinkhorn_rowpass_cpu: eps must be > 0, got ", eps);
  const int64_t B = s.size(0), K = s.size(1);
  TORCH_CHECK(a.device().is_cpu() && a.dim() == 1 && a.size(0) == K && a.is_contiguous() &&
                  a.scalar_type() == s.scalar_type(),
              "sinkhorn_rowpass_cpu: a must be a contiguous CPU vector of K=", K, " ",
              s.scalar_type(), ", got ", a.sizes(), " ", a.scalar_type());
  auto out = write_codes ? torch::empty({B, K}, s.options()) : torch::empty({K}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "sinkhorn_rowpass_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    rowpass_impl<scalar_t>(s.data_ptr<scalar_t>(), B, K, static_cast<scalar_t>(eps),
                           a.data_ptr<scalar_t>(), write_codes ? o : nullptr,
                           write_codes ? nullptr : o);
  });
  return out;
}

}  // namespace

void init_sinkhorn_cpu(pybind11::module_& m) {
  m.def("sinkhorn_colstats_cpu", &sinkhorn_colstats_cpu, pybind11::arg("scores"),
        pybind11::arg("eps"),
        "Column max M and sum S of exp(scores/eps - M) over rows: logsumexp = M + log S");
  m.def("sinkhorn_rowpass_cpu", &sinkhorn_rowpass_cpu, pybind11::arg("scores"),
        pybind11::arg("eps"), pybind11::arg("a"), pybind11::arg("write_codes"),
        "Row softmax of scores/eps + a: the codes, or their column sums");
}
