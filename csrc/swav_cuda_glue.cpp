// SwAV Sinkhorn, torch-facing glue for csrc/swav_cuda.cu (builds only against a CUDA torch).
// Checks the tensors, allocates the outputs and partial buffers, calls the launchers on the
// current stream. Same contract as sinkhorn_colstats_cpu / sinkhorn_rowpass_cpu.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

cudaError_t fastssl_sinkhorn_colstats_cuda(const void* s, int dtype, int64_t B, int64_t K,
                                           double eps, int rows, void* m_part, void* l_part,
                                           void* M, void* S, cudaStream_t stream);
cudaError_t fastssl_sinkhorn_rowpass_cuda(const void* s, int dtype, int64_t B, int64_t K,
                                          double eps, const void* a, int rows, bool write_codes,
                                          void* part, void* out, cudaStream_t stream);

namespace {

int dtype_code(const torch::Tensor& s) {
  switch (s.scalar_type()) {
    case torch::kFloat32: return 0;
    case torch::kFloat64: return 1;
    case torch::kFloat16: return 2;
    case torch::kBFloat16: return 3;
    default: TORCH_CHECK(false, "sinkhorn (cuda): scores must be float32/64, float16 or bfloat16, got ",
                         s.scalar_type());
  }
  return -1;
}

torch::ScalarType acc_type(const torch::Tensor& s) {
  return s.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
}

void check_scores(const torch::Tensor& s) {
  TORCH_CHECK(s.is_cuda(), "sinkhorn (cuda): scores must be a CUDA tensor, got ", s.device());
  TORCH_CHECK(s.dim() == 2 && s.size(0) > 0 && s.size(1) > 0,
              "sinkhorn (cuda): scores must be a non-empty (B, K) tensor, got ", s.sizes());
  TORCH_CHECK(s.is_contiguous(), "sinkhorn (cuda): scores must be contiguous");
}

// Rows per block: enough blocks to fill the GPU at SwAV's small local batches, few partial
// rows (ceil(B / rows) x K) at large ones. At most 32 (the kernel's shared lse buffer).
int rows_per_block(int64_t B) { return static_cast<int>(std::clamp<int64_t>((B + 127) / 128, 1, 32)); }

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "sinkhorn (cuda): kernel launch failed: ", cudaGetErrorString(err));
}

std::vector<torch::Tensor> sinkhorn_colstats_cuda(const torch::Tensor& s, double eps) {
  check_scores(s);
  TORCH_CHECK(eps > 0, "sinkhorn_colstats_cuda: eps must be > 0, got ", eps);
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t B = s.size(0), K = s.size(1);
  const int rows = 32;
  const int64_t parts = (B + rows - 1) / rows;
  auto opts = s.options().dtype(acc_type(s));
  auto m_part = torch::empty({parts, K}, opts), l_part = torch::empty({parts, K}, opts);
  auto M = torch::empty({K}, opts), S = torch::empty({K}, opts);
  check_launch(fastssl_sinkhorn_colstats_cuda(s.data_ptr(), dtype_code(s), B, K, eps, rows,
                                              m_part.data_ptr(), l_part.data_ptr(), M.data_ptr(),
                                              S.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return {M, S};
}

torch::Tensor sinkhorn_rowpass_cuda(const torch::Tensor& s, double eps, const torch::Tensor& a,
                                    bool write_codes) {
  check_scores(s);
  TORCH_CHECK(eps > 0, "sinkhorn_rowpass_cuda: eps must be > 0, got ", eps);
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t B = s.size(0), K = s.size(1);
  auto opts = s.options().dtype(acc_type(s));
  TORCH_CHECK(a.device() == s.device() && a.dim() == 1 && a.size(0) == K && a.is_contiguous() &&
                  a.scalar_type() == acc_type(s),
              "sinkhorn_rowpass_cuda: a must be a contiguous vector of K=", K, " ", acc_type(s),
              " on ", s.device(), ", got ", a.sizes(), " ", a.scalar_type(), " on ", a.device());
  const int rows = rows_per_block(B);
  const int64_t parts = (B + rows - 1) / rows;
  auto out = write_codes ? torch::empty({B, K}, opts) : torch::empty({K}, opts);
  auto part = write_codes ? torch::Tensor() : torch::empty({parts, K}, opts);
  check_launch(fastssl_sinkhorn_rowpass_cuda(s.data_ptr(), dtype_code(s), B, K, eps, a.data_ptr(),
                                             rows, write_codes,
                                             write_codes ? nullptr : part.data_ptr(),
                                             out.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace

void init_swav_cuda(pybind11::module_& m) {
  m.def("sinkhorn_colstats_cuda", &sinkhorn_colstats_cuda, pybind11::arg("scores"),
        pybind11::arg("eps"), "Column max M and sum S of exp(scores/eps - M) over rows (CUDA)");
  m.def("sinkhorn_rowpass_cuda", &sinkhorn_rowpass_cuda, pybind11::arg("scores"),
        pybind11::arg("eps"), pybind11::arg("a"), pybind11::arg("write_codes"),
        "Row softmax of scores/eps + a: the codes, or their column sums (CUDA)");
}
