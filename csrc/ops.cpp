// Operator schemas of the freezekern library (torch.ops.freezekern.*).
//
// (The logit lens is the linear cross-entropy's per-row forward of the normed
// state, freezekern/ops/deviation.py: it has no op of its own.)
//
// Backends register kernels for these schemas in their own files:
//   deviation_cpu.cpp, linear_cross_entropy_cpu.cpp                    TORCH_LIBRARY_IMPL(freezekern, CPU, m)
//   deviation_cuda_wrapper.cpp, linear_cross_entropy_cuda_wrapper.cpp  TORCH_LIBRARY_IMPL(freezekern, CUDA, m)
//                                                                      (CUDA builds only)
// The fake (meta) kernels used by torch.compile live in freezekern/ops/native.py;
// the autograd formula of linear_cross_entropy in freezekern/ops/linear_cross_entropy.py.
//
// Shapes and dtypes (see freezekern/ops/reference.py for the definitions):
// cosine_deviation: h [N, D] fp32|bf16|fp16, basis [M, D], target_row [N] int64
//   (< 0: ignored), norm "rms" | "layer" | "none", norm_weight [D]?, norm_bias [D]?
//   -> [N] fp32, 0 on ignored rows.
//
// linear_cross_entropy (see freezekern/ops/linear_cross_entropy.py): h [N, D],
// weight [V, D], target [N] int64, bias [V]?, softcap? (> 0) ->
//   loss   fp32 scalar sum over counted rows (reduce_sum) or [N] per row
//   lse    [N] fp32 logsumexp of each row's logits (0 on ignored rows)
//   grad_h [N, D], grad_weight [V, D], grad_bias [V] fp32: the gradients of each
//          row's loss / of the summed loss, computed in the same pass when the
//          grad_* flag is set (grad_weight / grad_bias only with reduce_sum);
//          empty [0] tensors otherwise.
// linear_cross_entropy_backward recomputes the logits: grad_rows [N] fp32 is
// the incoming gradient per row; returns dh [N, D], dW [V, D], dbias [V] fp32
// where need_* is set, empty [0] tensors otherwise.
#include <torch/library.h>

TORCH_LIBRARY(freezekern, m) {
  m.def(
      "cosine_deviation(Tensor h, Tensor basis, Tensor target_row, str norm, Tensor? norm_weight, "
      "Tensor? norm_bias, float norm_eps) -> Tensor");
  m.def(
      "linear_cross_entropy(Tensor h, Tensor weight, Tensor target, Tensor? bias, float? softcap, int ignore_index, "
      "bool reduce_sum, bool grad_h, bool grad_weight, bool grad_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_cross_entropy_backward(Tensor h, Tensor weight, Tensor target, Tensor? bias, Tensor lse, "
      "Tensor grad_rows, float? softcap, int ignore_index, bool need_h, bool need_weight, bool need_bias) "
      "-> (Tensor, Tensor, Tensor)");
}
