"""Host-side cost of the streaming tracer per latent space.

A 30-block llama with hidden size 64 on 20 batches of 2 x 64 tokens: the
deviation ops have almost nothing to compute, so the time a trace adds over
a plain forward is the per-space host work (dispatch, launches, sums) and the
per-batch basis lookup. That is the cost that matters on a GPU, where the
model's own kernels are short. extra_info["host_us_per_space"] is
(trace - plain forward) / (batches x 31 spaces). The plain forward is timed
in the same run, through the decoder alone (embeddings, blocks, final norm):
the tracer stops after the last block, so the LM head, about as costly here
as the host work measured, is not part of either. Run:

    python -m pytest benchmarks/bench_trace_overhead.py --benchmark-only
"""

from __future__ import annotations

import time

import pytest
import torch
from bench_trace import impls

import freezekern as fk

LAYERS, BATCHES = 30, 20
_PLAIN: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup(bench_device):
    model = fk.tiny_model("llama", num_layers=LAYERS, hidden=64, vocab=4096).to(bench_device)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 4096, (2, 64), generator=gen).to(bench_device) for _ in range(BATCHES)]
    return model, batches


def _best_of(fn, device, rounds=5) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _plain(model, batches):
    decoder = model.get_decoder()
    with torch.no_grad():
        for b in batches:
            decoder(input_ids=b, use_cache=False)


def _plain_seconds(setup, device) -> float:
    if "plain" not in _PLAIN:
        model, batches = setup
        _PLAIN["plain"] = _best_of(lambda: _plain(model, batches), device)
    return _PLAIN["plain"]


@pytest.mark.benchmark(group="trace-overhead")
def test_plain_forward(benchmark, setup, bench_device):
    model, batches = setup
    benchmark.extra_info["seconds_best"] = _plain_seconds(setup, bench_device)
    benchmark.pedantic(lambda: _plain(model, batches), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="trace-overhead")
@pytest.mark.parametrize("metric", ["cosine", "logit_lens"])
@pytest.mark.parametrize("impl", ["torch", "native", "triton"])
def test_trace(benchmark, setup, bench_device, metric, impl):
    if impl not in impls(bench_device):
        pytest.skip(f"impl {impl} not available on {bench_device.type}")
    model, batches = setup

    def trace():
        fk.analyze(model, batches, metric=metric, impl=impl, progress=False)

    seconds = _best_of(trace, bench_device)
    plain = _plain_seconds(setup, bench_device)
    benchmark.extra_info.update({
        "seconds_best": seconds, "plain_seconds_best": plain, "x_plain": seconds / plain,
        "host_us_per_space": (seconds - plain) / (BATCHES * (LAYERS + 1)) * 1e6,
    })
    benchmark.pedantic(trace, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="trace-overhead")
@pytest.mark.parametrize("impl", ["torch", "native", "triton"])
def test_reducer_host_cost(benchmark, setup, bench_device, impl):
    """The tracer's own host work, without the model: per batch (targets, basis lookup) and per space."""
    from freezekern.analysis.trace import _SpaceReducer, shifted_targets

    if impl not in impls(bench_device):
        pytest.skip(f"impl {impl} not available on {bench_device.type}")
    model, batches = setup
    reducer = _SpaceReducer(fk.discover(model), "cosine", impl, True, None)
    hidden = torch.randn(*batches[0].shape, model.config.hidden_size, device=bench_device)
    sums = torch.zeros(LAYERS + 1, dtype=torch.float64, device=bench_device)

    def start_batches():
        for b in batches:
            reducer.start_batch(shifted_targets({"input_ids": b}))

    def spaces():
        for k in range(LAYERS + 1):
            reducer(hidden, sums[k])

    start_batches()  # solves every basis row once: what follows is the steady state
    benchmark.extra_info["start_batch_us"] = _best_of(start_batches, bench_device) / BATCHES * 1e6
    benchmark.extra_info["space_us"] = _best_of(spaces, bench_device) / (LAYERS + 1) * 1e6
    benchmark.pedantic(spaces, rounds=3, iterations=1, warmup_rounds=1)
