// CUDA registration of the fused linear cross-entropy: the matrix products
// through cuBLAS (at::mm; 16-bit operands produce fp32 logits through
// mm.dtype, as an fp32-accumulating GEMM), the per-logit passes through the
// kernels of linear_cross_entropy_cuda.cu. The algorithm is the CPU kernel's
// (linear_cross_entropy_cpu.cpp) without the gathering of counted rows, which
// would need a host sync: ignored rows are carried and zeroed.
//
// Operands: h and weight in one matmul dtype, h's when both share a 16-bit
// dtype (the gradient of the logits is then rounded to it before its
// products, as Hugging Face's backward does), else fp32 (TF32 when torch's
// matmul precision allows it, as for torch.mm). Compiled only into CUDA
// builds (FREEZEKERN_WITH_CUDA); empty otherwise.
#ifdef FREEZEKERN_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>

#include "linear_cross_entropy.h"
#include "linear_cross_entropy_cuda.h"

namespace freezekern {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "freezekern: linear_cross_entropy ", what, " CUDA kernel failed: ",
              cudaGetErrorString(err));
}

int64_t env_or(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  return (end && *end == '\0' && x > 0) ? static_cast<int64_t>(x) : fallback;
}

struct Operands {
  at::Tensor x;       // h in the matmul dtype, [N, D]
  at::Tensor weight;  // [V, D], the matmul dtype
  at::ScalarType mm;
};

Operands operands(const LceInputs& in) {
  Operands o;
  const at::ScalarType ht = in.h.scalar_type(), wt = in.weight.scalar_type();
  o.mm = (ht == wt && (ht == at::kBFloat16 || ht == at::kHalf)) ? ht : at::kFloat;
  o.x = in.h.scalar_type() == o.mm ? in.h : in.h.to(o.mm);
  o.weight = wt == o.mm ? in.weight : in.weight.to(o.mm);
  return o;
}

// out = a @ b in fp32 (fp32-accumulated 16-bit products when a, b are 16-bit).
void mm_f32(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    at::mm_out(out, a, b);
  } else {
    at::mm_out(out, a, b, at::kFloat);
  }
}

// acc += a @ b in place, acc fp32 (no temporary of acc's size).
void addmm_f32_(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    acc.addmm_(a, b);
  } else {
    at::addmm_out(acc, acc, a, b, at::kFloat);
  }
}

cuda::LceBlock block_of(const LceInputs& in, at::Tensor& logits, int64_t r0, int64_t rows, int64_t v0, int64_t cols,
                        const at::Tensor& target) {
  cuda::LceBlock b;
  b.logits = logits.data_ptr<float>();
  b.ld = logits.stride(0);
  b.rows = rows;
  b.cols = cols;
  b.v0 = v0;
  b.vocab = in.vocab;
  b.bias = opt_ptr<float>(in.bias);
  b.target = target.data_ptr<int64_t>() + r0;
  b.ignore_index = in.ignore_index;
  b.has_softcap = in.has_softcap;
  b.softcap = in.softcap;
  return b;
}

at::Tensor none_like(const at::Tensor& h) { return at::empty({0}, h.options().dtype(at::kFloat)); }

using ForwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardOut linear_cross_entropy_cuda(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& target,
                                     const std::optional<at::Tensor>& bias, std::optional<double> softcap,
                                     int64_t ignore_index, bool reduce_sum, bool grad_h, bool grad_weight,
                                     bool grad_bias) {
  TORCH_CHECK(h.is_cuda(), "freezekern: the CUDA kernel got h on ", h.device());
  TORCH_CHECK(reduce_sum || !(grad_weight || grad_bias),
              "freezekern: linear_cross_entropy computes weight and bias gradients in the forward only for a "
              "summed loss (reduce_sum=True)");
  const c10::cuda::CUDAGuard device_guard(h.device());
  const LceInputs in = lce_inputs(h, weight, target, bias, softcap, ignore_index);
  at::AutoDispatchBelowADInplaceOrView guard;
  const Operands op = operands(in);
  const int64_t n = in.n, d = in.d, vocab = in.vocab;
  const auto f32 = in.h.options().dtype(at::kFloat);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor counted = in.target != in.ignore_index;
  const at::Tensor valid = counted.logical_and(in.target >= 0).logical_and(in.target < vocab);
  at::Tensor lse = at::zeros({n}, f32), loss_rows = at::zeros({n}, f32);
  at::Tensor gh = none_like(in.h), gw = none_like(in.h), gb = none_like(in.h);
  if (n > 0 && (grad_h || grad_weight || grad_bias)) {
    const int64_t budget = env_or("FREEZEKERN_CUDA_LCE_BUFFER", int64_t{1} << 26);
    const int64_t rb = std::max<int64_t>(1, std::min(n, budget / vocab));
    at::Tensor buf = at::empty({rb * vocab}, f32);
    if (grad_h) gh = at::empty({n, d}, f32);
    if (grad_weight) gw = at::zeros({vocab, d}, f32);
    if (grad_bias) gb = at::zeros({vocab}, f32);
    const at::Tensor wt = op.weight.t();
    for (int64_t r0 = 0; r0 < n; r0 += rb) {
      const int64_t rows = std::min(rb, n - r0);
      at::Tensor z = buf.narrow(0, 0, rows * vocab).view({rows, vocab});
      const at::Tensor x_rows = op.x.narrow(0, r0, rows);
      mm_f32(z, x_rows, wt);
      at::Tensor lse_rows = lse.narrow(0, r0, rows), loss_part = loss_rows.narrow(0, r0, rows);
      check_launch(cuda::launch_lce_eager(block_of(in, z, r0, rows, 0, vocab, in.target), lse_rows.data_ptr<float>(),
                                          loss_part.data_ptr<float>(), stream),
                   "eager");
      const at::Tensor g = z.scalar_type() == op.mm ? z : z.to(op.mm);  // the logits' gradient, [rows, V]
      if (grad_h) {
        at::Tensor gh_rows = gh.narrow(0, r0, rows);
        mm_f32(gh_rows, g, op.weight);
      }
      if (grad_weight) addmm_f32_(gw, g.t(), x_rows);
      if (grad_bias) gb.add_(z.sum(0));
    }
  } else if (n > 0) {
    const int64_t vchunk = std::min(vocab, env_or("FREEZEKERN_CUDA_VOCAB_CHUNK", 8192));
    const int64_t rb = std::max<int64_t>(1, std::min(n, env_or("FREEZEKERN_CUDA_LCE_BUFFER", int64_t{1} << 26) / vchunk));
    at::Tensor buf = at::empty({rb * vchunk}, f32);
    at::Tensor run_max = at::full({n}, -std::numeric_limits<float>::infinity(), f32);
    at::Tensor run_sum = at::zeros({n}, f32), target_logit = at::zeros({n}, f32);
    for (int64_t v0 = 0; v0 < vocab; v0 += vchunk) {
      const int64_t vc = std::min(vchunk, vocab - v0);
      const at::Tensor wct = op.weight.narrow(0, v0, vc).t();
      for (int64_t r0 = 0; r0 < n; r0 += rb) {
        const int64_t rows = std::min(rb, n - r0);
        at::Tensor block = buf.narrow(0, 0, rows * vc).view({rows, vc});
        mm_f32(block, op.x.narrow(0, r0, rows), wct);
        check_launch(cuda::launch_lce_fold(block_of(in, block, r0, rows, v0, vc, in.target),
                                           run_max.data_ptr<float>() + r0, run_sum.data_ptr<float>() + r0,
                                           target_logit.data_ptr<float>() + r0, stream),
                     "fold");
      }
    }
    lse = at::where(counted, run_max + run_sum.log(), at::zeros_like(run_max));
    loss_rows = at::where(valid, lse - target_logit, at::full_like(lse, std::numeric_limits<float>::quiet_NaN()));
    loss_rows = at::where(counted, loss_rows, at::zeros_like(loss_rows));
  }
  at::Tensor loss = reduce_sum ? loss_rows.sum() : loss_rows;
  return {loss, lse, gh, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cuda(
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& target, const std::optional<at::Tensor>& bias,
    const at::Tensor& lse_in, const at::Tensor& grad_rows_in, std::optional<double> softcap, int64_t ignore_index,
    bool need_h, bool need_weight, bool need_bias) {
  TORCH_CHECK(h.is_cuda(), "freezekern: the CUDA kernel got h on ", h.device());
  const c10::cuda::CUDAGuard device_guard(h.device());
  const LceInputs in = lce_inputs(h, weight, target, bias, softcap, ignore_index);
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor lse = lce_row_vector(lse_in, in.n, "lse", in.h.device());
  const at::Tensor grad_rows = lce_row_vector(grad_rows_in, in.n, "grad_rows", in.h.device());
  const Operands op = operands(in);
  const int64_t n = in.n, d = in.d, vocab = in.vocab;
  const auto f32 = in.h.options().dtype(at::kFloat);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor dh = need_h ? at::zeros({n, d}, f32) : none_like(in.h);
  at::Tensor dw = need_weight ? at::zeros({vocab, d}, f32) : none_like(in.h);
  at::Tensor db = need_bias ? at::zeros({vocab}, f32) : none_like(in.h);
  if (n == 0 || !(need_h || need_weight || need_bias)) return {dh, dw, db};
  const int64_t vchunk = std::min(vocab, env_or("FREEZEKERN_CUDA_VOCAB_CHUNK", 8192));
  const int64_t rb = std::max<int64_t>(1, std::min(n, env_or("FREEZEKERN_CUDA_LCE_BUFFER", int64_t{1} << 26) / vchunk));
  at::Tensor buf = at::empty({rb * vchunk}, f32);
  for (int64_t v0 = 0; v0 < vocab; v0 += vchunk) {
    const int64_t vc = std::min(vchunk, vocab - v0);
    const at::Tensor wc = op.weight.narrow(0, v0, vc);
    for (int64_t r0 = 0; r0 < n; r0 += rb) {
      const int64_t rows = std::min(rb, n - r0);
      at::Tensor block = buf.narrow(0, 0, rows * vc).view({rows, vc});
      const at::Tensor x_rows = op.x.narrow(0, r0, rows);
      mm_f32(block, x_rows, wc.t());
      check_launch(cuda::launch_lce_grad(block_of(in, block, r0, rows, v0, vc, in.target),
                                         lse.data_ptr<float>() + r0, grad_rows.data_ptr<float>() + r0, stream),
                   "grad");
      const at::Tensor g = block.scalar_type() == op.mm ? block : block.to(op.mm);
      if (need_h) {
        at::Tensor dh_rows = dh.narrow(0, r0, rows);
        addmm_f32_(dh_rows, g, wc);
      }
      if (need_weight) {
        at::Tensor dw_rows = dw.narrow(0, v0, vc);
        addmm_f32_(dw_rows, g.t(), x_rows);
      }
      if (need_bias) db.narrow(0, v0, vc).add_(block.sum(0));
    }
  }
  return {dh, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(freezekern, CUDA, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_cuda);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward_cuda);
}

}  // namespace freezekern

#endif  // FREEZEKERN_WITH_CUDA
