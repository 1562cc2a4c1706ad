"""GPU benchmarks of the Triton deviation kernels (skipped without CUDA).

    pytest benchmarks/bench_triton_gpu.py --benchmark-only

cosine: the Triton kernel, the PyTorch reference, and a plain device-to-device
copy of h (the bandwidth ceiling). extra_info["fraction_of_copy_bandwidth"] is
the kernel's achieved bytes/s (h read + gathered basis rows read) over the
copy's bytes/s (h read + written), per eager call; for the Triton kernel,
"fraction_of_copy_bandwidth_graph" compares both replayed from CUDA graphs
(GPU time only: single eager calls at these sizes are bound by launch cost).

logit lens: the Triton backend (the linear cross-entropy's forward kernel on
the normed rows), the PyTorch reference (chunked fp32), and one
bf16 torch.matmul [N, D] x [D, V] (which does form [N, V]: the throughput
ceiling). extra_info["fraction_of_matmul"] is t_matmul / t_kernel, and
extra_info["tflops"] counts 2*N*D*V per call.

The derived numbers use CUDA-event medians measured in the same test, so they
do not depend on pytest-benchmark's wall-clock timer. No timing is asserted.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

triton = pytest.importorskip("triton")

from freezekern import ops  # noqa: E402
from freezekern.ops import reference, triton_deviation  # noqa: E402

N_ROWS = [4096, 16384]
DIMS = [576, 2048]
VOCAB = 49152
IMPLS = ["triton", "torch", "baseline"]


def _cuda_median_ms(fn, warmup: int = 3, reps: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def _synced(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _cosine_inputs(n, d):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, d, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.rand(d, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5
    basis = torch.randn(8192, d, device="cuda", generator=g, dtype=torch.bfloat16)
    target_row = torch.randint(-1, 8192, (n,), device="cuda", generator=g)
    return h, w, basis, target_row


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("n", N_ROWS)
def test_bench_cosine(benchmark, n, d, impl):
    h, w, basis, target_row = _cosine_inputs(n, d)
    kernel = lambda: triton_deviation.cosine_deviation(h, basis, target_row, norm="rms", norm_weight=w)  # noqa: E731
    ref = lambda: reference.cosine_deviation_reference(h, basis, target_row, norm="rms", norm_weight=w)  # noqa: E731
    dst = torch.empty_like(h)
    copy = lambda: dst.copy_(h)  # noqa: E731
    fn = {"triton": kernel, "torch": ref, "baseline": copy}[impl]
    benchmark.group = f"cosine N={n} D={d} bf16"
    benchmark.pedantic(_synced(fn), rounds=20, warmup_rounds=3, iterations=1)

    t_fn, t_copy = _cuda_median_ms(fn), _cuda_median_ms(copy)
    copy_bytes = 2 * h.numel() * h.element_size()
    fn_bytes = copy_bytes if impl == "baseline" else h.numel() * (h.element_size() + basis.element_size())
    bw, copy_bw = fn_bytes / t_fn / 1e6, copy_bytes / t_copy / 1e6  # bytes per ms -> GB/s
    benchmark.extra_info.update(
        {
            "median_ms_cuda": t_fn,
            "copy_median_ms_cuda": t_copy,
            "achieved_gb_per_s": bw,
            "copy_gb_per_s": copy_bw,
            "fraction_of_copy_bandwidth": bw / copy_bw,
            "device": torch.cuda.get_device_name(),
        }
    )
    if impl == "triton":
        # Replayed from a CUDA graph: GPU time alone, without the per-call
        # Python/launch cost that dominates single calls at these sizes.
        g_fn, g_copy = triton.testing.do_bench_cudagraph(fn), triton.testing.do_bench_cudagraph(copy)
        benchmark.extra_info.update(
            {
                "graph_median_ms": g_fn,
                "copy_graph_median_ms": g_copy,
                "fraction_of_copy_bandwidth_graph": (fn_bytes / g_fn) / (copy_bytes / g_copy),
            }
        )


def _lens_inputs(n, d, v):
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(n, d, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.rand(d, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5
    weight = (torch.randn(v, d, device="cuda", generator=g) / d**0.5).to(torch.bfloat16)
    target = torch.randint(0, v, (n,), device="cuda", generator=g)
    return h, w, weight, target


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("n", N_ROWS)
def test_bench_logit_lens(benchmark, n, d, impl):
    h, w, weight, target = _lens_inputs(n, d, VOCAB)
    kernel = lambda: ops.logit_lens_deviation(h, weight, target, norm="rms", norm_weight=w, impl="triton")  # noqa: E731
    ref = lambda: ops.logit_lens_deviation(h, weight, target, norm="rms", norm_weight=w, impl="torch")  # noqa: E731
    matmul = lambda: torch.matmul(h, weight.t())  # noqa: E731
    fn = {"triton": kernel, "torch": ref, "baseline": matmul}[impl]
    benchmark.group = f"logit lens N={n} D={d} V={VOCAB} bf16"
    rounds = 3 if impl == "torch" else 10
    benchmark.pedantic(_synced(fn), rounds=rounds, warmup_rounds=2, iterations=1)

    reps = 3 if impl == "torch" else 10
    t_fn, t_mm = _cuda_median_ms(fn, warmup=1, reps=reps), _cuda_median_ms(matmul, warmup=1, reps=10)
    flops = 2.0 * n * d * VOCAB
    benchmark.extra_info.update(
        {
            "median_ms_cuda": t_fn,
            "matmul_median_ms_cuda": t_mm,
            "tflops": flops / t_fn / 1e9,
            "matmul_tflops": flops / t_mm / 1e9,
            "fraction_of_matmul": t_mm / t_fn,
            "device": torch.cuda.get_device_name(),
        }
    )
