"""Benchmarks of the deviation ops on the native (C++/OpenMP, CUDA) kernels.

    pytest benchmarks/bench_native_ops.py --benchmark-only
    FREEZEKERN_BENCH_BIG=1 pytest benchmarks/bench_native_ops.py --benchmark-only   # + N=16384, D=2048

Per op and size, three implementations on the same inputs (h bf16, LM head /
basis as a model would hold them; the cosine also with fp32 h, and with
RMSNorm and with LayerNorm + bias):

  logit lens   naive      materialised [N, V] fp32 logits + F.cross_entropy
               reference  impl="torch" (the linear cross-entropy's chunked PyTorch forward)
               native     impl="native" (torch.ops.freezekern.linear_cross_entropy, loss only)
  cosine       reference  impl="torch" (gathers an [N, D] copy of the basis rows)
               native     torch.ops.freezekern.cosine_deviation

On the CPU the Triton kernels run only under the interpreter, which is far
too slow to time: the native cases check them for correctness instead, after
their timings, on the first rows of the same inputs against the reference
(extra_info "triton_interpreted_max_abs_err" and "triton_interpreted_rows";
left out when the interpreter is not active: triton missing, or
TRITON_INTERPRET unset when triton was first imported).

The same run measures the machine's ceilings: a large tensor copy (bytes read
+ written per second) and torch.matmul GFLOP/s on the shapes the native CPU
kernel multiplies (fp32 [N, D] x [D, chunk]; on CUDA the whole [N, D] x [D, V]
fp32 product). benchmark.extra_info records per call: seconds (min and
median), GFLOP/s (2 N D V per logit-lens call), achieved bytes/s (cosine: h
read + distinct basis rows read + targets + output; ``..._gathered`` counts a
basis row per counted row instead, the traffic when the basis outgrows the
cache), the fraction of the ceiling, the speed-up over the reference, and the peak memory above the
starting point (CPU: the peak-RSS counter VmHWM after malloc_trim, ``PeakMemory``;
CUDA: max_memory_allocated above the allocation before the call). Nothing is
asserted about time.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from freezekern import ops
from freezekern.ops import native, reference, triton_common, triton_deviation
from freezekern.profiler.memory import PeakMemory

BIG = os.environ.get("FREEZEKERN_BENCH_BIG") == "1"
VOCAB = 49152
CPU_ROWS = [512, 4096] + ([16384] if BIG else [])
CUDA_ROWS = [4096, 16384] + ([65536] if BIG else [])
DIMS = [576] + ([2048] if BIG else [])
CPU_CHUNK = int(os.environ.get("FREEZEKERN_CPU_VOCAB_CHUNK", "4096"))
IGNORE = -100


def _devices():
    out = [pytest.param("cpu", id="cpu")]
    out.append(pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")))
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _times(fn, device: str, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _peak_bytes(fn, device: str) -> int:
    """Peak extra memory of ``fn()``: the CUDA allocator's, or the process's peak RSS (``PeakMemory``)."""
    with PeakMemory(device) as memory:
        fn()
    return memory.peak_bytes


# ---------------------------------------------------------------- ceilings (measured in this run)

_CEILINGS: dict[tuple, float] = {}


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a large tensor copy."""
    key = ("copy", device)
    if key not in _CEILINGS:
        n = (256 if device == "cpu" else 1024) * 2**20 // 4
        a = torch.randn(n, device=device)
        b = torch.empty_like(a)
        t = min(_times(lambda: b.copy_(a), device, reps=10))
        _CEILINGS[key] = 2 * a.numel() * 4 / t
    return _CEILINGS[key]


def matmul_gflops(device: str, n: int, d: int) -> float:
    """torch.matmul fp32 GFLOP/s on the native kernel's GEMM shapes."""
    key = ("mm", device, n, d)
    if key not in _CEILINGS:
        if device == "cpu":
            chunk = min(CPU_CHUNK, VOCAB)
            rows = min(n, max(256, (1 << 21) // chunk))
            x = torch.randn(rows, d)
            w = torch.randn(chunk, d)
            out = torch.empty(rows, chunk)
            t = min(_times(lambda: torch.mm(x, w.t(), out=out), device, reps=5))
            flops = 2 * rows * chunk * d
        else:
            x = torch.randn(n, d, device=device)
            w = torch.randn(VOCAB, d, device=device)
            t = min(_times(lambda: x @ w.t(), device, reps=10))
            flops = 2 * n * VOCAB * d
        _CEILINGS[key] = flops / t / 1e9
    return _CEILINGS[key]


# ---------------------------------------------------------------- inputs


def _logit_lens_inputs(n, d, device):
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(n, d, generator=gen) * 2).to(torch.bfloat16).to(device)
    weight = (torch.randn(VOCAB, d, generator=gen) / d**0.5).to(torch.bfloat16).to(device)
    target = torch.randint(0, VOCAB, (n,), generator=gen)
    target[::16] = IGNORE
    norm_weight = (torch.rand(d, generator=gen) + 0.5).to(device)
    return h, weight, target.to(device), norm_weight


def _naive_logit_lens(h, weight, target, norm_weight):
    x = reference.apply_norm(h, "rms", norm_weight, None, 1e-6).to(h.dtype)
    logits = x.float() @ weight.float().t()
    return F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")


# Rows the interpreter runs per case (the kernels work row by row, so a slice of
# the inputs exercises the same code as the whole), and the error allowed
# against the reference: the logit lens multiplies bf16 operands (rounded
# normalised rows), the cosine reads them and computes in fp32.
TRITON_ROWS = {"logit_lens": 8, "cosine": 512}
TRITON_ATOL = {"logit_lens": 5e-2, "cosine": 1e-4}


def _check_triton_interpreted(info: dict, op: str, run_triton, run_reference, rows: int) -> None:
    """Run the Triton kernel (interpreted) on the first rows; record and bound its error. Never timed."""
    if not triton_common.available("cpu"):
        return
    got, ref = run_triton(rows), run_reference(rows)
    err = (got - ref).abs().max().item() if got.numel() else 0.0
    info["triton_interpreted_rows"] = got.numel()
    info["triton_interpreted_max_abs_err"] = err
    assert err <= TRITON_ATOL[op] * (1.0 + ref.abs().max().item()), f"Triton {op} differs by {err:.3g}"


def _needs_native(device: str) -> None:
    if not native.has_op("linear_cross_entropy", device):
        pytest.skip(f"native kernels unavailable on {device}: {native.unavailable_reason(device)}")


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("impl", ["naive", "reference", "native"])
@pytest.mark.parametrize("n", CPU_ROWS + [r for r in CUDA_ROWS if r not in CPU_ROWS])
def test_logit_lens(benchmark, device, impl, n, d):
    if (device == "cpu" and n not in CPU_ROWS) or (device == "cuda" and n not in CUDA_ROWS):
        pytest.skip(f"N={n} is not benchmarked on {device}")
    if impl == "native":
        _needs_native(device)
    h, weight, target, nw = _logit_lens_inputs(n, d, device)
    kw = dict(norm="rms", norm_weight=nw, ignore_index=IGNORE)
    fns = {
        "naive": lambda: _naive_logit_lens(h, weight, target, nw),
        "reference": lambda: ops.logit_lens_deviation(h, weight, target, impl="torch", **kw),
        "native": lambda: ops.logit_lens_deviation(h, weight, target, impl="native", **kw),
    }
    fn = fns[impl]
    reps = 3 if device == "cpu" else 10
    times = _times(fn, device, reps=reps)
    t_min, t_med = min(times), statistics.median(times)
    gflops = 2 * n * d * VOCAB / t_min / 1e9
    info = {
        "device": device, "n": n, "d": d, "vocab": VOCAB, "impl": impl,
        "seconds_min": t_min, "seconds_median": t_med, "gflops": gflops,
        "matmul_gflops_same_shapes": matmul_gflops(device, n, d),
        "fraction_of_matmul": gflops / matmul_gflops(device, n, d),
        "peak_bytes": _peak_bytes(fn, device),
        "threads": torch.get_num_threads(),
    }
    if impl != "reference":
        t_ref = min(_times(fns["reference"], device, reps=max(2, reps // 2)))
        info["speedup_vs_reference"] = t_ref / t_min
    benchmark.extra_info.update(info)
    benchmark.pedantic(fn, setup=lambda: _sync(device), rounds=1 if device == "cpu" else 5, iterations=1)
    if impl == "native" and device == "cpu":
        _check_triton_interpreted(
            benchmark.extra_info, "logit_lens",
            lambda r: ops.logit_lens_deviation(h[:r], weight, target[:r], impl="triton", **kw),
            lambda r: ops.logit_lens_deviation(h[:r], weight, target[:r], impl="torch", **kw),
            TRITON_ROWS["logit_lens"])


def _cosine_inputs(n, d, device, dtype):
    gen = torch.Generator().manual_seed(1)
    h = (torch.randn(n, d, generator=gen) * 2 + 0.5).to(dtype).to(device)
    m = max(1, n // 4)  # the distinct label ids of a batch
    basis = torch.randn(m, d, generator=gen).to(device)
    target_row = torch.randint(0, m, (n,), generator=gen)
    target_row[::16] = -1
    norm_weight = (torch.rand(d, generator=gen) + 0.5).to(device)
    norm_bias = (torch.randn(d, generator=gen) * 0.1).to(device)
    return h, basis, target_row.to(device), norm_weight, norm_bias


# RMSNorm (llama, qwen, gemma, ...) and LayerNorm with a bias (gpt2, gpt_neox, opt).
COSINE_NORMS = {"rms": ("rms", False), "layer_bias": ("layer", True)}


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("norm_name", list(COSINE_NORMS))
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("impl", ["reference", "native"])
@pytest.mark.parametrize("n", [512, 4096, 16384, 65536] + ([262144] if BIG else []))
def test_cosine(benchmark, device, impl, n, d, norm_name, dtype):
    if impl == "native" and not native.has_op("cosine_deviation", device):
        pytest.skip(f"native kernels unavailable on {device}: {native.unavailable_reason(device)}")
    h, basis, target_row, nw, nb = _cosine_inputs(n, d, device, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    norm, with_bias = COSINE_NORMS[norm_name]
    kwargs = dict(norm=norm, norm_weight=nw, norm_bias=nb if with_bias else None)
    fns = {
        "reference": lambda: reference.cosine_deviation_reference(h, basis, target_row, **kwargs),
        "native": lambda: native.cosine_deviation(h, basis, target_row, **kwargs),
    }
    fn = fns[impl]
    times = _times(fn, device, reps=10 if device == "cpu" else 20)
    t_min, t_med = min(times), statistics.median(times)
    moved = h.numel() * h.element_size() + basis.numel() * basis.element_size() + n * (8 + 4)
    # Upper bound: every counted row fetches its basis row again (a basis larger than the cache).
    gathered = moved - basis.numel() * basis.element_size() + int((target_row >= 0).sum()) * d * basis.element_size()
    info = {
        "device": device, "n": n, "d": d, "m": basis.shape[0], "impl": impl, "norm": norm_name, "dtype": dtype,
        "seconds_min": t_min, "seconds_median": t_med, "bytes_per_s": moved / t_min,
        "copy_bytes_per_s": copy_bandwidth(device),
        "fraction_of_copy_bandwidth": moved / t_min / copy_bandwidth(device),
        "fraction_of_copy_bandwidth_gathered": gathered / t_min / copy_bandwidth(device),
        "peak_bytes": _peak_bytes(fn, device),
        "threads": torch.get_num_threads(),
    }
    if impl == "native":
        info["speedup_vs_reference"] = min(_times(fns["reference"], device, reps=3)) / t_min
    benchmark.extra_info.update(info)
    benchmark.pedantic(fn, setup=lambda: _sync(device), rounds=3, iterations=1)
    if impl == "native" and device == "cpu":
        _check_triton_interpreted(
            benchmark.extra_info, "cosine",
            lambda r: triton_deviation.cosine_deviation(h[:r], basis, target_row[:r], **kwargs),
            lambda r: reference.cosine_deviation_reference(h[:r], basis, target_row[:r], **kwargs),
            TRITON_ROWS["cosine"])

