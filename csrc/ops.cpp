// Operator schemas of the freezekern library (torch.ops.freezekern.*).
//
// Backends register kernels for these schemas in their own files:
//   deviation_cpu.cpp           TORCH_LIBRARY_IMPL(freezekern, CPU, m)
//   deviation_cuda_wrapper.cpp  TORCH_LIBRARY_IMPL(freezekern, CUDA, m)  (CUDA builds only)
// The fake (meta) kernels used by torch.compile live in freezekern/ops/native.py.
//
// Shapes and dtypes (see freezekern/ops/reference.py for the definitions):
//   h [N, D] fp32|bf16|fp16, basis [M, D], target_row [N] int64 (< 0: ignored)
//   weight [V, D], bias [V]?, target [N] int64 (== ignore_index: ignored)
//   norm "rms" | "layer" | "none"; norm_weight [D]?, norm_bias [D]?
//   returns [N] fp32, 0 on ignored rows.
#include <torch/library.h>

TORCH_LIBRARY(freezekern, m) {
  m.def(
      "cosine_deviation(Tensor h, Tensor basis, Tensor target_row, str norm, Tensor? norm_weight, "
      "Tensor? norm_bias, float norm_eps) -> Tensor");
  m.def(
      "logit_lens_deviation(Tensor h, Tensor weight, Tensor target, Tensor? bias, str norm, "
      "Tensor? norm_weight, Tensor? norm_bias, float norm_eps, int ignore_index) -> Tensor");
}
