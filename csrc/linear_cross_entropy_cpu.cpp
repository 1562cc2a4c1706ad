// CPU kernels of the fused linear cross-entropy (OpenMP + BLAS, fp32 accumulation).
//
// Definition in freezekern/ops/linear_cross_entropy.py: z = softcap(h W^T + b),
// l = logsumexp(z) - z[target]; ignored rows count nothing. The counted rows
// (target != ignore_index) are gathered once into an fp32 [Nc, D] matrix x;
// every matrix product is one BLAS GEMM (at::mm_out / addmm_) on fp32
// operands (a weight that is not fp32 is widened one vocabulary chunk at a
// time), and the per-logit work between the products is one or two fused
// vector passes over a block of logits that is still in cache.
//
// linear_cross_entropy (forward), two ways:
//   loss only (no gradient asked): the vocabulary is walked in chunks; each
//     [row_block, chunk] block of logits is folded into a running (max, sum)
//     per row, 1024 logits at a time (pass 1 adds the bias, soft-caps, stores
//     z and takes the max; pass 2 sums exp(z - max)); the target logit is read
//     from the block that holds it, so V = 1 gives exactly 0.
//   eager (gradients asked; see the Python docstring for when): per block of
//     rows the logits of the whole vocabulary are formed ([rows, V] fp32, at
//     most FREEZEKERN_CPU_LCE_BUFFER floats, default 2^24 = 64 MiB: it is alive at
//     the step's peak, when the forward has just ended), held chunk-major (each
//     vocabulary chunk a contiguous [rows, chunk] matrix: BLAS runs fastest on
//     those, and the chunks are multiplied side by side, one per thread); pass 1
//     as above on each chunk while it is in cache; then per row pass 2 stores
//     q = exp(z - max) dz/dy in place and sums exp(z - max) = s;
//     q[target] -= s dz/dy[target]. The gradient of the row's
//     loss with respect to its logits is then q / s, so
//       dh_rows = diag(1/s) (Q W),  dW += Q^T diag(1/s) x_rows,  db += Q^T (1/s):
//     the 1/s scale rides on the small [rows, D] operands, no third pass.
// linear_cross_entropy_backward (recompute): per vocabulary chunk and row
//   block the logits are recomputed and turned into g (softmax - onehot) dz/dy
//   in one pass (the target entry corrected after it), then
//   dh += G W_c, dW_c (+)= G^T x, db_c += G^T 1, each only when asked.
//
// [N, V] is never allocated. Tuning (read at each call): FREEZEKERN_CPU_VOCAB_CHUNK,
// FREEZEKERN_CPU_ROW_BLOCK, FREEZEKERN_CPU_LCE_BUFFER.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <exception>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_vec.h"
#include "linear_cross_entropy.h"

namespace freezekern {
namespace {

using namespace cpu;

// z = c tanh(y / c) when on; slope = dz/dy = 1 - tanh^2.
struct Cap {
  bool on;
  float c;
  float inv;
};

FK_INLINE float cap1(float y, const Cap& cap) { return cap.on ? std::tanh(y * cap.inv) * cap.c : y; }

FK_INLINE float slope_of_z(float z, const Cap& cap) {
  if (!cap.on) return 1.0f;
  const float t = z * cap.inv;
  return (1.0f - t) * (1.0f + t);
}

// ---------------------------------------------------------------- passes over one row of logits

// max_j l[j], read only: two accumulators hide the compare latency.
FK_INLINE float row_max(const float* l, int64_t n) {
  v16f m0 = vsplat(kNegInf), m1 = m0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const v16f a = vload(l + j), b = vload(l + j + 16);
    m0 = a > m0 ? a : m0;
    m1 = b > m1 ? b : m1;
  }
  for (; j + 16 <= n; j += 16) {
    const v16f a = vload(l + j);
    m0 = a > m0 ? a : m0;
  }
  float m = hmax(m1 > m0 ? m1 : m0);
  for (; j < n; ++j) m = l[j] > m ? l[j] : m;
  return m;
}

// z = cap(l + b) in place over [0, n); returns max z. Without bias and cap z = l: nothing is stored
// (the loss-only forward, e.g. the logit lens of a head without bias, reads its logits twice, writes none).
FK_INLINE float transform_max(float* l, const float* b, int64_t n, const Cap& cap) {
  if (!b && !cap.on) return row_max(l, n);
  const v16f vc = vsplat(cap.c), vi = vsplat(cap.inv);
  v16f m0 = vsplat(kNegInf);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    v16f z = vload(l + j);
    if (b) z += vload(b + j);
    if (cap.on) z = vtanh(z * vi) * vc;
    vstore(l + j, z);
    m0 = z > m0 ? z : m0;
  }
  float m = hmax(m0);
  for (; j < n; ++j) {
    const float z = cap1(l[j] + (b ? b[j] : 0.0f), cap);
    l[j] = z;
    m = z > m ? z : m;
  }
  return m;
}

// sum_j exp(z_j - m)
FK_INLINE float sum_exp(const float* z, int64_t n, float m) {
  const v16f vm = vsplat(m);
  v16f s0 = {}, s1 = {};
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    s0 += vexp(vload(z + j) - vm);
    s1 += vexp(vload(z + j + 16) - vm);
  }
  for (; j + 16 <= n; j += 16) s0 += vexp(vload(z + j) - vm);
  float s = hsum(s0 + s1);
  for (; j < n; ++j) s += fk_exp(z[j] - m);
  return s;
}

// q_j = exp(z_j - m) * slope_j in place; returns sum_j exp(z_j - m).
FK_INLINE float exp_slope_sum(float* z, int64_t n, float m, const Cap& cap) {
  const v16f vm = vsplat(m), vi = vsplat(cap.inv), one = vsplat(1.0f);
  v16f s0 = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const v16f zj = vload(z + j);
    v16f e = vexp(zj - vm);
    s0 += e;
    if (cap.on) {
      const v16f t = zj * vi;
      e *= (one - t) * (one + t);
    }
    vstore(z + j, e);
  }
  float s = hsum(s0);
  for (; j < n; ++j) {
    const float e = fk_exp(z[j] - m);
    s += e;
    z[j] = e * slope_of_z(z[j], cap);
  }
  return s;
}

// G_j = g exp(cap(l_j + b_j) - lse) slope_j in place.
FK_INLINE void grad_from_raw(float* l, const float* b, int64_t n, float lse, float g, const Cap& cap) {
  const v16f vl = vsplat(lse), vg = vsplat(g), vc = vsplat(cap.c), vi = vsplat(cap.inv), one = vsplat(1.0f);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    v16f z = vload(l + j);
    if (b) z += vload(b + j);
    v16f slope = one;
    if (cap.on) {
      const v16f t = vtanh(z * vi);
      z = t * vc;
      slope = (one - t) * (one + t);
    }
    vstore(l + j, vexp(z - vl) * slope * vg);
  }
  for (; j < n; ++j) {
    const float z = cap1(l[j] + (b ? b[j] : 0.0f), cap);
    l[j] = g * fk_exp(z - lse) * slope_of_z(z, cap);
  }
}

// ---------------------------------------------------------------- row-range kernels

// Folds rows [begin, end) of a [rows, cols] block of raw logits (leading dim
// ld; vocabulary offset v0) into their running (max, sum) and target logit.
struct FoldArgs {
  float* logits;
  int64_t ld;
  int64_t cols;
  int64_t v0;
  const float* bias;  // the chunk's, or null
  Cap cap;
  const int64_t* target;  // per row of the block
  float* run_max;
  float* run_sum;
  float* target_logit;
};

FK_MULTIVERSION void fold_rows(const FoldArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t kPiece = 1024;  // stays in L1 between the two passes
  for (int64_t r = begin; r < end; ++r) {
    float* l = a.logits + r * a.ld;
    float rm = a.run_max[r], rs = a.run_sum[r];
    for (int64_t p0 = 0; p0 < a.cols; p0 += kPiece) {
      const int64_t pn = std::min(kPiece, a.cols - p0);
      const float m = transform_max(l + p0, a.bias ? a.bias + p0 : nullptr, pn, a.cap);
      if (!(m > kNegInf)) continue;  // -inf everywhere (or NaN): nothing to add
      const float s = sum_exp(l + p0, pn, m);
      const float nm = std::max(rm, m);
      rs = rs * fk_exp(rm - nm) + s * fk_exp(m - nm);
      rm = nm;
    }
    a.run_max[r] = rm;
    a.run_sum[r] = rs;
    const int64_t col = a.target[r] - a.v0;
    if (col >= 0 && col < a.cols) a.target_logit[r] = l[col];
  }
}

// Eager rows. The block's logits are held chunk-major: chunk k (vocabulary [k vc, k vc + vc_k)) is a
// contiguous [rows, vc_k] matrix at logits + k rows vc, so every product runs on contiguous operands.
struct EagerArgs {
  float* logits;
  int64_t rows;  // rows in the block
  int64_t vocab;
  int64_t vc;  // chunk width (the last chunk may be narrower)
  const float* bias;
  Cap cap;
  const int64_t* target;
  float* chunk_max;  // [chunks, rows]: each chunk's max per row
  float* lse;
  float* loss;
  float* inv_sum;
};

FK_INLINE int64_t chunk_width(const EagerArgs& a, int64_t k) { return std::min(a.vc, a.vocab - k * a.vc); }

FK_INLINE float* chunk_row(const EagerArgs& a, int64_t k, int64_t r) {
  return a.logits + k * a.rows * a.vc + r * chunk_width(a, k);
}

// Chunk k just formed (still in cache): z = cap(l + b) in place, and its max per row.
FK_MULTIVERSION void eager_chunk_max(const EagerArgs& a, int64_t k) {
  const float* bias = a.bias ? a.bias + k * a.vc : nullptr;
  for (int64_t r = 0; r < a.rows; ++r)
    a.chunk_max[k * a.rows + r] = transform_max(chunk_row(a, k, r), bias, chunk_width(a, k), a.cap);
}

// Every chunk formed and transformed: z -> q = exp(z - max) dz/dy in place; lse, loss and 1/s per row.
FK_MULTIVERSION void eager_rows(const EagerArgs& a, int64_t begin, int64_t end) {
  const int64_t chunks = (a.vocab + a.vc - 1) / a.vc;
  for (int64_t r = begin; r < end; ++r) {
    float m = a.chunk_max[r];
    for (int64_t k = 1; k < chunks; ++k) m = std::max(m, a.chunk_max[k * a.rows + r]);
    const int64_t t = a.target[r];
    float* zt_at = chunk_row(a, t / a.vc, r) + t % a.vc;
    const float zt = *zt_at;
    float s = 0.0f;
    for (int64_t k = 0; k < chunks; ++k) s += exp_slope_sum(chunk_row(a, k, r), chunk_width(a, k), m, a.cap);
    const float lse = m + std::log(s);
    *zt_at -= s * slope_of_z(zt, a.cap);
    a.lse[r] = lse;
    a.loss[r] = lse - zt;
    a.inv_sum[r] = 1.0f / s;
  }
}

// Recompute rows: [rows, cols] raw logits of a chunk -> g (softmax - onehot) slope.
struct GradArgs {
  float* logits;
  int64_t ld;
  int64_t cols;
  int64_t v0;
  const float* bias;
  Cap cap;
  const int64_t* target;
  const float* lse;
  const float* g;
};

FK_MULTIVERSION void softmax_grad_rows(const GradArgs& a, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    float* l = a.logits + r * a.ld;
    const int64_t col = a.target[r] - a.v0;
    const bool inside = col >= 0 && col < a.cols;
    const float zt = inside ? cap1(l[col] + (a.bias ? a.bias[col] : 0.0f), a.cap) : 0.0f;
    grad_from_raw(l, a.bias, a.cols, a.lse[r], a.g[r], a.cap);
    if (inside) l[col] -= a.g[r] * slope_of_z(zt, a.cap);
  }
}

// ---------------------------------------------------------------- shared preparation

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "freezekern: the CPU kernel got ", name, " on ", t.device());
}

// The counted rows: their indices in h, their targets, and x = h[rows] as fp32 [Nc, D] (h itself when
// that is all of it already).
struct Counted {
  at::Tensor rows;  // int64 [Nc]
  std::vector<int64_t> target;
  at::Tensor x;
  int64_t n = 0;
};

Counted counted_rows(const LceInputs& in) {
  const int64_t* t = in.target.data_ptr<int64_t>();
  std::vector<int64_t> rows;
  Counted c;
  rows.reserve(static_cast<size_t>(in.n));
  c.target.reserve(static_cast<size_t>(in.n));
  for (int64_t i = 0; i < in.n; ++i) {
    if (t[i] == in.ignore_index) continue;
    TORCH_CHECK(t[i] >= 0 && t[i] < in.vocab, "freezekern: linear_cross_entropy: target[", i, "] = ", t[i],
                " is out of range for a vocabulary of ", in.vocab, " (ignore_index is ", in.ignore_index, ")");
    rows.push_back(i);
    c.target.push_back(t[i]);
  }
  c.n = static_cast<int64_t>(rows.size());
  c.rows = c.n > 0 ? at::from_blob(rows.data(), {c.n}, at::TensorOptions().dtype(at::kLong)).clone()
                   : at::empty({0}, at::TensorOptions().dtype(at::kLong));
  // Every row counted and already fp32 and contiguous: x is h itself (read only), no [N, D] copy.
  const bool as_is = c.n == in.n && in.h.scalar_type() == at::kFloat && in.h.is_contiguous();
  c.x = as_is ? in.h : in.h.index_select(0, c.rows).to(at::kFloat).contiguous();
  return c;
}

Cap make_cap(const LceInputs& in) { return Cap{in.has_softcap, in.softcap, in.has_softcap ? 1.0f / in.softcap : 0.0f}; }

// fp32 rows [v0, v0 + vc) of the weight: a view when it is fp32, else widened into buf.
at::Tensor weight_chunk(const at::Tensor& weight, int64_t v0, int64_t vc, at::Tensor& buf) {
  at::Tensor wc = weight.narrow(0, v0, vc);
  if (weight.scalar_type() == at::kFloat) return wc;
  at::Tensor out = buf.narrow(0, 0, vc);
  out.copy_(wc);
  return out;
}

// The eager path's logits block, in floats (FREEZEKERN_CPU_LCE_BUFFER).
constexpr int64_t kEagerBuffer = int64_t{1} << 24;

int64_t vocab_chunk(int64_t vocab) { return std::min(vocab, env_int("FREEZEKERN_CPU_VOCAB_CHUNK", 4096)); }

int64_t row_block(int64_t nc, int64_t vchunk) {
  return std::max<int64_t>(1, std::min(nc, env_int("FREEZEKERN_CPU_ROW_BLOCK",
                                                   std::max<int64_t>(256, (int64_t{1} << 21) / vchunk))));
}

at::Tensor none_f32() { return at::empty({0}, at::TensorOptions().dtype(at::kFloat)); }

// [n, ...] zeros with the counted rows' values scattered in.
at::Tensor scatter_rows(const at::Tensor& values, const Counted& c, int64_t n) {
  std::vector<int64_t> shape(values.sizes().begin(), values.sizes().end());
  shape[0] = n;
  at::Tensor out = at::zeros(shape, values.options());
  if (c.n > 0) out.index_copy_(0, c.rows, values);
  return out;
}

// ---------------------------------------------------------------- forward

using ForwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void forward_loss_only(const LceInputs& in, const Counted& c, float* lse, float* loss) {
  const int64_t nc = c.n, vocab = in.vocab, d = in.d;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t vchunk = vocab_chunk(vocab);
  const int64_t rb = row_block(nc, vchunk);
  std::vector<float> run_max(static_cast<size_t>(nc), kNegInf), run_sum(static_cast<size_t>(nc), 0.0f),
      target_logit(static_cast<size_t>(nc), 0.0f);
  at::Tensor logits_buf = at::empty({rb * vchunk}, f32);
  at::Tensor weight_buf = in.weight.scalar_type() == at::kFloat ? at::Tensor() : at::empty({vchunk, d}, f32);
  const float* bias = opt_ptr<float>(in.bias);
  const Cap cap = make_cap(in);
  for (int64_t v0 = 0; v0 < vocab; v0 += vchunk) {
    const int64_t vc = std::min(vchunk, vocab - v0);
    const at::Tensor wct = weight_chunk(in.weight, v0, vc, weight_buf).t();
    for (int64_t r0 = 0; r0 < nc; r0 += rb) {
      const int64_t rows = std::min(rb, nc - r0);
      at::Tensor block = logits_buf.narrow(0, 0, rows * vc).view({rows, vc});
      at::mm_out(block, c.x.narrow(0, r0, rows), wct);
      FoldArgs a{block.data_ptr<float>(), vc, vc, v0, bias ? bias + v0 : nullptr, cap, c.target.data() + r0,
                 run_max.data() + r0, run_sum.data() + r0, target_logit.data() + r0};
      parallel_rows(rows, 4, [&](int64_t b, int64_t e) { fold_rows(a, b, e); });
    }
  }
  for (int64_t k = 0; k < nc; ++k) {
    lse[k] = run_max[k] + std::log(run_sum[k]);
    loss[k] = lse[k] - target_logit[k];
  }
}

struct EagerOut {
  at::Tensor gx, gw, gb;  // [Nc, D], [V, D], [V] fp32, undefined when not asked
};

// Runs f(k, slot) for every k in [0, n): one contiguous range of k per thread, slot = that thread's index
// (< threads). Each call's BLAS product runs on its own thread (OpenMP does not nest), so the vocabulary
// chunks of a block are multiplied side by side. The first exception is rethrown after the region.
template <typename F>
void parallel_chunks(int64_t n, int64_t threads, const F& f) {
  std::exception_ptr error;
  const auto run = [&](int64_t begin, int64_t end, int64_t slot) {
    try {
      at::AutoDispatchBelowADInplaceOrView guard;  // thread-local: set on every worker
      for (int64_t k = begin; k < end; ++k) f(k, slot);
    } catch (...) {
#ifdef _OPENMP
#pragma omp critical(freezekern_lce_error)
#endif
      if (!error) error = std::current_exception();
    }
  };
  if (!omp_ranges(n, threads, run)) run(0, n, 0);
  if (error) std::rethrow_exception(error);
}

EagerOut forward_eager(const LceInputs& in, const Counted& c, float* lse, float* loss, bool need_h, bool need_w,
                       bool need_b) {
  const int64_t nc = c.n, vocab = in.vocab, d = in.d;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  EagerOut out;
  if (need_h) out.gx = at::empty({nc, d}, f32);
  if (need_w) out.gw = nc > 0 ? at::empty({vocab, d}, f32) : at::zeros({vocab, d}, f32);  // the first block writes it
  if (need_b) out.gb = at::zeros({vocab}, f32);
  if (nc == 0) return out;
  const int64_t vchunk = vocab_chunk(vocab);
  const int64_t chunks = (vocab + vchunk - 1) / vchunk;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks));
  const int64_t budget = env_int("FREEZEKERN_CPU_LCE_BUFFER", kEagerBuffer);
  const int64_t rb = std::max<int64_t>(1, std::min(nc, std::max<int64_t>(16, budget / vocab)));
  at::Tensor logits_buf = at::empty({rb * vocab}, f32);
  std::vector<at::Tensor> weight_bufs(static_cast<size_t>(threads));  // per thread: a 16-bit weight's chunk widened
  if (in.weight.scalar_type() != at::kFloat)
    for (auto& b : weight_bufs) b = at::empty({vchunk, d}, f32);
  // per thread after the first: its share of dh (the first thread's goes straight into dh)
  at::Tensor partial_gx = need_h && threads > 1 ? at::empty({threads - 1, rb, d}, f32) : at::Tensor();
  std::vector<char> partial_used(static_cast<size_t>(threads));
  at::Tensor inv_sum = at::empty({rb}, f32);
  std::vector<float> chunk_max(static_cast<size_t>(chunks * rb));
  const Cap cap = make_cap(in);
  for (int64_t r0 = 0; r0 < nc; r0 += rb) {
    const int64_t rows = std::min(rb, nc - r0);
    at::Tensor inv = inv_sum.narrow(0, 0, rows);
    EagerArgs a{logits_buf.data_ptr<float>(), rows, vocab, vchunk, opt_ptr<float>(in.bias), cap, c.target.data() + r0,
                chunk_max.data(), lse + r0, loss + r0, inv.data_ptr<float>()};
    const auto chunk = [&](int64_t k) {
      const int64_t width = chunk_width(a, k);
      return logits_buf.narrow(0, k * rows * vchunk, rows * width).view({rows, width});
    };
    const auto weight_of = [&](int64_t k, int64_t slot) {
      return weight_chunk(in.weight, k * vchunk, chunk_width(a, k), weight_bufs[static_cast<size_t>(slot)]);
    };
    const at::Tensor x_rows = c.x.narrow(0, r0, rows);
    parallel_chunks(chunks, threads, [&](int64_t k, int64_t slot) {
      at::Tensor zc = chunk(k);
      at::mm_out(zc, x_rows, weight_of(k, slot).t());
      eager_chunk_max(a, k);
    });
    parallel_rows(rows, 1, [&](int64_t b, int64_t e) { eager_rows(a, b, e); });
    const at::Tensor x_scaled = (need_w || need_b) ? x_rows * inv.unsqueeze(1) : at::Tensor();
    at::Tensor gx_rows = need_h ? out.gx.narrow(0, r0, rows) : at::Tensor();
    std::fill(partial_used.begin(), partial_used.end(), 0);
    parallel_chunks(chunks, threads, [&](int64_t k, int64_t slot) {
      const int64_t v0 = k * vchunk, vc = chunk_width(a, k);
      const at::Tensor q = chunk(k);
      if (need_h) {
        at::Tensor acc = slot == 0 ? gx_rows : partial_gx[slot - 1].narrow(0, 0, rows);
        char& used = partial_used[static_cast<size_t>(slot)];
        if (!used) {
          at::mm_out(acc, q, weight_of(k, slot));
          used = 1;
        } else {
          acc.addmm_(q, weight_of(k, slot));
        }
      }
      if (need_w) {
        at::Tensor gw_rows = out.gw.narrow(0, v0, vc);
        if (r0 == 0) {
          at::mm_out(gw_rows, q.t(), x_scaled);
        } else {
          gw_rows.addmm_(q.t(), x_scaled);
        }
      }
      if (need_b) out.gb.narrow(0, v0, vc).addmv_(q.t(), inv);
    });
    if (need_h) {
      for (int64_t slot = 1; slot < threads; ++slot)
        if (partial_used[static_cast<size_t>(slot)]) gx_rows.add_(partial_gx[slot - 1].narrow(0, 0, rows));
      gx_rows.mul_(inv.unsqueeze(1));
    }
  }
  return out;
}

ForwardOut linear_cross_entropy_cpu(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& target,
                                    const std::optional<at::Tensor>& bias, std::optional<double> softcap,
                                    int64_t ignore_index, bool reduce_sum, bool grad_h, bool grad_weight,
                                    bool grad_bias) {
  check_cpu(h, "h");
  TORCH_CHECK(reduce_sum || !(grad_weight || grad_bias),
              "freezekern: linear_cross_entropy computes weight and bias gradients in the forward only for a "
              "summed loss (reduce_sum=True)");
  const LceInputs in = lce_inputs(h, weight, target, bias, softcap, ignore_index);
  at::AutoDispatchBelowADInplaceOrView guard;
  const Counted c = counted_rows(in);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor lse_c = at::empty({c.n}, f32), loss_c = at::empty({c.n}, f32);
  at::Tensor gh = none_f32(), gw = none_f32(), gb = none_f32();
  if (grad_h || grad_weight || grad_bias) {
    EagerOut e = forward_eager(in, c, lse_c.data_ptr<float>(), loss_c.data_ptr<float>(), grad_h, grad_weight,
                               grad_bias);
    if (grad_h) gh = scatter_rows(e.gx, c, in.n);
    if (grad_weight) gw = e.gw;
    if (grad_bias) gb = e.gb;
  } else if (c.n > 0) {
    forward_loss_only(in, c, lse_c.data_ptr<float>(), loss_c.data_ptr<float>());
  }
  at::Tensor loss;
  if (reduce_sum) {
    double total = 0.0;
    const float* lp = loss_c.data_ptr<float>();
    for (int64_t k = 0; k < c.n; ++k) total += lp[k];
    loss = at::scalar_tensor(total, f32);
  } else {
    loss = scatter_rows(loss_c, c, in.n);
  }
  return {loss, scatter_rows(lse_c, c, in.n), gh, gw, gb};
}

// ---------------------------------------------------------------- recompute backward

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cpu(
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& target, const std::optional<at::Tensor>& bias,
    const at::Tensor& lse_in, const at::Tensor& grad_rows_in, std::optional<double> softcap, int64_t ignore_index,
    bool need_h, bool need_weight, bool need_bias) {
  check_cpu(h, "h");
  const LceInputs in = lce_inputs(h, weight, target, bias, softcap, ignore_index);
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor lse = lce_row_vector(lse_in, in.n, "lse", in.h.device());
  const at::Tensor grad_rows = lce_row_vector(grad_rows_in, in.n, "grad_rows", in.h.device());
  const Counted c = counted_rows(in);
  const int64_t nc = c.n, vocab = in.vocab, d = in.d;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor lse_c = lse.index_select(0, c.rows).contiguous();
  const at::Tensor g_c = grad_rows.index_select(0, c.rows).contiguous();
  at::Tensor dx = need_h ? at::zeros({nc, d}, f32) : at::Tensor();
  at::Tensor dw = need_weight ? (nc > 0 ? at::empty({vocab, d}, f32) : at::zeros({vocab, d}, f32)) : none_f32();
  at::Tensor db = need_bias ? at::zeros({vocab}, f32) : none_f32();
  if (nc > 0 && (need_h || need_weight || need_bias)) {
    const int64_t vchunk = vocab_chunk(vocab);
    const int64_t rb = row_block(nc, vchunk);
    at::Tensor logits_buf = at::empty({rb * vchunk}, f32);
    at::Tensor weight_buf = in.weight.scalar_type() == at::kFloat ? at::Tensor() : at::empty({vchunk, d}, f32);
    at::Tensor ones = need_bias ? at::ones({rb}, f32) : at::Tensor();
    const float* bias_ptr = opt_ptr<float>(in.bias);
    const Cap cap = make_cap(in);
    for (int64_t v0 = 0; v0 < vocab; v0 += vchunk) {
      const int64_t vc = std::min(vchunk, vocab - v0);
      const at::Tensor wc = weight_chunk(in.weight, v0, vc, weight_buf);
      const at::Tensor wct = wc.t();
      for (int64_t r0 = 0; r0 < nc; r0 += rb) {
        const int64_t rows = std::min(rb, nc - r0);
        at::Tensor block = logits_buf.narrow(0, 0, rows * vc).view({rows, vc});
        const at::Tensor x_rows = c.x.narrow(0, r0, rows);
        at::mm_out(block, x_rows, wct);
        GradArgs a{block.data_ptr<float>(), vc, vc, v0, bias_ptr ? bias_ptr + v0 : nullptr, cap,
                   c.target.data() + r0, lse_c.data_ptr<float>() + r0, g_c.data_ptr<float>() + r0};
        parallel_rows(rows, 4, [&](int64_t b, int64_t e) { softmax_grad_rows(a, b, e); });
        if (need_h) dx.narrow(0, r0, rows).addmm_(block, wc);
        if (need_weight) {
          at::Tensor dwc = dw.narrow(0, v0, vc);
          if (r0 == 0) {
            at::mm_out(dwc, block.t(), x_rows);
          } else {
            dwc.addmm_(block.t(), x_rows);
          }
        }
        if (need_bias) db.narrow(0, v0, vc).addmv_(block.t(), ones.narrow(0, 0, rows));
      }
    }
  }
  at::Tensor dh = need_h ? scatter_rows(dx, c, in.n) : none_f32();
  return {dh, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(freezekern, CPU, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_cpu);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward_cpu);
}

}  // namespace freezekern
