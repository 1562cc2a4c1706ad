// CUDA kernels of the fused linear cross-entropy: the per-logit passes between
// the cuBLAS products (see linear_cross_entropy_cuda.h for the contract and
// linear_cross_entropy_cuda_wrapper.cpp for the products). One thread block of
// 256 threads per row of the logits block; a row's threads stride over its
// columns, so each thread reads back only what it wrote itself between the
// passes, and block-wide max / sum reductions join them.
//
//   fold   (forward, loss only): z = cap(l + b) stored; max; sum exp(z - max);
//          merged into the row's running (max, sum); the target logit kept.
//   eager  (forward with gradients, the whole vocabulary): the same two passes,
//          then a third that writes exp(z - lse) dz/dy, minus dz/dy at the target.
//   grad   (recompute backward): one pass, g (exp(cap(l + b) - lse) - onehot) dz/dy.
#include <cuda_runtime.h>

#include <cstdint>

#include "linear_cross_entropy_cuda.h"

namespace freezekern {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// z = cap(y) and, when dz is given, dz/dy.
__device__ __forceinline__ float cap_of(float y, const LceBlock& b, float* dz) {
  if (!b.has_softcap) {
    if (dz) *dz = 1.0f;
    return y;
  }
  const float t = tanhf(y / b.softcap);
  if (dz) *dz = (1.0f - t) * (1.0f + t);
  return t * b.softcap;
}

__device__ __forceinline__ float slope_of_z(float z, const LceBlock& b) {
  if (!b.has_softcap) return 1.0f;
  const float t = z / b.softcap;
  return (1.0f - t) * (1.0f + t);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Block-wide reductions (kThreads threads); every thread gets the result.
__device__ float block_max(float v, float* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_max(v);
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < kThreads / kWarp ? shared[lane] : neg_inf();
  return warp_max(v);
}

__device__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < kThreads / kWarp ? shared[lane] : 0.0f;
  return warp_sum(v);
}

__device__ __forceinline__ float bias_at(const LceBlock& b, int64_t col) { return b.bias ? b.bias[b.v0 + col] : 0.0f; }

// Pass 1 over one row: z = cap(l + b) in place; returns the row's max (every thread).
__device__ float transform_row_max(float* l, const LceBlock& b, int64_t target_col, float* target_z, float* shared) {
  float m = neg_inf();
  for (int64_t j = threadIdx.x; j < b.cols; j += kThreads) {
    const float z = cap_of(l[j] + bias_at(b, j), b, nullptr);
    l[j] = z;
    m = fmaxf(m, z);
    if (j == target_col) *target_z = z;
  }
  return block_max(m, shared);
}

__global__ void __launch_bounds__(kThreads) lce_fold_kernel(LceBlock b, float* run_max, float* run_sum,
                                                             float* target_logit) {
  __shared__ float shared[kThreads / kWarp];
  const int64_t r = blockIdx.x;
  const int64_t t = b.target[r];
  if (t == b.ignore_index) return;  // the whole block returns: no barrier is left waiting
  float* l = b.logits + r * b.ld;
  const int64_t col = t - b.v0;
  const float m = transform_row_max(l, b, col, target_logit + r, shared);
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < b.cols; j += kThreads) s += __expf(l[j] - m);
  s = block_sum(s, shared);
  if (threadIdx.x == 0 && m > neg_inf()) {
    const float rm = run_max[r];
    const float nm = fmaxf(rm, m);
    run_sum[r] = run_sum[r] * __expf(rm - nm) + s * __expf(m - nm);
    run_max[r] = nm;
  }
}

__global__ void __launch_bounds__(kThreads) lce_eager_kernel(LceBlock b, float* lse_out, float* loss_out) {
  __shared__ float shared[kThreads / kWarp];
  __shared__ float target_z;
  const int64_t r = blockIdx.x;
  const int64_t t = b.target[r];
  float* l = b.logits + r * b.ld;
  const bool counted = t != b.ignore_index;
  if (!counted || t < 0 || t >= b.vocab) {
    for (int64_t j = threadIdx.x; j < b.cols; j += kThreads) l[j] = 0.0f;
    if (threadIdx.x == 0) {
      lse_out[r] = 0.0f;
      loss_out[r] = counted ? quiet_nan() : 0.0f;
    }
    return;
  }
  if (threadIdx.x == 0) target_z = 0.0f;
  __syncthreads();
  const float m = transform_row_max(l, b, t, &target_z, shared);  // its reduction orders target_z's write
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < b.cols; j += kThreads) s += __expf(l[j] - m);
  s = block_sum(s, shared);
  const float lse = m + logf(s);
  const float zt = target_z;
  for (int64_t j = threadIdx.x; j < b.cols; j += kThreads) {
    const float z = l[j];
    const float p = __expf(z - lse);
    l[j] = (j == t ? p - 1.0f : p) * slope_of_z(z, b);
  }
  if (threadIdx.x == 0) {
    lse_out[r] = lse;
    loss_out[r] = lse - zt;
  }
}

__global__ void __launch_bounds__(kThreads) lce_grad_kernel(LceBlock b, const float* lse, const float* grad_rows) {
  const int64_t r = blockIdx.x;
  const int64_t t = b.target[r];
  float* l = b.logits + r * b.ld;
  const bool live = t != b.ignore_index && t >= 0 && t < b.vocab;
  const float g = live ? grad_rows[r] : 0.0f;
  const float row_lse = live ? lse[r] : 0.0f;
  const int64_t col = t - b.v0;
  for (int64_t j = threadIdx.x; j < b.cols; j += kThreads) {
    if (!live) {
      l[j] = 0.0f;
      continue;
    }
    float dz;
    const float z = cap_of(l[j] + bias_at(b, j), b, &dz);
    const float p = __expf(z - row_lse);
    l[j] = g * (j == col ? p - 1.0f : p) * dz;
  }
}

unsigned grid_rows(int64_t rows) { return static_cast<unsigned>(rows); }

}  // namespace

cudaError_t launch_lce_fold(const LceBlock& b, float* run_max, float* run_sum, float* target_logit,
                            cudaStream_t stream) {
  if (b.rows == 0 || b.cols == 0) return cudaSuccess;
  lce_fold_kernel<<<grid_rows(b.rows), kThreads, 0, stream>>>(b, run_max, run_sum, target_logit);
  return cudaGetLastError();
}

cudaError_t launch_lce_eager(const LceBlock& b, float* lse, float* loss, cudaStream_t stream) {
  if (b.rows == 0) return cudaSuccess;
  if (b.cols != b.vocab || b.v0 != 0) return cudaErrorInvalidValue;
  lce_eager_kernel<<<grid_rows(b.rows), kThreads, 0, stream>>>(b, lse, loss);
  return cudaGetLastError();
}

cudaError_t launch_lce_grad(const LceBlock& b, const float* lse, const float* grad_rows, cudaStream_t stream) {
  if (b.rows == 0 || b.cols == 0) return cudaSuccess;
  lce_grad_kernel<<<grid_rows(b.rows), kThreads, 0, stream>>>(b, lse, grad_rows);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace freezekern
