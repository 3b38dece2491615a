// Contrastive same-pass ops, CPU: the loss value and its gradient from one pass over row blocks
// of the logits (fastssl/ops/contrastive.py, the "cpp" entry of the family's table).
//
// The torch backend runs the same arithmetic as a Python loop of ATen calls over row blocks:
// every call is a parallel region whose barrier stalls for a scheduler time slice when other
// processes share the cores (issue 18). Here the row blocks are spread over the threads once
// (one parallel region per call); inside it every ATen call runs on its own thread (nested
// parallelism is off), on a block sized to stay in the core's cache. dB, summed over all row
// blocks, is accumulated per thread and the partial sums added at the end in thread order.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_exp.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

// 8 MiB of float32 logits per block buffer (each thread holds one or two), and at least a few
// blocks per thread so that the static split of the blocks stays balanced. Each row block
// streams all the columns once, so fewer, taller blocks read b fewer times: measured
// (2 threads, EPYC, fwd+bwd, median of 3; 2^17 / 2^19 / 2^21 / 2^22 / 2^23 elements):
// info_nce B = 8192 1601 / 1171 / 710 / 799 / 876 ms, symmetric 3167 / 1860 / 1639 / 1592 /
// 1647 ms, sce B = 4096 K = 16384 3137 / 1733 / 1344 / 1380 / 1407 ms. At most c / 32 rows,
// so that the buffers (two threads, two each: c^2 / 8 elements) stay a small share of eager's
// c x c logits at smaller sizes (the 1/8-of-eager memory target from B = 2048).
constexpr int64_t kBlockElements = int64_t(1) << 21;
constexpr int64_t kBlocksPerThread = 4;
constexpr int64_t kColumnsPerRow = 32;
constexpr int64_t kMinRows = 16;
constexpr int64_t kNormRows = 1024;  // rows per block of the Gram's squared-norm bound

int64_t block_rows(int64_t m, int64_t c) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_cache = std::max<int64_t>(
      1, std::min(kBlockElements / std::max<int64_t>(c, 1),
                  std::max<int64_t>(kMinRows, c / kColumnsPerRow)));
  const int64_t by_balance = std::max<int64_t>(1, (m + threads * kBlocksPerThread - 1) / (threads * kBlocksPerThread));
  return std::max<int64_t>(1, std::min(by_cache, by_balance));
}

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_matrix(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, ": expected a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, name, ": expected a 2-D tensor, got ", x.dim(), " dimensions");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, ": expected a floating dtype, got ",
              x.scalar_type());
}

// A column index per row: int64, CPU, (rows,), every value in [-1, cols) (-1: nothing masked).
void check_columns(const at::Tensor& col, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(col.device().is_cpu(), name, ": expected a CPU tensor, got ", col.device());
  TORCH_CHECK(col.scalar_type() == at::kLong, name, ": expected int64, got ", col.scalar_type());
  TORCH_CHECK(col.dim() == 1 && col.size(0) == rows, name, ": expected shape (", rows,
              "), got ", col.sizes());
  if (rows > 0) {
    const auto c = col.contiguous();
    const int64_t* p = c.data_ptr<int64_t>();
    const auto [lo, hi] = std::minmax_element(p, p + rows);
    TORCH_CHECK(*lo >= -1 && *hi < cols, name, ": values must lie in [-1, ", cols, "), got [",
                *lo, ", ", *hi, "]");
  }
}

// Masked entries of the block's rows [r0, r0 + n): x[i, col[r0 + i]] = value for each column.
template <typename T>
void fill_masked(T* x, int64_t n, int64_t c, int64_t r0, const std::vector<const int64_t*>& cols,
                 T value) {
  for (const int64_t* col : cols)
    for (int64_t i = 0; i < n; ++i)
      if (col[r0 + i] >= 0) x[i * c + col[r0 + i]] = value;
}

// One column per row that no mask touches (the smallest of 0, 1, 2 outside the row's masked
// columns), or -1: log-sum-exp is read back there from log_softmax, lse = x - log_softmax(x).
int64_t probe_column(int64_t row, int64_t c, const std::vector<const int64_t*>& cols) {
  for (int64_t j = 0; j < std::min<int64_t>(c, 3); ++j) {
    bool free = true;
    for (const int64_t* col : cols) free = free && col[row] != j;
    if (free) return j;
  }
  return -1;
}

// log-sum-exp is read back from log_softmax at one unmasked column j of each row:
// lse = x_j - log_softmax(x)_j. The block's log_softmax is taken in place (one buffer per
// thread), so x_j is saved first (save_probe) and lse formed after (read_lse).
template <typename T>
void save_probe(const T* x, int64_t n, int64_t c, int64_t r0,
                const std::vector<const int64_t*>& cols, std::vector<T>& probe) {
  probe.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = probe_column(r0 + i, c, cols);
    probe[i] = j < 0 ? T(0) : x[i * c + j];
  }
}

template <typename T>
void read_lse(const std::vector<T>& probe, const T* y, int64_t n, int64_t c, int64_t r0,
              const std::vector<const int64_t*>& cols, T* lse) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = probe_column(r0 + i, c, cols);
    lse[r0 + i] = j < 0 ? -std::numeric_limits<T>::infinity() : probe[i] - y[i * c + j];
  }
}

// The checked operands of a call over X = scale * a @ b.T: a and b in the accumulation dtype
// (float32, float64 for float64), contiguous, detached; the masked columns of each row.
struct Operands {
  int64_t m, c, d;
  at::ScalarType acc;
  at::TensorOptions opts;
  at::Tensor A, B, sc, pc;
  std::vector<const int64_t*> masks;
};

Operands prepare(const at::Tensor& a, const at::Tensor& b, const at::Tensor& self_col,
                 const at::Tensor& pos_col, bool exclude_pos) {
  check_matrix(a, "a");
  check_matrix(b, "b");
  TORCH_CHECK(a.size(1) == b.size(1), "a, b: expected the same number of columns, got ",
              a.size(1), " and ", b.size(1));
  Operands o;
  o.m = a.size(0);
  o.c = b.size(0);
  o.d = a.size(1);
  check_columns(self_col, "self_col", o.m, o.c);
  check_columns(pos_col, "pos_col", o.m, o.c);
  o.acc = acc_type(a);
  o.opts = a.options().dtype(o.acc);
  o.A = a.detach().to(o.acc).contiguous();
  o.B = b.detach().to(o.acc).contiguous();
  o.sc = self_col.contiguous();
  o.pc = pos_col.contiguous();
  o.masks = {o.sc.data_ptr<int64_t>()};
  if (exclude_pos) o.masks.push_back(o.pc.data_ptr<int64_t>());
  return o;
}

// A block's share of the gradients from its G (rows r0..r0+n): da rows = G b (scaled at the end),
// db += G^T (scale a) into the thread's accumulator.
void block_grads(const at::Tensor& g, const at::Tensor& a_r, const at::Tensor& B, at::Tensor& da,
                 at::Tensor& db_t, int64_t r0, int64_t n, bool need_da, bool need_db) {
  if (need_da) {
    at::Tensor da_r = da.narrow(0, r0, n);
    at::mm_out(da_r, g, B);
  }
  if (need_db) db_t.addmm_(g.t(), a_r);
}

// After the parallel region: da's scale, and the other threads' dB partial sums added into
// thread 0's (db itself), in thread order (the same sum at every call).
void finish_grads(at::Tensor& da, at::Tensor& db, const std::vector<at::Tensor>& db_part,
                  double scale, bool need_da) {
  if (need_da) da.mul_(scale);
  for (size_t t = 1; t < db_part.size(); ++t)
    if (db_part[t].defined()) db.add_(db_part[t]);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define FASTSSL_SCE_AVX2 1
// x[j] = exp(x[j] - m) in place for j < n (m the row's running max, so x - m <= 0), returning
// their sum (8 lanes, then the lanes in order: the same sum at every call). ATen's exp_ costs
// ~2 ns an element here, a sixth of a tile's time; this pass (sub, exp, sum fused) ~0.5 ns.
// The exp is the shared vector one (csrc/vec_exp.h, as the SwAV kernels'): below -87 and at
// -inf (a masked entry) it gives 0; NaN stays NaN.
__attribute__((target("avx2,fma"))) float exp_shift_sum_avx2(float* x, int64_t n, float m) {
  using F = fastssl_vec::Vec<8>::f;
  F acc = F{};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const F y = fastssl_vec::vexp<8>(fastssl_vec::vload<8>(x + j) - m);
    fastssl_vec::vstore<8>(x + j, y);
    acc += y;
  }
  float s = 0;
  for (int k = 0; k < 8; ++k) s += acc[k];
  for (; j < n; ++j) s += (x[j] = std::exp(x[j] - m));
  return s;
}

// max of x[0..n) (8 lanes; -inf for n = 0)
__attribute__((target("avx2,fma"))) float row_max_avx2(const float* x, int64_t n) {
  __m256 acc = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(x + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float m = lanes[0];
  for (int k = 1; k < 8; ++k) m = std::max(m, lanes[k]);
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

// Whether lse_sum_cpu's float32 blocks take fused_block (1, the default) or the log_softmax
// form; settable for the A/B (contrastive_fused_exp).
std::atomic<int> g_fused_exp{1};

#ifdef FASTSSL_SCE_AVX2
// One float32 row block of lse_sum_cpu with the exp fused (issue 25): x (n x c, masked entries
// -inf) becomes E = exp(x - m_i) and the row sums s_i in one pass (exp_shift_sum_avx2), and
// P = E / s is never written: the 1/s_i is folded into the n x D operands of the gradient
// products, da_r = diag(1/s) (E B) - B[pos] and db += E^T diag(1/s) a_r - onehot^T a_r. The
// log_softmax + exp form made four passes over the block (8 MiB per thread at c = 8192,
// beyond L2), this two (max, exp): they were 18% of non-symmetric InfoNCE's time at B = 8192.
// lse = m + log s; ce = -((x_pos - m) - log s), log_softmax's own arithmetic at the positive
// (+inf where a mask hides the positive, as log_softmax there is -inf).
// A row with every column masked: s = 0, lse = -inf, its gradient row 0 (as the ATen path).
void fused_block(at::Tensor& x, float* xp, const at::Tensor& a_r, const at::Tensor& B,
                 int64_t r0, int64_t n, int64_t c, const int64_t* pos_p, float* lsep, float* cep,
                 const float* posp, bool subtract_pos, bool need_da, bool need_db, at::Tensor& da,
                 at::Tensor& db_t, std::vector<float>& rowbuf) {
  const float inf = std::numeric_limits<float>::infinity();
  rowbuf.resize(static_cast<size_t>(n));
  float* inv = rowbuf.data();
  for (int64_t i = 0; i < n; ++i) {
    float* row = xp + i * c;
    const float m = row_max_avx2(row, c);
    const float shift = m == -inf ? 0.0f : m;
    const int64_t p = pos_p[r0 + i];
    // log_softmax is -inf at a masked positive: ce +inf there, as the ATen form gives
    const bool pos_masked = p >= 0 && row[p] == -inf;
    const float s = exp_shift_sum_avx2(row, c, shift);  // masked (-inf) entries: 0
    const float log_s = std::log(s);
    lsep[r0 + i] = s > 0 ? shift + log_s : -inf;
    if (cep)  // a row without a positive: its lse alone
      cep[r0 + i] = p < 0 ? lsep[r0 + i] : pos_masked ? inf : -((posp[r0 + i] - shift) - log_s);
    inv[i] = s > 0 ? 1.0f / s : 0.0f;
  }
  if (!(need_da || need_db)) return;
  const int64_t d = B.size(1);
  const float* bp = B.data_ptr<float>();
  const float* ap = a_r.data_ptr<float>();
  if (need_da) {
    at::Tensor da_r = da.narrow(0, r0, n);
    at::mm_out(da_r, x, B);
    float* dp = da_r.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      float* out = dp + i * d;
      const int64_t p = subtract_pos ? pos_p[r0 + i] : -1;
      const float* bpos = p >= 0 ? bp + p * d : nullptr;
      for (int64_t k = 0; k < d; ++k) out[k] = out[k] * inv[i] - (bpos ? bpos[k] : 0.0f);
    }
  }
  if (need_db) {
    const at::Tensor a_s = a_r * at::from_blob(inv, {n, 1}, a_r.options());
    db_t.addmm_(x.t(), a_s);
    if (subtract_pos) {
      float* dbp = db_t.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t p = pos_p[r0 + i];
        if (p < 0) continue;
        for (int64_t k = 0; k < d; ++k) dbp[p * d + k] -= ap[i * d + k];
      }
    }
  }
}
#endif

// (lse, pos, da, db, ce): lse[i] = log-sum-exp of row i of X = scale * a @ b.T with the masked
// entries removed, pos[i] = X[i, pos_col[i]] (0 where pos_col is -1); ce[i] = lse[i] - pos[i]
// read as -log_softmax(X)[i, pos_col[i]] (eager cross-entropy's arithmetic: no rounding at the
// logits' magnitude; +inf where self_col masks the positive; only when subtract_pos and not
// exclude_pos, else empty);
// da and db the gradients of
// L = sum_i lse_i (minus sum_i pos_i when subtract_pos: the cross-entropy of each row against
// its positive column, G = P - onehot(pos)): da = scale * G b, db = scale * G^T a, P = softmax of
// the rows; each empty when not asked for. Float32 statistics (float64 for float64 inputs).
std::vector<at::Tensor> lse_sum_cpu(const at::Tensor& a, const at::Tensor& b,
                                    const at::Tensor& self_col, const at::Tensor& pos_col,
                                    double scale, bool exclude_pos, bool subtract_pos,
                                    bool need_da, bool need_db) {
  at::NoGradGuard no_grad;  // the gradient is computed here, not recorded (out= calls need this;
                            // the worker threads set their own, and the inputs are detached)
  const Operands o = prepare(a, b, self_col, pos_col, exclude_pos);
  const int64_t m = o.m, c = o.c, d = o.d;
  const auto acc = o.acc;
  const auto& opts = o.opts;
  const at::Tensor &A = o.A, &B = o.B, &pc = o.pc;
  const auto& masks = o.masks;

  at::Tensor lse = at::empty({m}, opts), pos = at::zeros({m}, opts);
  const bool want_ce = subtract_pos && !exclude_pos;
  at::Tensor ce = at::empty({want_ce ? m : 0}, opts);
  const int64_t* pos_p = pc.data_ptr<int64_t>();
  at::Tensor da = need_da ? at::empty({m, d}, opts) : at::empty({0}, opts);
  const int64_t rows = block_rows(m, c);
  const int64_t blocks = (m + rows - 1) / rows;
  // dB: thread 0 accumulates into db itself, every other thread into its own partial sum,
  // added in thread order after the region (the same sum at every call).
  at::Tensor db = need_db ? at::zeros({c, d}, opts) : at::empty({0}, opts);
  std::vector<at::Tensor> db_part(std::max(1, at::get_num_threads()));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad_here;  // grad mode is per thread
    const at::Tensor x_buf = at::empty({rows, c}, opts);
    const int tid = at::get_thread_num();
    at::Tensor& db_t = db_part.at(tid);
    if (need_db && !db_t.defined()) db_t = tid == 0 ? db : at::zeros({c, d}, opts);
    std::vector<float> rowbuf;
    AT_DISPATCH_FLOATING_TYPES(acc, "lse_sum_cpu", [&] {
      std::vector<scalar_t> probe;
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * rows, n = std::min(rows, m - r0);
        const at::Tensor a_r = A.narrow(0, r0, n) * scale;
        at::Tensor x = x_buf.narrow(0, 0, n);
        at::mm_out(x, a_r, B.t());
        scalar_t* xp = x.data_ptr<scalar_t>();
        scalar_t* posp = pos.data_ptr<scalar_t>();
        for (int64_t i = 0; i < n; ++i)  // the positive's logit, before any mask
          if (pos_p[r0 + i] >= 0) posp[r0 + i] = xp[i * c + pos_p[r0 + i]];
        fill_masked<scalar_t>(xp, n, c, r0, masks, -std::numeric_limits<scalar_t>::infinity());
#ifdef FASTSSL_SCE_AVX2
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (has_avx2() && g_fused_exp.load()) {
            // (the dispatch lambda is not a template: the casts compile for double too)
            fused_block(x, reinterpret_cast<float*>(xp), a_r, B, r0, n, c, pos_p,
                        lse.data_ptr<float>(), want_ce ? ce.data_ptr<float>() : nullptr,
                        reinterpret_cast<const float*>(posp), subtract_pos, need_da, need_db,
                        da, db_t, rowbuf);
            continue;
          }
        }
#endif
        save_probe<scalar_t>(xp, n, c, r0, masks, probe);
        at::_log_softmax_out(x, x, 1, false);  // row by row: in place is exact
        read_lse<scalar_t>(probe, xp, n, c, r0, masks, lse.data_ptr<scalar_t>());
        if (want_ce) {
          scalar_t* cep = ce.data_ptr<scalar_t>();
          scalar_t* lsep = lse.data_ptr<scalar_t>();
          for (int64_t i = 0; i < n; ++i)  // a row without a positive: its lse alone
            cep[r0 + i] = pos_p[r0 + i] >= 0 ? -xp[i * c + pos_p[r0 + i]] : lsep[r0 + i];
        }
        if (!(need_da || need_db)) continue;
        x.exp_();  // P
        // rows with every column masked are NaN after the softmax: their masked entries are all
        fill_masked<scalar_t>(xp, n, c, r0, masks, scalar_t(0));
        if (subtract_pos)  // G = P - onehot(pos)
          for (int64_t i = 0; i < n; ++i)
            if (pos_p[r0 + i] >= 0) xp[i * c + pos_p[r0 + i]] -= scalar_t(1);
        block_grads(x, a_r, B, da, db_t, r0, n, need_da, need_db);
      }
    });
  });
  finish_grads(da, db, db_part, scale, need_da);
  return {lse, pos, da, db, ce};
}

// SCE's same-pass kernel, column-tiled (issue 25): the flash-attention forward, twice. A block
// of n rows stacks the student and teacher operands, A = [scale_s q; scale_t k] (2n x D), and
// walks the columns in tiles of w: S = A C_tile^T (2n x w) stays in L2, and only per-row
// running statistics (max m, sum l of exp(S - m)) and the 2n x D accumulator
// U += exp(S - m) C_tile (rescaled by exp(m_old - m_new) when a row's max grows) outlive the
// tile. The former version built the two n x c logit blocks in full (8 MiB each at c = 16384)
// and made ~10 passes over them from memory. wmean needs no pass of its own:
// sum_j softmax(Y)_ij X_ij = scale_s q_i . (softmax(Y) C)_i = q_i . u_t,i.
// Sizes measured at B = 4096, K = 16384, D = 128, 2 threads, float32, candidates interleaved in
// one process with the former version and a 2048^2 sgemm (the machine shared, load 4.5-5.6, so
// the figures are noisy; median ms over 9 then 7 calls, rows x tile): 128 x 256 2210,
// 128 x 512 2168, 256 x 256 2005 / 2358, 256 x 512 1969 / 2140, 128 x 1024 2053, 512 x 256 2392,
// 512 x 128 2552, 256 x 1024 2443; the former version 2838 / 2872. Taller blocks read the
// columns fewer times; 256 x 512 was the best or near it in both runs (its float32 tile, 2 x 256
// x 512, is 1 MiB: twice the core's 512 KiB L2, held in the 32 MiB L3; the smaller tiles that fit
// L2 were not faster here). Fewer rows when the row count is small, so that every thread gets
// blocks (kBlocksPerThread). Reported by fastssl.backends.ext.contrastive.block_config()
// (sce_rows, sce_tile): keep the two in step. With the fused exp below (float32, AVX2), same
// size, 7 calls interleaved, load 1.6-1.9 with this run's own 2 threads: former version median
// 1330 ms (best 989), tiled with ATen's exp 826 (662), tiled with the fused exp 630 (515, 133
// GFLOP/s counted as the 4 products); a 2048^2 sgemm in the same run 91.0 (best 143.7) GFLOP/s.
// The sizes again with the fused exp (11 calls each, interleaved, load 1.2-1.6): medians 256 x
// 512 641, 256 x 256 639, 512 x 512 659, 128 x 512 663, 512 x 256 690 ms: flat within the noise.
constexpr int64_t kSceRows = 256;
constexpr int64_t kSceTile = 512;

// Per-thread scratch of the tiled SCE kernel, sized for the largest block and tile.
struct SceScratch {
  at::Tensor a, s, u, mx, alpha, msafe, psum;
  std::vector<double> m, l;
  SceScratch(int64_t rows, int64_t tile, int64_t d, const at::TensorOptions& opts)
      : a(at::empty({2 * rows, d}, opts)), s(at::empty({2 * rows * tile}, opts)),
        u(at::empty({2 * rows, d}, opts)), mx(at::empty({2 * rows}, opts)),
        alpha(at::empty({2 * rows}, opts)), msafe(at::empty({2 * rows}, opts)),
        psum(at::empty({2 * rows}, opts)), m(2 * rows), l(2 * rows) {}
};


// Rows [r0, r0 + n) of the SCE statistics (see sce_grad_cpu), one thread, columns in order:
// the same sums at every call.
template <typename T>
void sce_row_block(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& Cm,
                   const int64_t* self_col, double scale_s, double scale_t, int64_t r0,
                   int64_t n, int64_t tile, SceScratch& w, T* lse_s, T* lse_t, T* wmean,
                   T* u_s, T* u_t) {
  const int64_t c = Cm.size(0), d = Cm.size(1), n2 = 2 * n;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  constexpr double kNegInfD = -std::numeric_limits<double>::infinity();
  at::Tensor A = w.a.narrow(0, 0, n2), U = w.u.narrow(0, 0, n2);
  A.narrow(0, 0, n).copy_(Q.narrow(0, r0, n)).mul_(scale_s);
  A.narrow(0, n, n).copy_(K.narrow(0, r0, n)).mul_(scale_t);
  U.zero_();
  std::fill_n(w.m.begin(), n2, kNegInfD);
  std::fill_n(w.l.begin(), n2, 0.0);
  at::Tensor mx = w.mx.narrow(0, 0, n2), psum = w.psum.narrow(0, 0, n2);
  at::Tensor alpha = w.alpha.narrow(0, 0, n2), msafe = w.msafe.narrow(0, 0, n2);
  T* mxp = mx.data_ptr<T>();
  T* alp = alpha.data_ptr<T>();
  T* msp = msafe.data_ptr<T>();
  T* psp = psum.data_ptr<T>();
  for (int64_t j0 = 0; j0 < c; j0 += tile) {
    const int64_t nw = std::min(tile, c - j0);
    const at::Tensor Ct = Cm.narrow(0, j0, nw);
    at::Tensor S = w.s.narrow(0, 0, n2 * nw).view({n2, nw});  // contiguous at any width
    at::mm_out(S, A, Ct.t());
    T* sp = S.data_ptr<T>();
    for (int64_t i = 0; i < n; ++i) {  // the teacher's masked column, if in this tile
      const int64_t j = self_col[r0 + i] - j0;
      if (j >= 0 && j < nw) sp[(n + i) * nw + j] = kNegInf;
    }
    at::amax_out(mx, S, {1});
    for (int64_t i = 0; i < n2; ++i) {
      const double m_old = w.m[i], m_new = std::max<double>(m_old, mxp[i]);
      // a row masked so far has l = 0 and U = 0: any finite factor; exp(-inf - -inf) is NaN
      alp[i] = m_old == kNegInfD ? T(0) : T(std::exp(m_old - m_new));
      msp[i] = m_new == kNegInfD ? T(0) : T(m_new);
      w.m[i] = m_new;
    }
    bool fused = false;
#ifdef FASTSSL_SCE_AVX2
    if constexpr (std::is_same_v<T, float>) {
      if (has_avx2()) {
        for (int64_t i = 0; i < n2; ++i) psp[i] = exp_shift_sum_avx2(sp + i * nw, nw, msp[i]);
        fused = true;
      }
    }
#endif
    if (!fused) {  // float64, or no AVX2
      S.sub_(msafe.unsqueeze(1));
      S.exp_();  // masked entries: exp(-inf) = 0
      at::sum_out(psum, S, {1});
    }
    for (int64_t i = 0; i < n2; ++i) w.l[i] = w.l[i] * alp[i] + psp[i];
    if (j0 > 0) U.mul_(alpha.unsqueeze(1));  // the first tile's alpha is 0 and U is zero
    U.addmm_(S, Ct);
  }
  const T* up = U.data_ptr<T>();
  const T* qp = Q.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = r0 + i;
    // student rows always have columns (c > 0 here); a teacher row with every column masked
    // has l = 0: lse -inf, u_t 0, wmean 0 (as the former version)
    lse_s[r] = T(w.m[i] + std::log(w.l[i]));
    const double lt = w.l[n + i];
    lse_t[r] = lt > 0 ? T(w.m[n + i] + std::log(lt)) : kNegInf;
    const T fs = T(scale_s / w.l[i]), ft = lt > 0 ? T(scale_s / lt) : T(0);
    double dot = 0;
    for (int64_t k = 0; k < d; ++k) {
      u_s[r * d + k] = up[i * d + k] * fs;
      const T ut = up[(n + i) * d + k] * ft;
      u_t[r * d + k] = ut;
      dot += double(qp[r * d + k]) * double(ut);
    }
    wmean[r] = T(dot);
  }
}

// SCE's statistics and their per-row gradients in q (fastssl.ops.contrastive.sce_stats,
// same_pass=True): X = scale_s q cols^T, Y = scale_t k cols^T with (i, self_col[i]) masked in Y;
// lse_s, lse_t their row log-sum-exps, wmean[i] = sum_j softmax(Y)_ij X_ij,
// u_s = scale_s softmax(X) cols, u_t = scale_s softmax(Y) cols.
std::vector<at::Tensor> sce_grad_cpu(const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& cols, const at::Tensor& self_col,
                                     double scale_s, double scale_t) {
  at::NoGradGuard no_grad;
  check_matrix(q, "q");
  check_matrix(k, "k");
  check_matrix(cols, "cols");
  TORCH_CHECK(k.sizes() == q.sizes(), "k: expected the shape of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(cols.size(1) == q.size(1), "cols: expected ", q.size(1), " columns, got ", cols.size(1));
  const int64_t m = q.size(0), c = cols.size(0), d = q.size(1);
  check_columns(self_col, "self_col", m, c);
  const auto acc = acc_type(q);
  const auto opts = q.options().dtype(acc);
  const at::Tensor Q = q.detach().to(acc).contiguous(), K = k.detach().to(acc).contiguous();
  const at::Tensor Cm = cols.detach().to(acc).contiguous(), sc = self_col.contiguous();
  const int64_t* self_p = sc.data_ptr<int64_t>();

  at::Tensor lse_s = at::empty({m}, opts), lse_t = at::empty({m}, opts), wmean = at::empty({m}, opts);
  at::Tensor u_s = at::empty({m, d}, opts), u_t = at::empty({m, d}, opts);
  if (c == 0) {  // no columns: empty softmaxes (log-sum-exp -inf, weighted sums 0)
    lse_s.fill_(-std::numeric_limits<double>::infinity());
    lse_t.fill_(-std::numeric_limits<double>::infinity());
    wmean.zero_();
    u_s.zero_();
    u_t.zero_();
    return {lse_s, lse_t, wmean, u_s, u_t};
  }
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows = std::max<int64_t>(
      1, std::min(kSceRows,
                  (m + threads * kBlocksPerThread - 1) / (threads * kBlocksPerThread)));
  const int64_t tile = std::min(kSceTile, c);
  const int64_t blocks = (m + rows - 1) / rows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad_here;  // grad mode is per thread
    SceScratch scratch(rows, tile, d, opts);
    AT_DISPATCH_FLOATING_TYPES(acc, "sce_grad_cpu", [&] {
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * rows, n = std::min(rows, m - r0);
        sce_row_block<scalar_t>(Q, K, Cm, self_p, scale_s, scale_t, r0, n, tile, scratch,
                                lse_s.data_ptr<scalar_t>(), lse_t.data_ptr<scalar_t>(),
                                wmean.data_ptr<scalar_t>(), u_s.data_ptr<scalar_t>(),
                                u_t.data_ptr<scalar_t>());
      }
    });
  });
  return {lse_s, lse_t, wmean, u_s, u_t};
}

// The two-pass ops of the family (fastssl.ops.contrastive.torch_lse_forward / _backward, the
// same arithmetic block for block) in one parallel region each: symmetric InfoNCE, DCL,
// SogCLR and the memory bank use them. Forward: (lse0, lse1, wmean, col_lse), lse0 over the
// columns < split, lse1 over the others (empty when split >= C), wmean the softmax-weighted
// mean logit of the lse0 columns (empty unless weighted), col_lse the column log-sum-exps
// (empty unless col_stats; per-thread partials merged by logaddexp in thread order).
std::vector<at::Tensor> lse_forward_cpu(const at::Tensor& a, const at::Tensor& b,
                                        const at::Tensor& self_col, const at::Tensor& pos_col,
                                        double scale, int64_t split, bool exclude_pos,
                                        bool weighted, bool col_stats) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(split >= 0, "split: expected >= 0, got ", split);
  const Operands o = prepare(a, b, self_col, pos_col, exclude_pos);
  const int64_t m = o.m, c = o.c;
  const bool has_split = split < c;
  const auto acc = o.acc;
  const auto& opts = o.opts;
  const at::Tensor &A = o.A, &B = o.B;
  const auto& masks = o.masks;
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor lse0 = at::empty({m}, opts);
  at::Tensor lse1 = at::empty({has_split ? m : 0}, opts);
  at::Tensor wmean = at::empty({weighted ? m : 0}, opts);
  const int64_t rows = block_rows(m, c);
  const int64_t blocks = (m + rows - 1) / rows;
  std::vector<at::Tensor> col_part(std::max(1, at::get_num_threads()));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad_here;  // grad mode is per thread
    const at::Tensor x_buf = at::empty({rows, c}, opts);
    at::Tensor& col_t = col_part.at(at::get_thread_num());
    if (col_stats && !col_t.defined()) col_t = at::full({c}, -inf, opts);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * rows, n = std::min(rows, m - r0);
      at::Tensor x = x_buf.narrow(0, 0, n);
      at::mm_out(x, A.narrow(0, r0, n) * scale, B.t());
      AT_DISPATCH_FLOATING_TYPES(acc, "lse_forward_cpu", [&] {
        fill_masked<scalar_t>(x.data_ptr<scalar_t>(), n, c, r0, masks,
                              -std::numeric_limits<scalar_t>::infinity());
      });
      if (col_stats) col_t = at::logaddexp(col_t, at::logsumexp(x, {0}));
      const at::Tensor x0 = has_split ? x.narrow(1, 0, split) : x;
      at::Tensor l0 = lse0.narrow(0, r0, n);
      l0.copy_(at::logsumexp(x0, {1}));
      if (has_split) lse1.narrow(0, r0, n).copy_(at::logsumexp(x.narrow(1, split, c - split), {1}));
      if (weighted) {
        // softmax * logit, with 0 * -inf (masked entries) read as 0
        const at::Tensor p = at::exp(x0 - l0.unsqueeze(1));
        wmean.narrow(0, r0, n).copy_(at::nan_to_num(p * x0, 0.0).sum(1));
      }
    }
  });
  at::Tensor col_lse = at::full({col_stats ? c : 0}, -inf, opts);
  for (const auto& part : col_part)  // thread order: the same merge at every call
    if (part.defined()) col_lse = at::logaddexp(col_lse, part);
  return {lse0, lse1, wmean, col_lse};
}

// (da, db) of sum_i g0_i lse0_i + g1_i lse1_i + sum_j g_col_j col_lse_j: the block's logits
// recomputed, G = g * softmax (rows) + g_col * column softmax, da = scale G b, db = scale G^T a.
std::vector<at::Tensor> lse_backward_cpu(const at::Tensor& a, const at::Tensor& b,
                                         const at::Tensor& self_col, const at::Tensor& pos_col,
                                         double scale, int64_t split, bool exclude_pos,
                                         const at::Tensor& lse0, const at::Tensor& lse1,
                                         const at::Tensor& col_lse, const at::Tensor& g0,
                                         const at::Tensor& g1, const at::Tensor& g_col,
                                         bool need_da, bool need_db) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(split >= 0, "split: expected >= 0, got ", split);
  const Operands o = prepare(a, b, self_col, pos_col, exclude_pos);
  const int64_t m = o.m, c = o.c, d = o.d;
  const bool has_split = split < c, col_grad = col_lse.numel() > 0;
  auto vec = [](const at::Tensor& t, const char* name, int64_t len) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == len &&
                    at::isFloatingType(t.scalar_type()),
                name, ": expected a floating CPU vector of length ", len, ", got ", t.sizes(), " ",
                t.scalar_type());
  };
  vec(lse0, "lse0", m);
  vec(g0, "g0", m);
  if (has_split) { vec(lse1, "lse1", m); vec(g1, "g1", m); }
  if (col_grad) { vec(col_lse, "col_lse", c); vec(g_col, "g_col", c); }
  const auto acc = o.acc;
  const auto& opts = o.opts;
  const at::Tensor &A = o.A, &B = o.B;
  const auto& masks = o.masks;
  const at::Tensor L0 = lse0.to(acc), G0 = g0.to(acc);
  const at::Tensor L1 = has_split ? lse1.to(acc) : lse1, G1 = has_split ? g1.to(acc) : g1;
  const at::Tensor CL = col_grad ? col_lse.to(acc) : col_lse, GC = col_grad ? g_col.to(acc) : g_col;
  at::Tensor da = need_da ? at::empty({m, d}, opts) : at::empty({0}, opts);
  at::Tensor db = need_db ? at::zeros({c, d}, opts) : at::empty({0}, opts);
  const int64_t rows = block_rows(m, c);
  const int64_t blocks = (m + rows - 1) / rows;
  std::vector<at::Tensor> db_part(std::max(1, at::get_num_threads()));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad_here;
    const at::Tensor x_buf = at::empty({rows, c}, opts);
    const int tid = at::get_thread_num();
    at::Tensor& db_t = db_part.at(tid);
    if (need_db && !db_t.defined()) db_t = tid == 0 ? db : at::zeros({c, d}, opts);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * rows, n = std::min(rows, m - r0);
      const at::Tensor a_r = A.narrow(0, r0, n) * scale;
      at::Tensor x = x_buf.narrow(0, 0, n);
      at::mm_out(x, a_r, B.t());
      at::Tensor col_part;
      if (col_grad) {
        col_part = at::exp(x - CL.unsqueeze(0));
        AT_DISPATCH_FLOATING_TYPES(acc, "lse_backward_cpu", [&] {
          fill_masked<scalar_t>(col_part.data_ptr<scalar_t>(), n, c, r0, masks, scalar_t(0));
        });
        col_part.mul_(GC.unsqueeze(0));
      }
      // g * softmax in place; masked entries zeroed after the exp, before the multiply, so
      // an overflowing masked exp never meets a zero gradient (no inf * 0)
      if (has_split) {
        x.narrow(1, 0, split).sub_(L0.narrow(0, r0, n).unsqueeze(1));
        x.narrow(1, split, c - split).sub_(L1.narrow(0, r0, n).unsqueeze(1));
      } else {
        x.sub_(L0.narrow(0, r0, n).unsqueeze(1));
      }
      x.exp_();
      AT_DISPATCH_FLOATING_TYPES(acc, "lse_backward_cpu", [&] {
        fill_masked<scalar_t>(x.data_ptr<scalar_t>(), n, c, r0, masks, scalar_t(0));
      });
      if (has_split) {
        x.narrow(1, 0, split).mul_(G0.narrow(0, r0, n).unsqueeze(1));
        x.narrow(1, split, c - split).mul_(G1.narrow(0, r0, n).unsqueeze(1));
      } else {
        x.mul_(G0.narrow(0, r0, n).unsqueeze(1));
      }
      if (col_grad) x.add_(col_part);
      block_grads(x, a_r, B, da, db_t, r0, n, need_da, need_db);
    }
  });
  finish_grads(da, db, db_part, scale, need_da);
  return {da, db};
}

// ---------------------------------------------------------------------------------------------
// Symmetric schedule (issue 25): X = scale * Z Z^T (2N x 2N) with symmetric masks (self_col[i]
// in {i, -1}; pos_col[pos_col[i]] = i). Only the upper-triangle tiles (I, J), I <= J, are
// formed: tile (I, J) serves rows I and, for I < J, rows J through its transpose.
//  * Forward: the row and column partial sums of each tile go into per-thread arrays of length
//    2N, merged after the region in thread order: half a Gram of products.
//  * Backward of sum_i g_i lse_i: dz = scale (G + G^T) Z, G_ij = g_i P_ij. H = G + G^T is
//    symmetric, H_ij = g_i P_ij + g_j P_ji, so one recomputed tile gives dz_I += H_IJ Z_J and
//    dz_J += H_IJ^T Z_I (diagonal tiles once): half a Gram + two half products. With the
//    forward, 2 full products where the row-block path takes 3.
//  * Shift. |X_ij| <= c = scale max_k |z_k|^2 (Cauchy-Schwarz), so with that fixed shift ONE exp
//    E_ij = exp(X_ij - c) serves the row and the column: lse_i = c + log sum_j E_ij and
//    H_ij = E_ij (a_i + a_j), a_i = g_i exp(c - lse_i). Exact while E >= exp(-2c) stays normal
//    with margin (2c <= kFixedSpan); beyond that (e.g. temperature 0.01) per-row online shifts,
//    two exps per pair, so no row underflows to -inf.
//  * Cross mode (0 < cross < 2N; symmetric InfoNCE with z = [q; k], cross = B): only the pairs
//    across `cross` are entries, so only the tiles holding one are formed (the q k^T block);
//    a tile's row sums are q -> k log-sum-exps, its column sums the k -> q ones: 1 product
//    forward and 3 backward where two same-pass directions take 6.
// ---------------------------------------------------------------------------------------------

// Tile edge, measured (fastssl.backends.ext.contrastive.block_config documents the figures);
// settable for the measurement (contrastive_gram_block).
std::atomic<int64_t> g_gram_block{256};

struct Gram {
  int64_t n, d, t;
  at::ScalarType acc;
  at::TensorOptions opts;
  at::Tensor Z, sc, pc;
  std::vector<const int64_t*> masks;
  std::vector<std::array<int64_t, 2>> tiles;  // (I0, J0), row panel by row panel
  double shift;                               // c, in the fixed-shift form
  bool fixed;
  int64_t cross;                              // 0: every pair; else only those across it
};

Gram prepare_gram(const at::Tensor& z, const at::Tensor& self_col, const at::Tensor& pos_col,
                  double scale, bool exclude_pos, int64_t cross) {
  check_matrix(z, "z");
  Gram o;
  o.n = z.size(0);
  o.d = z.size(1);
  TORCH_CHECK(cross == 0 || (cross > 0 && cross < o.n), "cross: expected 0 or 0 < cross < ",
              o.n, ", got ", cross);
  o.cross = cross;
  check_columns(self_col, "self_col", o.n, o.n);
  check_columns(pos_col, "pos_col", o.n, o.n);
  o.sc = self_col.contiguous();
  o.pc = pos_col.contiguous();
  const int64_t* sp = o.sc.data_ptr<int64_t>();
  const int64_t* pp = o.pc.data_ptr<int64_t>();
  for (int64_t i = 0; i < o.n; ++i) {  // one tile serves both uses only with symmetric masks
    TORCH_CHECK(sp[i] == i || sp[i] == -1, "self_col: expected i or -1 at row i, got ", sp[i],
                " at row ", i);
    TORCH_CHECK(!exclude_pos || pp[i] < 0 || pp[pp[i]] == i, "pos_col: expected symmetric "
                "positives (pos_col[pos_col[i]] == i), got pos_col[", i, "] = ", pp[i],
                " and pos_col[", pp[i], "] = ", pp[pp[i]]);
  }
  o.masks = {sp};
  if (exclude_pos) o.masks.push_back(pp);
  o.acc = acc_type(z);
  o.opts = z.options().dtype(o.acc);
  o.Z = z.detach().to(o.acc).contiguous();
  o.t = std::max<int64_t>(1, g_gram_block.load());
  const int64_t nb = (o.n + o.t - 1) / o.t;
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t j = i; j < nb; ++j)  // cross mode: the tiles holding a pair across `cross`
      if (cross == 0 || (i * o.t < cross && std::min(o.n, (j + 1) * o.t) > cross))
        o.tiles.push_back({i * o.t, j * o.t});
  // max_k |z_k|^2 over row blocks: a 2N x D square of Z would be the op's largest temporary
  double r2 = 0.0;
  for (int64_t r0 = 0; r0 < o.n; r0 += kNormRows) {
    const at::Tensor zr = o.Z.narrow(0, r0, std::min(kNormRows, o.n - r0));
    r2 = std::max(r2, (zr * zr).sum(1).max().item<double>());
  }
  o.shift = scale * r2;
  const double span = o.acc == at::kDouble ? 600.0 : 64.0;  // exp(-span) well above the minimum normal
  o.fixed = std::isfinite(o.shift) && 2.0 * std::abs(o.shift) <= span;
  return o;
}

// Masked entries of tile (I0.., J0..) (ni x nj, row-major) = value: (i, col[i]) for the rows whose
// masked column lies in the tile; with symmetric masks these are also its column-derived ones.
template <typename T>
void mask_tile(T* x, int64_t i0, int64_t ni, int64_t j0, int64_t nj,
               const std::vector<const int64_t*>& masks, T value) {
  for (const int64_t* col : masks)
    for (int64_t i = 0; i < ni; ++i) {
      const int64_t j = col[i0 + i] - j0;
      if (col[i0 + i] >= 0 && j >= 0 && j < nj) x[i * nj + j] = value;
    }
}

// Same-side pairs of a tile straddling `cross` = value (cross mode; none when the tile lies
// across it, as every tile does when cross is a multiple of the tile edge).
template <typename T>
void mask_same_side(T* x, int64_t i0, int64_t ni, int64_t j0, int64_t nj, int64_t cross,
                    T value) {
  for (int64_t i = 0; i < ni; ++i) {
    const bool low = i0 + i < cross;
    for (int64_t j = 0; j < nj; ++j)
      if ((j0 + j < cross) == low) x[i * nj + j] = value;
  }
}

void mask_tile_t(at::Tensor& x, int64_t i0, int64_t j0, const Gram& o, double value) {
  const int64_t ni = x.size(0), nj = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mask_tile", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    mask_tile<scalar_t>(xp, i0, ni, j0, nj, o.masks, static_cast<scalar_t>(value));
    const bool straddles = o.cross > 0 && ((i0 < o.cross && i0 + ni > o.cross) ||
                                           (j0 < o.cross && j0 + nj > o.cross));
    if (straddles) mask_same_side<scalar_t>(xp, i0, ni, j0, nj, o.cross, static_cast<scalar_t>(value));
  });
}

// A contiguous ni x nj view at the start of a thread's tile buffer.
at::Tensor tile_view(const at::Tensor& buf, int64_t ni, int64_t nj) {
  return buf.narrow(0, 0, ni * nj).view({ni, nj});
}

// Online log-sum-exp (per-row shifts): fold tile x (masked entries -inf) into the running
// (max m, sum s, weighted sum w; w undefined unless weighted) along dim (1: rows, 0: columns).
void merge_lse(at::Tensor m, at::Tensor s, at::Tensor w, const at::Tensor& x, int64_t dim) {
  const at::Tensor mt = std::get<0>(x.max(dim));
  const at::Tensor nw = at::maximum(m, mt);
  const at::Tensor safe = at::where(at::isfinite(nw), nw, at::zeros_like(nw));
  const at::Tensor e = at::exp(x - safe.unsqueeze(dim));
  const at::Tensor factor = at::exp(m - safe);
  s.mul_(factor).add_(e.sum(dim));
  if (w.defined()) w.mul_(factor).add_(at::nan_to_num(e * x, 0.0).sum(dim));  // 0 * -inf: 0
  m.copy_(nw);
}

// (lse, wmean): the rows' log-sum-exps of X (masked), wmean[i] = sum_j P_ij X_ij (empty unless
// weighted; 0 on a row whose columns are all masked).
std::vector<at::Tensor> gram_lse_forward_cpu(const at::Tensor& z, const at::Tensor& self_col,
                                             const at::Tensor& pos_col, double scale,
                                             bool exclude_pos, bool weighted, int64_t cross) {
  at::NoGradGuard no_grad;
  const Gram o = prepare_gram(z, self_col, pos_col, scale, exclude_pos, cross);
  const int64_t n = o.n, t = o.t, ntiles = static_cast<int64_t>(o.tiles.size());
  const double inf = std::numeric_limits<double>::infinity();
  const double c = o.fixed ? o.shift : 0.0;
  // per thread: (m, s, w) of every row; m stays c in the fixed-shift form
  const int nthreads = std::max(1, at::get_num_threads());
  std::vector<at::Tensor> part_m(nthreads), part_s(nthreads), part_w(nthreads);
  at::parallel_for(0, ntiles, 1, [&](int64_t k0, int64_t k1) {
    at::NoGradGuard no_grad_here;  // grad mode is per thread
    const int tid = at::get_thread_num();
    part_m[tid] = at::full({n}, o.fixed ? c : -inf, o.opts);
    part_s[tid] = at::zeros({n}, o.opts);
    if (weighted) part_w[tid] = at::zeros({n}, o.opts);
    const at::Tensor x_buf = at::empty({t * t}, o.opts);
    const at::Tensor w_buf = weighted ? at::empty({t * t}, o.opts) : at::Tensor();
    at::Tensor &m_t = part_m[tid], &s_t = part_s[tid], &w_t = part_w[tid];
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i0 = o.tiles[k][0], j0 = o.tiles[k][1];
      const int64_t ni = std::min(t, n - i0), nj = std::min(t, n - j0);
      const at::Tensor zi = o.Z.narrow(0, i0, ni), zj = o.Z.narrow(0, j0, nj);
      at::Tensor x = tile_view(x_buf, ni, nj);
      if (o.fixed) {
        x.fill_(-c);
        x.addmm_(zi, zj.t(), 1.0, scale);  // X - c
        at::Tensor wx;
        if (weighted) wx = tile_view(w_buf, ni, nj).copy_(x);
        x.exp_();
        mask_tile_t(x, i0, j0, o, 0.0);
        s_t.narrow(0, i0, ni).add_(x.sum(1));
        if (j0 != i0) s_t.narrow(0, j0, nj).add_(x.sum(0));
        if (weighted) {
          wx.mul_(x);  // E (X - c); masked entries 0
          w_t.narrow(0, i0, ni).add_(wx.sum(1));
          if (j0 != i0) w_t.narrow(0, j0, nj).add_(wx.sum(0));
        }
      } else {
        at::mm_out(x, zi, zj.t());
        x.mul_(scale);
        mask_tile_t(x, i0, j0, o, -inf);
        auto rows = [&](at::Tensor v, int64_t r0, int64_t len) {
          return v.defined() ? v.narrow(0, r0, len) : v;
        };
        merge_lse(m_t.narrow(0, i0, ni), s_t.narrow(0, i0, ni), rows(w_t, i0, ni), x, 1);
        if (j0 != i0)
          merge_lse(m_t.narrow(0, j0, nj), s_t.narrow(0, j0, nj), rows(w_t, j0, nj), x, 0);
      }
    }
  });
  // merge the threads' partials in thread order (the same sum at every call)
  at::Tensor m = at::full({n}, o.fixed ? c : -inf, o.opts);
  for (const auto& p : part_m)
    if (p.defined()) m = at::maximum(m, p);
  const at::Tensor safe = at::where(at::isfinite(m), m, at::zeros_like(m));
  at::Tensor s = at::zeros({n}, o.opts), w = at::zeros({weighted ? n : 0}, o.opts);
  for (int tid = 0; tid < nthreads; ++tid) {
    if (!part_m[tid].defined()) continue;
    const at::Tensor f = at::exp(part_m[tid] - safe);
    s.add_(part_s[tid] * f);
    if (weighted) w.add_(part_w[tid] * f);
  }
  at::Tensor lse = at::log(s).add_(safe);  // a row with every column masked: -inf
  at::Tensor wmean = at::empty({0}, o.opts);
  if (weighted)  // fixed form: w holds E (X - c)
    wmean = at::where(s > 0, w / s + c, at::zeros_like(s));
  return {lse, wmean};
}

// dz = scale (G + G^T) Z of sum_i g_i lse_i, each upper-triangle tile recomputed once.
at::Tensor gram_lse_backward_cpu(const at::Tensor& z, const at::Tensor& self_col,
                                 const at::Tensor& pos_col, double scale, bool exclude_pos,
                                 const at::Tensor& lse, const at::Tensor& g, int64_t cross) {
  at::NoGradGuard no_grad;
  const Gram o = prepare_gram(z, self_col, pos_col, scale, exclude_pos, cross);
  const int64_t n = o.n, d = o.d, t = o.t, ntiles = static_cast<int64_t>(o.tiles.size());
  auto vec = [n](const at::Tensor& v, const char* name) {
    TORCH_CHECK(v.device().is_cpu() && v.dim() == 1 && v.size(0) == n &&
                    at::isFloatingType(v.scalar_type()),
                name, ": expected a floating CPU vector of length ", n, ", got ", v.sizes(), " ",
                v.scalar_type());
  };
  vec(lse, "lse");
  vec(g, "g");
  const double c = o.shift;
  const at::Tensor L = lse.to(o.acc).contiguous(), G = g.to(o.acc).contiguous();
  // fixed form: a_i = g_i exp(c - lse_i) (0 on a row with every column masked: its E are 0)
  at::Tensor a;
  if (o.fixed) a = at::where(at::isfinite(L), G * at::exp(c - L), at::zeros_like(L));
  at::Tensor dz = at::zeros({n, d}, o.opts);
  const int nthreads = std::max(1, at::get_num_threads());
  std::vector<at::Tensor> part(nthreads);
  at::parallel_for(0, ntiles, 1, [&](int64_t k0, int64_t k1) {
    at::NoGradGuard no_grad_here;
    const int tid = at::get_thread_num();
    // thread 0 accumulates into dz, the others into their own 2N x D partial sums
    part[tid] = tid == 0 ? dz : at::zeros({n, d}, o.opts);
    at::Tensor& dz_t = part[tid];
    const at::Tensor x_buf = at::empty({t * t}, o.opts);
    const at::Tensor h_buf = o.fixed ? at::Tensor() : at::empty({t * t}, o.opts);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i0 = o.tiles[k][0], j0 = o.tiles[k][1];
      const int64_t ni = std::min(t, n - i0), nj = std::min(t, n - j0);
      const at::Tensor zi = o.Z.narrow(0, i0, ni), zj = o.Z.narrow(0, j0, nj);
      at::Tensor x = tile_view(x_buf, ni, nj);
      at::Tensor h = o.fixed ? x : tile_view(h_buf, ni, nj);
      if (o.fixed) {
        x.fill_(-c);
        x.addmm_(zi, zj.t(), 1.0, scale);
        x.exp_();  // E
        // H = E (a_i + a_j) in place: one tile buffer, so the tile and both panels stay in L2
        AT_DISPATCH_FLOATING_TYPES(o.acc, "gram_lse_backward_cpu", [&] {
          scalar_t* xp = x.data_ptr<scalar_t>();
          const scalar_t* ai = a.data_ptr<scalar_t>() + i0;
          const scalar_t* aj = a.data_ptr<scalar_t>() + j0;
          for (int64_t i = 0; i < ni; ++i)
            for (int64_t j = 0; j < nj; ++j) xp[i * nj + j] *= ai[i] + aj[j];
        });
      } else {
        at::mm_out(x, zi, zj.t());
        x.mul_(scale);
        at::sub_out(h, x, L.narrow(0, i0, ni).unsqueeze(1));
        h.exp_().mul_(G.narrow(0, i0, ni).unsqueeze(1));  // g_i P_ij
        if (j0 == i0) {
          h.add_(h.t().clone());
        } else {
          x.sub_(L.narrow(0, j0, nj).unsqueeze(0)).exp_().mul_(G.narrow(0, j0, nj).unsqueeze(0));
          h.add_(x);
        }
      }
      // masked entries (only they may be inf or NaN: a row of only masked columns has lse
      // -inf) zeroed after the exps
      mask_tile_t(h, i0, j0, o, 0.0);
      dz_t.narrow(0, i0, ni).addmm_(h, zj);
      if (j0 != i0) dz_t.narrow(0, j0, nj).addmm_(h.t(), zi);
    }
  });
  for (int tid = 1; tid < nthreads; ++tid)  // thread order: the same sum at every call
    if (part[tid].defined()) dz.add_(part[tid]);
  return dz.mul_(scale);
}

// lse_sum_cpu's fused float32 blocks: the current setting, set first when flag >= 0 (A/B only).
int contrastive_fused_exp(int flag) {
  if (flag >= 0) g_fused_exp.store(flag ? 1 : 0);
  return g_fused_exp.load();
}

// The tile edge: the current value, set first when block > 0 (measurement only).
int64_t gram_block(int64_t block) {
  if (block > 0) g_gram_block.store(block);
  return g_gram_block.load();
}

}  // namespace

void init_contrastive_cpu(pybind11::module_& m) {
  m.def("contrastive_lse_forward_cpu", &lse_forward_cpu,
        "(lse0, lse1, wmean, col_lse) of scale a b^T, masked, split at `split` (CPU)");
  m.def("contrastive_lse_backward_cpu", &lse_backward_cpu,
        "(da, db) of the weighted row and column log-sum-exps, logits recomputed (CPU)");
  m.def("contrastive_lse_sum_cpu", &lse_sum_cpu,
        "(lse, pos, da, db, ce): row log-sum-exps of scale a b^T (masked), the positives' "
        "logits, the gradients of sum(lse) [- sum(pos)] and the rows' cross-entropies "
        "-log_softmax at the positive (subtract_pos, positive unmasked; else empty), from one "
        "pass (CPU)");
  m.def("contrastive_fused_exp", &contrastive_fused_exp, pybind11::arg("flag") = -1,
        "lse_sum_cpu's fused float32 exp blocks on (1) / off (0); -1 reads (A/B only)");
  m.def("contrastive_gram_lse_forward_cpu", &gram_lse_forward_cpu,
        "(lse, wmean) of the rows of scale z z^T (symmetric masks) from the upper-triangle "
        "tiles (CPU)");
  m.def("contrastive_gram_lse_backward_cpu", &gram_lse_backward_cpu,
        "dz = scale (G + G^T) z, G = g * softmax, each upper-triangle tile once (CPU)");
  m.def("contrastive_gram_block", &gram_block, pybind11::arg("block") = 0,
        "the symmetric schedule's tile edge (set first when block > 0)");
  m.def("sce_grad_cpu", &sce_grad_cpu,
        "(lse_s, lse_t, wmean, u_s, u_t): SCE's statistics and their per-row q gradients (CPU)");
}
