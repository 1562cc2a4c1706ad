// CUDA kernels of the deviation ops. They need only the CUDA runtime and
// cuda_bf16.h / cuda_fp16.h: plain pointers in, launch functions out (see
// deviation_cuda.h); deviation_cuda_wrapper.cpp adapts torch tensors.
//
// cosine_deviation: one warp per row (grid-stride), 16-byte vector loads when
//   the rows allow them, fp32 accumulation, warp-shuffle reductions.
// logit_lens_deviation, three kernels:
//   1. prepare: one warp per row writes n(h_i) as fp32 (zero padded to x_ld)
//      and the target logit W[t_i] . n(h_i) + b[t_i].
//   2. lse: a tiled SIMT GEMM (64 rows x 128 vocabulary entries per block,
//      8x8 outputs per thread, double-buffered shared-memory tiles of depth
//      16) over a slice of the vocabulary; each thread keeps an online
//      logsumexp (running max and sum) of its rows over the slice, the 16
//      threads sharing a row merge theirs with shuffles, and one partial
//      (max, sum) per (split, row) is written. No [N, V] tensor exists.
//   3. combine: merges the partials of each row and subtracts the target logit.
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

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
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

// ------------------------------------------------------------------ logit lens: prepare

template <int kVec>
__device__ __forceinline__ void store_vec(float* __restrict__ p, const float (&v)[kVec]) {
  if constexpr (kVec % 4 == 0) {
#pragma unroll
    for (int k = 0; k < kVec; k += 4) *reinterpret_cast<float4*>(p + k) = make_float4(v[k], v[k + 1], v[k + 2], v[k + 3]);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) p[k] = v[k];
  }
}

template <typename TH, typename TW, int kVec>
__global__ void __launch_bounds__(256) logit_lens_prepare_kernel(LogitLensParams p) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t first = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t stride = (int64_t(gridDim.x) * blockDim.x) / kWarp;
  const TH* h = static_cast<const TH*>(p.h);
  const TW* weight = static_cast<const TW*>(p.weight);
  const int64_t d = p.dim;
  const int64_t dv = d / kVec * kVec;
  const NormSpec norm = p.norm;
  for (int64_t row = first; row < p.n_rows; row += stride) {
    const TH* x = h + row * p.h_row_stride;
    float* xo = p.x + row * p.x_ld;
    const int64_t t = p.target[row];
    const bool counted = t != p.ignore_index;
    const bool valid = counted && t >= 0 && t < p.vocab;
    const TW* wr = valid ? weight + t * p.weight_row_stride : nullptr;
    const RowAffine a = row_affine<TH, kVec>(x, d, norm, lane);
    float dot = 0.0f;
    for (int64_t j = int64_t(lane) * kVec; j < dv; j += kWarp * kVec) {
      float v[kVec];
      load_vec<TH, kVec>(x + j, v);
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[k] = apply_norm(v[k], a, norm, j + k);
      store_vec<kVec>(xo + j, v);
      if (wr) {
        float w[kVec];
        load_vec<TW, kVec>(wr + j, w);
#pragma unroll
        for (int k = 0; k < kVec; ++k) dot = fmaf(v[k], w[k], dot);
      }
    }
    for (int64_t j = dv + lane; j < d; j += kWarp) {
      const float y = apply_norm(to_f32(x[j]), a, norm, j);
      xo[j] = y;
      if (wr) dot = fmaf(y, to_f32(wr[j]), dot);
    }
    for (int64_t j = d + lane; j < p.x_ld; j += kWarp) xo[j] = 0.0f;
    dot = warp_sum(dot);
    if (lane == 0) {
      float tl = 0.0f;
      if (counted && p.vocab > 0) tl = valid ? dot + (p.bias ? p.bias[t] : 0.0f) : quiet_nan();
      p.target_logit[row] = tl;
    }
  }
}

// ------------------------------------------------------------------ logit lens: tiled GEMM + online logsumexp

constexpr int kBM = 64;   // rows per block
constexpr int kBN = 128;  // vocabulary entries per tile
constexpr int kBK = 16;   // depth of a shared-memory tile
constexpr int kTM = 8;    // rows per thread
constexpr int kTN = 8;    // vocabulary entries per thread
constexpr int kLseThreads = (kBM / kTM) * (kBN / kTN);  // 128
static_assert(kLseThreads == 128, "tile shape");
static_assert(kBN == kLseThreads, "one weight row per thread in the tile loader");

// Thread (ty, tx) owns rows ty*4 + {0..3} and 32 + ty*4 + {0..3}, and
// columns tx*4 + {0..3} and 64 + tx*4 + {0..3} of the 64 x 128 tile.
__device__ __forceinline__ int tile_row(int ty, int i) { return (i < 4) ? ty * 4 + i : 32 + ty * 4 + (i - 4); }
__device__ __forceinline__ int tile_col(int tx, int j) { return (j < 4) ? tx * 4 + j : 64 + tx * 4 + (j - 4); }

// Loads kBK consecutive weights of one row (kBK * sizeof(TW) bytes, aligned).
template <typename TW>
__device__ __forceinline__ void load_weight_run(const TW* __restrict__ src, float (&dst)[kBK]) {
  constexpr int kPer = 16 / sizeof(TW);  // elements per 16-byte load
#pragma unroll
  for (int k = 0; k < kBK; k += kPer) {
    float v[kPer];
    load_vec<TW, kPer>(src + k, v);
#pragma unroll
    for (int e = 0; e < kPer; ++e) dst[k + e] = v[e];
  }
}

__device__ __forceinline__ void merge_lse(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == neg_inf()) return;  // both empty
  s = s * __expf(m - mn) + s2 * __expf(m2 - mn);
  m = mn;
}

template <typename TW, bool kVecW>
__global__ void __launch_bounds__(kLseThreads) logit_lens_lse_kernel(const float* __restrict__ X, int64_t x_ld,
                                                                     const TW* __restrict__ W, int64_t w_ld,
                                                                     const float* __restrict__ bias, int64_t n_rows,
                                                                     int64_t dim, int64_t vocab, int tiles_per_split,
                                                                     float* __restrict__ part_max,
                                                                     float* __restrict__ part_sum) {
  __shared__ __align__(16) float xs[2][kBK][kBM + 4];
  __shared__ __align__(16) float ws[2][kBK][kBN + 4];

  const int tid = threadIdx.x;
  const int tx = tid % (kBN / kTN);
  const int ty = tid / (kBN / kTN);
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int split = blockIdx.y;
  const int64_t n_vtiles = (vocab + kBN - 1) / kBN;
  const int64_t vt_begin = int64_t(split) * tiles_per_split;
  const int64_t vt_end = min(n_vtiles, vt_begin + tiles_per_split);
  const int k_tiles = static_cast<int>(x_ld / kBK);

  // X loader: row tid % 64, depth (tid / 64) * 8 .. + 8 of the tile.
  const int xr = tid % kBM;
  const int xk = (tid / kBM) * 8;
  const bool x_ok = row0 + xr < n_rows;
  const float* x_src = X + (x_ok ? (row0 + xr) * x_ld : 0) + xk;

  float run_max[kTM], run_sum[kTM];
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    run_max[i] = neg_inf();
    run_sum[i] = 0.0f;
  }

  for (int64_t vt = vt_begin; vt < vt_end; ++vt) {
    const int64_t v0 = vt * kBN;
    const bool w_ok = v0 + tid < vocab;  // W loader: one vocabulary row per thread
    const TW* w_src = W + (w_ok ? (v0 + tid) * w_ld : 0);

    float acc[kTM][kTN];
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = 0.0f;

    float4 xa = make_float4(0.f, 0.f, 0.f, 0.f), xb = xa;
    float wreg[kBK];
    auto load_tile = [&](int kt) {
      const int64_t k0 = int64_t(kt) * kBK;
      if (x_ok) {
        xa = __ldg(reinterpret_cast<const float4*>(x_src + k0));
        xb = __ldg(reinterpret_cast<const float4*>(x_src + k0 + 4));
      }
      if (w_ok) {
        if constexpr (kVecW) {
          load_weight_run<TW>(w_src + k0, wreg);
        } else {
#pragma unroll
          for (int k = 0; k < kBK; ++k) wreg[k] = (k0 + k < dim) ? to_f32(w_src[k0 + k]) : 0.0f;
        }
      } else {
#pragma unroll
        for (int k = 0; k < kBK; ++k) wreg[k] = 0.0f;
      }
    };
    auto store_tile = [&](int buf) {
      xs[buf][xk + 0][xr] = xa.x;
      xs[buf][xk + 1][xr] = xa.y;
      xs[buf][xk + 2][xr] = xa.z;
      xs[buf][xk + 3][xr] = xa.w;
      xs[buf][xk + 4][xr] = xb.x;
      xs[buf][xk + 5][xr] = xb.y;
      xs[buf][xk + 6][xr] = xb.z;
      xs[buf][xk + 7][xr] = xb.w;
#pragma unroll
      for (int k = 0; k < kBK; ++k) ws[buf][k][tid] = wreg[k];
    };

    load_tile(0);
    store_tile(0);
    __syncthreads();
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int cur = kt & 1;
      if (kt + 1 < k_tiles) load_tile(kt + 1);
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        const float4 a0 = *reinterpret_cast<const float4*>(&xs[cur][kk][ty * 4]);
        const float4 a1 = *reinterpret_cast<const float4*>(&xs[cur][kk][32 + ty * 4]);
        const float4 b0 = *reinterpret_cast<const float4*>(&ws[cur][kk][tx * 4]);
        const float4 b1 = *reinterpret_cast<const float4*>(&ws[cur][kk][64 + tx * 4]);
        const float a[kTM] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float b[kTN] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
        for (int i = 0; i < kTM; ++i)
#pragma unroll
          for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      if (kt + 1 < k_tiles) store_tile(cur ^ 1);
      __syncthreads();
    }

    // Fold this tile's logits into the running logsumexp of each row.
    float col_bias[kTN];
    bool col_ok[kTN];
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t col = v0 + tile_col(tx, j);
      col_ok[j] = col < vocab;
      col_bias[j] = (col_ok[j] && bias) ? bias[col] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      float tile_max = neg_inf();
#pragma unroll
      for (int j = 0; j < kTN; ++j)
        if (col_ok[j]) tile_max = fmaxf(tile_max, acc[i][j] + col_bias[j]);
      if (tile_max == neg_inf()) continue;
      const float m = fmaxf(run_max[i], tile_max);
      float s = 0.0f;
#pragma unroll
      for (int j = 0; j < kTN; ++j)
        if (col_ok[j]) s += __expf(acc[i][j] + col_bias[j] - m);
      run_sum[i] = run_sum[i] * __expf(run_max[i] - m) + s;
      run_max[i] = m;
    }
  }

  // The 16 threads of a row group are consecutive lanes: merge with shuffles.
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    float m = run_max[i], s = run_sum[i];
#pragma unroll
    for (int o = (kBN / kTN) / 2; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(kFullMask, m, o);
      const float s2 = __shfl_xor_sync(kFullMask, s, o);
      merge_lse(m, s, m2, s2);
    }
    const int64_t row = row0 + tile_row(ty, i);
    if (tx == 0 && row < n_rows) {
      part_max[int64_t(split) * n_rows + row] = m;
      part_sum[int64_t(split) * n_rows + row] = s;
    }
  }
}

__global__ void logit_lens_combine_kernel(LogitLensParams p) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.n_rows) return;
  const int64_t t = p.target[row];
  if (t == p.ignore_index) {
    p.out[row] = 0.0f;
    return;
  }
  const float* pmax = p.partial;
  const float* psum = p.partial + int64_t(p.n_splits) * p.n_rows;
  float m = neg_inf();
  for (int s = 0; s < p.n_splits; ++s) m = fmaxf(m, pmax[int64_t(s) * p.n_rows + row]);
  float sum = 0.0f;
  for (int s = 0; s < p.n_splits; ++s) {
    const float ms = pmax[int64_t(s) * p.n_rows + row];
    if (ms != neg_inf()) sum += psum[int64_t(s) * p.n_rows + row] * expf(ms - m);
  }
  const float lse = (m == neg_inf()) ? neg_inf() : m + logf(sum);
  p.out[row] = lse - p.target_logit[row];
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

LogitLensWorkspace logit_lens_workspace(int64_t n_rows, int64_t dim, int64_t vocab) {
  LogitLensWorkspace w;
  w.x_ld = (dim + kBK - 1) / kBK * kBK;
  if (w.x_ld == 0) w.x_ld = kBK;
  const int64_t n_vtiles = (vocab + kBN - 1) / kBN;
  const int64_t row_tiles = (n_rows + kBM - 1) / kBM;
  int64_t splits = 0;
  if (n_vtiles > 0 && row_tiles > 0) {
    // About eight waves of resident blocks, rounded down so that the last
    // wave is nearly full; more splits only add (max, sum) partials.
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, logit_lens_lse_kernel<float, true>, kLseThreads, 0) !=
            cudaSuccess ||
        per_sm <= 0) {
      (void)cudaGetLastError();
      per_sm = 2;
    }
    const int64_t resident = int64_t(sm_count()) * per_sm;
    const int64_t want = (8 * resident) / row_tiles;
    splits = want < 1 ? 1 : (want > n_vtiles ? n_vtiles : want);
    if (splits > 65535) splits = 65535;
    const int64_t per = (n_vtiles + splits - 1) / splits;
    splits = (n_vtiles + per - 1) / per;  // no empty split
  }
  w.n_splits = static_cast<int>(splits);
  w.n_floats = n_rows * w.x_ld + n_rows + 2 * splits * n_rows;
  return w;
}

cudaError_t launch_logit_lens_deviation(const LogitLensParams& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned grid = warp_grid(p.n_rows, kThreads / kWarp);
  cudaError_t err = with_dtype(p.h_dtype, [&](auto* th) {
    using TH = std::remove_pointer_t<decltype(th)>;
    return with_dtype(p.weight_dtype, [&](auto* tw) {
      using TW = std::remove_pointer_t<decltype(tw)>;
      constexpr int kVec = (sizeof(TH) == 2 && sizeof(TW) == 2) ? 8 : 4;
      const bool vec = rows_aligned<TH>(p.h, p.h_row_stride, kVec) &&
                       rows_aligned<TW>(p.weight, p.weight_row_stride, kVec);
      if (vec) {
        logit_lens_prepare_kernel<TH, TW, kVec><<<grid, kThreads, 0, stream>>>(p);
      } else {
        logit_lens_prepare_kernel<TH, TW, 1><<<grid, kThreads, 0, stream>>>(p);
      }
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess) return err;

  if (p.n_splits > 0 && p.vocab > 0) {
    const int64_t n_vtiles = (p.vocab + kBN - 1) / kBN;
    const int tiles_per_split = static_cast<int>((n_vtiles + p.n_splits - 1) / p.n_splits);
    const dim3 lse_grid(static_cast<unsigned>((p.n_rows + kBM - 1) / kBM), static_cast<unsigned>(p.n_splits));
    float* part_max = p.partial;
    float* part_sum = p.partial + int64_t(p.n_splits) * p.n_rows;
    err = with_dtype(p.weight_dtype, [&](auto* tw) {
      using TW = std::remove_pointer_t<decltype(tw)>;
      // 16-byte loads of kBK weights need aligned rows and no ragged depth.
      const bool vec = p.dim % kBK == 0 && rows_aligned<TW>(p.weight, p.weight_row_stride, 16 / sizeof(TW));
      const TW* w = static_cast<const TW*>(p.weight);
      if (vec) {
        logit_lens_lse_kernel<TW, true><<<lse_grid, kLseThreads, 0, stream>>>(
            p.x, p.x_ld, w, p.weight_row_stride, p.bias, p.n_rows, p.dim, p.vocab, tiles_per_split, part_max,
            part_sum);
      } else {
        logit_lens_lse_kernel<TW, false><<<lse_grid, kLseThreads, 0, stream>>>(
            p.x, p.x_ld, w, p.weight_row_stride, p.bias, p.n_rows, p.dim, p.vocab, tiles_per_split, part_max,
            part_sum);
      }
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }

  const unsigned combine_grid = static_cast<unsigned>((p.n_rows + 255) / 256);
  logit_lens_combine_kernel<<<combine_grid, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace freezekern
