"""Fused LM-head loss: the op against HF's logits + cross-entropy, and training steps with and without it.

    python -m pytest benchmarks/bench_fused_loss.py --benchmark-only -s       # tiny llama; the op at N = 1024
    FREEZEKERN_BENCH_FULL=1 OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_fused_loss.py \\
        --benchmark-only -s --benchmark-json=freezekern-out/bench_fused_loss.json  # + SmolLM2-135M, N = 4096

Every ratio comes from one run, its two sides stepped alternately (A B B A
...), as ``bench_step.py`` does, so that load on a shared machine falls on both.
Nothing is asserted about time; the summary (``-s``) prints each ratio beside
its target.

* ``test_op_vs_hf``: forward + backward of ``linear_cross_entropy`` (impl
  "auto": the native kernel when built) against Hugging Face's path
  (``F.linear`` then ``cross_entropy`` of the fp32 logits), D = 576,
  V = 49,152 (SmolLM2's head), N = 1024 and 4096 (FULL), the head frozen
  (dh only) and trained (dh + dW). Time and peak memory of each.
* ``test_op_vs_mm``: the native op against ``torch.mm`` alone on the same
  matrix shapes it runs (its row blocks; 2 products per block with a frozen
  head, 3 with dW): the fraction of the GEMMs' throughput the whole op keeps.
* ``test_step_pair``: one training step (zero_grad, forward with labels,
  backward, AdamW) of freezekern + activation checkpointing with and without
  the fused loss, and of full fine-tuning with and without it; the tiny
  llama (CI) and SmolLM2-135M at 4 x 256 (FULL). Peak memory of each
  variant over one measured step.

Peak memory: ``freezekern.profiler.memory.PeakMemory`` (CPU: peak RSS above the
RSS at entry; CUDA: max_memory_allocated above the allocation at entry). On
the CPU, glibc keeps freed blocks below its dynamic mmap threshold (up to 32
MiB) resident, so RSS peaks carry the heap's history; run with
``MALLOC_MMAP_THRESHOLD_=65536`` (every block of 64 KiB or more is mapped and
unmapped, RSS then follows live memory) for exact peaks, and take the times
from a run without it.
"""

from __future__ import annotations

import copy
import os
import statistics

import pytest
import torch
import torch.nn.functional as F
from bench_step import _load

from freezekern.cut import apply, trainable_parameters
from freezekern.cut.fused_loss import fused_loss
from freezekern.model.training import enable_checkpointing
from freezekern.ops import linear_cross_entropy
from freezekern.profiler.memory import PeakMemory, release_memory
from freezekern.profiler.timing import paired_times

FULL = os.environ.get("FREEZEKERN_BENCH_FULL") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
D, V = 576, 49152
OP_ROWS = [1024, 4096] if FULL else [1024]
TARGETS = {  # name: (time target, peak-memory target), as ratios fused / baseline
    "fk_gc_fused / fk_gc": (0.95, 0.7),
    "full_fused / full": (1.0, 0.8),
}
SUMMARY: list[str] = []


def _paired(first, second, rounds, out=None):
    """Median over rounds of t(first) / t(second), stepped A B B A ...; and both sides' times.

    ``out`` (a dict) also receives the sorted per-round ratios under "paired".
    """
    ratios, times = paired_times(first, second, rounds, DEVICE)
    if out is not None:
        out["paired"] = ratios
    return statistics.median(ratios), times


def _peak_mb(fn, before=None) -> float:
    if before is not None:
        before()
    release_memory(DEVICE)
    with PeakMemory(DEVICE) as memory:
        fn()
    return memory.peak_bytes / 2**20


def _line(text: str) -> None:
    SUMMARY.append(text)
    print(text)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if SUMMARY:
        print("\nfused-loss benchmark summary\n" + "\n".join(SUMMARY))


# -- the op alone -----------------------------------------------------------------------------

def _op_inputs(n: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(n)
    h = torch.randn(n, D, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(V, D, generator=gen) * 0.05).to(dtype).to(DEVICE)
    target = torch.randint(0, V, (n,), generator=gen).to(DEVICE)
    return h, weight, target


def _op_step(kind: str, h, weight, target, trained: bool):
    def step():
        hh = h.detach().requires_grad_(True)
        ww = weight.detach().requires_grad_(trained)
        if kind == "fused":
            loss = linear_cross_entropy(hh, ww, target)
        else:  # what a Hugging Face *ForCausalLM does once it has the hidden states
            loss = F.cross_entropy(F.linear(hh, ww).float(), target)
        loss.backward()

    return step


@pytest.mark.parametrize("head", ["frozen", "trained"])
@pytest.mark.parametrize("n", OP_ROWS)
def test_op_vs_hf(benchmark, n, head):
    benchmark.group = "fused loss op"
    h, weight, target = _op_inputs(n)
    trained = head == "trained"
    fused, hf = _op_step("fused", h, weight, target, trained), _op_step("hf", h, weight, target, trained)
    fused()
    hf()
    rounds = 4 if n <= 1024 else 2
    result = {}

    def run():
        result["ratio"], result["times"] = _paired(fused, hf, rounds, result)

    benchmark.pedantic(run, rounds=1, iterations=1)
    mem_fused, mem_hf = _peak_mb(fused), _peak_mb(hf)
    t_fused, t_hf = (statistics.median(result["times"][i]) for i in (0, 1))
    flops = (6 if trained else 4) * n * V * D
    info = {"n": n, "d": D, "v": V, "head": head, "device": str(DEVICE), "threads": torch.get_num_threads(),
            "fused_s": t_fused, "hf_s": t_hf, "time_ratio": result["ratio"], "fused_peak_mb": mem_fused,
            "hf_peak_mb": mem_hf, "memory_ratio": mem_fused / max(mem_hf, 1e-9),
            "fused_gflops": flops / t_fused / 1e9, "hf_gflops": flops / t_hf / 1e9,
            "paired_ratios": result["paired"]}
    benchmark.extra_info.update(info)
    _line(f"op N={n} head {head:<7} fused {t_fused:.3f} s / HF {t_hf:.3f} s = {result['ratio']:.2f} (paired); "
          f"peak {mem_fused:.0f} / {mem_hf:.0f} MiB = {info['memory_ratio']:.2f}")


def _mm_sequence(n: int, weight: torch.Tensor, h: torch.Tensor, trained: bool):
    """The matrix products the native CPU op runs for an fp32 weight (its eager row blocks, held per
    vocabulary chunk), alone, one after another."""
    budget = int(os.environ.get("FREEZEKERN_CPU_LCE_BUFFER", 1 << 24))  # the kernel's default
    chunk = min(V, int(os.environ.get("FREEZEKERN_CPU_VOCAB_CHUNK", 4096)))
    rows = max(1, min(n, max(16, budget // V)))
    blocks = [(r0, min(r0 + rows, n)) for r0 in range(0, n, rows)]
    chunks = [(v0, min(v0 + chunk, V)) for v0 in range(0, V, chunk)]
    z = torch.empty(rows * V)
    gx = torch.empty(n, D)
    gw = torch.empty(V, D)

    def run():
        for i, (r0, r1) in enumerate(blocks):
            r = r1 - r0
            zs = [z[r * v0: r * v1].view(r, v1 - v0) for v0, v1 in chunks]
            for zc, (v0, v1) in zip(zs, chunks):
                torch.mm(h[r0:r1], weight[v0:v1].t(), out=zc)
            for k, (zc, (v0, v1)) in enumerate(zip(zs, chunks)):
                if k == 0:
                    torch.mm(zc, weight[v0:v1], out=gx[r0:r1])
                else:
                    gx[r0:r1].addmm_(zc, weight[v0:v1])
                if trained:
                    if i == 0:
                        torch.mm(zc.t(), h[r0:r1], out=gw[v0:v1])
                    else:
                        gw[v0:v1].addmm_(zc.t(), h[r0:r1])

    return run, blocks


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU kernel's GEMM shapes")
@pytest.mark.parametrize("head", ["frozen", "trained"])
@pytest.mark.parametrize("n", OP_ROWS)
def test_op_vs_mm(benchmark, n, head):
    from freezekern.ops import native

    if not native.has_op("linear_cross_entropy", "cpu"):
        pytest.skip(native.unavailable_reason("cpu", "linear_cross_entropy"))
    benchmark.group = "fused loss op vs torch.mm"
    h, weight, target = _op_inputs(n)
    trained = head == "trained"
    op = _op_step("fused", h, weight, target, trained)
    mm, blocks = _mm_sequence(n, weight, h, trained)
    op()
    mm()
    result = {}

    def run():
        result["ratio"], result["times"] = _paired(op, mm, 4 if n <= 1024 else 2, result)

    benchmark.pedantic(run, rounds=1, iterations=1)
    flops = (6 if trained else 4) * n * V * D
    t_op, t_mm = (statistics.median(result["times"][i]) for i in (0, 1))
    fraction = 1.0 / result["ratio"]
    benchmark.extra_info.update({"n": n, "head": head, "row_blocks": len(blocks), "threads": torch.get_num_threads(),
                                 "op_s": t_op, "mm_s": t_mm, "op_gflops": flops / t_op / 1e9,
                                 "mm_gflops": flops / t_mm / 1e9, "fraction_of_mm": fraction, "target": 0.8,
                                 "paired_ratios": result["paired"]})
    _line(f"op N={n} head {head:<7} {flops / t_op / 1e9:.0f} GFLOP/s vs torch.mm {flops / t_mm / 1e9:.0f} on the "
          f"same {len(blocks)} row blocks: {fraction:.0%} (paired; target >= 80%)")


# -- training steps ---------------------------------------------------------------------------

CONFIGS = ["tiny"] + (["smollm2"] if FULL else [])
PAIRS = {"fk_gc_fused / fk_gc": ("fk_gc_fused", "fk_gc"), "full_fused / full": ("full_fused", "full")}


@pytest.fixture(scope="module", params=CONFIGS)
def setup(request):
    loaded = _load(request.param)
    yield loaded
    del loaded.model
    release_memory(DEVICE)


def _stepper(setup, variant: str):
    model = copy.deepcopy(setup.model)
    model.train()
    if variant.startswith("fk"):
        enable_checkpointing(model)
        apply(model, setup.boundary, fused_loss=variant.endswith("_fused"))
    elif variant == "full_fused":
        fused_loss(model)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-5)
    batch = setup.batch

    def zero():
        optimizer.zero_grad(set_to_none=True)

    def step():
        zero()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()

    step.zero = zero
    return step


@pytest.mark.parametrize("pair", list(PAIRS), ids=lambda name: name.replace(" / ", "_over_"))
def test_step_pair(benchmark, setup, pair):
    benchmark.group = f"fused loss step[{setup.name}]"
    num, den = PAIRS[pair]
    steppers = {name: _stepper(setup, name) for name in (num, den)}
    for fn in steppers.values():  # warm-up; creates the optimizer state
        fn()
    memory = {name: _peak_mb(fn, before=fn.zero) for name, fn in steppers.items()}  # from a state without grads
    result = {}

    def run():
        result["ratio"], result["times"] = _paired(steppers[num], steppers[den], max(setup.rounds, 4), result)

    benchmark.pedantic(run, rounds=1, iterations=1)
    t_num, t_den = (statistics.median(result["times"][i]) for i in (0, 1))
    time_target, memory_target = TARGETS[pair]
    memory_ratio = memory[num] / max(memory[den], 1e-9)
    benchmark.extra_info.update({
        "config": setup.name, "pair": pair, "boundary": setup.boundary, "num_layers": setup.num_layers,
        "batch_shape": list(setup.batch["input_ids"].shape), "device": str(DEVICE),
        "threads": torch.get_num_threads(), f"{num}_s": t_num, f"{den}_s": t_den, "time_ratio": result["ratio"],
        "time_target": time_target, f"{num}_peak_mb": memory[num], f"{den}_peak_mb": memory[den],
        "memory_ratio": memory_ratio, "memory_target": memory_target, "paired_ratios": result["paired"],
    })
    _line(f"step [{setup.name}, k={setup.boundary}/{setup.num_layers}] {pair}: time {t_num:.3f} / {t_den:.3f} s = "
          f"{result['ratio']:.2f} (paired; target <= {time_target}); peak {memory[num]:.0f} / {memory[den]:.0f} MiB "
          f"= {memory_ratio:.2f} (target <= {memory_target})")
    steppers.clear()
    release_memory(DEVICE)
