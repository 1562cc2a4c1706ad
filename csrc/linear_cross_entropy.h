// Arguments of the fused linear cross-entropy ops in kernel layouts, shared by
// the CPU and CUDA registrations (see freezekern/ops/linear_cross_entropy.py
// for the definition and ops.cpp for the schemas).
//
//   h      [N, D]  fp32 | bf16 | fp16, inner stride 1 (copied otherwise), any row stride
//   weight [V, D]  the same layouts
//   target [N]     int64, contiguous
//   bias   [V]     fp32, contiguous, or undefined
//   softcap        z = softcap * tanh(z / softcap) when set (> 0)
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "deviation_checks.h"

namespace freezekern {

struct LceInputs {
  at::Tensor h, weight, target, bias;
  int64_t n = 0, d = 0, vocab = 0;
  bool has_softcap = false;
  float softcap = 0.0f;
  int64_t ignore_index = -100;
};

inline LceInputs lce_inputs(const at::Tensor& h_in, const at::Tensor& weight_in, const at::Tensor& target_in,
                            const std::optional<at::Tensor>& bias_in, std::optional<double> softcap,
                            int64_t ignore_index) {
  LceInputs in;
  in.h = as_row_major(h_in, "h");
  const at::Device dev = in.h.device();
  check_same_device(weight_in, "weight", dev);
  in.weight = as_row_major(weight_in, "weight");
  in.n = in.h.size(0);
  in.d = in.h.size(1);
  in.vocab = in.weight.size(0);
  TORCH_CHECK(in.weight.size(1) == in.d, "freezekern: weight must be [V, ", in.d, "], got shape ", in.weight.sizes());
  TORCH_CHECK(in.vocab > 0 && in.d > 0, "freezekern: linear_cross_entropy needs V > 0 and D > 0, got weight ",
              in.weight.sizes());
  in.target = as_index_vector(target_in, in.n, "target", dev);
  in.bias = as_f32_vector(bias_in, in.vocab, "bias", dev);
  if (softcap.has_value()) {
    TORCH_CHECK(*softcap > 0, "freezekern: softcap must be positive, got ", *softcap);
    in.has_softcap = true;
    in.softcap = static_cast<float>(*softcap);
  }
  in.ignore_index = ignore_index;
  return in;
}

// An [N] fp32 vector (lse, per-row gradients) on h's device.
inline at::Tensor lce_row_vector(const at::Tensor& t, int64_t n, const char* name, const at::Device& device) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "freezekern: ", name, " must be [", n, "], got shape ", t.sizes());
  check_same_device(t, name, device);
  return t.to(at::kFloat).contiguous();
}

}  // namespace freezekern
