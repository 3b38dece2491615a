// SwAV Sinkhorn-Knopp, CPU (C++ / OpenMP), float32 and float64.
//
// Log-domain form (see fastssl/ops/swav.py): with x = s / eps, the codes after n
// iterations are softmax_k(x[b, :] + a) where the prototype log-scalings a come from
//   a  = -logsumexp_b x[b, k]                                  (colstats pass)
//   a -= log sum_b softmax_k(x[b, :] + a)[k]     (n - 1 times, rowpass with write_codes=false)
// so the B x K matrix is only ever read (never a Q matrix written), each pass one read,
// and every exponent is max-shifted (no overflow for any epsilon or input range).
#include <atomic>
#include <torch/extension.h>

#include "vec_exp.h"

// The vector kernels pass 32/64-byte vectors only between always-inline functions; the note
// that their ABI differs without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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
using fastssl_vec::exp_poly;
using fastssl_vec::Vec;
using fastssl_vec::vexp;
using fastssl_vec::vload;
using fastssl_vec::vstore;

typedef float f4 __attribute__((vector_size(16)));
typedef int32_t i4 __attribute__((vector_size(16)));


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

// A new B x K output is often fresh memory from mmap, whose first write takes a page fault per
// 4 KiB page: for 49 MB (B = 4096, K = 3000) about 20 ms, more than the Sinkhorn itself, and
// no faster on two threads. Transparent huge pages cut that to a fault per 2 MiB; the kernel
// only gives them to a range marked MADV_HUGEPAGE when THP is in its usual "madvise" mode.
// The mark is advice on memory this op just allocated (what torch's THP_MEM_ALLOC_ENABLE does
// for every large allocation); only whole 2 MiB pages inside the buffer are marked.
// Kept only where an A/B showed it helps in a training loop's mode (issue 25: outputs kept
// alive, last 2 per provider, and dropped; advice on/off interleaved in one process, median
// of 17, one thread, THP enabled=madvise defrag=madvise, a loaded 2-core machine): Sinkhorn
// codes (sinkhorn_cached_cpu), kept outputs, advice on / off: B = 4096, K = 3000: float32
// 361 / 477 ms, bfloat16 276 / 362, float16 448 / 509; B = 1024, K = 16384: 435 / 506,
// 850 / 842, 779 / 1017 (dropped outputs: 1.2-1.8x faster with advice in all six). Each call took
// ~22 huge-page faults and no compaction stall (/proc/vmstat compact_stall unchanged; 1069
// free order-10 blocks): with memory too fragmented for a free 2 MiB page, defrag=madvise
// compacts synchronously on these faults (the 64-69 ms mode the issue saw). Not used for the
// SwAV cross-entropy gradient (no gain measured in the loss's forward+backward, B = 1024 x 2
// crops and 512 x 8 crops, K = 3000: on/off within the noise, only 0.3-3.6 huge-page faults a
// step, so its buffers mostly reuse mapped memory) nor the distributed row pass (not measured).
// The advice alone is bimodal in a loop that keeps its outputs: whether a fault finds a free
// 2 MiB page varies call to call. Prefaulting the whole buffer in one call
// (MADV_POPULATE_WRITE, after the hugepage mark) removed the slow mode (python -m
// bench.sinkhorn_thp, quiet, 2 threads, THP madvise/madvise, kept outputs, median [p20-p80],
// none / hugepage / hugepage+populate): B = 1024, K = 16384 bfloat16 103.0 [101-109] /
// 75.6 [72-134] / 77.5 [75-81] ms, float16 103.7 / 78.9 [75-131] / 78.6 [76-83], float32
// 99.8 / 71.6 [69-136] / 74.1 [72-80]; B = 4096, K = 3000 bfloat16 62.0 [48-73] / 57.5
// [48-91] / 53.4 [50-55], float32 74.4 / 60.0 [52-102] / 58.7 [56-61]. Populate alone was
// slower than none (4 KiB pages). At 16 MiB (B = 256, K = 16384) the prefault cost ~2 ms more
// than the advice alone (steady there), so it applies from kPopulateBytes.
// Settable for the A/B (swav_huge_page_advice): bit 0 MADV_HUGEPAGE, bit 1 MADV_POPULATE_WRITE.
std::atomic<int> g_huge_advice{3};
constexpr size_t kPopulateBytes = size_t(32) << 20;

void advise_huge_pages(const torch::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int mode = g_huge_advice.load();
  if (mode == 0) return;
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t n = t.nbytes();
  if (n < 2 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + n) & ~(kHuge - 1);
  if ((mode & 1) && hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#ifdef MADV_POPULATE_WRITE
  constexpr uintptr_t kPage = 4096;
  const uintptr_t plo = p & ~(kPage - 1);
  if ((mode & 2) && n >= kPopulateBytes)  // advice only: an older kernel returns EINVAL
    madvise(reinterpret_cast<void*>(plo), p + n - plo, MADV_POPULATE_WRITE);
#endif
#else
  (void)t;
#endif
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
// grad[b, k] = (softmax(z[b])[k] * sum_k q[b, k] - q[b, k]) / T, times grad_scale (the
// backward's incoming gradient, folded in). One read of s and q.
template <typename T>
T swav_ce_impl(const T* s, const T* q, int64_t B, int64_t K, T temp, T* grad, T grad_scale) {
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
        for (int64_t k = 0; k < K; ++k) g[k] = (eb[k] * scale - qrow[k]) / temp * grad_scale;
      }
    }
  }
  return static_cast<T>(total);
}

// float32 / float16 / bfloat16 cross-entropy rows through the vector kernels (defined with them
// below)
template <typename In>
float swav_ce_float(const In* s, const float* q, int64_t B, int64_t K, float temp, float* grad,
                    float grad_scale);

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

// Scores float32/float64, or float16/bfloat16 read as they are (float targets, float loss and
// gradient): the swapped-prediction cross-entropy and, with compute_grad, its gradient in s.
std::vector<torch::Tensor> swav_cross_entropy_cpu(const torch::Tensor& s, const torch::Tensor& q,
                                                  double temperature, bool compute_grad,
                                                  double grad_scale) {
  const bool half = s.scalar_type() == torch::kHalf || s.scalar_type() == torch::kBFloat16;
  if (half) {
    TORCH_CHECK(s.device().is_cpu() && s.dim() == 2 && s.is_contiguous() && s.numel() > 0,
                "swav_cross_entropy_cpu: scores must be a non-empty contiguous 2-D CPU tensor, "
                "got ", s.sizes(), " on ", s.device());
  } else {
    check_scores(s, "swav_cross_entropy_cpu");
  }
  TORCH_CHECK(temperature > 0, "swav_cross_entropy_cpu: temperature must be > 0, got ", temperature);
  const auto acc = half ? torch::kFloat32 : s.scalar_type();
  TORCH_CHECK(q.device().is_cpu() && q.sizes() == s.sizes() && q.is_contiguous() &&
                  q.scalar_type() == acc,
              "swav_cross_entropy_cpu: targets must be a contiguous CPU ", acc,
              " tensor of shape ", s.sizes(), ", got ", q.sizes(), " ", q.scalar_type());
  const int64_t B = s.size(0), K = s.size(1);
  const auto opts = s.options().dtype(acc);
  auto loss = torch::empty({}, opts);
  auto grad = compute_grad ? torch::empty({B, K}, opts) : torch::empty({0}, opts);
  float* gp = compute_grad && acc == torch::kFloat32 ? grad.data_ptr<float>() : nullptr;
  const float t = static_cast<float>(temperature), gs = static_cast<float>(grad_scale);
  if (s.scalar_type() == torch::kFloat32) {
    loss.fill_(swav_ce_float(s.data_ptr<float>(), q.data_ptr<float>(), B, K, t, gp, gs));
  } else if (s.scalar_type() == torch::kHalf) {
    loss.fill_(swav_ce_float(s.data_ptr<c10::Half>(), q.data_ptr<float>(), B, K, t, gp, gs));
  } else if (s.scalar_type() == torch::kBFloat16) {
    loss.fill_(swav_ce_float(s.data_ptr<c10::BFloat16>(), q.data_ptr<float>(), B, K, t, gp, gs));
  } else {
    loss.fill_(swav_ce_impl<double>(s.data_ptr<double>(), q.data_ptr<double>(), B, K, temperature,
                                    compute_grad ? grad.data_ptr<double>() : nullptr, grad_scale));
  }
  return {loss, grad};
}

// The same with the scale as a one-element CPU tensor (the backward's incoming gradient), read
// here: a CPU value read costs no device sync, and the Python side makes no host read.
std::vector<torch::Tensor> swav_cross_entropy_scaled_cpu(const torch::Tensor& s, const torch::Tensor& q,
                                                         double temperature, bool compute_grad,
                                                         const torch::Tensor& grad_scale) {
  TORCH_CHECK(grad_scale.device().is_cpu() && grad_scale.numel() == 1 &&
                  at::isFloatingType(grad_scale.scalar_type()),
              "swav_cross_entropy_scaled_cpu: grad_scale must be a one-element floating CPU tensor, got ",
              grad_scale.sizes(), " ", grad_scale.scalar_type(), " on ", grad_scale.device());
  return swav_cross_entropy_cpu(s, q, temperature, compute_grad, grad_scale.item<double>());
}

// ---- vector row kernels, one build per x86 ISA level, chosen at run time ------------------
//
// The wheel is built for the baseline ISA (SSE2 on x86-64), where the kernels above run 4 floats
// at a time. The hot row loops of the one-call Sinkhorn and of the cross-entropy are also
// compiled for AVX2+FMA (8 floats) and AVX-512 (16 floats) through function target attributes,
// and the widest the CPU (and OS) supports is picked once at load, as torch's own CPU kernels
// do, so no -march flag is needed. The arithmetic is the same at every width (the exp
// polynomial above); only the order of the row sums differs.
// bfloat16 is the top half of a float: widen and shift the bits (exact).
template <int W>
FASTSSL_INLINE typename Vec<W>::f vload(const c10::BFloat16* p) {
  typename Vec<W>::h raw;
  std::memcpy(&raw, p, sizeof(raw));
  const typename Vec<W>::u bits = __builtin_convertvector(raw, typename Vec<W>::u) << 16;
  return (typename Vec<W>::f)bits;
}

// IEEE half to float from the bit fields (exact, subnormals, inf and nan included): the
// exponent is rebased from 15 to 127; subnormal halves are renormalised by one float
// subtraction; inf/nan get the float's all-ones exponent.
template <int W>
FASTSSL_INLINE typename Vec<W>::f vload(const c10::Half* p) {
  using U = typename Vec<W>::u;
  using F = typename Vec<W>::f;
  typename Vec<W>::h raw;
  std::memcpy(&raw, p, sizeof(raw));
  const U h = __builtin_convertvector(raw, U);
  U o = (h & 0x7fffu) << 13;
  const U e = o & (0x7c00u << 13);
  o += (127u - 15u) << 23;
  o = e == (0x7c00u << 13) ? o + ((128u - 16u) << 23) : o;
  const F sub = (F)(o + (1u << 23)) - 6.103515625e-05f;  // 2^-14, the float of exponent 113
  o = e == 0u ? (U)sub : o;
  return (F)(o | ((h & 0x8000u) << 16));
}

template <int W>
FASTSSL_INLINE float hsum(typename Vec<W>::f v) {
  float t = 0;
  for (int j = 0; j < W; ++j) t += v[j];
  return t;
}

// Double accumulators as two native-width halves (lanes [0, W/2) and [W/2, W)): a W-lane
// double vector is twice the register width, and GCC kept it on the stack with a store-forward
// and shuffles every iteration (2.2-2.5 ns an element, 4-6x the arithmetic; issue 25). Each
// lane accumulates exactly as before and hsum adds the lanes in the same order: the same sums.
template <int W>
struct Wide {
  typedef typename Vec<W / 2>::f hf;
  typedef typename Vec<W / 2>::d hd;
  hd lo{}, hi{};
  FASTSSL_INLINE static void halves(typename Vec<W>::f v, hd& a, hd& b) {
    hf x, y;
    __builtin_memcpy(&x, &v, sizeof(hf));
    __builtin_memcpy(&y, reinterpret_cast<const char*>(&v) + sizeof(hf), sizeof(hf));
    a = __builtin_convertvector(x, hd);
    b = __builtin_convertvector(y, hd);
  }
  FASTSSL_INLINE void add(typename Vec<W>::f v) {  // += v
    hd a, b;
    halves(v, a, b);
    lo += a;
    hi += b;
  }
  FASTSSL_INLINE void add_product(typename Vec<W>::f u, typename Vec<W>::f v) {  // += u v
    hd a, b, c, d;
    halves(u, a, b);
    halves(v, c, d);
    lo += a * c;
    hi += b * d;
  }
  FASTSSL_INLINE double sum() const {
    double t = 0;
    for (int j = 0; j < W / 2; ++j) t += lo[j];
    for (int j = 0; j < W / 2; ++j) t += hi[j];
    return t;
  }
};

template <int W>
FASTSSL_INLINE float hmax(typename Vec<W>::f v) {
  float t = v[0];
  for (int j = 1; j < W; ++j) t = v[j] > t ? v[j] : t;
  return t;
}

// mine[k] = max(mine[k], row[k]) (NaN-free inputs; the comparison order of the scalar loop)
template <int W, typename In>
FASTSSL_INLINE void k_colmax(const In* row, float* mine, int64_t K) {
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    const auto v = vload<W>(row + k), m = vload<W>(mine + k);
    vstore<W>(mine + k, v > m ? v : m);
  }
  for (; k < K; ++k) {
    const float v = static_cast<float>(row[k]);
    mine[k] = v > mine[k] ? v : mine[k];
  }
}

// e[k] = exp((row[k] - M[k]) * inv_eps), M the raw column max; acc[k] += e[k]
template <int W, typename In>
FASTSSL_INLINE void k_expsum(const In* row, float inv_eps, const float* M, float* e, float* acc,
                             int64_t K) {
  // The difference is taken before the scaling: the column max's own entry is exactly 0 and
  // its exp exactly 1, so every column sums to >= 1. As row * inv_eps - M * inv_eps, a fused
  // multiply-add (rounded once, where M * inv_eps was rounded before) left it anywhere within
  // half an ulp of |x|: at |scores / eps| ~ 1e9, exp(+-100), i.e. inf or 0, and NaN codes.
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    const auto v = vexp<W>((vload<W>(row + k) - vload<W>(M + k)) * inv_eps);
    vstore<W>(e + k, v);
    vstore<W>(acc + k, vload<W>(acc + k) + v);
  }
  if (k < K) {  // the tail as one padded vector (padding: exp(-inf) = 0)
    float x[W];
    for (int j = 0; j < W; ++j)
      x[j] = k + j < K ? (static_cast<float>(row[k + j]) - M[k + j]) * inv_eps
                       : -std::numeric_limits<float>::infinity();
    const auto v = vexp<W>(vload<W>(x));
    for (int64_t j = 0; k + j < K; ++j) {
      e[k + j] = v[j];
      acc[k + j] += v[j];
    }
  }
}

// dot = sum_k e[k] w[k], top = max_k e[k] w[k]. The sum runs in double: the codes are the
// products over dot, so each row then sums to 1 within about one float rounding.
template <int W>
FASTSSL_INLINE void k_dot_top(const float* e, const float* w, int64_t K, float* dot, float* top) {
  using F = typename Vec<W>::f;
  Wide<W> d;
  F t = F{};
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    const F v = vload<W>(e + k) * vload<W>(w + k);
    d.add(v);
    t = v > t ? v : t;
  }
  double ds = d.sum();
  float ts = hmax<W>(t);
  for (; k < K; ++k) {
    const float v = e[k] * w[k];
    ds += static_cast<double>(v);
    ts = v > ts ? v : ts;
  }
  *dot = static_cast<float>(ds);
  *top = ts;
}

// e[k] = e[k] w[k] inv
template <int W>
FASTSSL_INLINE void k_scale_store(float* e, const float* w, float inv, int64_t K) {
  int64_t k = 0;
  for (; k + W <= K; k += W) vstore<W>(e + k, vload<W>(e + k) * vload<W>(w + k) * inv);
  for (; k < K; ++k) e[k] = e[k] * w[k] * inv;
}

// acc[k] += e[k] w[k] inv
template <int W>
FASTSSL_INLINE void k_scale_acc(float* acc, const float* e, const float* w, float inv, int64_t K) {
  int64_t k = 0;
  for (; k + W <= K; k += W)
    vstore<W>(acc + k, vload<W>(acc + k) + vload<W>(e + k) * vload<W>(w + k) * inv);
  for (; k < K; ++k) acc[k] += e[k] * w[k] * inv;
}

// One row of the swapped-prediction cross-entropy (see swav_ce_impl): returns
// (sum_k q) log l - sum_k q (z - m), z = s / T; with grad, writes (softmax(z) sum_k q - q) gmul,
// gmul = grad_scale / T (the backward's incoming gradient folded in: no pass to scale it).
// The target sums run in double (float sums of K terms would cost ~1e-5 of log K).
// Scores are read in their own dtype (float16/bfloat16 widened per vector, as the Sinkhorn
// reads them): no float32 copy of the B x K scores per call.
template <int W, typename In>
FASTSSL_INLINE double k_ce_row(const In* s, const float* q, int64_t K, float inv_t,
                               float gmul, float* grad) {
  using F = typename Vec<W>::f;
  F mv = F{} - std::numeric_limits<float>::infinity();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    const F v = vload<W>(s + k);
    mv = v > mv ? v : mv;
  }
  float m = hmax<W>(mv);
  for (; k < K; ++k) m = static_cast<float>(s[k]) > m ? static_cast<float>(s[k]) : m;
  // z - m = s / T - m / T; m / T is the max of s / T (division by T > 0 keeps the order)
  const float mz = m * inv_t;
  F lv = F{};
  Wide<W> qs, qz;
  for (k = 0; k + W <= K; k += W) {
    const F d = vload<W>(s + k) * inv_t - mz;
    const F e = vexp<W>(d);
    const F qv = vload<W>(q + k);
    lv += e;
    qs.add(qv);
    qz.add_product(qv, d);
    if (grad) vstore<W>(grad + k, e);
  }
  float l = hsum<W>(lv);
  double qss = qs.sum(), qzs = qz.sum();
  if (k < K) {  // the tail as one padded vector: padded d = -inf gives e = 0, padded q = 0
    float d[W], qt[W];
    for (int j = 0; j < W; ++j) {
      const bool in = k + j < K;
      d[j] = in ? static_cast<float>(s[k + j]) * inv_t - mz
                : -std::numeric_limits<float>::infinity();
      qt[j] = in ? q[k + j] : 0.0f;
    }
    const F e = vexp<W>(vload<W>(d));
    for (int64_t j = 0; k + j < K; ++j) {
      l += e[j];
      qss += static_cast<double>(qt[j]);
      qzs += static_cast<double>(qt[j]) * static_cast<double>(d[j]);
      if (grad) grad[k + j] = e[j];
    }
  }
  if (grad) {
    const float scale = static_cast<float>(qss / static_cast<double>(l));
    for (k = 0; k + W <= K; k += W)
      vstore<W>(grad + k, (vload<W>(grad + k) * scale - vload<W>(q + k)) * gmul);
    for (; k < K; ++k) grad[k] = (grad[k] * scale - q[k]) * gmul;
  }
  return qss * std::log(static_cast<double>(l)) - qzs;
}

struct RowKernels {
  const char* name;
  void (*colmax_f)(const float*, float*, int64_t);
  void (*colmax_h)(const c10::Half*, float*, int64_t);
  void (*colmax_b)(const c10::BFloat16*, float*, int64_t);
  void (*expsum_f)(const float*, float, const float*, float*, float*, int64_t);
  void (*expsum_h)(const c10::Half*, float, const float*, float*, float*, int64_t);
  void (*expsum_b)(const c10::BFloat16*, float, const float*, float*, float*, int64_t);
  void (*dot_top)(const float*, const float*, int64_t, float*, float*);
  void (*scale_store)(float*, const float*, float, int64_t);
  void (*scale_acc)(float*, const float*, const float*, float, int64_t);
  double (*ce_row)(const float*, const float*, int64_t, float, float, float*);
  double (*ce_row_h)(const c10::Half*, const float*, int64_t, float, float, float*);
  double (*ce_row_b)(const c10::BFloat16*, const float*, int64_t, float, float, float*);
};

#define FASTSSL_ROW_KERNELS(NS, W, TARGET)                                                        \
  namespace NS {                                                                                \
  TARGET void colmax_f(const float* r, float* m, int64_t K) { k_colmax<W>(r, m, K); }          \
  TARGET void colmax_h(const c10::Half* r, float* m, int64_t K) { k_colmax<W>(r, m, K); }      \
  TARGET void colmax_b(const c10::BFloat16* r, float* m, int64_t K) { k_colmax<W>(r, m, K); }  \
  TARGET void expsum_f(const float* r, float ie, const float* M, float* e, float* a, int64_t K) { \
    k_expsum<W>(r, ie, M, e, a, K);                                                             \
  }                                                                                             \
  TARGET void expsum_h(const c10::Half* r, float ie, const float* M, float* e, float* a,        \
                       int64_t K) {                                                             \
    k_expsum<W>(r, ie, M, e, a, K);                                                             \
  }                                                                                             \
  TARGET void expsum_b(const c10::BFloat16* r, float ie, const float* M, float* e, float* a,    \
                       int64_t K) {                                                             \
    k_expsum<W>(r, ie, M, e, a, K);                                                             \
  }                                                                                             \
  TARGET void dot_top(const float* e, const float* w, int64_t K, float* d, float* t) {          \
    k_dot_top<W>(e, w, K, d, t);                                                                \
  }                                                                                             \
  TARGET void scale_store(float* e, const float* w, float inv, int64_t K) {                     \
    k_scale_store<W>(e, w, inv, K);                                                             \
  }                                                                                             \
  TARGET void scale_acc(float* a, const float* e, const float* w, float inv, int64_t K) {       \
    k_scale_acc<W>(a, e, w, inv, K);                                                            \
  }                                                                                             \
  TARGET double ce_row(const float* s, const float* q, int64_t K, float it, float gm, float* g) { \
    return k_ce_row<W>(s, q, K, it, gm, g);                                                     \
  }                                                                                             \
  TARGET double ce_row_h(const c10::Half* s, const float* q, int64_t K, float it, float gm,     \
                         float* g) {                                                            \
    return k_ce_row<W>(s, q, K, it, gm, g);                                                     \
  }                                                                                             \
  TARGET double ce_row_b(const c10::BFloat16* s, const float* q, int64_t K, float it, float gm, \
                         float* g) {                                                            \
    return k_ce_row<W>(s, q, K, it, gm, g);                                                     \
  }                                                                                             \
  const RowKernels table = {#NS,     colmax_f, colmax_h,    colmax_b,  expsum_f, expsum_h,       \
                            expsum_b, dot_top,  scale_store, scale_acc, ce_row,   ce_row_h,      \
                            ce_row_b};                                                          \
  }

FASTSSL_ROW_KERNELS(baseline, 4, )
#if defined(__GNUC__) && defined(__x86_64__)
#define FASTSSL_X86_DISPATCH 1
FASTSSL_ROW_KERNELS(avx2, 8, __attribute__((target("avx2,fma"))))
FASTSSL_ROW_KERNELS(avx512, 16, __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))))
#endif

std::vector<const RowKernels*> available_kernels() {
  std::vector<const RowKernels*> out{&baseline::table};
#ifdef FASTSSL_X86_DISPATCH
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.push_back(&avx2::table);
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    out.push_back(&avx512::table);
#endif
  return out;
}

// The widest available; swav_cpu_isa() can pick another (the tests run each).
const RowKernels* g_rows = available_kernels().back();

// Row operations of the one-call Sinkhorn: float rows through the chosen kernels, double rows
// as plain loops (float64 keeps std::exp).
inline void row_colmax(const float* r, float* m, int64_t K) { g_rows->colmax_f(r, m, K); }
inline void row_colmax(const c10::Half* r, float* m, int64_t K) { g_rows->colmax_h(r, m, K); }
inline void row_colmax(const c10::BFloat16* r, float* m, int64_t K) { g_rows->colmax_b(r, m, K); }
inline void row_colmax(const double* r, double* m, int64_t K) {
  for (int64_t k = 0; k < K; ++k) m[k] = r[k] > m[k] ? r[k] : m[k];
}
inline void row_expsum(const float* r, float ie, const float* M, float* e, float* a, int64_t K) {
  g_rows->expsum_f(r, ie, M, e, a, K);
}
inline void row_expsum(const c10::Half* r, float ie, const float* M, float* e, float* a,
                       int64_t K) {
  g_rows->expsum_h(r, ie, M, e, a, K);
}
inline void row_expsum(const c10::BFloat16* r, float ie, const float* M, float* e, float* a,
                       int64_t K) {
  g_rows->expsum_b(r, ie, M, e, a, K);
}
inline void row_expsum(const double* r, double ie, const double* M, double* e, double* a,
                       int64_t K) {
  for (int64_t k = 0; k < K; ++k) e[k] = (r[k] - M[k]) * ie;  // M raw, as k_expsum
  exp_inplace_sum(e, K);
  for (int64_t k = 0; k < K; ++k) a[k] += e[k];
}
inline void row_dot_top(const float* e, const float* w, int64_t K, float* d, float* t) {
  g_rows->dot_top(e, w, K, d, t);
}
inline void row_dot_top(const double* e, const double* w, int64_t K, double* d, double* t) {
  double dot = 0, top = 0;
  for (int64_t k = 0; k < K; ++k) {
    const double v = e[k] * w[k];
    dot += v;
    top = top > v ? top : v;
  }
  *d = dot;
  *t = top;
}
inline void row_scale_store(float* e, const float* w, float inv, int64_t K) {
  g_rows->scale_store(e, w, inv, K);
}
inline void row_scale_store(double* e, const double* w, double inv, int64_t K) {
  for (int64_t k = 0; k < K; ++k) e[k] = e[k] * w[k] * inv;
}
inline void row_scale_acc(float* a, const float* e, const float* w, float inv, int64_t K) {
  g_rows->scale_acc(a, e, w, inv, K);
}
inline void row_scale_acc(double* a, const double* e, const double* w, double inv, int64_t K) {
  for (int64_t k = 0; k < K; ++k) a[k] += e[k] * w[k] * inv;
}

inline double ce_row(const float* s, const float* q, int64_t K, float it, float gm, float* g) {
  return g_rows->ce_row(s, q, K, it, gm, g);
}
inline double ce_row(const c10::Half* s, const float* q, int64_t K, float it, float gm, float* g) {
  return g_rows->ce_row_h(s, q, K, it, gm, g);
}
inline double ce_row(const c10::BFloat16* s, const float* q, int64_t K, float it, float gm,
                     float* g) {
  return g_rows->ce_row_b(s, q, K, it, gm, g);
}

// float32 / float16 / bfloat16 rows of swav_cross_entropy_cpu through the chosen kernels (float
// targets, float arithmetic and gradient)
template <typename In>
float swav_ce_float(const In* s, const float* q, int64_t B, int64_t K, float temp, float* grad,
                    float grad_scale) {
  const int nt = num_threads(B * K);
  const float inv_t = 1.0f / temp, gmul = inv_t * grad_scale;
  double total = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : total)
  for (int64_t b = 0; b < B; ++b)
    total += ce_row(s + b * K, q + b * K, K, inv_t, gmul, grad ? grad + b * K : nullptr);
  return static_cast<float>(total);
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
// The row loops are the vector kernels above (float) or plain loops (double).
// Extra memory: O(K) per thread, plus the B x K codes in the accumulation dtype.
template <typename In, typename T>
void sinkhorn_cached_impl(const In* s, int64_t B, int64_t K, T eps, int64_t iterations, T* codes) {
  const int nt = num_threads(B * K);
  const T inv_eps = T(1) / eps;
  std::vector<T> part(static_cast<size_t>(nt) * K);
  std::vector<T> M(K), Mraw(K), la(K), w(K);
  const T tiny = std::ldexp(T(1), -60);
  T* Mp = M.data();
  T* lap = la.data();
  T* wp = w.data();
  // p row of row b into out (out may alias codes + b K), in the log domain from the scores
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
    for (int64_t b = 0; b < B; ++b) row_colmax(s + b * K, mine, K);
#pragma omp for schedule(static)
    for (int64_t k = 0; k < K; ++k) {
      T m = -std::numeric_limits<T>::infinity();
      for (int t = 0; t < nt; ++t) m = std::max(m, part[static_cast<size_t>(t) * K + k]);
      Mraw[k] = m;
      Mp[k] = m * inv_eps;
    }
    std::fill(mine, mine + K, T(0));
    // E = exp(x - M) into the codes buffer, column sums S.
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b)
      row_expsum(s + b * K, inv_eps, Mraw.data(), codes + b * K, mine, K);
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
        T dot, top;
        row_dot_top(e, wp, K, &dot, &top);
        const bool exact = !(top >= tiny);
        if (last) {
          if (exact) {
            exact_row(b, eb, e);
          } else {
            row_scale_store(e, wp, T(1) / dot, K);
          }
        } else if (exact) {
          exact_row(b, eb, eb);
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) mine[k] += eb[k];
        } else {
          row_scale_acc(mine, e, wp, T(1) / dot, K);
        }
      }
      if (!last) {
#pragma omp for schedule(static)
        for (int64_t k = 0; k < K; ++k) {
          T acc = 0;
          for (int t = 0; t < nt; ++t) acc += part[static_cast<size_t>(t) * K + k];
          // A column's mass is >= 1/(B K) in exact arithmetic, but at |scores / eps| ~ 1e9
          // float32 rounds x + a by hundreds: a column can sum to 0 (log 0 = -inf would turn
          // every weight into NaN). The smallest normal keeps it a finite, tiny weight.
          lap[k] -= std::log(std::max(acc, std::numeric_limits<T>::min()));
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
  advise_huge_pages(codes);
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

// The kernel set in use ("baseline", "avx2", "avx512"); a non-empty name selects that set if
// this CPU has it (the tests run every set).
std::string swav_cpu_isa(const std::string& name) {
  if (!name.empty()) {
    const RowKernels* pick = nullptr;
    std::string have;
    for (const RowKernels* k : available_kernels()) {
      if (name == k->name) pick = k;
      have += std::string(have.empty() ? "" : ", ") + k->name;
    }
    TORCH_CHECK(pick != nullptr, "swav_cpu_isa: name must be one of this CPU's kernel sets (",
                have, "), got '", name, "'");
    g_rows = pick;
  }
  return g_rows->name;
}

std::vector<std::string> swav_cpu_isas() {
  std::vector<std::string> out;
  for (const RowKernels* k : available_kernels()) out.push_back(k->name);
  return out;
}

// exp of every element of a float32 tensor with the chosen kernels' exp (for its accuracy test)
torch::Tensor swav_cpu_exp(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 1 && x.scalar_type() == torch::kFloat32 &&
                  x.is_contiguous(),
              "swav_cpu_exp: x must be a contiguous 1-D float32 CPU tensor, got ", x.sizes(), " ",
              x.scalar_type());
  const int64_t n = x.numel();
  auto out = torch::empty({n}, x.options());
  std::vector<float> zeros(static_cast<size_t>(n), 0.0f);
  // e = exp(x * 1 - 0); the column-sum side output is discarded
  std::vector<float> acc(static_cast<size_t>(n), 0.0f);
  if (n > 0) g_rows->expsum_f(x.data_ptr<float>(), 1.0f, zeros.data(), out.data_ptr<float>(),
                              acc.data(), n);
  return out;
}

}  // namespace

void init_swav_cpu(pybind11::module_& m) {
  m.def("swav_cpu_isa", &swav_cpu_isa, pybind11::arg("name") = std::string(),
        "Vector kernel set of the CPU SwAV ops; a name selects another available set");
  m.def("swav_cpu_isas", &swav_cpu_isas, "Vector kernel sets this CPU can run");
  m.def(
      "swav_huge_page_advice",
      [](int64_t on) {
        if (on >= 0) g_huge_advice.store(static_cast<int>(on));
        return static_cast<int64_t>(g_huge_advice.load());
      },
      pybind11::arg("on") = -1,
      "the Sinkhorn codes' page advice: bit 0 MADV_HUGEPAGE, bit 1 MADV_POPULATE_WRITE (set "
      "first when on >= 0; measurement only)");
  m.def("swav_cpu_exp", &swav_cpu_exp, pybind11::arg("x"),
        "exp of a float32 vector with the SwAV kernels' polynomial (for its accuracy test)");
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
        pybind11::arg("grad_scale") = 1.0,
        "Sum over rows of -<targets, log_softmax(scores / T)>, and its gradient in scores times "
        "grad_scale");
  m.def("swav_cross_entropy_scaled_cpu", &swav_cross_entropy_scaled_cpu, pybind11::arg("scores"),
        pybind11::arg("targets"), pybind11::arg("temperature"), pybind11::arg("compute_grad"),
        pybind11::arg("grad_scale"),
        "swav_cross_entropy_cpu with grad_scale a one-element CPU tensor (read in C++)");
}
