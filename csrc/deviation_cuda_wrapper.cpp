// CUDA registration of the cosine deviation: adapts torch tensors to the plain
// launch function of deviation_cuda.cu. Compiled only into CUDA builds
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

}  // namespace

TORCH_LIBRARY_IMPL(freezekern, CUDA, m) {
  m.impl("cosine_deviation", &cosine_deviation_cuda);
}

}  // namespace freezekern

#endif  // FREEZEKERN_WITH_CUDA
