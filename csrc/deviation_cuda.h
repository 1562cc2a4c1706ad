// Plain C++ interface of the CUDA kernel in deviation_cuda.cu.
//
// Nothing here depends on torch: pointers, strides (in elements) and a
// stream. deviation_cuda_wrapper.cpp adapts torch tensors to these calls.
// All pointers are device pointers; every launch function returns the CUDA
// error of its launches (cudaSuccess when fine).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace freezekern {
namespace cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };
enum class Norm : int { None = 0, Rms = 1, Layer = 2 };

// n(x) = (x - mean) * rsqrt(stat + eps) * norm_weight + norm_bias, with
// mean = 0 and stat = mean(x^2) for Rms, stat = var(x) for Layer; the
// identity for None. norm_weight / norm_bias are fp32 [dim] or null.
struct NormSpec {
  Norm kind;
  const float* weight;
  const float* bias;
  float eps;
};

// out[i] = 1 - cos(n(h[i]), basis[target_row[i]]), 0 where target_row[i] < 0,
// 1 for counted rows when n_basis == 0, NaN where target_row[i] >= n_basis.
struct CosineParams {
  const void* h;
  int64_t h_row_stride;  // elements; the inner stride is 1
  DType h_dtype;
  const void* basis;
  int64_t basis_row_stride;
  DType basis_dtype;
  const int64_t* target_row;  // [n_rows]
  int64_t n_rows;
  int64_t dim;
  int64_t n_basis;
  NormSpec norm;
  float* out;  // [n_rows] fp32
};

cudaError_t launch_cosine_deviation(const CosineParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace freezekern
