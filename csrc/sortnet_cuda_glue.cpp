// sortnet family, torch-facing glue for the plain-CUDA kernels in sortnet_cuda.cu.
// Builds only against a CUDA torch. Allocates outputs and scratch, then calls the launchers.
// Only the c10/cuda headers it needs: ATen/cuda/CUDAContext.h pulls in cusparse.h, which a
// CUDA toolkit without the math libraries does not have.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>

template <typename T>
void sortnet_soft_sort_forward_cuda(T* y, T* P, T* d, const int32_t* net, int64_t B, int64_t n,
                                    int64_t C, int dist, double s, double lam, double sb,
                                    cudaStream_t stream);
template <typename T>
void sortnet_soft_sort_backward_cuda(T* gx, const T* gP, const T* d, T* ga, T* ws, int64_t chunk,
                                     const int32_t* net, int64_t B, int64_t n, int64_t C,
                                     int64_t K, int64_t S, int dist, double s, double lam,
                                     double sb, cudaStream_t stream);
template <typename T>
void sortnet_groco_rows_cuda(const T* sims, T* loss, const T* grow, T* gs, T* ws,
                             const int32_t* net, int64_t B, int64_t n, int64_t C, int64_t k,
                             int dist, double s, double lam, double sb, bool backward,
                             cudaStream_t stream);

namespace {

void check_cuda(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kDouble, name,
              " must be float32 or float64");
}

// Everything a kernel indexes with: same device and dtype as `like`, the expected shape.
void check_like(const torch::Tensor& t, const torch::Tensor& like, const char* name,
                c10::IntArrayRef shape) {
  check_cuda(t, name);
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device(), ", got ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " must be ",
                   like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// The (4, C) int32 comparator table on the device of `like`; returns C.
int64_t check_net(const torch::Tensor& net, const torch::Tensor& like) {
  TORCH_CHECK_VALUE(net.device() == like.device() && net.is_contiguous(),
                    "net must be a contiguous tensor on ", like.device(), ", got ", net.device());
  TORCH_CHECK_TYPE(net.scalar_type() == torch::kInt, "net must be int32, got ", net.scalar_type());
  TORCH_CHECK_VALUE(net.dim() == 2 && net.size(0) == 4, "net must have shape (4, C), got ",
                    net.sizes());
  return net.size(1);
}

void check_dist(int64_t dist) {
  TORCH_CHECK_VALUE(dist >= 0 && dist <= 5, "dist must be in [0, 5], got ", dist);
}

void check_2d(const torch::Tensor& t, const char* name) {
  check_cuda(t, name);
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be a (B, n) matrix, got ", t.sizes());
}

std::vector<torch::Tensor> soft_sort_forward_cuda(torch::Tensor x, torch::Tensor net,
                                                  int64_t dist, double s, double lam, double sb,
                                                  bool want_p) {
  check_2d(x, "x");
  check_dist(dist);
  const int64_t C = check_net(net, x);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), n = x.size(1);
  auto y = x.clone();
  auto d = torch::empty({B, C}, x.options());
  auto P = want_p ? torch::empty({B, n, n}, x.options()) : torch::empty({0}, x.options());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "soft_sort_forward_cuda", [&] {
    sortnet_soft_sort_forward_cuda<scalar_t>(y.data_ptr<scalar_t>(),
                                             want_p ? P.data_ptr<scalar_t>() : nullptr,
                                             d.data_ptr<scalar_t>(), net.data_ptr<int32_t>(), B,
                                             n, C, (int)dist, s, lam, sb, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, P, d};
}

torch::Tensor soft_sort_backward_cuda(torch::Tensor gy, torch::Tensor gP, torch::Tensor d,
                                      torch::Tensor net, int64_t dist, double s, double lam,
                                      double sb, int64_t n) {
  check_2d(d, "d");
  check_dist(dist);
  const int64_t B = d.size(0), C = d.size(1);
  TORCH_CHECK_VALUE(check_net(net, d) == C, "net must have the ", C, " comparators of d, got ",
                    net.sizes());
  TORCH_CHECK_VALUE(n >= 1, "n must be >= 1, got ", n);
  if (gy.numel()) check_like(gy, d, "gy", {B, n});
  if (gP.numel()) check_like(gP, d, "gP", {B, n, n});
  c10::cuda::CUDAGuard guard(d.device());
  auto gx = gy.numel() ? gy.clone() : torch::zeros({B, n}, d.options());
  const bool has_gp = gP.numel() > 0;
  // checkpoint spacing K minimises S*n + 2K per row (see kernels/sortnet.py)
  const int64_t K = std::max<int64_t>(1, (int64_t)std::ceil(std::sqrt((double)C * n / 2.0)));
  const int64_t S = (C + K - 1) / K;
  const int64_t slots = S * n + 2 * n + 2 * K;
  const int64_t per_problem = slots * n * d.element_size();
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(B, (1LL << 28) / per_problem));
  auto ga = has_gp ? torch::zeros({B, C}, d.options()) : torch::empty({0}, d.options());
  auto ws = has_gp ? torch::empty({chunk * slots * n}, d.options()) : torch::empty({0}, d.options());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "soft_sort_backward_cuda", [&] {
    sortnet_soft_sort_backward_cuda<scalar_t>(
        gx.data_ptr<scalar_t>(), has_gp ? gP.data_ptr<scalar_t>() : nullptr,
        d.data_ptr<scalar_t>(), has_gp ? ga.data_ptr<scalar_t>() : nullptr,
        has_gp ? ws.data_ptr<scalar_t>() : nullptr, chunk, net.data_ptr<int32_t>(), B, n, C, K,
        S, (int)dist, s, lam, sb, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx;
}

torch::Tensor groco_rows_forward_cuda(torch::Tensor sims, int64_t k, torch::Tensor net,
                                      int64_t dist, double s, double lam, double sb) {
  check_2d(sims, "sims");
  check_dist(dist);
  const int64_t C = check_net(net, sims);
  const int64_t B = sims.size(0), n = sims.size(1);
  TORCH_CHECK_VALUE(k >= 0 && k <= n, "k must be in [0, ", n, "], got ", k);
  c10::cuda::CUDAGuard guard(sims.device());
  auto loss = torch::empty({B}, sims.options());
  auto ws = torch::empty({(3 * n + 6 * C) * B}, sims.options());
  AT_DISPATCH_FLOATING_TYPES(sims.scalar_type(), "groco_rows_forward_cuda", [&] {
    sortnet_groco_rows_cuda<scalar_t>(sims.data_ptr<scalar_t>(), loss.data_ptr<scalar_t>(),
                                      nullptr, nullptr, ws.data_ptr<scalar_t>(),
                                      net.data_ptr<int32_t>(), B, n, C, k, (int)dist, s, lam, sb,
                                      false, c10::cuda::getCurrentCUDAStream().stream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

torch::Tensor groco_rows_backward_cuda(torch::Tensor grow, torch::Tensor sims, int64_t k,
                                       torch::Tensor net, int64_t dist, double s, double lam,
                                       double sb) {
  check_2d(sims, "sims");
  check_dist(dist);
  const int64_t C = check_net(net, sims);
  const int64_t B = sims.size(0), n = sims.size(1);
  TORCH_CHECK_VALUE(k >= 0 && k <= n, "k must be in [0, ", n, "], got ", k);
  check_like(grow, sims, "grow", {B});
  c10::cuda::CUDAGuard guard(sims.device());
  auto gs = torch::empty_like(sims);
  auto ws = torch::empty({(3 * n + 6 * C) * B}, sims.options());
  AT_DISPATCH_FLOATING_TYPES(sims.scalar_type(), "groco_rows_backward_cuda", [&] {
    sortnet_groco_rows_cuda<scalar_t>(sims.data_ptr<scalar_t>(), nullptr,
                                      grow.data_ptr<scalar_t>(), gs.data_ptr<scalar_t>(),
                                      ws.data_ptr<scalar_t>(), net.data_ptr<int32_t>(), B, n, C,
                                      k, (int)dist, s, lam, sb, true,
                                      c10::cuda::getCurrentCUDAStream().stream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gs;
}

}  // namespace

void init_sortnet_cuda(pybind11::module_& m) {
  m.def("soft_sort_forward_cuda", &soft_sort_forward_cuda, "soft sort forward (CUDA)");
  m.def("soft_sort_backward_cuda", &soft_sort_backward_cuda, "soft sort backward (CUDA)");
  m.def("groco_rows_forward_cuda", &groco_rows_forward_cuda, "GroCo row losses (CUDA)");
  m.def("groco_rows_backward_cuda", &groco_rows_backward_cuda, "GroCo row loss backward (CUDA)");
}
