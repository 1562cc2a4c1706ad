// Plain C++ interface of the CUDA kernels in linear_cross_entropy_cuda.cu.
//
// The fused linear cross-entropy on CUDA runs its matrix products through
// cuBLAS (at::mm in linear_cross_entropy_cuda_wrapper.cpp); these kernels are
// the per-logit passes between them, on one block of rows of fp32 logits at
// a time. Nothing here depends on torch: device pointers, element strides, a
// stream; every launch returns the CUDA error of its launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace freezekern {
namespace cuda {

// A block of rows of raw logits l = x W_c^T, fp32, in place: rows [0, rows)
// of the block, columns [0, cols) holding vocabulary entries [v0, v0 + cols).
// bias (fp32 [vocab], or null) and target (int64, one per row of the block)
// are indexed as the full vocabulary and as the block's rows.
struct LceBlock {
  float* logits;
  int64_t ld;  // row stride of logits, elements
  int64_t rows;
  int64_t cols;
  int64_t v0;
  int64_t vocab;
  const float* bias;
  const int64_t* target;
  int64_t ignore_index;
  bool has_softcap;
  float softcap;  // z = softcap * tanh(y / softcap)
};

// Forward, loss only: z = cap(l + b) in place, folded into the running
// (max, sum of exp) of each counted row; the target logit is stored when it
// lies in the block. Ignored rows are left untouched.
cudaError_t launch_lce_fold(const LceBlock& b, float* run_max, float* run_sum, float* target_logit,
                            cudaStream_t stream);

// Forward, eager (cols == vocab, v0 == 0): the logits of each row become the
// gradient of its loss, (softmax(z) - onehot(target)) dz/dy, and lse and loss
// are written. Ignored rows become zeros (loss 0); a counted row whose target
// lies outside [0, vocab) becomes zeros with loss NaN.
cudaError_t launch_lce_eager(const LceBlock& b, float* lse, float* loss, cudaStream_t stream);

// Backward, recompute: the raw logits of the block become
// g (softmax(z) - onehot(target)) dz/dy with the saved lse and the incoming
// per-row gradient g; rows that are ignored or have no valid target become zeros.
cudaError_t launch_lce_grad(const LceBlock& b, const float* lse, const float* grad_rows, cudaStream_t stream);

}  // namespace cuda
}  // namespace freezekern
