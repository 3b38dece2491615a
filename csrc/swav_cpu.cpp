// SwAV Sinkhorn-Knopp, CPU (C++ / OpenMP), float32 and float64.
//
// Log-domain form (see fastssl/ops/swav.py): with x = s / eps, the codes after n
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

// exp(x) for float on GCC/Clang vectors of 4 floats (one SSE2/NEON register at the baseline
// ISA; wider vectors are split element-wise by gcc without AVX, which is slower than scalar):
// gcc 12 does not vectorise a scalar exp loop, even under `omp simd`. Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2,
// the Cephes degree-5 polynomial for e^r (about 1 ulp), 2^n built in the exponent bits.
// Arguments below -87 (e^x under FLT_MIN) give 0.
typedef float f4 __attribute__((vector_size(16)));
typedef int32_t i4 __attribute__((vector_size(16)));

template <typename V>
__attribute__((always_inline)) inline V exp_poly(V x) {
  const V lo = V{} - 87.0f;
  const V xc = x < lo ? lo : x;
  const V t = xc * 1.44269504088896341f;
  const V n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const V z = r * r;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * z + r + 1.0f;
}

__attribute__((always_inline)) inline f4 exp_vec(f4 x) {
  const f4 lo = f4{} - 87.0f;
  const f4 er = exp_poly(x);
  const f4 xc = x < lo ? lo : x;
  const f4 n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const i4 bits = (__builtin_convertvector(n, i4) + 127) << 23;
  const f4 y = er * (f4)bits;
  return x < lo ? f4{} : y;
}

inline float exp_scalar(float x) {
  f4 v = f4{} + x;
  return exp_vec(v)[0];
}

// buf[k] = exp(buf[k]) for k < K; returns the sum. Callers pass arguments <= 0.
inline float exp_inplace_sum(float* buf, int64_t K) {
  f4 acc = f4{};
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    f4 v;
    std::memcpy(&v, buf + k, sizeof(v));
    v = exp_vec(v);
    std::memcpy(buf + k, &v, sizeof(v));
    acc += v;
  }
  float total = 0;
  for (int i = 0; i < 4; ++i) total += acc[i];
  for (; k < K; ++k) {
    const float e = exp_scalar(buf[k]);
    buf[k] = e;
    total += e;
  }
  return total;
}

inline double exp_inplace_sum(double* buf, int64_t K) {
  double total = 0;
  for (int64_t k = 0; k < K; ++k) {
    const double e = std::exp(buf[k]);
    buf[k] = e;
    total += e;
  }
  return total;
}

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
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) eb[k] = row[k] / eps - M[k];
      exp_inplace_sum(eb, K);
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
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) eb[k] -= m;
      const T l = exp_inplace_sum(eb, K);
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

// Swapped-prediction cross-entropy, summed over rows: with z = s / T and L = log_softmax(z),
// returns -sum_b <q[b], L[b]> = sum_b (sum_k q[b, k]) * log l_b - sum_k q[b, k] (z - m_b)[k]
// (m_b the row max, l_b = sum_k exp(z - m_b)), and, when grad is given, its gradient in s:
// grad[b, k] = (softmax(z[b])[k] * sum_k q[b, k] - q[b, k]) / T. One read of s and q.
template <typename T>
T swav_ce_impl(const T* s, const T* q, int64_t B, int64_t K, T temp, T* grad) {
  const int nt = num_threads(B * K);
  double total = 0;
#pragma omp parallel num_threads(nt) reduction(+ : total)
  {
    std::vector<T> e(K);
    T* eb = e.data();
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* row = s + b * K;
      const T* qrow = q + b * K;
      T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t k = 0; k < K; ++k) {
        const T v = row[k] / temp;
        eb[k] = v;
        m = std::max(m, v);
      }
      // target sums in double: qs * log l - qz cancels to the loss, float sums of K terms
      // would cost ~1e-5 of log K
      double qs = 0, qz = 0;
#pragma omp simd reduction(+ : qs, qz)
      for (int64_t k = 0; k < K; ++k) {
        const T v = eb[k] - m;
        eb[k] = v;
        qs += static_cast<double>(qrow[k]);
        qz += static_cast<double>(qrow[k]) * static_cast<double>(v);
      }
      const T l = exp_inplace_sum(eb, K);
      total += qs * std::log(static_cast<double>(l)) - qz;
      if (grad) {
        const T scale = static_cast<T>(qs / static_cast<double>(l));
        T* g = grad + b * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) g[k] = (eb[k] * scale - qrow[k]) / temp;
      }
    }
  }
  return static_cast<T>(total);
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

std::vector<torch::Tensor> swav_cross_entropy_cpu(const torch::Tensor& s, const torch::Tensor& q,
                                                  double temperature, bool compute_grad) {
  check_scores(s, "swav_cross_entropy_cpu");
  TORCH_CHECK(temperature > 0, "swav_cross_entropy_cpu: temperature must be > 0, got ", temperature);
  TORCH_CHECK(q.device().is_cpu() && q.sizes() == s.sizes() && q.is_contiguous() &&
                  q.scalar_type() == s.scalar_type(),
              "swav_cross_entropy_cpu: targets must be a contiguous CPU ", s.scalar_type(),
              " tensor of shape ", s.sizes(), ", got ", q.sizes(), " ", q.scalar_type());
  const int64_t B = s.size(0), K = s.size(1);
  auto loss = torch::empty({}, s.options());
  auto grad = compute_grad ? torch::empty({B, K}, s.options()) : torch::empty({0}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "swav_cross_entropy_cpu", [&] {
    loss.fill_(swav_ce_impl<scalar_t>(s.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), B, K,
                                      static_cast<scalar_t>(temperature),
                                      compute_grad ? grad.data_ptr<scalar_t>() : nullptr));
  });
  return {loss, grad};
}

// ---- one-call Sinkhorn with the exponentials cached in the codes buffer ----------------------
//
// The passes above take one exp per score per pass (iterations + 1 of them). Here the codes
// output (B x K, needed anyway) first holds E[b, k] = exp(x[b, k] - M[k]) (M the column max, so
// every column of E has an entry 1 and its sum is >= 1): one exp per score in all. With the
// prototype weights w[k] = exp(a[k] + M[k] - max) in (0, 1] (any common factor cancels in the
// row softmax), p[b, k] = E[b, k] w[k] / sum_k E[b, k] w[k], so each iteration is a
// multiply-add pass over the float cache, without exp, and the last one turns E into the codes
// in place. The weights are kept as logs (la), so a weight far below the largest is exact.
// A row whose largest E w is below 2^-60 of the largest weight (its entries sit ~40 below
// every column max: possible at small eps) could lose mass to float underflow: it is
// recomputed from the scores in the log domain, exactly as the passes above do.
// Scores are read in their own dtype (float16/bfloat16 converted per element): no float copy.
// Extra memory: O(K) per thread, plus the B x K codes in the accumulation dtype.
template <typename In, typename T>
void sinkhorn_cached_impl(const In* s, int64_t B, int64_t K, T eps, int64_t iterations, T* codes) {
  const int nt = num_threads(B * K);
  const T inv_eps = T(1) / eps;
  std::vector<T> part(static_cast<size_t>(nt) * K);
  std::vector<T> M(K), la(K), w(K);
  const T tiny = std::ldexp(T(1), -60);
  T* Mp = M.data();
  T* lap = la.data();
  T* wp = w.data();
  // p row of row b into out (out may alias codes + b K); returns via out; colsum optional.
  auto exact_row = [&](int64_t b, T* buf, T* out) {
    const In* row = s + b * K;
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t k = 0; k < K; ++k) {
      const T v = static_cast<T>(row[k]) * inv_eps - Mp[k] + lap[k];
      buf[k] = v;
      m = std::max(m, v);
    }
    for (int64_t k = 0; k < K; ++k) buf[k] -= m;
    const T inv = T(1) / exp_inplace_sum(buf, K);
    for (int64_t k = 0; k < K; ++k) out[k] = buf[k] * inv;
  };
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id();
    T* mine = part.data() + static_cast<size_t>(tid) * K;
    std::vector<T> buf(K);
    T* eb = buf.data();
    std::fill(mine, mine + K, -std::numeric_limits<T>::infinity());
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const In* row = s + b * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        const T v = static_cast<T>(row[k]), cur = mine[k];
        mine[k] = v > cur ? v : cur;
      }
    }
#pragma omp for schedule(static)
    for (int64_t k = 0; k < K; ++k) {
      T m = -std::numeric_limits<T>::infinity();
      for (int t = 0; t < nt; ++t) m = std::max(m, part[static_cast<size_t>(t) * K + k]);
      Mp[k] = m * inv_eps;
    }
    std::fill(mine, mine + K, T(0));
    // E = exp(x - M) into the codes buffer, column sums S.
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const In* row = s + b * K;
      T* e = codes + b * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) e[k] = static_cast<T>(row[k]) * inv_eps - Mp[k];
      exp_inplace_sum(e, K);
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) mine[k] += e[k];
    }
#pragma omp for schedule(static)
    for (int64_t k = 0; k < K; ++k) {
      T acc = 0;
      for (int t = 0; t < nt; ++t) acc += part[static_cast<size_t>(t) * K + k];
      lap[k] = -std::log(acc);  // a + M = -log S
    }
    for (int64_t it = 0; it < iterations; ++it) {
      const bool last = it + 1 == iterations;
#pragma omp single
      {
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t k = 0; k < K; ++k) mx = std::max(mx, lap[k]);
        for (int64_t k = 0; k < K; ++k) {
          lap[k] -= mx;
          wp[k] = std::exp(lap[k]);
        }
      }  // implicit barrier
      if (!last) std::fill(mine, mine + K, T(0));
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        T* e = codes + b * K;
        T dot = 0, top = 0;
#pragma omp simd reduction(+ : dot) reduction(max : top)
        for (int64_t k = 0; k < K; ++k) {
          const T v = e[k] * wp[k];
          dot += v;
          top = top > v ? top : v;
        }
        const bool exact = !(top >= tiny);
        if (last) {
          if (exact) {
            exact_row(b, eb, e);
          } else {
            const T inv = T(1) / dot;
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) e[k] = e[k] * wp[k] * inv;
          }
        } else if (exact) {
          exact_row(b, eb, eb);
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) mine[k] += eb[k];
        } else {
          const T inv = T(1) / dot;
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) mine[k] += e[k] * wp[k] * inv;
        }
      }
      if (!last) {
#pragma omp for schedule(static)
        for (int64_t k = 0; k < K; ++k) {
          T acc = 0;
          for (int t = 0; t < nt; ++t) acc += part[static_cast<size_t>(t) * K + k];
          lap[k] -= std::log(acc);
        }
      }
    }
  }
}

torch::Tensor sinkhorn_cached_cpu(const torch::Tensor& s, double eps, int64_t iterations) {
  TORCH_CHECK(s.device().is_cpu(), "sinkhorn_cached_cpu: scores must be a CPU tensor, got ", s.device());
  TORCH_CHECK(s.dim() == 2 && s.size(0) > 0 && s.size(1) > 0,
              "sinkhorn_cached_cpu: scores must be non-empty 2-D (B, K), got ", s.sizes());
  TORCH_CHECK(s.is_contiguous(), "sinkhorn_cached_cpu: scores must be contiguous");
  TORCH_CHECK(eps > 0, "sinkhorn_cached_cpu: eps must be > 0, got ", eps);
  TORCH_CHECK(iterations >= 1, "sinkhorn_cached_cpu: iterations must be >= 1, got ", iterations);
  const int64_t B = s.size(0), K = s.size(1);
  const auto st = s.scalar_type();
  const bool dbl = st == torch::kFloat64;
  auto codes = torch::empty({B, K}, s.options().dtype(dbl ? torch::kFloat64 : torch::kFloat32));
  if (dbl) {
    sinkhorn_cached_impl<double, double>(s.data_ptr<double>(), B, K, eps, iterations,
                                         codes.data_ptr<double>());
  } else if (st == torch::kFloat32) {
    sinkhorn_cached_impl<float, float>(s.data_ptr<float>(), B, K, static_cast<float>(eps),
                                       iterations, codes.data_ptr<float>());
  } else if (st == torch::kFloat16) {
    sinkhorn_cached_impl<c10::Half, float>(s.data_ptr<c10::Half>(), B, K, static_cast<float>(eps),
                                           iterations, codes.data_ptr<float>());
  } else if (st == torch::kBFloat16) {
    sinkhorn_cached_impl<c10::BFloat16, float>(s.data_ptr<c10::BFloat16>(), B, K,
                                               static_cast<float>(eps), iterations,
                                               codes.data_ptr<float>());
  } else {
    TORCH_CHECK(false, "sinkhorn_cached_cpu: scores must be float16, bfloat16, float32 or float64, got ", st);
  }
  return codes;
}

}  // namespace

void init_swav_cpu(pybind11::module_& m) {
  m.def("sinkhorn_colstats_cpu", &sinkhorn_colstats_cpu, pybind11::arg("scores"),
        pybind11::arg("eps"),
        "Column max M and sum S of exp(scores/eps - M) over rows: logsumexp = M + log S");
  m.def("sinkhorn_rowpass_cpu", &sinkhorn_rowpass_cpu, pybind11::arg("scores"),
        pybind11::arg("eps"), pybind11::arg("a"), pybind11::arg("write_codes"),
        "Row softmax of scores/eps + a: the codes, or their column sums");
  m.def("sinkhorn_cached_cpu", &sinkhorn_cached_cpu, pybind11::arg("scores"), pybind11::arg("eps"),
        pybind11::arg("iterations"),
        "Sinkhorn codes in one call: scores read in their dtype, exponentials cached in the codes");
  m.def("swav_cross_entropy_cpu", &swav_cross_entropy_cpu, pybind11::arg("scores"),
        pybind11::arg("targets"), pybind11::arg("temperature"), pybind11::arg("compute_grad"),
        "Sum over rows of -<targets, log_softmax(scores / T)>, and its gradient in scores");
}
