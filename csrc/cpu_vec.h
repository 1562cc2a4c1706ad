// Vector helpers shared by the CPU kernels (deviation_cpu.cpp, linear_cross_entropy_cpu.cpp).
//
// 16-lane fp32 vectors through GCC/Clang vector extensions (one zmm, two ymm
// or four xmm registers in each target clone), element loads that widen
// bf16/fp16 to fp32, a vectorisable exp and tanh, and the OpenMP row
// splitter. The vector functions are always inlined, so they are compiled
// into the FK_MULTIVERSION (x86-64-v4 / v3 / baseline) clones of their callers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && (__GNUC__ >= 12) && defined(__x86_64__) && \
    defined(__linux__) && !defined(FREEZEKERN_NO_MULTIVERSION)
#define FK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FK_MULTIVERSION
#endif

#if defined(_MSC_VER)
#define FK_INLINE __forceinline
#else
#define FK_INLINE inline __attribute__((always_inline))
#endif

namespace freezekern {
namespace cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------- element loads

FK_INLINE float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

FK_INLINE uint32_t bits_from_f32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// IEEE half -> float without branches; handles zeros, subnormals, inf and
// NaN (same method as c10's portable path).
FK_INLINE float half_bits_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * f32_from_bits(0x7800000u);  // 2^-112
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits =
      sign | (two_w < (1u << 27) ? bits_from_f32(denormalized) : bits_from_f32(normalized));
  return f32_from_bits(bits);
}

FK_INLINE float load_f32(const float* p, int64_t j) { return p[j]; }
FK_INLINE float load_f32(const at::BFloat16* p, int64_t j) {
  return f32_from_bits(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[j]) << 16);
}
FK_INLINE float load_f32(const at::Half* p, int64_t j) {
  return half_bits_to_f32(reinterpret_cast<const uint16_t*>(p)[j]);
}

// Row loops use explicit 16-lane vectors (GCC/Clang vector extensions): in
// each target clone a v16f is one zmm, two ymm or four xmm registers. Sums
// keep two independent accumulators and end in a tree reduction. (An
// `omp simd reduction` ends with a scalar loop over the lanes, which costs as
// much as the loop itself on rows of a few hundred elements.)
typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

template <typename To, typename From>
FK_INLINE To bitcast(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bitcast size");
  To r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
}

FK_INLINE v16f vsplat(float x) {
  v16f v = {};
  return v + x;
}

// 16 consecutive elements as fp32.
FK_INLINE v16f vload(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

FK_INLINE v16f vload(const at::BFloat16* p) {
  // Interleave with zeros: each bf16 becomes the high half of its fp32 (one
  // vpermt2w with AVX-512; a zero-extension and shift split in halves
  // otherwise).
  v16h h;
  std::memcpy(&h, p, sizeof(h));
  const v16h z = {};
  return bitcast<v16f>(__builtin_shufflevector(z, h, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9,
                                               25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
}

FK_INLINE v16f vload(const at::Half* p) {
  v16h h;
  std::memcpy(&h, p, sizeof(h));
  const v16u w = __builtin_convertvector(h, v16u) << 16;
  const v16u sign = w & 0x80000000u;
  const v16u two_w = w + w;
  const v16f normalized = bitcast<v16f>((two_w >> 4) + (0xE0u << 23)) * f32_from_bits(0x7800000u);
  const v16f denormalized = bitcast<v16f>((two_w >> 17) | (126u << 23)) - 0.5f;
  const v16u is_denormal = bitcast<v16u>(two_w < (1u << 27));  // all ones where denormal
  const v16u bits = sign | ((bitcast<v16u>(denormalized) & is_denormal) | (bitcast<v16u>(normalized) & ~is_denormal));
  return bitcast<v16f>(bits);
}

FK_INLINE float hsum(v16f v) {
  const v8f a = bitcast<v8f>(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7));
  const v8f b = bitcast<v8f>(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  const v8f s8 = a + b;
  const v4f c = __builtin_shufflevector(s8, s8, 0, 1, 2, 3);
  const v4f e = __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  const v4f s4 = c + e;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// exp(x) for the logsumexp, vectorisable: Cephes-style range reduction and a
// degree-6 polynomial (about 1 ulp). Returns 0 below -87.3 (and for -inf).
FK_INLINE float fk_exp(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  const float scale = f32_from_bits(static_cast<uint32_t>(e) << 23);
  const float y = p * scale;
  return x < -87.3f ? 0.0f : y;
}

typedef int32_t v16i __attribute__((vector_size(64)));

// fk_exp on 16 lanes.
FK_INLINE v16f vexp(v16f x) {
  const v16f lo = vsplat(-87.3f), hi = vsplat(88.3f);
  v16f xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const v16f t = xc * 1.44269504088896341f;
  const v16f n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  v16f r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16f p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v16i e = (__builtin_convertvector(n, v16i) + 127) << 23;
  const v16f y = p * bitcast<v16f>(e);
  const v16f zero = {};
  return x < lo ? zero : y;
}

FK_INLINE void vstore(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }

// tanh(x) = 1 - 2 / (exp(2x) + 1): absolute error about 1e-7, exactly +-1
// once exp saturates.
FK_INLINE v16f vtanh(v16f x) {
  const v16f e = vexp(x + x);
  return 1.0f - 2.0f / (e + 1.0f);
}

FK_INLINE float hmax(v16f v) {
  float m = v[0];
  for (int k = 1; k < 16; ++k) m = v[k] > m ? v[k] : m;
  return m;
}

// Runs f(begin, end, slot) on one contiguous, non-empty range of [0, n) per
// OpenMP thread, at most `threads` of them (slot: the thread's index, < threads);
// on the calling thread alone when threads <= 1 or already inside a parallel
// region. Returns false, having run nothing, when OpenMP is absent and
// threads > 1 (the caller picks its own fallback). f must not throw.
template <typename F>
bool omp_ranges(int64_t n, int64_t threads, const F& f) {
  if (n <= 0) return true;
#ifdef _OPENMP
  if (threads > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
      const int64_t tid = omp_get_thread_num();
      const int64_t per = (n + omp_get_num_threads() - 1) / omp_get_num_threads();
      const int64_t begin = std::min(n, tid * per);
      const int64_t end = std::min(n, begin + per);
      if (begin < end) f(begin, end, tid);
    }
    return true;
  }
#else
  if (threads > 1) return false;
#endif
  f(0, n, 0);
  return true;
}

// Splits [0, n) into one contiguous range per thread (OpenMP, torch's thread
// count; at most one per `grain` items). f must not throw.
template <typename F>
void parallel_rows(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain));
  if (!omp_ranges(n, threads, [&](int64_t begin, int64_t end, int64_t) { f(begin, end); }))
    at::parallel_for(0, n, grain, f);
}

inline int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* endp = nullptr;
  const long long x = std::strtoll(v, &endp, 10);
  return (endp && *endp == '\0' && x > 0) ? static_cast<int64_t>(x) : fallback;
}

inline int dtype_slot(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return 0;
    case at::kBFloat16:
      return 1;
    case at::kHalf:
      return 2;
    default:
      TORCH_CHECK(false, "freezekern: unsupported dtype ", t);
  }
}

}  // namespace cpu
}  // namespace freezekern
