// CPU kernel of the cosine deviation (OpenMP over rows, fp32 accumulation).
//
// cosine_deviation: one pass over memory per row: bf16/fp16 elements are
// widened to fp32 in registers, the norm statistics (when needed, see
// below) and the three sums (y.b, y.y, b.b) run over the row while it is in
// L1. The gathered basis rows (and, with LayerNorm or a norm bias, the h
// rows) are prefetched into L2 two rows ahead. No [N, D] buffer is made.
//
// The logit lens has no kernel of its own: it runs the linear
// cross-entropy's loss-only forward (linear_cross_entropy_cpu.cpp).
//
// Hot loops are compiled three times (x86-64-v4 / v3 / baseline) with GCC's
// target_clones, so one binary uses AVX-512 or AVX2+FMA when the CPU has it.
// The vector types, loads and the OpenMP row splitter are in cpu_vec.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

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

}  // namespace

TORCH_LIBRARY_IMPL(freezekern, CPU, m) {
  m.impl("cosine_deviation", &cosine_deviation_cpu);
}

}  // namespace freezekern
