// SwAV Sinkhorn-Knopp, CUDA (plain CUDA: raw pointers + cudaStream_t, no torch headers).
//
// The two log-domain passes of fastssl/ops/swav.py (same maths as csrc/swav_cpu.cpp
// and kernels/swav.py), on row-major contiguous (B, K) scores of float32, float64,
// float16 or bfloat16; compute and outputs in float32 (float64 for float64 scores):
//   colstats: M[k] = max_b x[b,k], S[k] = sum_b exp(x[b,k] - M[k]), x = scores / eps
//   rowpass : p = softmax_k(x[b,:] + a); write p (codes) or colsum[k] = sum_b p[b,k]
// Both are two-stage (per row-block partials, then a per-prototype combine), deterministic
// (no atomics). The caller owns every buffer (see swav_cuda_glue.cpp for the sizes).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float load_acc(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double load_acc(const double* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_acc(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_acc(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -__int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double neg_inf<double>() {
  return -__longlong_as_double(0x7ff0000000000000LL);
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide reductions (blockDim.x == kThreads); every thread gets the result.
template <typename A>
__device__ A block_max(A v, A* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = (threadIdx.x < kThreads / 32) ? smem[threadIdx.x] : neg_inf<A>();
  if (warp == 0) v = warp_max(v);
  if (threadIdx.x == 0) smem[0] = v;
  __syncthreads();
  v = smem[0];
  __syncthreads();
  return v;
}

template <typename A>
__device__ A block_sum(A v, A* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = (threadIdx.x < kThreads / 32) ? smem[threadIdx.x] : A(0);
  if (warp == 0) v = warp_sum(v);
  if (threadIdx.x == 0) smem[0] = v;
  __syncthreads();
  v = smem[0];
  __syncthreads();
  return v;
}

// grid (ceil(K / kThreads), min(n_parts, kMaxGridY)): one thread per prototype column; each
// block walks the row blocks blockIdx.y, blockIdx.y + gridDim.y, ... (grid.y is at most 65,535:
// ceil(B / 32) passes it at B > 2.1 million rows).
template <typename T, typename A>
__global__ void colstats_partial_kernel(const T* __restrict__ s, int64_t B, int64_t K, A eps,
                                        int rows, int64_t n_parts, A* __restrict__ m_part,
                                        A* __restrict__ l_part) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (k >= K) return;
  for (int64_t part = blockIdx.y; part < n_parts; part += gridDim.y) {
    const int64_t r0 = part * rows;
    const int64_t r1 = r0 + rows < B ? r0 + rows : B;
    A m = neg_inf<A>();
    for (int64_t b = r0; b < r1; ++b) m = fmax(m, load_acc(s, b * K + k) / eps);
    A l = 0;
    for (int64_t b = r0; b < r1; ++b) l += exp_acc(load_acc(s, b * K + k) / eps - m);
    m_part[part * K + k] = m;
    l_part[part * K + k] = l;
  }
}

// grid ceil(K / kThreads): merge the row-block partials of each column.
template <typename A>
__global__ void colstats_combine_kernel(const A* __restrict__ m_part, const A* __restrict__ l_part,
                                        int64_t n_parts, int64_t K, A* __restrict__ M,
                                        A* __restrict__ S) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (k >= K) return;
  A m = neg_inf<A>();
  for (int64_t p = 0; p < n_parts; ++p) m = fmax(m, m_part[p * K + k]);
  A l = 0;
  for (int64_t p = 0; p < n_parts; ++p) l += l_part[p * K + k] * exp_acc(m_part[p * K + k] - m);
  M[k] = m;
  S[k] = l;
}

// grid n_row_blocks, kThreads threads, shared memory: `rows` lse values + 32 for reductions.
// Phase 1: row logsumexp of x + a (block reductions, one row at a time).
// Phase 2: codes, or this block's column sums of the softmax (each thread owns columns).
template <typename T, typename A>
__global__ void rowpass_kernel(const T* __restrict__ s, int64_t B, int64_t K, A eps,
                               const A* __restrict__ a, int rows, bool write_codes,
                               A* __restrict__ out) {
  extern __shared__ unsigned char smem_raw[];
  A* red = reinterpret_cast<A*>(smem_raw);
  A* lse = red + 32;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows;
  const int nr = static_cast<int>(r0 + rows < B ? rows : B - r0);
  for (int r = 0; r < nr; ++r) {
    const int64_t base = (r0 + r) * K;
    A m = neg_inf<A>();
    for (int64_t k = threadIdx.x; k < K; k += kThreads) m = fmax(m, load_acc(s, base + k) / eps + a[k]);
    m = block_max(m, red);
    A l = 0;
    for (int64_t k = threadIdx.x; k < K; k += kThreads) l += exp_acc(load_acc(s, base + k) / eps + a[k] - m);
    l = block_sum(l, red);
    if (threadIdx.x == 0) lse[r] = m + log_acc(l);
  }
  __syncthreads();
  if (write_codes) {
    for (int r = 0; r < nr; ++r) {
      const int64_t base = (r0 + r) * K;
      const A c = lse[r];
      for (int64_t k = threadIdx.x; k < K; k += kThreads)
        out[base + k] = exp_acc(load_acc(s, base + k) / eps + a[k] - c);
    }
  } else {
    for (int64_t k = threadIdx.x; k < K; k += kThreads) {
      const A ak = a[k];
      A acc = 0;
      for (int r = 0; r < nr; ++r) acc += exp_acc(load_acc(s, (r0 + r) * K + k) / eps + ak - lse[r]);
      out[blockIdx.x * K + k] = acc;
    }
  }
}

// grid ceil(K / kThreads): colsum[k] = sum over row blocks of the partial column sums.
template <typename A>
__global__ void colsum_combine_kernel(const A* __restrict__ part, int n_parts, int64_t K,
                                      A* __restrict__ colsum) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (k >= K) return;
  A acc = 0;
  for (int p = 0; p < n_parts; ++p) acc += part[p * K + k];
  colsum[k] = acc;
}

constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

template <typename T>
cudaError_t colstats_launch(const void* s, int64_t B, int64_t K, double eps, int rows, void* m_part,
                            void* l_part, void* M, void* S, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int64_t n_parts = (B + rows - 1) / rows;
  const unsigned grid_y = static_cast<unsigned>(n_parts < kMaxGridY ? n_parts : kMaxGridY);
  colstats_partial_kernel<T, A><<<dim3(blocks_for(K), grid_y), kThreads, 0, stream>>>(
      static_cast<const T*>(s), B, K, static_cast<A>(eps), rows, n_parts,
      static_cast<A*>(m_part), static_cast<A*>(l_part));
  colstats_combine_kernel<A><<<blocks_for(K), kThreads, 0, stream>>>(
      static_cast<const A*>(m_part), static_cast<const A*>(l_part), n_parts, K,
      static_cast<A*>(M), static_cast<A*>(S));
  return cudaGetLastError();
}

template <typename T>
cudaError_t rowpass_launch(const void* s, int64_t B, int64_t K, double eps, const void* a, int rows,
                           bool write_codes, void* part, void* out, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int n_parts = static_cast<int>((B + rows - 1) / rows);
  const size_t smem = (32 + static_cast<size_t>(rows)) * sizeof(A);
  rowpass_kernel<T, A><<<n_parts, kThreads, smem, stream>>>(
      static_cast<const T*>(s), B, K, static_cast<A>(eps), static_cast<const A*>(a), rows,
      write_codes, static_cast<A*>(write_codes ? out : part));
  if (!write_codes) {
    colsum_combine_kernel<A><<<blocks_for(K), kThreads, 0, stream>>>(
        static_cast<const A*>(part), n_parts, K, static_cast<A*>(out));
  }
  return cudaGetLastError();
}

}  // namespace

// dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16. Accumulation buffers (m_part,
// l_part, M, S, a, part, out) are float64 for float64 scores and float32 otherwise.
// Partial buffers hold ceil(B / rows) x K values. Returns cudaSuccess or the launch error.
cudaError_t fastssl_sinkhorn_colstats_cuda(const void* s, int dtype, int64_t B, int64_t K,
                                           double eps, int rows, void* m_part, void* l_part,
                                           void* M, void* S, cudaStream_t stream) {
  switch (dtype) {
    case 0: return colstats_launch<float>(s, B, K, eps, rows, m_part, l_part, M, S, stream);
    case 1: return colstats_launch<double>(s, B, K, eps, rows, m_part, l_part, M, S, stream);
    case 2: return colstats_launch<__half>(s, B, K, eps, rows, m_part, l_part, M, S, stream);
    case 3: return colstats_launch<__nv_bfloat16>(s, B, K, eps, rows, m_part, l_part, M, S, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t fastssl_sinkhorn_rowpass_cuda(const void* s, int dtype, int64_t B, int64_t K,
                                          double eps, const void* a, int rows, bool write_codes,
                                          void* part, void* out, cudaStream_t stream) {
  switch (dtype) {
    case 0: return rowpass_launch<float>(s, B, K, eps, a, rows, write_codes, part, out, stream);
    case 1: return rowpass_launch<double>(s, B, K, eps, a, rows, write_codes, part, out, stream);
    case 2: return rowpass_launch<__half>(s, B, K, eps, a, rows, write_codes, part, out, stream);
    case 3: return rowpass_launch<__nv_bfloat16>(s, B, K, eps, a, rows, write_codes, part, out, stream);
    default: return cudaErrorInvalidValue;
  }
}
