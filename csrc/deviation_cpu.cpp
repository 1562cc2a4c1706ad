// CPU kernels of the deviation ops (OpenMP over rows, fp32 accumulation).
//
// cosine_deviation: one pass over memory per row: bf16/fp16 elements are
// widened to fp32 in registers, the norm statistics (when needed, see
// below) and the three sums (y.b, y.y, b.b) run over the row while it is in
// L1. The gathered basis rows (and, with LayerNorm or a norm bias, the h
// rows) are prefetched into L2 two rows ahead. No [N, D] buffer is made.
//
// logit_lens_deviation: the counted rows (target != ignore_index) are
// normalised once into an fp32 [Nc, D] buffer. The vocabulary is walked in
// chunks; each chunk's logits come from one BLAS GEMM (at::mm_out) into a
// reused [row_block, chunk] fp32 buffer, and an online logsumexp (running
// max and sum per row) is folded over it, 1024 logits at a time so that the
// max and the exp pass read each logit from memory once. The
// target logit is a separate dot product. Peak extra memory is
// Nc*D + row_block*chunk (+ chunk*D when the weight is not fp32) floats;
// [N, V] is never allocated.
//
// Hot loops are compiled three times (x86-64-v4 / v3 / baseline) with GCC's
// target_clones, so one binary uses AVX-512 or AVX2+FMA when the CPU has it.
// The vector types, loads, exp and the OpenMP row splitter are in cpu_vec.h.
//
// Tuning (read at each call, for benchmarking): FREEZEKERN_CPU_VOCAB_CHUNK,
// FREEZEKERN_CPU_ROW_BLOCK.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_vec.h"
#include "deviation_checks.h"

namespace freezekern {
namespace {

using namespace cpu;  // vector types, loads, exp, parallel_rows (cpu_vec.h)

// ---------------------------------------------------------------- row reductions

// sum_j x[j]
template <typename T>
FK_INLINE float row_sum(const T* x, int64_t d) {
  v16f a0 = {}, a1 = {};
  int64_t j = 0;
  for (; j + 32 <= d; j += 32) {
    a0 += vload(x + j);
    a1 += vload(x + j + 16);
  }
  for (; j + 16 <= d; j += 16) a0 += vload(x + j);
  float s = hsum(a0 + a1);
  for (; j < d; ++j) s += load_f32(x, j);
  return s;
}

// sum_j (x[j] - c)^2
template <typename T>
FK_INLINE float row_sum_sq_dev(const T* x, int64_t d, float c) {
  const v16f vc = vsplat(c);
  v16f a0 = {}, a1 = {};
  int64_t j = 0;
  for (; j + 32 <= d; j += 32) {
    const v16f u0 = vload(x + j) - vc;
    const v16f u1 = vload(x + j + 16) - vc;
    a0 += u0 * u0;
    a1 += u1 * u1;
  }
  for (; j + 16 <= d; j += 16) {
    const v16f u = vload(x + j) - vc;
    a0 += u * u;
  }
  float s = hsum(a0 + a1);
  for (; j < d; ++j) {
    const float u = load_f32(x, j) - c;
    s += u * u;
  }
  return s;
}

// sum_j x[j] * y[j]
template <typename T>
FK_INLINE float row_dot(const float* x, const T* y, int64_t d) {
  v16f a0 = {}, a1 = {};
  int64_t j = 0;
  for (; j + 32 <= d; j += 32) {
    a0 += vload(x + j) * vload(y + j);
    a1 += vload(x + j + 16) * vload(y + j + 16);
  }
  for (; j + 16 <= d; j += 16) a0 += vload(x + j) * vload(y + j);
  float s = hsum(a0 + a1);
  for (; j < d; ++j) s += x[j] * load_f32(y, j);
  return s;
}

// ---------------------------------------------------------------- norm of one row

// n(x) = (x - mean) * scale * w + nb, with mean = 0 for RMSNorm; the
// identity for norm "none".
struct RowAffine {
  float mean;
  float scale;
};

template <typename T>
FK_INLINE RowAffine row_affine(const T* x, int64_t d, NormKind kind, float eps) {
  if (kind == NormKind::None || d == 0) return {0.0f, 1.0f};
  const float fd = static_cast<float>(d);
  if (kind == NormKind::Rms) return {0.0f, 1.0f / std::sqrt(row_sum_sq_dev(x, d, 0.0f) / fd + eps)};
  const float mean = row_sum(x, d) / fd;
  return {mean, 1.0f / std::sqrt(row_sum_sq_dev(x, d, mean) / fd + eps)};
}

// ---------------------------------------------------------------- cosine
//
// cos(n(x), b) does not change when n(x) is scaled by a positive number, so
// without a norm bias the per-row scale (rsqrt of the mean square or of the
// variance) is never computed: y = x, x * w, x - mean or (x - mean) * w, and
// RMSNorm needs no statistics pass at all.
//
// With a norm bias (Full), y = s u + nb with u = (x - mean) w and s the
// per-row scale, which is only known after the variance. Expanding,
//   y.b = s P + S,   y.y = s^2 Q + 2 s R + C,
//   P = sum u b,  Q = sum u^2,  R = sum u nb,  S = sum nb b,  C = sum nb^2,
// so one pass after the mean (none for RMSNorm: mean = 0) yields the
// variance and every sum; C is the same for all rows. When the bias cancels
// much of s u, the expanded y.y loses digits; such rows take a second pass
// that builds y explicitly (cosine_sums<Full>).

enum class CosineMode { Plain, Weighted, Centered, CenteredWeighted, Full };

struct CosineArgs {
  const void* h;
  int64_t h_stride;
  const void* basis;
  int64_t basis_stride;
  const int64_t* target;
  int64_t d;
  NormKind norm;
  const float* w;   // [D] or null
  const float* nb;  // [D] or null
  float nb_sq;      // sum nb^2 (Full mode)
  float eps;
  float* out;
};

struct CosineSums {
  float dot, yy, bb;
};

// The row's map to y for cosine_y: (x - mean) * w in the modes without a
// norm bias (the positive per-row scale is left out), and the whole affine
// map (x - mean) * scale * w + nb in Full mode's explicit pass.
struct RowMap {
  const float* w;   // [D] or null (Full: never null)
  const float* nb;  // [D], Full only
  float mean;
  float scale;  // Full only
};

template <CosineMode kMode>
FK_INLINE v16f cosine_y(v16f x, const RowMap& r, int64_t j, v16f mean, v16f scale) {
  if constexpr (kMode == CosineMode::Plain) {
    return x;
  } else if constexpr (kMode == CosineMode::Weighted) {
    return x * vload(r.w + j);
  } else if constexpr (kMode == CosineMode::Centered) {
    return x - mean;
  } else if constexpr (kMode == CosineMode::CenteredWeighted) {
    return (x - mean) * vload(r.w + j);
  } else {
    return (x - mean) * (scale * vload(r.w + j)) + vload(r.nb + j);
  }
}

template <CosineMode kMode>
FK_INLINE float cosine_y1(float x, const RowMap& r, int64_t j) {
  if constexpr (kMode == CosineMode::Plain) {
    return x;
  } else if constexpr (kMode == CosineMode::Weighted) {
    return x * r.w[j];
  } else if constexpr (kMode == CosineMode::Centered) {
    return x - r.mean;
  } else if constexpr (kMode == CosineMode::CenteredWeighted) {
    return (x - r.mean) * r.w[j];
  } else {
    return (x - r.mean) * (r.scale * r.w[j]) + r.nb[j];
  }
}

// y.b, y.y and b.b with y = cosine_y<kMode>(x).
template <CosineMode kMode, typename TH, typename TB>
FK_INLINE CosineSums cosine_sums(const TH* x, const TB* b, const RowMap& r, int64_t d) {
  const v16f vm = vsplat(r.mean), vs = vsplat(r.scale);
  v16f dot0 = {}, yy0 = {}, bb0 = {}, dot1 = {}, yy1 = {}, bb1 = {};
  int64_t j = 0;
  for (; j + 32 <= d; j += 32) {
    const v16f y0 = cosine_y<kMode>(vload(x + j), r, j, vm, vs);
    const v16f y1 = cosine_y<kMode>(vload(x + j + 16), r, j + 16, vm, vs);
    const v16f b0 = vload(b + j), b1 = vload(b + j + 16);
    dot0 += y0 * b0;
    yy0 += y0 * y0;
    bb0 += b0 * b0;
    dot1 += y1 * b1;
    yy1 += y1 * y1;
    bb1 += b1 * b1;
  }
  for (; j + 16 <= d; j += 16) {
    const v16f y0 = cosine_y<kMode>(vload(x + j), r, j, vm, vs);
    const v16f b0 = vload(b + j);
    dot0 += y0 * b0;
    yy0 += y0 * y0;
    bb0 += b0 * b0;
  }
  CosineSums out{hsum(dot0 + dot1), hsum(yy0 + yy1), hsum(bb0 + bb1)};
  for (; j < d; ++j) {
    const float y = cosine_y1<kMode>(load_f32(x, j), r, j);
    const float bj = load_f32(b, j);
    out.dot += y * bj;
    out.yy += y * y;
    out.bb += bj * bj;
  }
  return out;
}

// The Full-mode sums (see above) with c = x - mean: sum c^2 and P, Q, R, S, sum b^2.
struct FullSums {
  float cc, p, q, r, s, bb;
};

template <typename TH, typename TB>
FK_INLINE FullSums full_sums(const TH* x, const TB* b, const float* w, const float* nb, int64_t d, float mean) {
  const v16f vm = vsplat(mean);
  v16f cc = {}, p = {}, q = {}, r = {}, s = {}, bb = {};
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const v16f c = vload(x + j) - vm;
    const v16f u = c * vload(w + j);
    const v16f bj = vload(b + j);
    const v16f nbj = vload(nb + j);
    cc += c * c;
    p += u * bj;
    q += u * u;
    r += u * nbj;
    s += nbj * bj;
    bb += bj * bj;
  }
  FullSums out{hsum(cc), hsum(p), hsum(q), hsum(r), hsum(s), hsum(bb)};
  for (; j < d; ++j) {
    const float c = load_f32(x, j) - mean;
    const float u = c * w[j];
    const float bj = load_f32(b, j);
    out.cc += c * c;
    out.p += u * bj;
    out.q += u * u;
    out.r += u * nb[j];
    out.s += nb[j] * bj;
    out.bb += bj * bj;
  }
  return out;
}

// Software prefetch of a row a few iterations ahead: the basis rows are
// gathered in target order, which the hardware prefetchers cannot predict.
#ifndef FK_PREFETCH_ROWS
#define FK_PREFETCH_ROWS 2
#endif
#ifndef FK_PREFETCH_LOCALITY
#define FK_PREFETCH_LOCALITY 1  // into L2: the L1 miss buffers are too few for whole rows
#endif

FK_INLINE void prefetch_row(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, FK_PREFETCH_LOCALITY);
#else
  (void)p;
  (void)bytes;
#endif
}

constexpr int64_t kPrefetchRows = FK_PREFETCH_ROWS;
constexpr float kExpandedMinRatio = 0.25f;

template <CosineMode kMode, typename TH, typename TB>
FK_INLINE void cosine_rows_mode(const CosineArgs& a, int64_t begin, int64_t end) {
  const TH* h = static_cast<const TH*>(a.h);
  const TB* basis = static_cast<const TB*>(a.basis);
  const int64_t d = a.d;
  // h is read in order and the hardware prefetchers keep up with the light
  // modes; with LayerNorm (a mean pass) or a norm bias (the Full sums) a row
  // computes long enough that fetching h ahead as well hides its latency
  // (benchmarks/ab_cpu_cosine.py: up to 16 % faster with LayerNorm + bias;
  // for plain RMSNorm it was mixed).
  constexpr bool kPrefetchH = kMode == CosineMode::Centered || kMode == CosineMode::CenteredWeighted ||
                              kMode == CosineMode::Full;
  for (int64_t i = begin; i < end; ++i) {
    if (kPrefetchRows > 0 && i + kPrefetchRows < end) {
      const int64_t tp = a.target[i + kPrefetchRows];
      if (kPrefetchH) prefetch_row(h + (i + kPrefetchRows) * a.h_stride, d * static_cast<int64_t>(sizeof(TH)));
      if (tp >= 0) prefetch_row(basis + tp * a.basis_stride, d * static_cast<int64_t>(sizeof(TB)));
    }
    const int64_t t = a.target[i];
    if (t < 0) {
      a.out[i] = 0.0f;
      continue;
    }
    const TH* x = h + i * a.h_stride;
    const TB* b = basis + t * a.basis_stride;
    const bool centred = kMode == CosineMode::Centered || kMode == CosineMode::CenteredWeighted ||
                         (kMode == CosineMode::Full && a.norm == NormKind::Layer);
    RowMap r{a.w, a.nb, centred && d ? row_sum(x, d) / static_cast<float>(d) : 0.0f, 1.0f};
    CosineSums cs;
    if constexpr (kMode == CosineMode::Full) {
      const FullSums fs = full_sums(x, b, a.w, a.nb, d, r.mean);
      r.scale = 1.0f / std::sqrt(fs.cc / static_cast<float>(d) + a.eps);
      const float magnitude = r.scale * r.scale * fs.q + a.nb_sq;  // |s u|^2 + |nb|^2 >= y.y
      cs = {r.scale * fs.p + fs.s, magnitude + 2.0f * r.scale * fs.r, fs.bb};
      // The expanded y.y carries the rounding of magnitude: its relative error
      // grows as magnitude / y.y, so rows where the bias cancels a quarter or
      // more of it are summed again with y built (a second pass, from L1).
      if (!(cs.yy > kExpandedMinRatio * magnitude)) cs = cosine_sums<kMode>(x, b, r, d);
    } else {
      cs = cosine_sums<kMode>(x, b, r, d);
    }
    const float denom = std::max(std::sqrt(cs.yy) * std::sqrt(cs.bb), 1e-30f);
    a.out[i] = 1.0f - cs.dot / denom;
  }
}

CosineMode cosine_mode(const CosineArgs& a) {
  if (a.norm == NormKind::None) return CosineMode::Plain;
  if (a.nb) return CosineMode::Full;
  if (a.norm == NormKind::Rms) return a.w ? CosineMode::Weighted : CosineMode::Plain;
  return a.w ? CosineMode::CenteredWeighted : CosineMode::Centered;
}

template <typename TH, typename TB>
FK_INLINE void cosine_rows_impl(const CosineArgs& a, CosineMode mode, int64_t begin, int64_t end) {
  switch (mode) {
    case CosineMode::Plain:
      return cosine_rows_mode<CosineMode::Plain, TH, TB>(a, begin, end);
    case CosineMode::Weighted:
      return cosine_rows_mode<CosineMode::Weighted, TH, TB>(a, begin, end);
    case CosineMode::Centered:
      return cosine_rows_mode<CosineMode::Centered, TH, TB>(a, begin, end);
    case CosineMode::CenteredWeighted:
      return cosine_rows_mode<CosineMode::CenteredWeighted, TH, TB>(a, begin, end);
    case CosineMode::Full:
      return cosine_rows_mode<CosineMode::Full, TH, TB>(a, begin, end);
  }
}

using CosineFn = void (*)(const CosineArgs&, CosineMode, int64_t, int64_t);

#define FK_COSINE_ENTRY(NAME, TH, TB)                                                                \
  FK_MULTIVERSION void NAME(const CosineArgs& a, CosineMode mode, int64_t begin, int64_t end) { \
    cosine_rows_impl<TH, TB>(a, mode, begin, end);                                               \
  }
FK_COSINE_ENTRY(cosine_f32_f32, float, float)
FK_COSINE_ENTRY(cosine_f32_bf16, float, at::BFloat16)
FK_COSINE_ENTRY(cosine_f32_f16, float, at::Half)
FK_COSINE_ENTRY(cosine_bf16_f32, at::BFloat16, float)
FK_COSINE_ENTRY(cosine_bf16_bf16, at::BFloat16, at::BFloat16)
FK_COSINE_ENTRY(cosine_bf16_f16, at::BFloat16, at::Half)
FK_COSINE_ENTRY(cosine_f16_f32, at::Half, float)
FK_COSINE_ENTRY(cosine_f16_bf16, at::Half, at::BFloat16)
FK_COSINE_ENTRY(cosine_f16_f16, at::Half, at::Half)
#undef FK_COSINE_ENTRY


CosineFn cosine_fn(at::ScalarType th, at::ScalarType tb) {
  static const CosineFn table[3][3] = {
      {cosine_f32_f32, cosine_f32_bf16, cosine_f32_f16},
      {cosine_bf16_f32, cosine_bf16_bf16, cosine_bf16_f16},
      {cosine_f16_f32, cosine_f16_bf16, cosine_f16_f16},
  };
  return table[dtype_slot(th)][dtype_slot(tb)];
}

// ---------------------------------------------------------------- logit lens pieces

struct NormalizeArgs {
  const void* h;
  int64_t h_stride;
  const int64_t* rows;  // counted row indices, [Nc]
  int64_t d;
  NormKind norm;
  const float* w;   // [D], ones when absent
  const float* nb;  // [D], zeros when absent
  float eps;
  float* x;  // [Nc, d] fp32 out
};

template <typename TH>
FK_INLINE void normalize_rows_impl(const NormalizeArgs& a, int64_t begin, int64_t end) {
  const TH* h = static_cast<const TH*>(a.h);
  const int64_t d = a.d;
  for (int64_t k = begin; k < end; ++k) {
    const TH* x = h + a.rows[k] * a.h_stride;
    const RowAffine aff = row_affine(x, d, a.norm, a.eps);
    const v16f vm = vsplat(aff.mean), vs = vsplat(aff.scale);
    float* y = a.x + k * d;
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) {
      const v16f v = (vload(x + j) - vm) * vs * vload(a.w + j) + vload(a.nb + j);
      std::memcpy(y + j, &v, sizeof(v));
    }
    for (; j < d; ++j) y[j] = (load_f32(x, j) - aff.mean) * aff.scale * a.w[j] + a.nb[j];
  }
}

using NormalizeFn = void (*)(const NormalizeArgs&, int64_t, int64_t);
FK_MULTIVERSION void normalize_f32(const NormalizeArgs& a, int64_t b, int64_t e) { normalize_rows_impl<float>(a, b, e); }
FK_MULTIVERSION void normalize_bf16(const NormalizeArgs& a, int64_t b, int64_t e) {
  normalize_rows_impl<at::BFloat16>(a, b, e);
}
FK_MULTIVERSION void normalize_f16(const NormalizeArgs& a, int64_t b, int64_t e) {
  normalize_rows_impl<at::Half>(a, b, e);
}

struct TargetArgs {
  const float* x;  // [Nc, d]
  const int64_t* rows;
  const int64_t* target;
  const void* weight;
  int64_t weight_stride;
  const float* bias;  // [V] or null
  int64_t d;
  float* out;  // [Nc]
};

template <typename TW>
FK_INLINE void target_logits_impl(const TargetArgs& a, int64_t begin, int64_t end) {
  const TW* weight = static_cast<const TW*>(a.weight);
  const int64_t d = a.d;
  for (int64_t k = begin; k < end; ++k) {
    const int64_t t = a.target[a.rows[k]];
    a.out[k] = row_dot(a.x + k * d, weight + t * a.weight_stride, d) + (a.bias ? a.bias[t] : 0.0f);
  }
}

using TargetFn = void (*)(const TargetArgs&, int64_t, int64_t);
FK_MULTIVERSION void target_f32(const TargetArgs& a, int64_t b, int64_t e) { target_logits_impl<float>(a, b, e); }
FK_MULTIVERSION void target_bf16(const TargetArgs& a, int64_t b, int64_t e) {
  target_logits_impl<at::BFloat16>(a, b, e);
}
FK_MULTIVERSION void target_f16(const TargetArgs& a, int64_t b, int64_t e) { target_logits_impl<at::Half>(a, b, e); }

// (max, sum exp(l - max)) of l[0, n) (+ bias), reading l once from memory:
// the row is taken in pieces small enough to stay in L1 between the max and
// the exp pass.
FK_INLINE void row_lse(const float* l, const float* bias, int64_t n, float& run_max, float& run_sum) {
  constexpr int64_t kPiece = 1024;
  for (int64_t p0 = 0; p0 < n; p0 += kPiece) {
    const int64_t pn = std::min(kPiece, n - p0);
    const float* lp = l + p0;
    const float* bp = bias ? bias + p0 : nullptr;
    const int64_t pv = pn / 16 * 16;
    v16f m0 = vsplat(kNegInf), m1 = m0;
    int64_t j = 0;
    if (bp) {
      for (; j + 32 <= pv; j += 32) {
        const v16f a = vload(lp + j) + vload(bp + j), b = vload(lp + j + 16) + vload(bp + j + 16);
        m0 = a > m0 ? a : m0;
        m1 = b > m1 ? b : m1;
      }
      for (; j < pv; j += 16) {
        const v16f a = vload(lp + j) + vload(bp + j);
        m0 = a > m0 ? a : m0;
      }
    } else {
      for (; j + 32 <= pv; j += 32) {
        const v16f a = vload(lp + j), b = vload(lp + j + 16);
        m0 = a > m0 ? a : m0;
        m1 = b > m1 ? b : m1;
      }
      for (; j < pv; j += 16) {
        const v16f a = vload(lp + j);
        m0 = a > m0 ? a : m0;
      }
    }
    float m = hmax(m1 > m0 ? m1 : m0);
    for (int64_t k = pv; k < pn; ++k) m = std::max(m, lp[k] + (bp ? bp[k] : 0.0f));
    if (m == kNegInf) continue;
    const v16f vm = vsplat(m);
    v16f s0 = {}, s1 = {};
    j = 0;
    if (bp) {
      for (; j + 32 <= pv; j += 32) {
        s0 += vexp(vload(lp + j) + vload(bp + j) - vm);
        s1 += vexp(vload(lp + j + 16) + vload(bp + j + 16) - vm);
      }
      for (; j < pv; j += 16) s0 += vexp(vload(lp + j) + vload(bp + j) - vm);
    } else {
      for (; j + 32 <= pv; j += 32) {
        s0 += vexp(vload(lp + j) - vm);
        s1 += vexp(vload(lp + j + 16) - vm);
      }
      for (; j < pv; j += 16) s0 += vexp(vload(lp + j) - vm);
    }
    float sum = hsum(s0 + s1);
    for (int64_t k = pv; k < pn; ++k) sum += fk_exp(lp[k] + (bp ? bp[k] : 0.0f) - m);
    const float new_m = std::max(run_max, m);
    run_sum = run_sum * fk_exp(run_max - new_m) + sum * fk_exp(m - new_m);
    run_max = new_m;
  }
}

// Folds logits rows [begin, end) of a [rows, cols] block (leading dim ld)
// into the running (max, sum) of those rows.
FK_MULTIVERSION void lse_update_rows(const float* logits, int64_t ld, int64_t cols, const float* bias, int64_t begin,
                                     int64_t end, float* run_max, float* run_sum) {
  for (int64_t r = begin; r < end; ++r) row_lse(logits + r * ld, bias, cols, run_max[r], run_sum[r]);
}

// ---------------------------------------------------------------- helpers

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "freezekern: the CPU kernel got ", name, " on ", t.device());
}

// ---------------------------------------------------------------- ops

at::Tensor cosine_deviation_cpu(const at::Tensor& h_in, const at::Tensor& basis_in, const at::Tensor& target_row,
                                c10::string_view norm, const std::optional<at::Tensor>& norm_weight,
                                const std::optional<at::Tensor>& norm_bias, double norm_eps) {
  check_cpu(h_in, "h");
  const CosineInputs in = cosine_inputs(h_in, basis_in, target_row, norm, norm_weight, norm_bias, norm_eps);
  const at::Tensor &h = in.h, &basis = in.basis, &target = in.target;
  const NormArgs& na = in.norm;
  const int64_t n = in.n, d = in.d, m = in.m;

  at::Tensor out = at::empty({n}, h.options().dtype(at::kFloat));
  if (n == 0) return out;
  const int64_t* t = target.data_ptr<int64_t>();
  if (m == 0) {
    // As the reference: with an empty basis every counted row compares with
    // a zero vector, cos = 0, deviation 1.
    float* o = out.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) o[i] = t[i] < 0 ? 0.0f : 1.0f;
    return out;
  }
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(t[i] < m, "freezekern: cosine_deviation: target_row[", i, "] = ", t[i],
                " is out of range for a basis of ", m, " rows");
  }
  CosineArgs a;
  a.h = h.data_ptr();
  a.h_stride = h.stride(0);
  a.basis = basis.data_ptr();
  a.basis_stride = basis.stride(0);
  a.target = t;
  a.d = d;
  a.norm = na.kind;
  a.w = opt_ptr<float>(na.weight);
  a.nb = opt_ptr<float>(na.bias);
  a.eps = na.eps;
  a.out = out.data_ptr<float>();
  at::Tensor ones;
  if (a.nb && !a.w) {  // the full affine map reads a weight
    ones = at::ones({d}, out.options());
    a.w = ones.data_ptr<float>();
  }
  a.nb_sq = 0.0f;
  for (int64_t j = 0; a.nb && j < d; ++j) a.nb_sq += a.nb[j] * a.nb[j];
  const CosineFn fn = cosine_fn(h.scalar_type(), basis.scalar_type());
  const CosineMode mode = cosine_mode(a);
  parallel_rows(n, 16, [&](int64_t begin, int64_t end) { fn(a, mode, begin, end); });
  return out;
}

at::Tensor logit_lens_deviation_cpu(const at::Tensor& h_in, const at::Tensor& weight_in, const at::Tensor& target_in,
                                    const std::optional<at::Tensor>& bias_in, c10::string_view norm,
                                    const std::optional<at::Tensor>& norm_weight,
                                    const std::optional<at::Tensor>& norm_bias, double norm_eps,
                                    int64_t ignore_index) {
  check_cpu(h_in, "h");
  const LogitLensInputs in = logit_lens_inputs(h_in, weight_in, target_in, bias_in, norm, norm_weight, norm_bias,
                                               norm_eps);
  const at::Tensor &h = in.h, &weight = in.weight, &target = in.target, &bias = in.bias;
  const NormArgs& na = in.norm;
  const int64_t n = in.n, d = in.d, vocab = in.vocab;

  const auto f32 = h.options().dtype(at::kFloat);
  at::Tensor out = at::zeros({n}, f32);
  if (n == 0) return out;

  const int64_t* t = target.data_ptr<int64_t>();
  std::vector<int64_t> rows;
  rows.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    if (t[i] == ignore_index) continue;
    TORCH_CHECK(vocab == 0 || (t[i] >= 0 && t[i] < vocab), "freezekern: logit_lens_deviation: target[", i,
                "] = ", t[i], " is out of range for a vocabulary of ", vocab, " (ignore_index is ", ignore_index,
                ")");
    rows.push_back(i);
  }
  const int64_t nc = static_cast<int64_t>(rows.size());
  float* o = out.data_ptr<float>();
  if (nc == 0) return out;
  if (vocab == 0) {
    // As the reference: logsumexp over an empty vocabulary is -inf.
    for (int64_t k = 0; k < nc; ++k) o[rows[k]] = kNegInf;
    return out;
  }

  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor w = na.weight.defined() ? na.weight : at::ones({d}, f32);
  const at::Tensor nb = na.bias.defined() ? na.bias : at::zeros({d}, f32);

  // 1. normalised counted rows, fp32 [Nc, D]
  at::Tensor x = at::empty({nc, d}, f32);
  {
    NormalizeArgs a;
    a.h = h.data_ptr();
    a.h_stride = h.stride(0);
    a.rows = rows.data();
    a.d = d;
    a.norm = na.kind;
    a.w = w.data_ptr<float>();
    a.nb = nb.data_ptr<float>();
    a.eps = na.eps;
    a.x = x.data_ptr<float>();
    const NormalizeFn fns[3] = {normalize_f32, normalize_bf16, normalize_f16};
    const NormalizeFn fn = fns[dtype_slot(h.scalar_type())];
    parallel_rows(nc, 16, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  }

  // 2. target logits
  std::vector<float> target_logit(static_cast<size_t>(nc));
  {
    TargetArgs a;
    a.x = x.data_ptr<float>();
    a.rows = rows.data();
    a.target = t;
    a.weight = weight.data_ptr();
    a.weight_stride = weight.stride(0);
    a.bias = opt_ptr<float>(bias);
    a.d = d;
    a.out = target_logit.data();
    const TargetFn fns[3] = {target_f32, target_bf16, target_f16};
    const TargetFn fn = fns[dtype_slot(weight.scalar_type())];
    parallel_rows(nc, 16, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  }

  // 3. chunked GEMM + online logsumexp
  const int64_t vchunk = std::min(vocab, env_int("FREEZEKERN_CPU_VOCAB_CHUNK", 4096));
  const int64_t row_block =
      std::min(nc, env_int("FREEZEKERN_CPU_ROW_BLOCK", std::max<int64_t>(256, (int64_t{1} << 21) / vchunk)));
  std::vector<float> run_max(static_cast<size_t>(nc), kNegInf), run_sum(static_cast<size_t>(nc), 0.0f);
  at::Tensor logits_buf = at::empty({row_block * vchunk}, f32);
  const bool convert_weight = weight.scalar_type() != at::kFloat;
  at::Tensor weight_buf = convert_weight ? at::empty({vchunk, d}, f32) : at::Tensor();
  const float* bias_ptr = opt_ptr<float>(bias);

  for (int64_t v0 = 0; v0 < vocab; v0 += vchunk) {
    const int64_t vc = std::min(vchunk, vocab - v0);
    at::Tensor wc = weight.narrow(0, v0, vc);
    if (convert_weight) {
      at::Tensor wf = weight_buf.narrow(0, 0, vc);
      wf.copy_(wc);
      wc = wf;
    }
    const at::Tensor wct = wc.t();
    const float* chunk_bias = bias_ptr ? bias_ptr + v0 : nullptr;
    for (int64_t r0 = 0; r0 < nc; r0 += row_block) {
      const int64_t rb = std::min(row_block, nc - r0);
      at::Tensor logits = logits_buf.narrow(0, 0, rb * vc).view({rb, vc});
      at::mm_out(logits, x.narrow(0, r0, rb), wct);
      const float* lp = logits.data_ptr<float>();
      float* mp = run_max.data() + r0;
      float* sp = run_sum.data() + r0;
      parallel_rows(rb, 4, [&](int64_t begin, int64_t end) {
        lse_update_rows(lp, vc, vc, chunk_bias, begin, end, mp, sp);
      });
    }
  }

  for (int64_t k = 0; k < nc; ++k) {
    o[rows[k]] = run_max[k] + std::log(run_sum[k]) - target_logit[k];
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(freezekern, CPU, m) {
  m.impl("cosine_deviation", &cosine_deviation_cpu);
  m.impl("logit_lens_deviation", &logit_lens_deviation_cpu);
}

}  // namespace freezekern
