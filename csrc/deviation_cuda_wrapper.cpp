// CUDA registration of the deviation ops: adapts torch tensors to the plain
// launch functions of deviation_cuda.cu. Compiled only into CUDA builds
// (setup.py defines FREEZEKERN_WITH_CUDA and adds the .cu sources); in a CPU
// build this translation unit is empty.
#ifdef FREEZEKERN_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "deviation_checks.h"
#include "deviation_cuda.h"

namespace freezekern {
namespace {

cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::F32;
    case at::kHalf:
      return cuda::DType::F16;
    case at::kBFloat16:
      return cuda::DType::BF16;
    default:
      TORCH_CHECK(false, "freezekern: unsupported dtype ", t);
  }
}

cuda::NormSpec norm_spec(const NormArgs& n) {
  cuda::NormSpec s;
  s.kind = n.kind == NormKind::Rms ? cuda::Norm::Rms : (n.kind == NormKind::Layer ? cuda::Norm::Layer : cuda::Norm::None);
  s.weight = opt_ptr<float>(n.weight);
  s.bias = opt_ptr<float>(n.bias);
  s.eps = n.eps;
  return s;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "freezekern: ", op, " CUDA kernel failed: ", cudaGetErrorString(err));
}

at::Tensor cosine_deviation_cuda(const at::Tensor& h_in, const at::Tensor& basis_in, const at::Tensor& target_row,
                                 c10::string_view norm, const std::optional<at::Tensor>& norm_weight,
                                 const std::optional<at::Tensor>& norm_bias, double norm_eps) {
  TORCH_CHECK(h_in.is_cuda(), "freezekern: the CUDA kernel got h on ", h_in.device());
  const c10::cuda::CUDAGuard guard(h_in.device());
  const CosineInputs in = cosine_inputs(h_in, basis_in, target_row, norm, norm_weight, norm_bias, norm_eps);
  const at::Tensor &h = in.h, &basis = in.basis, &target = in.target;
  const int64_t n = in.n, d = in.d;
  at::Tensor out = at::empty({n}, h.options().dtype(at::kFloat));
  if (n == 0) return out;

  cuda::CosineParams p;
  p.h = h.data_ptr();
  p.h_row_stride = h.stride(0);
  p.h_dtype = cuda_dtype(h.scalar_type());
  p.basis = basis.data_ptr();
  p.basis_row_stride = basis.stride(0);
  p.basis_dtype = cuda_dtype(basis.scalar_type());
  p.target_row = target.data_ptr<int64_t>();
  p.n_rows = n;
  p.dim = d;
  p.n_basis = in.m;
  p.norm = norm_spec(in.norm);
  p.out = out.data_ptr<float>();
  check_launch(cuda::launch_cosine_deviation(p, at::cuda::getCurrentCUDAStream()), "cosine_deviation");
  return out;
}

at::Tensor logit_lens_deviation_cuda(const at::Tensor& h_in, const at::Tensor& weight_in, const at::Tensor& target_in,
                                     const std::optional<at::Tensor>& bias_in, c10::string_view norm,
                                     const std::optional<at::Tensor>& norm_weight,
                                     const std::optional<at::Tensor>& norm_bias, double norm_eps,
                                     int64_t ignore_index) {
  TORCH_CHECK(h_in.is_cuda(), "freezekern: the CUDA kernel got h on ", h_in.device());
  const c10::cuda::CUDAGuard guard(h_in.device());
  const LogitLensInputs in = logit_lens_inputs(h_in, weight_in, target_in, bias_in, norm, norm_weight, norm_bias,
                                               norm_eps);
  const at::Tensor &h = in.h, &weight = in.weight, &target = in.target, &bias = in.bias;
  const int64_t n = in.n, d = in.d, vocab = in.vocab;
  const auto f32 = h.options().dtype(at::kFloat);
  at::Tensor out = at::empty({n}, f32);
  if (n == 0) return out;

  const cuda::LogitLensWorkspace ws = cuda::logit_lens_workspace(n, d, vocab);
  at::Tensor workspace = at::empty({ws.n_floats}, f32);
  float* base = workspace.data_ptr<float>();

  cuda::LogitLensParams p;
  p.h = h.data_ptr();
  p.h_row_stride = h.stride(0);
  p.h_dtype = cuda_dtype(h.scalar_type());
  p.weight = weight.data_ptr();
  p.weight_row_stride = weight.stride(0);
  p.weight_dtype = cuda_dtype(weight.scalar_type());
  p.bias = opt_ptr<float>(bias);
  p.target = target.data_ptr<int64_t>();
  p.ignore_index = ignore_index;
  p.n_rows = n;
  p.dim = d;
  p.vocab = vocab;
  p.norm = norm_spec(in.norm);
  p.out = out.data_ptr<float>();
  p.x = base;
  p.x_ld = ws.x_ld;
  p.target_logit = base + n * ws.x_ld;
  p.partial = p.target_logit + n;
  p.n_splits = ws.n_splits;
  check_launch(cuda::launch_logit_lens_deviation(p, at::cuda::getCurrentCUDAStream()), "logit_lens_deviation");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(freezekern, CUDA, m) {
  m.impl("cosine_deviation", &cosine_deviation_cuda);
  m.impl("logit_lens_deviation", &logit_lens_deviation_cuda);
}

}  // namespace freezekern

#endif  // FREEZEKERN_WITH_CUDA
