// sortnet family, CPU (C++ / OpenMP): diffsort-compatible soft sort and the fused GroCo row loss.
//
// A sorting network is passed as a (4, C) int32 tensor of comparators in execution order:
// rows = wire a (split_a), wire b (split_b), destination of the soft min, destination of the soft
// max. Identity slots of diffsort are dropped (they pass the wire through exactly). Comparators
// of one layer touch disjoint wires, so running them one after another equals the layer update.
//
// Per comparator with d = x[b] - x[a] and alpha = f(d):
//   x'[dmin] = alpha x[a] + (1 - alpha) x[b],   x'[dmax] = (1 - alpha) x[a] + alpha x[b]
// and the same mix on the two columns a, b of P = M_1 ... M_C. The soft sort P-chain works on
// whole rows of n x n matrices (see "soft sort" below); its backward keeps per-thread buffers of
// O(C n) values, or O(sqrt(C n) n + n^2 sqrt(C / n)) with checkpoints when C n is large, instead
// of the dense reference's O(n^2 L) per problem.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

enum Dist { LOGISTIC = 0, LOGISTIC_PHI = 1, GAUSSIAN = 2, RECIPROCAL = 3, CAUCHY = 4, OPTIMAL = 5 };

struct SortParams {
  int dist;
  double steepness;
  double art_lambda;
  double sigma_bwd;  // diffsort's NormalCDF keeps 1/steepness as a float32 tensor for backward
};

// alpha = f(d) and dalpha/dd with diffsort's exact formulas.
template <typename T>
inline void alpha_and_slope(T d, const SortParams& p, T& alpha, T& slope) {
  const T s = static_cast<T>(p.steepness);
  switch (p.dist) {
    case LOGISTIC: {
      T a = T(1) / (T(1) + std::exp(-d * s));
      alpha = a;
      slope = s * a * (T(1) - a);
      break;
    }
    case LOGISTIC_PHI: {
      const T lam = static_cast<T>(p.art_lambda);
      const T ad = std::abs(d) + T(1e-10);
      const T den = std::pow(ad, lam);
      const T v = d * s / den;
      T a = T(1) / (T(1) + std::exp(-v));
      alpha = a;
      slope = a * (T(1) - a) * (s / den) * (T(1) - lam * std::abs(d) / ad);
      break;
    }
    case GAUSSIAN: {
      const T sigma = T(1) / s;
      alpha = T(0.5) + T(0.5) * std::erf(d / sigma / std::sqrt(T(2)));
      const T sb = static_cast<T>(p.sigma_bwd);
      const T z = d / sb;
      slope = T(1) / sb / std::sqrt(T(M_PI) * T(2)) * std::exp(T(-0.5) * z * z);
      break;
    }
    case RECIPROCAL: {
      const T v = s * d;
      const T den = T(2) + std::abs(v);
      alpha = T(0.5) * (v / den + T(1));
      slope = s / (den * den);
      break;
    }
    case CAUCHY: {
      const T v = s * d;
      alpha = T(1) / T(M_PI) * std::atan(v) + T(0.5);
      slope = s / (T(M_PI) * (T(1) + v * v));
      break;
    }
    default: {  // OPTIMAL
      const T v = s * d;
      const T av = std::abs(v);
      const T clamped = std::min(std::max(v, T(-0.25)), T(0.25));
      const T side = (v > T(0.25) ? T(1) : T(0)) - (v < T(-0.25) ? T(1) : T(0));
      alpha = clamped + T(0.5) + side * (T(0.25) - T(1) / T(16) / (av + T(1e-10)));
      if (av <= T(0.25)) {
        slope = s;
      } else {
        const T e = av + T(1e-10);
        slope = s / (T(16) * e * e);
      }
      break;
    }
  }
}

// float atan for the block forward: Cephes' atanf reduction and polynomial (about 2 ulp),
// branch-free so that a loop over problems vectorises; std::atan (a libm call per element) was
// most of the soft sort forward. float64 keeps std::atan.
inline float atan_vec(float v) {
  const float ax = std::abs(v);
  const bool big = ax > 2.414213562373095f, mid = ax > 0.4142135623730950f;
  const float xr = big ? -1.0f / ax : (mid ? (ax - 1.0f) / (ax + 1.0f) : ax);
  const float y0 = big ? 1.5707963267948966f : (mid ? 0.7853981633974483f : 0.0f);
  const float z = xr * xr;
  const float r =
      y0 + (((8.05374449538e-2f * z - 1.38776856032e-1f) * z + 1.99777106478e-1f) * z -
            3.33329491539e-1f) * z * xr + xr;
  return std::copysign(r, v);
}
inline double atan_vec(double v) { return std::atan(v); }

// alpha and slope of W problems at one comparator (d, alpha, slope: W contiguous values).
template <typename T>
inline void alpha_and_slope_lanes(const T* d, const SortParams& p, T* alpha, T* slope, int64_t W) {
  if (p.dist == CAUCHY) {
    const T s = static_cast<T>(p.steepness);
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) {
      const T v = s * d[w];
      alpha[w] = T(1) / T(M_PI) * atan_vec(v) + T(0.5);
      slope[w] = s / (T(M_PI) * (T(1) + v * v));
    }
  } else {
    for (int64_t w = 0; w < W; ++w) alpha_and_slope(d[w], p, alpha[w], slope[w]);
  }
}

struct Net {
  const int32_t* a;
  const int32_t* b;
  const int32_t* dmin;
  const int32_t* dmax;
  int64_t C;
};

// The longest row a sorting network sorts: odd-even's n (n - 1) / 2 comparators stay below
// 2^31 (int32 wire tables, int64 counts without overflow), and fastssl/ops/sortnet.py's
// MAX_SORT_N says the same.
constexpr int64_t kMaxSortWidth = 65536;
constexpr int64_t kAnyWidth = -1;  // net_of's n when no row length is known (nothing to sort)

// The network's wire numbers index the rows: a wire outside [0, n), or a comparator whose
// destinations are not its own two wires, would read and write outside the buffers.
Net net_of(const torch::Tensor& net, int64_t n, const char* fn, const char* n_from) {
  TORCH_CHECK(n == kAnyWidth || n <= kMaxSortWidth, fn, ": rows of at most ", kMaxSortWidth,
              " entries can be sorted, got n=", n, " (", n_from, ")");
  TORCH_CHECK(net.device().is_cpu() && net.dim() == 2 && net.size(0) == 4 &&
                  net.scalar_type() == torch::kInt32 && net.is_contiguous(),
              fn, ": network must be a contiguous CPU (4, C) int32 tensor, got ", net.sizes(), " ",
              net.scalar_type(), " on ", net.device());
  const int32_t* p = net.data_ptr<int32_t>();
  const int64_t C = net.size(1);
  Net out{p, p + C, p + 2 * C, p + 3 * C, C};
  int64_t wires = 0;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t a = out.a[c], b = out.b[c], lo = out.dmin[c], hi = out.dmax[c];
    TORCH_CHECK(a >= 0 && (n == kAnyWidth || a < n) && b >= 0 && (n == kAnyWidth || b < n) &&
                    a != b,
                fn, ": network comparator ", c, " joins wires (", a, ", ", b,
                "), expected two distinct wires in [0, ", n, ") (n: ", n_from, ")");
    TORCH_CHECK((lo == a && hi == b) || (lo == b && hi == a), fn, ": network comparator ", c,
                " writes wires (", lo, ", ", hi, "), expected its own wires (", a, ", ", b, ")");
    wires = std::max(wires, std::max(a, b) + 1);
  }
  // a sorting network of n >= 2 wires touches every wire: a smaller one was built for another
  // row length, and its output would be garbage
  TORCH_CHECK(n == kAnyWidth || wires == n || (C == 0 && n <= 1), fn, ": network sorts ", wires,
              " wires, but the rows have n=", n, " (", n_from, ")");
  return out;
}

// A float32/float64 CPU tensor of the given rank; names the argument.
void check_float_cpu(const torch::Tensor& t, const char* fn, const char* name, int64_t dim) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kFloat64, fn, ": ",
              name, " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, fn, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

void check_same_dtype(const torch::Tensor& t, const torch::Tensor& ref, const char* fn,
                      const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), fn, ": ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

// Value chain forward: x (n) in place; d and alpha per comparator.
template <typename T>
inline void value_forward(const Net& net, const SortParams& p, T* x, T* d_out, T* alpha_out,
                          T* slope_out) {
  for (int64_t c = 0; c < net.C; ++c) {
    const T va = x[net.a[c]], vb = x[net.b[c]];
    const T d = vb - va;
    T al, sl;
    alpha_and_slope(d, p, al, sl);
    x[net.dmin[c]] = al * va + (T(1) - al) * vb;
    x[net.dmax[c]] = (T(1) - al) * va + al * vb;
    if (d_out) d_out[c] = d;
    if (alpha_out) alpha_out[c] = al;
    if (slope_out) slope_out[c] = sl;
  }
}

// Reverse sweep of the value chain: lam (n) holds dL/dx_C on entry, dL/dx_0 on exit.
// galpha: extra dL/dalpha from other chains (P or q), may be null.
template <typename T>
inline void value_backward(const Net& net, const T* d, const T* alpha, const T* slope,
                           const T* galpha, T* lam) {
  for (int64_t c = net.C - 1; c >= 0; --c) {
    const int32_t ia = net.a[c], ib = net.b[c];
    const T lmin = lam[net.dmin[c]], lmax = lam[net.dmax[c]];
    const T al = alpha[c];
    T ga = -(lmin - lmax) * d[c];  // (lmin - lmax) * (x[a] - x[b])
    if (galpha) ga += galpha[c];
    const T gd = ga * slope[c];
    lam[ia] = al * lmin + (T(1) - al) * lmax - gd;
    lam[ib] = (T(1) - al) * lmin + al * lmax + gd;
  }
}

// The OpenMP pragmas cannot sit inside AT_DISPATCH's macro argument; this calls a generic
// lambda with a float or double tag instead.
template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  if (t == at::kDouble) {
    f(double(0));
  } else if (t == at::kFloat) {
    f(float(0));
  } else {
    TORCH_CHECK(false, "sortnet: expected float32 or float64 tensors, got ", t);
  }
}

SortParams params_of(int64_t dist, double steepness, double art_lambda, double sigma_bwd) {
  TORCH_CHECK(dist >= 0 && dist <= 5, "sortnet: dist must be a distribution id in [0, 5], got ",
              dist);
  return SortParams{static_cast<int>(dist), steepness, art_lambda, sigma_bwd};
}

// ---------------------------------------------------------------------------------------------
// soft sort
//
// P = M_1 ... M_C, where M_c mixes the two wires of comparator c. The P-chain runs on whole
// n-vectors so that every step is two contiguous length-n rows (vectorisable), never a column
// gather:
//   forward:  P = M_1 (M_2 (... (M_C I))): left-multiplying by M_c writes rows a, b from rows
//             dmin, dmax, so P is built in its own (row-major) layout, comparators in reverse.
//   backward: with U_c = M_1 ... M_{c-1} (the prefix before c) and H_c = M_{c+1} ... M_C gP^T,
//             dL/dalpha_c = sum_r (H_c[dmin, r] - H_c[dmax, r]) (U_c^T[a, r] - U_c^T[b, r]).
//             X = U^T is swept forward (rows a, b -> dmin, dmax, the value-chain mix) keeping
//             the row difference X[a] - X[b] per comparator; H starts at gP^T and is swept
//             backward (rows dmin, dmax -> a, b). For large C n the differences are kept for one
//             segment of K comparators at a time, recomputed from checkpoints of X.

// out_dmin = al u_a + (1 - al) u_b, out_dmax = (1 - al) u_a + al u_b, reading before writing
// (out_dmin/out_dmax are u_a/u_b in some order).
template <typename T>
inline void mix_rows(T al, T* ua, T* ub, T* out_min, T* out_max, int64_t n) {
  const T bl = T(1) - al;
  if (out_min == ua) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T x = ua[i], y = ub[i];
      ua[i] = al * x + bl * y;
      ub[i] = bl * x + al * y;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T x = ua[i], y = ub[i];
      ub[i] = al * x + bl * y;
      ua[i] = bl * x + al * y;
    }
  }
}

template <typename T>
inline void identity_matrix(T* X, int64_t n) {
  std::fill(X, X + n * n, T(0));
  for (int64_t r = 0; r < n; ++r) X[r * n + r] = T(1);
}

std::vector<torch::Tensor> soft_sort_forward(torch::Tensor x, torch::Tensor net_t, int64_t dist,
                                             double steepness, double art_lambda,
                                             double sigma_bwd, bool want_p) {
  check_float_cpu(x, "soft_sort_forward", "x", 2);
  x = x.contiguous();
  const Net net = net_of(net_t, x.size(1), "soft_sort_forward", "x's width");
  const SortParams prm = params_of(dist, steepness, art_lambda, sigma_bwd);
  const int64_t B = x.size(0), n = x.size(1), C = net.C;
  auto y = torch::empty_like(x);
  // saved for the backward, per problem: d, alpha, dalpha/dd (C each), so that it evaluates no
  // transcendental function again
  auto saved = torch::empty({B, 3 * C}, x.options());
  torch::Tensor P = want_p ? torch::empty({B, n, n}, x.options()) : torch::empty({0}, x.options());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* sp = saved.data_ptr<scalar_t>();
    scalar_t* Pp = want_p ? P.data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    // W problems advance through the value chain together (wire-major x^T, W lanes per wire) so
    // that alpha = f(d) vectorises across problems
    constexpr int64_t W = 16;
    const int64_t blocks = (B + W - 1) / W;
#pragma omp parallel
    {
      std::vector<scalar_t> xt(n * W), dl(C * W), al(C * W), sl(C * W);
#pragma omp for schedule(static)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t b0 = blk * W, lanes = std::min(W, B - b0);
        for (int64_t j = 0; j < n; ++j)
          for (int64_t w = 0; w < W; ++w)
            xt[j * W + w] = w < lanes ? xp[(b0 + w) * n + j] : scalar_t(0);
        for (int64_t c = 0; c < C; ++c) {
          scalar_t* xa = xt.data() + net.a[c] * W;
          scalar_t* xb = xt.data() + net.b[c] * W;
          scalar_t* dc = dl.data() + c * W;
          scalar_t* ac = al.data() + c * W;
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) dc[w] = xb[w] - xa[w];
          alpha_and_slope_lanes<scalar_t>(dc, prm, ac, sl.data() + c * W, W);
          scalar_t* xmin = net.dmin[c] == net.a[c] ? xa : xb;
          scalar_t* xmax = net.dmin[c] == net.a[c] ? xb : xa;
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) {
            const scalar_t va = xa[w], vb = xb[w], aw = ac[w];
            xmin[w] = aw * va + (scalar_t(1) - aw) * vb;
            xmax[w] = (scalar_t(1) - aw) * va + aw * vb;
          }
        }
        for (int64_t w = 0; w < lanes; ++w) {
          const int64_t bi = b0 + w;
          for (int64_t j = 0; j < n; ++j) yp[bi * n + j] = xt[j * W + w];
          scalar_t* db = sp + bi * 3 * C;
          for (int64_t c = 0; c < C; ++c) {
            db[c] = dl[c * W + w];
            db[C + c] = al[c * W + w];
            db[2 * C + c] = sl[c * W + w];
          }
          if (want_p) {
            const scalar_t* alpha = db + C;
            scalar_t* M = Pp + bi * n * n;
            identity_matrix(M, n);
            for (int64_t c = C - 1; c >= 0; --c) {
              // rows a, b of M_c V from rows dmin, dmax of V: the transposed mix
              scalar_t* vmin = M + net.dmin[c] * n;
              scalar_t* vmax = M + net.dmax[c] * n;
              mix_rows<scalar_t>(alpha[c], vmin, vmax, M + net.a[c] * n, M + net.b[c] * n, n);
            }
          }
        }
      }
    }
  });
  return {y, P, saved};
}

// saved: (B, 3C) from soft_sort_forward (d, alpha, slope), or (B, C) holding d only (then alpha
// and slope are evaluated again).
torch::Tensor soft_sort_backward(torch::Tensor gy, torch::Tensor gP, torch::Tensor saved,
                                 torch::Tensor net_t, int64_t dist, double steepness,
                                 double art_lambda, double sigma_bwd) {
  const char* fn = "soft_sort_backward";
  check_float_cpu(saved, fn, "saved", 2);
  saved = saved.contiguous();
  const SortParams prm = params_of(dist, steepness, art_lambda, sigma_bwd);
  const int64_t B = saved.size(0);
  const bool has_gy = gy.defined() && gy.numel() > 0;
  const bool has_gp = gP.defined() && gP.numel() > 0;
  // every buffer below is sized from n and indexed per problem: both gradients must agree with
  // saved and with each other, or the sweeps run past them
  if (has_gy) {
    check_float_cpu(gy, fn, "grad_sorted", 2);
    check_same_dtype(gy, saved, fn, "grad_sorted", "saved");
    TORCH_CHECK(gy.size(0) == B, fn, ": grad_sorted must have B=", B,
                " rows (the saved tensor's), got shape ", gy.sizes());
  }
  if (has_gp) {
    check_float_cpu(gP, fn, "grad_P", 3);
    check_same_dtype(gP, saved, fn, "grad_P", "saved");
    TORCH_CHECK(gP.size(0) == B && gP.size(1) == gP.size(2), fn,
                ": grad_P must be (B, n, n) with B=", B, ", got shape ", gP.sizes());
  }
  const int64_t n = has_gy ? gy.size(1) : (has_gp ? gP.size(1) : 0);
  TORCH_CHECK(!(has_gy && has_gp) || gP.size(1) == n, fn, ": grad_P must be (B, n, n) with n=",
              n, " (grad_sorted's), got shape ", gP.sizes());
  const Net net = net_of(net_t, n == 0 ? kAnyWidth : n, fn,
                         has_gy ? "grad_sorted's width" : "grad_P's size");
  const int64_t C = net.C;
  TORCH_CHECK(saved.size(1) == 3 * C || saved.size(1) == C, fn,
              ": saved must be the forward's (B, 3C) or (B, C) tensor with C=", C, ", got shape ",
              saved.sizes());
  const bool has_alpha = saved.size(1) == 3 * C;
  const int64_t stride = saved.size(1);
  if (has_gy) gy = gy.contiguous();
  if (has_gp) gP = gP.contiguous();
  auto gx = has_gy ? gy.clone() : torch::zeros({B, n}, saved.options());
  if (n == 0) return gx;
  // Keep every comparator's row difference (C n values) while that is small (L2-sized); else
  // segments of K ~ sqrt(C n) comparators between checkpoints of X (C/K n^2 + K n values).
  const int64_t full_limit = int64_t(1) << 17;
  const int64_t K = C * n <= full_limit
                        ? std::max<int64_t>(C, 1)
                        : std::max<int64_t>(1, (int64_t)std::ceil(std::sqrt((double)C * n)));
  const int64_t S = (C + K - 1) / K;
  dispatch_float(saved.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* sp = saved.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    const scalar_t* gpp = has_gp ? gP.data_ptr<scalar_t>() : nullptr;
#pragma omp parallel
    {
      std::vector<scalar_t> alpha_buf(has_alpha ? 0 : C), slope_buf(has_alpha ? 0 : C), galpha(C);
      std::vector<scalar_t> X(has_gp ? n * n : 0), H(has_gp ? n * n : 0);
      std::vector<scalar_t> ckpt(has_gp && S > 1 ? (S - 1) * n * n : 0);
      std::vector<scalar_t> diff(has_gp ? std::min(K, C) * n : 0);
#pragma omp for schedule(static)
      for (int64_t bi = 0; bi < B; ++bi) {
        const scalar_t* db = sp + bi * stride;
        const scalar_t* alpha = db + C;
        const scalar_t* slope = db + 2 * C;
        if (!has_alpha) {
          for (int64_t c = 0; c < C; ++c)
            alpha_and_slope<scalar_t>(db[c], prm, alpha_buf[c], slope_buf[c]);
          alpha = alpha_buf.data();
          slope = slope_buf.data();
        }
        if (has_gp) {
          scalar_t* Xp = X.data();
          scalar_t* Hp = H.data();
          const scalar_t* g = gpp + bi * n * n;
          for (int64_t r = 0; r < n; ++r)
            for (int64_t j = 0; j < n; ++j) Hp[j * n + r] = g[r * n + j];
          if (S > 1) {  // checkpoints of X at the start of segments 1 .. S-1
            identity_matrix(Xp, n);
            for (int64_t c = 0; c < (S - 1) * K; ++c) {
              if (c % K == 0 && c > 0)
                std::copy(Xp, Xp + n * n, ckpt.begin() + (c / K - 1) * n * n);
              mix_rows<scalar_t>(alpha[c], Xp + net.a[c] * n, Xp + net.b[c] * n,
                                 Xp + net.dmin[c] * n, Xp + net.dmax[c] * n, n);
            }
            std::copy(Xp, Xp + n * n, ckpt.begin() + (S - 2) * n * n);
          }
          for (int64_t s = S - 1; s >= 0; --s) {
            const int64_t c0 = s * K, c1 = std::min(C, c0 + K);
            if (s == 0)
              identity_matrix(Xp, n);
            else
              std::copy(ckpt.begin() + (s - 1) * n * n, ckpt.begin() + s * n * n, Xp);
            for (int64_t c = c0; c < c1; ++c) {
              scalar_t* xa = Xp + net.a[c] * n;
              scalar_t* xb = Xp + net.b[c] * n;
              scalar_t* df = diff.data() + (c - c0) * n;
#pragma omp simd
              for (int64_t i = 0; i < n; ++i) df[i] = xa[i] - xb[i];
              mix_rows<scalar_t>(alpha[c], xa, xb, Xp + net.dmin[c] * n, Xp + net.dmax[c] * n,
                                 n);
            }
            for (int64_t c = c1 - 1; c >= c0; --c) {
              scalar_t* hmin = Hp + net.dmin[c] * n;
              scalar_t* hmax = Hp + net.dmax[c] * n;
              const scalar_t* df = diff.data() + (c - c0) * n;
              scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
              for (int64_t i = 0; i < n; ++i) acc += (hmin[i] - hmax[i]) * df[i];
              galpha[c] = acc;
              mix_rows<scalar_t>(alpha[c], hmin, hmax, Hp + net.a[c] * n, Hp + net.b[c] * n, n);
            }
          }
        } else {
          std::fill(galpha.begin(), galpha.end(), scalar_t(0));
        }
        value_backward<scalar_t>(net, db, alpha, slope, galpha.data(), gxp + bi * n);
      }
    }
  });
  return gx;
}

// ---------------------------------------------------------------------------------------------
// GroCo row loss on a pre-ordered row s = [negatives asc | positives asc]:
//   q_pos = P 1[c >= k], q_neg = P 1[c < k], each a vector swept backwards through the network
//   (q = M_1(...(M_C v))), clipped to [0, 1]; loss = (sum_r BCE(q_pos) + BCE(q_neg)) / (2n).

template <typename T>
inline T bce_term(T q, T t) {
  const T lq = std::max(std::log(q), T(-100));
  const T l1q = std::max(std::log(T(1) - q), T(-100));
  return -(t * lq + (T(1) - t) * l1q);
}

template <typename T>
inline T bce_grad(T q, T t) {  // torch's binary_cross_entropy_backward, EPSILON = 1e-12
  return (q - t) / std::max((T(1) - q) * q, T(1e-12));
}

template <typename T>
struct RowWork {
  std::vector<T> x, d, alpha, slope, wpos, wneg, ppos, pneg, galpha, gpos, gneg;
  RowWork(int64_t n, int64_t C)
      : x(n), d(C), alpha(C), slope(C), wpos(n), wneg(n), ppos(2 * C), pneg(2 * C), galpha(C),
        gpos(n), gneg(n) {}
};

// Forward of one row; keeps what the backward needs in w. Returns the row loss.
template <typename T>
T groco_row_forward(const Net& net, const SortParams& prm, const T* s, int64_t n, int64_t k,
                    RowWork<T>& w) {
  std::copy(s, s + n, w.x.begin());
  value_forward<T>(net, prm, w.x.data(), w.d.data(), w.alpha.data(), w.slope.data());
  for (int64_t r = 0; r < n; ++r) {
    w.wpos[r] = r >= k ? T(1) : T(0);
    w.wneg[r] = r >= k ? T(0) : T(1);
  }
  for (int64_t c = net.C - 1; c >= 0; --c) {
    const int32_t dn = net.dmin[c], dx = net.dmax[c];
    const T al = w.alpha[c];
    const T pmin = w.wpos[dn], pmax = w.wpos[dx], nmin = w.wneg[dn], nmax = w.wneg[dx];
    w.ppos[2 * c] = pmin; w.ppos[2 * c + 1] = pmax;
    w.pneg[2 * c] = nmin; w.pneg[2 * c + 1] = nmax;
    w.wpos[net.a[c]] = al * pmin + (T(1) - al) * pmax;
    w.wpos[net.b[c]] = (T(1) - al) * pmin + al * pmax;
    w.wneg[net.a[c]] = al * nmin + (T(1) - al) * nmax;
    w.wneg[net.b[c]] = (T(1) - al) * nmin + al * nmax;
  }
  T loss = 0;
  for (int64_t r = 0; r < n; ++r) {
    const T t = r >= k ? T(1) : T(0);
    const T qp = std::min(std::max(w.wpos[r], T(0)), T(1));
    const T qn = std::min(std::max(w.wneg[r], T(0)), T(1));
    loss += bce_term(qp, t) + bce_term(qn, T(1) - t);
  }
  return loss / T(2 * n);
}

// Backward of one row after groco_row_forward: gs (n) = dL/ds for dL/dloss = gl.
template <typename T>
void groco_row_backward(const Net& net, int64_t n, int64_t k, T gl, RowWork<T>& w, T* gs) {
  const T scale = gl / T(2 * n);
  for (int64_t r = 0; r < n; ++r) {
    const T t = r >= k ? T(1) : T(0);
    const T qp = w.wpos[r], qn = w.wneg[r];
    // torch.clip passes the gradient where 0 <= q <= 1
    w.gpos[r] = (qp >= T(0) && qp <= T(1)) ? scale * bce_grad(qp, t) : T(0);
    w.gneg[r] = (qn >= T(0) && qn <= T(1)) ? scale * bce_grad(qn, T(1) - t) : T(0);
  }
  for (int64_t c = 0; c < net.C; ++c) {
    const int32_t ia = net.a[c], ib = net.b[c];
    const T al = w.alpha[c];
    const T pa = w.gpos[ia], pb = w.gpos[ib], na = w.gneg[ia], nb = w.gneg[ib];
    w.galpha[c] = (pa - pb) * (w.ppos[2 * c] - w.ppos[2 * c + 1]) +
                  (na - nb) * (w.pneg[2 * c] - w.pneg[2 * c + 1]);
    w.gpos[net.dmin[c]] = al * pa + (T(1) - al) * pb;
    w.gpos[net.dmax[c]] = (T(1) - al) * pa + al * pb;
    w.gneg[net.dmin[c]] = al * na + (T(1) - al) * nb;
    w.gneg[net.dmax[c]] = (T(1) - al) * na + al * nb;
  }
  for (int64_t r = 0; r < n; ++r) gs[r] = T(0);
  value_backward<T>(net, w.d.data(), w.alpha.data(), w.slope.data(), w.galpha.data(), gs);
}

// k splits a row into k negatives and n - k positives; both parts must be non-empty.
void check_rows_split(int64_t k, int64_t n, const char* fn) {
  TORCH_CHECK(k >= 1 && k < n, fn, ": k must be in [1, n - 1] with n=", n, " (row length), got ",
              k);
  TORCH_CHECK(n <= kMaxSortWidth, fn, ": rows of at most ", kMaxSortWidth,
              " entries can be sorted, got n=", n);
}

torch::Tensor groco_rows_forward(torch::Tensor sims, int64_t k, torch::Tensor net_t, int64_t dist,
                                 double steepness, double art_lambda, double sigma_bwd) {
  const char* fn = "groco_rows_forward";
  check_float_cpu(sims, fn, "sims", 2);
  sims = sims.contiguous();
  const int64_t B = sims.size(0), n = sims.size(1);
  check_rows_split(k, n, fn);
  const Net net = net_of(net_t, n, fn, "sims' row length");
  const SortParams prm = params_of(dist, steepness, art_lambda, sigma_bwd);
  auto loss = torch::empty({B}, sims.options());
  dispatch_float(sims.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* sp = sims.data_ptr<scalar_t>();
    scalar_t* lp = loss.data_ptr<scalar_t>();
#pragma omp parallel
    {
      RowWork<scalar_t> w(n, net.C);
#pragma omp for schedule(static)
      for (int64_t bi = 0; bi < B; ++bi)
        lp[bi] = groco_row_forward<scalar_t>(net, prm, sp + bi * n, n, k, w);
    }
  });
  return loss;
}

torch::Tensor groco_rows_backward(torch::Tensor grow, torch::Tensor sims, int64_t k,
                                  torch::Tensor net_t, int64_t dist, double steepness,
                                  double art_lambda, double sigma_bwd) {
  const char* fn = "groco_rows_backward";
  check_float_cpu(sims, fn, "sims", 2);
  check_float_cpu(grow, fn, "grad_rows", 1);
  check_same_dtype(grow, sims, fn, "grad_rows", "sims");
  sims = sims.contiguous();
  grow = grow.contiguous();
  const int64_t B = sims.size(0), n = sims.size(1);
  TORCH_CHECK(grow.size(0) == B, fn, ": grad_rows must have B=", B, " entries (sims' rows), got ",
              grow.sizes());
  check_rows_split(k, n, fn);
  const Net net = net_of(net_t, n, fn, "sims' row length");
  const SortParams prm = params_of(dist, steepness, art_lambda, sigma_bwd);
  auto gs = torch::empty_like(sims);
  dispatch_float(sims.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* sp = sims.data_ptr<scalar_t>();
    const scalar_t* gp = grow.data_ptr<scalar_t>();
    scalar_t* gsp = gs.data_ptr<scalar_t>();
#pragma omp parallel
    {
      RowWork<scalar_t> w(n, net.C);
#pragma omp for schedule(static)
      for (int64_t bi = 0; bi < B; ++bi) {
        groco_row_forward<scalar_t>(net, prm, sp + bi * n, n, k, w);
        groco_row_backward<scalar_t>(net, n, k, gp[bi], w, gsp + bi * n);
      }
    }
  });
  return gs;
}

template <typename T>
inline T dot(const T* x, const T* y, int64_t D) {
  // 8 partial sums let the compiler vectorise without reassociating a single chain
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= D; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += x[i + j] * y[i + j];
  T s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < D; ++i) s += x[i] * y[i];
  return s;
}

// Fused GroCo forward for one anchor view. anchor (B, D), negatives (N, D) and positives (P, B, D)
// are already normalised. Per row: cosine to every negative tile by tile with a running top-k
// (self column masked), sorted positives, then the row loss. No B x N matrix is stored.
// Returns (row_loss (B), sims (B, n), index (B, n) int64: negative row for the first k slots,
// positive view for the rest).
std::vector<torch::Tensor> groco_fused_forward(torch::Tensor anchor, torch::Tensor negatives,
                                               torch::Tensor positives, int64_t self_offset,
                                               int64_t k, torch::Tensor net_t, int64_t dist,
                                               double steepness, double art_lambda,
                                               double sigma_bwd) {
  const char* fn = "groco_fused_forward";
  check_float_cpu(anchor, fn, "anchor", 2);
  check_float_cpu(negatives, fn, "negatives", 2);
  check_float_cpu(positives, fn, "positives", 3);
  check_same_dtype(negatives, anchor, fn, "negatives", "anchor");
  check_same_dtype(positives, anchor, fn, "positives", "anchor");
  const int64_t B = anchor.size(0), D = anchor.size(1), N = negatives.size(0);
  const int64_t P = positives.size(0);
  TORCH_CHECK(negatives.size(1) == D, fn, ": negatives must be (N, D) with D=", D,
              " (anchor's), got shape ", negatives.sizes());
  TORCH_CHECK(positives.size(1) == B && positives.size(2) == D, fn,
              ": positives must be (P, B, D) with B=", B, ", D=", D, " (anchor's), got shape ",
              positives.sizes());
  TORCH_CHECK(P >= 1, fn, ": positives must hold at least one view, got shape ",
              positives.sizes());
  TORCH_CHECK(k >= 1, fn, ": k must be >= 1, got ", k);
  // every bound written as a difference of sizes (N, B >= 0): `k + 1` or `self_offset + B`
  // would overflow int64 for arguments near 2^63 and let them through
  TORCH_CHECK(k <= N - 1, fn, ": k must be at most N - 1 = ", N - 1,
              " (the negatives' rows, one is the anchor's own), got ", k);
  TORCH_CHECK(k <= kMaxSortWidth - P, fn, ": k + the positive views must be at most ",
              kMaxSortWidth, " (the longest sorted row), got k=", k, " with ", P, " views");
  // row bi's own column self_offset + bi is skipped and must be a real negatives row
  TORCH_CHECK(B <= N && self_offset >= 0 && self_offset <= N - B, fn,
              ": self_offset must be in [0, N - B]",
              " = [0, ", N - B, "] so that every anchor's own row is among the N=", N,
              " negatives, got ", self_offset);
  const int64_t n = k + P;
  const Net net = net_of(net_t, n, fn, "k + the positive views");
  const SortParams prm = params_of(dist, steepness, art_lambda, sigma_bwd);
  anchor = anchor.contiguous();
  negatives = negatives.contiguous();
  positives = positives.contiguous();
  auto loss = torch::empty({B}, anchor.options());
  auto sims = torch::empty({B, n}, anchor.options());
  auto index = torch::empty({B, n}, anchor.options().dtype(torch::kInt64));
  dispatch_float(anchor.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* ap = anchor.data_ptr<scalar_t>();
    const scalar_t* np_ = negatives.data_ptr<scalar_t>();
    const scalar_t* pp = positives.data_ptr<scalar_t>();
    scalar_t* lp = loss.data_ptr<scalar_t>();
    scalar_t* sp = sims.data_ptr<scalar_t>();
    int64_t* ip = index.data_ptr<int64_t>();
#pragma omp parallel
    {
      RowWork<scalar_t> w(n, net.C);
      std::vector<scalar_t> topv(k);
      std::vector<int64_t> topi(k);
#pragma omp for schedule(static)
      for (int64_t bi = 0; bi < B; ++bi) {
        const scalar_t* a = ap + bi * D;
        int64_t filled = 0;
        // running top-k, kept sorted descending; strict > keeps the lower index on ties
        for (int64_t j = 0; j < N; ++j) {
          if (j == self_offset + bi) continue;
          const scalar_t v = dot<scalar_t>(a, np_ + j * D, D);
          if (filled == k && !(v > topv[k - 1])) continue;
          int64_t pos = filled < k ? filled++ : k - 1;
          while (pos > 0 && v > topv[pos - 1]) {
            topv[pos] = topv[pos - 1];
            topi[pos] = topi[pos - 1];
            --pos;
          }
          topv[pos] = v;
          topi[pos] = j;
        }
        scalar_t* srow = sp + bi * n;
        int64_t* irow = ip + bi * n;
        for (int64_t i = 0; i < k; ++i) {  // ascending
          srow[i] = topv[k - 1 - i];
          irow[i] = topi[k - 1 - i];
        }
        for (int64_t p = 0; p < P; ++p) {  // insertion sort of the positives, ascending
          const scalar_t v = dot<scalar_t>(a, pp + (p * B + bi) * D, D);
          int64_t pos = k + p;
          while (pos > k && srow[pos - 1] > v) {
            srow[pos] = srow[pos - 1];
            irow[pos] = irow[pos - 1];
            --pos;
          }
          srow[pos] = v;
          irow[pos] = p;
        }
        lp[bi] = groco_row_forward<scalar_t>(net, prm, srow, n, k, w);
      }
    }
  });
  return {loss, sims, index};
}

torch::Tensor groco_fused_backward(torch::Tensor grow, torch::Tensor sims, torch::Tensor index,
                                   torch::Tensor negatives, torch::Tensor positives, int64_t k,
                                   torch::Tensor net_t, int64_t dist, double steepness,
                                   double art_lambda, double sigma_bwd) {
  const char* fn = "groco_fused_backward";
  check_float_cpu(sims, fn, "sims", 2);
  check_float_cpu(grow, fn, "grad_rows", 1);
  check_float_cpu(negatives, fn, "negatives", 2);
  check_float_cpu(positives, fn, "positives", 3);
  check_same_dtype(grow, sims, fn, "grad_rows", "sims");
  check_same_dtype(negatives, sims, fn, "negatives", "sims");
  check_same_dtype(positives, sims, fn, "positives", "sims");
  const int64_t B = sims.size(0), n = sims.size(1), D = negatives.size(1);
  const int64_t N = negatives.size(0), P = positives.size(0);
  TORCH_CHECK(grow.size(0) == B, fn, ": grad_rows must have B=", B, " entries (sims' rows), got ",
              grow.sizes());
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == torch::kInt64 &&
                  index.sizes() == sims.sizes(),
              fn, ": index must be a CPU int64 tensor of sims' shape ", sims.sizes(), ", got ",
              index.sizes(), " ", index.scalar_type(), " on ", index.device());
  TORCH_CHECK(positives.size(1) == B && positives.size(2) == D, fn,
              ": positives must be (P, B, D) with B=", B, ", D=", D, ", got shape ",
              positives.sizes());
  TORCH_CHECK(k >= 1 && k == n - P, fn, ": k must be >= 1 and k + P = n (sims' row length ", n,
              ", P=", P, " positive views), got k=", k);
  grow = grow.contiguous();
  sims = sims.contiguous();
  index = index.contiguous();
  negatives = negatives.contiguous();
  positives = positives.contiguous();
  {  // the index picks the rows read below: negatives rows in the first k slots, views after
    const int64_t* ip = index.data_ptr<int64_t>();
    for (int64_t bi = 0; bi < B; ++bi)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = ip[bi * n + i], hi = i < k ? N : P;
        TORCH_CHECK(v >= 0 && v < hi, fn, ": index[", bi, ", ", i, "]=", v, " out of range [0, ",
                    hi, ") (", i < k ? "negatives rows" : "positive views", ")");
      }
  }
  const Net net = net_of(net_t, n, fn, "sims' row length");
  const SortParams prm = params_of(dist, steepness, art_lambda, sigma_bwd);
  auto ga = torch::zeros({B, D}, sims.options());
  dispatch_float(sims.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gp = grow.data_ptr<scalar_t>();
    const scalar_t* sp = sims.data_ptr<scalar_t>();
    const int64_t* ip = index.data_ptr<int64_t>();
    const scalar_t* np_ = negatives.data_ptr<scalar_t>();
    const scalar_t* pp = positives.data_ptr<scalar_t>();
    scalar_t* gap = ga.data_ptr<scalar_t>();
#pragma omp parallel
    {
      RowWork<scalar_t> w(n, net.C);
      std::vector<scalar_t> gs(n);
#pragma omp for schedule(static)
      for (int64_t bi = 0; bi < B; ++bi) {
        groco_row_forward<scalar_t>(net, prm, sp + bi * n, n, k, w);
        groco_row_backward<scalar_t>(net, n, k, gp[bi], w, gs.data());
        scalar_t* g = gap + bi * D;
        // scatter into the anchor only: sims_i = <anchor, column_i>
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* col = i < k ? np_ + ip[bi * n + i] * D
                                      : pp + (ip[bi * n + i] * B + bi) * D;
          const scalar_t gi = gs[i];
          for (int64_t t = 0; t < D; ++t) g[t] += gi * col[t];
        }
      }
    }
  });
  return ga;
}

}  // namespace

void init_sortnet_cpu(pybind11::module_& m) {
  m.def("soft_sort_forward", &soft_sort_forward,
        "soft sort forward: (x, network, dist, steepness, art_lambda, sigma_bwd, want_p) -> "
        "(sorted, P, saved (B, 3C): d | alpha | dalpha/dd)");
  m.def("soft_sort_backward", &soft_sort_backward,
        "soft sort backward: (grad_sorted, grad_P, saved, network, ...) -> grad_x");
  m.def("groco_rows_forward", &groco_rows_forward, "GroCo row losses of pre-ordered rows");
  m.def("groco_rows_backward", &groco_rows_backward, "GroCo row loss backward -> grad of rows");
  m.def("groco_fused_forward", &groco_fused_forward,
        "fused GroCo (cosine + running top-k + network + BCE) per anchor row");
  m.def("groco_fused_backward", &groco_fused_backward,
        "fused GroCo backward into the normalised anchor");
}
