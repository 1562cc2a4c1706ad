"""The native linear cross-entropy against apple's cut-cross-entropy, side by side in one run.

    OMP_NUM_THREADS=2 python -m pytest benchmarks/bench_lce_vs_cce.py --benchmark-only -s
    MALLOC_MMAP_THRESHOLD_=65536 ... (exact CPU peaks; take the times from a run without it)

Forward + backward of the loss (mean over rows) at N = 4096, D = 576,
V = 49,152 (SmolLM2's head), fp32, with the head frozen (dh only) and trained
(dh + dW): ``freezekern.ops.linear_cross_entropy`` (impl "native") against
``cut_cross_entropy.linear_cross_entropy(..., impl="torch_compile")``, the
only implementation of theirs that runs on a CPU (its others are Triton GPU
kernels). Each ratio comes from one run, the two sides stepped alternately
(A B B A ...; ``freezekern.profiler.timing.paired_times``), so load on a
shared machine falls on both; peak memory above the start of each call with
``PeakMemory``. Skipped when cut-cross-entropy is not installed
(``pip install cut-cross-entropy``) or the native extension is not built.
Targets (ratios freezekern / cut-cross-entropy): time <= 1.0, peak memory <= 0.3.
Nothing is asserted about time.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from freezekern.ops import linear_cross_entropy, native
from freezekern.profiler.memory import PeakMemory, release_memory
from freezekern.profiler.timing import paired_times

cce = pytest.importorskip("cut_cross_entropy", reason="cut-cross-entropy is not installed")
pytestmark = pytest.mark.skipif(not native.has_op("linear_cross_entropy", "cpu"),
                                reason=f"native kernel unavailable: {native.unavailable_reason('cpu')}")

N, D, V = 4096, 576, 49152
ROUNDS = 6
TARGETS = (1.0, 0.3)  # time, peak memory
SUMMARY: list[str] = []


def _inputs():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * 0.05
    target = torch.randint(0, V, (N,), generator=gen)
    target[::17] = -100
    return h, weight, target


def _step(kind: str, h, weight, target, trained: bool):
    def step():
        hh = h.detach().requires_grad_(True)
        ww = weight.detach().requires_grad_(trained)
        if kind == "freezekern":
            loss = linear_cross_entropy(hh, ww, target, impl="native")
        else:
            loss = cce.linear_cross_entropy(hh, ww, target, impl="torch_compile")
        loss.backward()
        return loss.detach(), hh.grad, ww.grad

    return step


def _peak_mib(fn) -> float:
    release_memory("cpu")
    with PeakMemory("cpu") as memory:
        fn()
    return memory.peak_bytes / 2**20


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if SUMMARY:
        print("\nfreezekern vs cut-cross-entropy (torch_compile), targets: time <= "
              f"{TARGETS[0]}, peak memory <= {TARGETS[1]}\n" + "\n".join(SUMMARY))


@pytest.mark.parametrize("head", ["frozen", "trained"])
def test_native_vs_cut_cross_entropy(benchmark, head):
    benchmark.group = "linear cross-entropy vs cut-cross-entropy"
    h, weight, target = _inputs()
    trained = head == "trained"
    ours, theirs = _step("freezekern", h, weight, target, trained), _step("cce", h, weight, target, trained)
    got, want = ours(), theirs()  # warm-up (torch.compile compiles here) and the same result first
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    result = {}

    def run():
        result["ratios"], result["times"] = paired_times(ours, theirs, ROUNDS)

    benchmark.pedantic(run, rounds=1, iterations=1)
    mem_ours, mem_theirs = _peak_mib(ours), _peak_mib(theirs)
    t_ours, t_theirs = (statistics.median(result["times"][i]) for i in (0, 1))
    ratio, mem_ratio = statistics.median(result["ratios"]), mem_ours / max(mem_theirs, 1e-9)
    benchmark.extra_info.update({
        "n": N, "d": D, "v": V, "head": head, "threads": torch.get_num_threads(), "freezekern_s": t_ours,
        "cce_s": t_theirs, "time_ratio": ratio, "paired_ratios": result["ratios"], "freezekern_peak_mib": mem_ours,
        "cce_peak_mib": mem_theirs, "memory_ratio": mem_ratio,
    })
    SUMMARY.append(f"head {head:<7} time {t_ours:.3f} s / {t_theirs:.3f} s = {ratio:.2f} (paired median of "
                   f"{ROUNDS}); peak {mem_ours:.0f} / {mem_theirs:.0f} MiB = {mem_ratio:.2f}")
    print(SUMMARY[-1])
