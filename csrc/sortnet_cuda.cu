// sortnet family, plain CUDA: diffsort-compatible soft sort and the GroCo row loss.
//
// Raw pointers and cudaStream_t only (no torch headers); the glue in sortnet_cuda_glue.cpp
// allocates and launches. The network is a (4, C) int32 table (wire a, wire b, soft-min
// destination, soft-max destination) in execution order, identical for every problem.
//
// * values / value backward / GroCo rows: one thread per problem.
// * P forward / P backward: one block per problem, one thread per row of P (rows are
//   independent sweeps of e_r). The P backward recomputes each row's forward from checkpoints
//   every K comparators and sums dL/dalpha over the rows in a fixed order (no atomics).
// Per-thread state sits in global scratch laid out [slot][lane] so that accesses coalesce.
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

struct Prm {
  int dist;
  double s, lam, sb;
};

template <typename T>
__device__ __forceinline__ void alpha_slope(T d, const Prm& p, T& a, T& sl) {
  const T s = (T)p.s;
  switch (p.dist) {
    case 0: {  // logistic
      a = T(1) / (T(1) + exp(-(d * s)));
      sl = s * a * (T(1) - a);
      break;
    }
    case 1: {  // logistic_phi
      const T ad = fabs(d) + T(1e-10);
      const T den = pow(ad, (T)p.lam);
      a = T(1) / (T(1) + exp(-(d * s / den)));
      sl = a * (T(1) - a) * (s / den) * (T(1) - (T)p.lam * fabs(d) / ad);
      break;
    }
    case 2: {  // gaussian; slope with diffsort's float32-stored sigma
      a = T(0.5) + T(0.5) * erf(d / (T(1) / s) / T(1.4142135623730951));
      const T sb = (T)p.sb;
      const T z = d / sb;
      sl = T(1) / sb / T(2.5066282746310002) * exp(T(-0.5) * z * z);
      break;
    }
    case 3: {  // reciprocal
      const T v = s * d;
      const T den = T(2) + fabs(v);
      a = T(0.5) * (v / den + T(1));
      sl = s / (den * den);
      break;
    }
    case 4: {  // cauchy
      const T v = s * d;
      a = atan(v) / T(3.141592653589793) + T(0.5);
      sl = s / (T(3.141592653589793) * (T(1) + v * v));
      break;
    }
    default: {  // optimal
      const T v = s * d;
      const T av = fabs(v);
      const T side = (v > T(0.25) ? T(1) : T(0)) - (v < T(-0.25) ? T(1) : T(0));
      a = fmin(fmax(v, T(-0.25)), T(0.25)) + T(0.5) + side * (T(0.25) - T(1) / T(16) / (av + T(1e-10)));
      const T e = av + T(1e-10);
      sl = av <= T(0.25) ? s : s / (T(16) * e * e);
      break;
    }
  }
}

template <typename T>
__global__ void values_kernel(T* y, T* d, const int32_t* net, int64_t B, int64_t C, int64_t n,
                              Prm p) {
  const int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (b >= B) return;
  T* row = y + b * n;
  for (int64_t c = 0; c < C; ++c) {
    const int ia = net[c], ib = net[C + c], dn = net[2 * C + c], dx = net[3 * C + c];
    const T xa = row[ia], xb = row[ib];
    const T dd = xb - xa;
    T a, sl;
    alpha_slope(dd, p, a, sl);
    row[dn] = a * xa + (T(1) - a) * xb;
    row[dx] = (T(1) - a) * xa + a * xb;
    d[b * C + c] = dd;
  }
}

template <typename T>
__global__ void perm_kernel(T* P, const T* d, const int32_t* net, int64_t C, int64_t n, Prm p) {
  const int64_t b = blockIdx.x;
  for (int64_t r = threadIdx.x; r < n; r += blockDim.x) {
    T* u = P + (b * n + r) * n;
    for (int64_t w = 0; w < n; ++w) u[w] = w == r ? T(1) : T(0);
    for (int64_t c = 0; c < C; ++c) {
      T a, sl;
      alpha_slope(d[b * C + c], p, a, sl);
      const int ia = net[c], ib = net[C + c];
      const T ua = u[ia], ub = u[ib];
      u[net[2 * C + c]] = a * ua + (T(1) - a) * ub;
      u[net[3 * C + c]] = (T(1) - a) * ua + a * ub;
    }
  }
}

// ws: per block `slots * n` values, slot-major: [S checkpoints x n wires | u (n) | g (n) | 2K pairs]
// Deterministic: every row leaves its dL/dalpha contribution to comparator c in the slot of the
// pair (ua, ub) it no longer needs; after each segment the block sums those slots over the rows
// in row order (one thread per comparator) and stores the sum. No atomics: no contention on one
// address per comparator, and the same bits on every run.
template <typename T>
__global__ void bwd_perm_kernel(const T* gP, const T* d, T* ga, T* ws_all, const int32_t* net,
                                int64_t b0, int64_t C, int64_t n, int64_t K, int64_t S, Prm p) {
  const int64_t pid = blockIdx.x;
  const int64_t b = b0 + pid;
  const int64_t slots = S * n + 2 * n + 2 * K;
  T* ws = ws_all + pid * slots * n;
  const int64_t U = S * n, G = S * n + n, PR = S * n + 2 * n;
#define SLOT(i) ws[(i) * n + r]
  for (int64_t r = threadIdx.x; r < n; r += blockDim.x) {
    for (int64_t w = 0; w < n; ++w) SLOT(U + w) = w == r ? T(1) : T(0);
    for (int64_t sg = 0; sg < S; ++sg) {
      for (int64_t w = 0; w < n; ++w) SLOT(sg * n + w) = SLOT(U + w);
      const int64_t c1 = min(C, (sg + 1) * K);
      for (int64_t c = sg * K; c < c1; ++c) {
        T a, sl;
        alpha_slope(d[b * C + c], p, a, sl);
        const T ua = SLOT(U + net[c]), ub = SLOT(U + net[C + c]);
        SLOT(U + net[2 * C + c]) = a * ua + (T(1) - a) * ub;
        SLOT(U + net[3 * C + c]) = (T(1) - a) * ua + a * ub;
      }
    }
    for (int64_t w = 0; w < n; ++w) SLOT(G + w) = gP[(b * n + r) * n + w];
  }
  for (int64_t sg = S - 1; sg >= 0; --sg) {
    const int64_t c0 = sg * K, c1 = min(C, c0 + K);
    for (int64_t r = threadIdx.x; r < n; r += blockDim.x) {
      for (int64_t w = 0; w < n; ++w) SLOT(U + w) = SLOT(sg * n + w);
      for (int64_t c = c0; c < c1; ++c) {
        T a, sl;
        alpha_slope(d[b * C + c], p, a, sl);
        const T ua = SLOT(U + net[c]), ub = SLOT(U + net[C + c]);
        SLOT(PR + 2 * (c - c0)) = ua;
        SLOT(PR + 2 * (c - c0) + 1) = ub;
        SLOT(U + net[2 * C + c]) = a * ua + (T(1) - a) * ub;
        SLOT(U + net[3 * C + c]) = (T(1) - a) * ua + a * ub;
      }
      for (int64_t c = c1 - 1; c >= c0; --c) {
        T a, sl;
        alpha_slope(d[b * C + c], p, a, sl);
        const T gmin = SLOT(G + net[2 * C + c]), gmax = SLOT(G + net[3 * C + c]);
        // this row's contribution replaces ua, which nothing reads any more
        SLOT(PR + 2 * (c - c0)) = (gmin - gmax) * (SLOT(PR + 2 * (c - c0)) - SLOT(PR + 2 * (c - c0) + 1));
        SLOT(G + net[c]) = a * gmin + (T(1) - a) * gmax;
        SLOT(G + net[C + c]) = (T(1) - a) * gmin + a * gmax;
      }
    }
    __syncthreads();  // every row's contributions of this segment are in place
    for (int64_t c = c0 + threadIdx.x; c < c1; c += blockDim.x) {
      const T* contrib = ws + (PR + 2 * (c - c0)) * n;
      T acc = T(0);
      for (int64_t r = 0; r < n; ++r) acc += contrib[r];
      ga[b * C + c] = acc;
    }
    __syncthreads();  // the next segment reuses the pair slots
  }
#undef SLOT
}

template <typename T>
__global__ void bwd_values_kernel(T* gx, const T* d, const T* ga, const int32_t* net, int64_t B,
                                  int64_t C, int64_t n, Prm p) {
  const int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (b >= B) return;
  T* lam = gx + b * n;
  for (int64_t c = C - 1; c >= 0; --c) {
    const T dd = d[b * C + c];
    T a, sl;
    alpha_slope(dd, p, a, sl);
    const T lmin = lam[net[2 * C + c]], lmax = lam[net[3 * C + c]];
    T g = -(lmin - lmax) * dd;
    if (ga) g += ga[b * C + c];
    const T gd = g * sl;
    lam[net[c]] = a * lmin + (T(1) - a) * lmax - gd;
    lam[net[C + c]] = (T(1) - a) * lmin + a * lmax + gd;
  }
}

// GroCo rows; ws slot-major [slot][B]: x (n) | d (C) | wpos (n) | wneg (n) | pairs (4C) | galpha (C)
template <typename T>
__global__ void groco_rows_kernel(const T* sims, T* loss, const T* grow, T* gs, T* ws,
                                  const int32_t* net, int64_t B, int64_t C, int64_t n, int64_t k,
                                  Prm p, bool backward) {
  const int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (b >= B) return;
#define W(i) ws[(i) * B + b]
  const int64_t X = 0, DD = n, WP = n + C, WN = 2 * n + C, PP = 3 * n + C, GA = 3 * n + 5 * C;
  for (int64_t w = 0; w < n; ++w) W(X + w) = sims[b * n + w];
  for (int64_t c = 0; c < C; ++c) {
    const T xa = W(X + net[c]), xb = W(X + net[C + c]);
    const T dd = xb - xa;
    T a, sl;
    alpha_slope(dd, p, a, sl);
    W(X + net[2 * C + c]) = a * xa + (T(1) - a) * xb;
    W(X + net[3 * C + c]) = (T(1) - a) * xa + a * xb;
    W(DD + c) = dd;
  }
  for (int64_t w = 0; w < n; ++w) {
    W(WP + w) = w >= k ? T(1) : T(0);
    W(WN + w) = w >= k ? T(0) : T(1);
  }
  for (int64_t c = C - 1; c >= 0; --c) {
    T a, sl;
    alpha_slope(W(DD + c), p, a, sl);
    const int ia = net[c], ib = net[C + c], dn = net[2 * C + c], dx = net[3 * C + c];
    const T pmin = W(WP + dn), pmax = W(WP + dx), nmin = W(WN + dn), nmax = W(WN + dx);
    W(PP + 4 * c) = pmin;
    W(PP + 4 * c + 1) = pmax;
    W(PP + 4 * c + 2) = nmin;
    W(PP + 4 * c + 3) = nmax;
    W(WP + ia) = a * pmin + (T(1) - a) * pmax;
    W(WP + ib) = (T(1) - a) * pmin + a * pmax;
    W(WN + ia) = a * nmin + (T(1) - a) * nmax;
    W(WN + ib) = (T(1) - a) * nmin + a * nmax;
  }
  if (!backward) {
    T total = 0;
    for (int64_t w = 0; w < n; ++w) {
      const T t = w >= k ? T(1) : T(0);
      const T qp = fmin(fmax(W(WP + w), T(0)), T(1));
      const T qn = fmin(fmax(W(WN + w), T(0)), T(1));
      total -= t * fmax(log(qp), T(-100)) + (T(1) - t) * fmax(log(T(1) - qp), T(-100));
      total -= (T(1) - t) * fmax(log(qn), T(-100)) + t * fmax(log(T(1) - qn), T(-100));
    }
    loss[b] = total / T(2 * n);
    return;
  }
  const T scale = grow[b] / T(2 * n);
  for (int64_t w = 0; w < n; ++w) {
    const T t = w >= k ? T(1) : T(0);
    const T qp = W(WP + w), qn = W(WN + w);
    W(WP + w) = (qp >= T(0) && qp <= T(1)) ? scale * (qp - t) / fmax((T(1) - qp) * qp, T(1e-12)) : T(0);
    W(WN + w) = (qn >= T(0) && qn <= T(1)) ? scale * (qn - (T(1) - t)) / fmax((T(1) - qn) * qn, T(1e-12)) : T(0);
  }
  for (int64_t c = 0; c < C; ++c) {
    T a, sl;
    alpha_slope(W(DD + c), p, a, sl);
    const int ia = net[c], ib = net[C + c], dn = net[2 * C + c], dx = net[3 * C + c];
    const T pa = W(WP + ia), pb = W(WP + ib), na = W(WN + ia), nb = W(WN + ib);
    W(GA + c) = (pa - pb) * (W(PP + 4 * c) - W(PP + 4 * c + 1)) +
                (na - nb) * (W(PP + 4 * c + 2) - W(PP + 4 * c + 3));
    W(WP + dn) = a * pa + (T(1) - a) * pb;
    W(WP + dx) = (T(1) - a) * pa + a * pb;
    W(WN + dn) = a * na + (T(1) - a) * nb;
    W(WN + dx) = (T(1) - a) * na + a * nb;
  }
  T* lam = gs + b * n;
  for (int64_t w = 0; w < n; ++w) lam[w] = T(0);
  for (int64_t c = C - 1; c >= 0; --c) {
    const T dd = W(DD + c);
    T a, sl;
    alpha_slope(dd, p, a, sl);
    const T lmin = lam[net[2 * C + c]], lmax = lam[net[3 * C + c]];
    const T gd = (W(GA + c) - (lmin - lmax) * dd) * sl;
    lam[net[c]] = a * lmin + (T(1) - a) * lmax - gd;
    lam[net[C + c]] = (T(1) - a) * lmin + a * lmax + gd;
  }
#undef W
}

inline unsigned blocks_for(int64_t count, int threads) {
  return (unsigned)((count + threads - 1) / threads);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// launchers (called by sortnet_cuda_glue.cpp)

template <typename T>
void sortnet_soft_sort_forward_cuda(T* y, T* P, T* d, const int32_t* net, int64_t B, int64_t n,
                                    int64_t C, int dist, double s, double lam, double sb,
                                    cudaStream_t stream) {
  const Prm p{dist, s, lam, sb};
  if (B == 0) return;
  if (C > 0) values_kernel<T><<<blocks_for(B, 128), 128, 0, stream>>>(y, d, net, B, C, n, p);
  if (P) {
    const int threads = n >= 256 ? 256 : (n >= 32 ? (int)((n + 31) / 32 * 32) : 32);
    perm_kernel<T><<<(unsigned)B, threads, 0, stream>>>(P, d, net, C, n, p);
  }
}

// ga: a zeroed (B, C) buffer (or null without a P gradient); ws: chunk * slots * n values
template <typename T>
void sortnet_soft_sort_backward_cuda(T* gx, const T* gP, const T* d, T* ga, T* ws,
                                     int64_t chunk, const int32_t* net, int64_t B, int64_t n,
                                     int64_t C, int64_t K, int64_t S, int dist, double s,
                                     double lam, double sb, cudaStream_t stream) {
  const Prm p{dist, s, lam, sb};
  if (B == 0 || C == 0) return;
  if (gP) {
    const int threads = n >= 256 ? 256 : (n >= 32 ? (int)((n + 31) / 32 * 32) : 32);
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      const int64_t nb = B - b0 < chunk ? B - b0 : chunk;
      bwd_perm_kernel<T><<<(unsigned)nb, threads, 0, stream>>>(gP, d, ga, ws, net, b0, C, n, K,
                                                               S, p);
    }
  }
  bwd_values_kernel<T><<<blocks_for(B, 128), 128, 0, stream>>>(gx, d, gP ? ga : nullptr, net, B,
                                                                C, n, p);
}

// ws: (3n + 6C) * B values
template <typename T>
void sortnet_groco_rows_cuda(const T* sims, T* loss, const T* grow, T* gs, T* ws,
                             const int32_t* net, int64_t B, int64_t n, int64_t C, int64_t k,
                             int dist, double s, double lam, double sb, bool backward,
                             cudaStream_t stream) {
  const Prm p{dist, s, lam, sb};
  if (B == 0) return;
  groco_rows_kernel<T><<<blocks_for(B, 128), 128, 0, stream>>>(sims, loss, grow, gs, ws, net, B,
                                                               C, n, k, p, backward);
}

#define SORTNET_INSTANTIATE(T)                                                                 \
  template void sortnet_soft_sort_forward_cuda<T>(T*, T*, T*, const int32_t*, int64_t, int64_t, \
                                                  int64_t, int, double, double, double,        \
                                                  cudaStream_t);                               \
  template void sortnet_soft_sort_backward_cuda<T>(T*, const T*, const T*, T*, T*, int64_t,    \
                                                   const int32_t*, int64_t, int64_t, int64_t,  \
                                                   int64_t, int64_t, int, double, double,      \
                                                   double, cudaStream_t);                      \
  template void sortnet_groco_rows_cuda<T>(const T*, T*, const T*, T*, T*, const int32_t*,     \
                                           int64_t, int64_t, int64_t, int64_t, int, double,    \
                                           double, double, bool, cudaStream_t);
SORTNET_INSTANTIATE(float)
SORTNET_INSTANTIATE(double)
