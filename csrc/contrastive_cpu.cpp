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
#include <cstdint>
#include <limits>
#include <vector>

namespace {

// About 512 KiB of float32 logits per block buffer (each thread holds one or two), and at
// least a few blocks per thread so that the static split of the blocks stays balanced.
constexpr int64_t kBlockElements = int64_t(1) << 17;
constexpr int64_t kBlocksPerThread = 4;

int64_t block_rows(int64_t m, int64_t c) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_cache = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(c, 1));
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
  const std::vector<const int64_t*> masks{sc.data_ptr<int64_t>()};
  const std::vector<const int64_t*> none{};

  at::Tensor lse_s = at::empty({m}, opts), lse_t = at::empty({m}, opts), wmean = at::empty({m}, opts);
  at::Tensor u_s = at::empty({m, d}, opts), u_t = at::empty({m, d}, opts);
  const int64_t rows = block_rows(m, c);
  const int64_t blocks = (m + rows - 1) / rows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad_here;  // grad mode is per thread
    // x: the student logits, then their softmax; y: the teacher's, then log_softmax in place
    const at::Tensor x_buf = at::empty({rows, c}, opts), y_buf = at::empty({rows, c}, opts);
    AT_DISPATCH_FLOATING_TYPES(acc, "sce_grad_cpu", [&] {
      std::vector<scalar_t> probe_s, probe_t;
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * rows, n = std::min(rows, m - r0);
        at::Tensor x = x_buf.narrow(0, 0, n), y = y_buf.narrow(0, 0, n);
        at::mm_out(x, Q.narrow(0, r0, n) * scale_s, Cm.t());
        at::mm_out(y, K.narrow(0, r0, n) * scale_t, Cm.t());
        scalar_t* xp = x.data_ptr<scalar_t>();
        scalar_t* yp = y.data_ptr<scalar_t>();
        fill_masked<scalar_t>(yp, n, c, r0, masks, -std::numeric_limits<scalar_t>::infinity());
        save_probe<scalar_t>(yp, n, c, r0, masks, probe_t);
        at::_log_softmax_out(y, y, 1, false);
        read_lse<scalar_t>(probe_t, yp, n, c, r0, masks, lse_t.data_ptr<scalar_t>());
        y.exp_();  // P_t
        // a teacher row with every column masked: no softmax, weighted mean 0
        fill_masked<scalar_t>(yp, n, c, r0, masks, scalar_t(0));
        // wmean needs the raw student logits: before x is turned into its softmax
        wmean.narrow(0, r0, n).copy_((y * x).sum(1));
        save_probe<scalar_t>(xp, n, c, r0, none, probe_s);
        at::_log_softmax_out(x, x, 1, false);
        read_lse<scalar_t>(probe_s, xp, n, c, r0, none, lse_s.data_ptr<scalar_t>());
        at::Tensor us_r = u_s.narrow(0, r0, n), ut_r = u_t.narrow(0, r0, n);
        at::mm_out(us_r, x.exp_(), Cm);
        at::mm_out(ut_r, y, Cm);
      }
    });
  });
  u_s.mul_(scale_s);
  u_t.mul_(scale_s);
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
  m.def("sce_grad_cpu", &sce_grad_cpu,
        "(lse_s, lse_t, wmean, u_s, u_t): SCE's statistics and their per-row q gradients (CPU)");
}
