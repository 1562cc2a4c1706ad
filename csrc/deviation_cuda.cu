// CUDA kernel of the cosine deviation. It needs only the CUDA runtime and
// cuda_bf16.h / cuda_fp16.h: plain pointers in, a launch function out (see
// deviation_cuda.h); deviation_cuda_wrapper.cpp adapts torch tensors.
//
// cosine_deviation: one warp per row (grid-stride), 16-byte vector loads when
//   the rows allow them, fp32 accumulation, warp-shuffle reductions.
// (The logit lens runs the linear cross-entropy's kernels,
// linear_cross_entropy_cuda.cu.)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "deviation_cuda.h"

namespace freezekern {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// One 32-bit word of packed elements as fp32 (no trip through local memory).
template <typename T>
__device__ __forceinline__ void unpack_word(unsigned int u, float* out);
template <>
__device__ __forceinline__ void unpack_word<float>(unsigned int u, float* out) {
  out[0] = __uint_as_float(u);
}
template <>
__device__ __forceinline__ void unpack_word<__nv_bfloat16>(unsigned int u, float* out) {
  out[0] = __uint_as_float(u << 16);
  out[1] = __uint_as_float(u & 0xffff0000u);
}
template <>
__device__ __forceinline__ void unpack_word<__half>(unsigned int u, float* out) {
  out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xffffu)));
  out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(u >> 16)));
}

// kVec consecutive elements (kVec * sizeof(T) bytes, that aligned) as fp32.
template <typename T, int kVec>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[kVec]) {
  if constexpr (kVec == 1) {
    out[0] = to_f32(p[0]);
  } else {
    constexpr int kWords = kVec * int(sizeof(T)) / 4;
    constexpr int kPerWord = 4 / int(sizeof(T));
    static_assert(kWords == 1 || kWords == 2 || kWords == 4, "vector load of 4, 8 or 16 bytes");
    unsigned int w[kWords];
    if constexpr (kWords == 4) {
      const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
      w[0] = r.x;
      w[1] = r.y;
      w[2] = r.z;
      w[3] = r.w;
    } else if constexpr (kWords == 2) {
      const uint2 r = __ldg(reinterpret_cast<const uint2*>(p));
      w[0] = r.x;
      w[1] = r.y;
    } else {
      w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
    }
#pragma unroll
    for (int i = 0; i < kWords; ++i) unpack_word<T>(w[i], out + i * kPerWord);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

struct RowAffine {
  float mean;
  float scale;
};

// Norm statistics of one row, computed by a whole warp.
template <typename T, int kVec>
__device__ __forceinline__ RowAffine row_affine(const T* __restrict__ x, int64_t d, NormSpec norm, int lane,
                                                bool scale = true) {
  if (norm.kind == Norm::None || d == 0) return {0.0f, 1.0f};
  const int64_t dv = d / kVec * kVec;
  const float fd = static_cast<float>(d);
  float mean = 0.0f;
  if (norm.kind == Norm::Layer) {
    float s = 0.0f;
    for (int64_t j = int64_t(lane) * kVec; j < dv; j += kWarp * kVec) {
      float v[kVec];
      load_vec<T, kVec>(x + j, v);
#pragma unroll
      for (int k = 0; k < kVec; ++k) s += v[k];
    }
    for (int64_t j = dv + lane; j < d; j += kWarp) s += to_f32(x[j]);
    mean = warp_sum(s) / fd;
    if (!scale) return {mean, 1.0f};
  }
  float ss = 0.0f;
  for (int64_t j = int64_t(lane) * kVec; j < dv; j += kWarp * kVec) {
    float v[kVec];
    load_vec<T, kVec>(x + j, v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float c = v[k] - mean;
      ss = fmaf(c, c, ss);
    }
  }
  for (int64_t j = dv + lane; j < d; j += kWarp) {
    const float c = to_f32(x[j]) - mean;
    ss = fmaf(c, c, ss);
  }
  ss = warp_sum(ss);
  return {mean, 1.0f / sqrtf(ss / fd + norm.eps)};
}

__device__ __forceinline__ float apply_norm(float x, RowAffine a, NormSpec norm, int64_t j) {
  float y = (x - a.mean) * a.scale;
  if (norm.weight) y *= norm.weight[j];
  if (norm.bias) y += norm.bias[j];
  return y;
}

// ------------------------------------------------------------------ cosine

template <typename TH, typename TB, int kVec>
__global__ void __launch_bounds__(256) cosine_kernel(CosineParams p) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t first = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t stride = (int64_t(gridDim.x) * blockDim.x) / kWarp;
  const TH* h = static_cast<const TH*>(p.h);
  const TB* basis = static_cast<const TB*>(p.basis);
  const int64_t d = p.dim;
  const int64_t dv = d / kVec * kVec;
  const NormSpec norm = p.norm;
  for (int64_t row = first; row < p.n_rows; row += stride) {
    const int64_t t = p.target_row[row];
    float result;
    if (t < 0) {
      result = 0.0f;
    } else if (p.n_basis == 0) {
      result = 1.0f;  // as the reference: a zero basis row gives cos = 0
    } else if (t >= p.n_basis) {
      result = quiet_nan();
    } else {
      const TH* x = h + row * p.h_row_stride;
      const TB* b = basis + t * p.basis_row_stride;
      // Without a norm bias the positive per-row scale cancels in the cosine:
      // RMSNorm needs no statistics pass, LayerNorm only its mean.
      NormSpec stats = norm;
      if (!norm.bias && norm.kind == Norm::Rms) stats.kind = Norm::None;
      RowAffine a = row_affine<TH, kVec>(x, d, stats, lane, /*scale=*/norm.bias != nullptr);
      float dot = 0.0f, yy = 0.0f, bb = 0.0f;
      for (int64_t j = int64_t(lane) * kVec; j < dv; j += kWarp * kVec) {
        float xv[kVec], bv[kVec];
        load_vec<TH, kVec>(x + j, xv);
        load_vec<TB, kVec>(b + j, bv);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float y = apply_norm(xv[k], a, norm, j + k);
          dot = fmaf(y, bv[k], dot);
          yy = fmaf(y, y, yy);
          bb = fmaf(bv[k], bv[k], bb);
        }
      }
      for (int64_t j = dv + lane; j < d; j += kWarp) {
        const float y = apply_norm(to_f32(x[j]), a, norm, j);
        const float bj = to_f32(b[j]);
        dot = fmaf(y, bj, dot);
        yy = fmaf(y, y, yy);
        bb = fmaf(bj, bj, bb);
      }
      dot = warp_sum(dot);
      yy = warp_sum(yy);
      bb = warp_sum(bb);
      result = 1.0f - dot / fmaxf(sqrtf(yy) * sqrtf(bb), 1e-30f);
    }
    if (lane == 0) p.out[row] = result;
  }
}

// ------------------------------------------------------------------ launch helpers

template <typename F>
cudaError_t with_dtype(DType t, F&& f) {
  switch (t) {
    case DType::F32:
      return f(static_cast<float*>(nullptr));
    case DType::F16:
      return f(static_cast<__half*>(nullptr));
    case DType::BF16:
      return f(static_cast<__nv_bfloat16*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

template <typename T>
bool rows_aligned(const void* ptr, int64_t row_stride, int vec) {
  const uintptr_t bytes = static_cast<uintptr_t>(vec) * sizeof(T);
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0 && row_stride % vec == 0;
}

int sm_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 80;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) return 80;
  return count;
}

unsigned warp_grid(int64_t n_rows, int warps_per_block) {
  const int64_t blocks = (n_rows + warps_per_block - 1) / warps_per_block;
  const int64_t cap = int64_t(sm_count()) * 64;
  return static_cast<unsigned>(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

}  // namespace

cudaError_t launch_cosine_deviation(const CosineParams& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned grid = warp_grid(p.n_rows, kThreads / kWarp);
  return with_dtype(p.h_dtype, [&](auto* th) {
    using TH = std::remove_pointer_t<decltype(th)>;
    return with_dtype(p.basis_dtype, [&](auto* tb) {
      using TB = std::remove_pointer_t<decltype(tb)>;
      constexpr int kVec = (sizeof(TH) == 2 && sizeof(TB) == 2) ? 8 : 4;
      const bool vec = rows_aligned<TH>(p.h, p.h_row_stride, kVec) &&
                       rows_aligned<TB>(p.basis, p.basis_row_stride, kVec);
      if (vec) {
        cosine_kernel<TH, TB, kVec><<<grid, kThreads, 0, stream>>>(p);
      } else {
        cosine_kernel<TH, TB, 1><<<grid, kThreads, 0, stream>>>(p);
      }
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace freezekern
