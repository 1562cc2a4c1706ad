// Argument checks and normalisation shared by the CPU and CUDA registrations.
//
// Every backend kernel receives tensors already reduced to a small set of
// layouts, so the kernels only handle:
//   h, basis, weight : 2-D, dtype fp32 | bf16 | fp16, inner stride 1, any row
//                      stride (other float dtypes are cast to fp32, exactly as
//                      the reference does with .float(); an inner stride != 1
//                      is made contiguous, i.e. copied once)
//   norm_weight, norm_bias, bias : fp32, contiguous, or undefined
//   target / target_row : int64, contiguous
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace freezekern {

enum class NormKind : int { None = 0, Rms = 1, Layer = 2 };

inline NormKind parse_norm(c10::string_view norm) {
  if (norm == "rms") return NormKind::Rms;
  if (norm == "layer") return NormKind::Layer;
  if (norm == "none" || norm.empty()) return NormKind::None;
  TORCH_CHECK(false, "freezekern: norm must be 'rms', 'layer' or 'none', got '", std::string(norm), "'");
}

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// [R, D] matrix with inner stride 1 and a kernel dtype (row stride kept).
inline at::Tensor as_row_major(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "freezekern: ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "freezekern: ", name, " must be floating, got ",
              t.scalar_type());
  at::Tensor r = is_kernel_dtype(t.scalar_type()) ? t : t.to(at::kFloat);
  if (r.size(1) > 1 && r.stride(1) != 1) r = r.contiguous();
  return r;
}

// Optional [n] vector as contiguous fp32 (undefined tensor when absent).
inline at::Tensor as_f32_vector(const std::optional<at::Tensor>& t, int64_t n, const char* name,
                                const at::Device& device) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "freezekern: ", name, " must be [", n, "], got shape ",
              t->sizes());
  TORCH_CHECK(t->device() == device, "freezekern: ", name, " is on ", t->device(), " but h is on ", device);
  return t->to(at::kFloat).contiguous();
}

inline at::Tensor as_index_vector(const at::Tensor& t, int64_t n, const char* name, const at::Device& device) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "freezekern: ", name, " must be [", n, "], got shape ", t.sizes());
  TORCH_CHECK(!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type()),
              "freezekern: ", name, " must be an integer tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, "freezekern: ", name, " is on ", t.device(), " but h is on ", device);
  return t.to(at::kLong).contiguous();
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "freezekern: ", name, " is on ", t.device(), " but h is on ", device);
}

// The norm weight and bias are only used by an actual norm, as in the reference.
struct NormArgs {
  NormKind kind;
  at::Tensor weight;  // fp32 [D] or undefined
  at::Tensor bias;    // fp32 [D] or undefined
  float eps;
};

inline NormArgs make_norm_args(c10::string_view norm, const std::optional<at::Tensor>& norm_weight,
                               const std::optional<at::Tensor>& norm_bias, double eps, int64_t dim,
                               const at::Device& device) {
  NormArgs a;
  a.kind = parse_norm(norm);
  a.eps = static_cast<float>(eps);
  if (a.kind != NormKind::None) {
    a.weight = as_f32_vector(norm_weight, dim, "norm_weight", device);
    a.bias = as_f32_vector(norm_bias, dim, "norm_bias", device);
  }
  return a;
}

template <typename T>
inline const T* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// cosine_deviation's arguments in kernel layouts: h [N, D], basis [M, D],
// target [N] int64, the norm; every backend starts from this.
struct CosineInputs {
  at::Tensor h, basis, target;
  NormArgs norm;
  int64_t n, d, m;
};

inline CosineInputs cosine_inputs(const at::Tensor& h_in, const at::Tensor& basis_in, const at::Tensor& target_row,
                                  c10::string_view norm, const std::optional<at::Tensor>& norm_weight,
                                  const std::optional<at::Tensor>& norm_bias, double norm_eps) {
  CosineInputs in;
  in.h = as_row_major(h_in, "h");
  const at::Device dev = in.h.device();
  check_same_device(basis_in, "basis", dev);
  in.basis = as_row_major(basis_in, "basis");
  in.n = in.h.size(0);
  in.d = in.h.size(1);
  in.m = in.basis.size(0);
  TORCH_CHECK(in.basis.size(1) == in.d, "freezekern: basis must be [M, ", in.d, "], got shape ", in.basis.sizes());
  in.target = as_index_vector(target_row, in.n, "target_row", dev);
  in.norm = make_norm_args(norm, norm_weight, norm_bias, norm_eps, in.d, dev);
  return in;
}

}  // namespace freezekern
