"""The prefix cache over several epochs of distinct batches: what it saves once the first epoch has paid.

    pytest benchmarks/bench_prefix_cache.py --benchmark-only -s                  # tiny llama (CI speed)
    FREEZEKERN_BENCH_FULL=1 pytest benchmarks/bench_prefix_cache.py --benchmark-only -s   # + SmolLM2, 4 x 256

Two copies of the model under the same boundary, one with a ``PrefixCache``,
train on the same ``BATCHES`` distinct batches for ``EPOCHS`` epochs; their
steps alternate (A B B A ...), so load on the machine hits both alike. Epoch
1 computes and stores every boundary state (misses), later epochs are served.
Recorded in ``benchmark.extra_info``: per epoch the median ratio of paired
step times (cache / no cache), the ratio over all epochs (the realistic
figure) and the cache's hit counts. The single-batch ``fk_cache`` variant of
``bench_step.py`` is the best case (every measured step a hit). Nothing is
asserted about time.
"""

from __future__ import annotations

import copy
import functools
import os
import statistics

import pytest
import torch

from freezekern import apply, tiny_model
from freezekern.cut import trainable_parameters
from freezekern.cut.prefix_cache import PrefixCache
from freezekern.profiler.timing import timed, train_step

FULL = os.environ.get("FREEZEKERN_BENCH_FULL") == "1"
EPOCHS = 3
BATCHES = 4


def _setup(name: str):
    if name == "tiny":
        model = tiny_model("llama", num_layers=12, hidden=128, vocab=2048, tie=True)
        gen = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(BATCHES):
            ids = torch.randint(3, 2048, (4, 128), generator=gen)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        return model, batches, 9
    from freezekern import load_default_model, make_batches

    model, tokenizer = load_default_model()
    batches = make_batches(tokenizer, seq_len=256, num_tokens=BATCHES * 4 * 256, batch_size=4)
    return model, batches, 24


@pytest.mark.parametrize("config", ["tiny"] + (["smollm2"] if FULL else []))
def test_prefix_cache_over_epochs(benchmark, config):
    base, batches, boundary = _setup(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base.to(device).train()
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    models, optimizers = {}, {}
    for variant in ("plain", "cache"):
        model = copy.deepcopy(base)
        handle = apply(model, boundary)
        if variant == "cache":
            cache = PrefixCache(max_bytes=4 << 30).attach(handle)
        models[variant] = model
        optimizers[variant] = torch.optim.AdamW(trainable_parameters(model), lr=1e-5)
    times = {"plain": [[] for _ in range(EPOCHS)], "cache": [[] for _ in range(EPOCHS)]}

    def step(variant, batch):
        return timed(functools.partial(train_step, models[variant], batch, optimizers[variant]), device)[1]

    def epochs():
        flip = False
        for epoch in range(EPOCHS):
            for batch in batches:
                order = ("plain", "cache") if not flip else ("cache", "plain")
                flip = not flip
                for variant in order:
                    times[variant][epoch].append(step(variant, batch))

    step("plain", batches[0])  # warm-up of the plain copy only: the cache copy's first epoch must stay cold
    benchmark.pedantic(epochs, rounds=1, iterations=1)
    per_epoch = [statistics.median(c / p for c, p in zip(times["cache"][e], times["plain"][e]))
                 for e in range(EPOCHS)]
    overall = sum(sum(t) for t in times["cache"]) / sum(sum(t) for t in times["plain"])
    info = {"config": config, "boundary": boundary, "epochs": EPOCHS, "distinct_batches": BATCHES,
            "ratio_per_epoch": per_epoch, "ratio_all_epochs": overall, "cache": cache.stats()}
    benchmark.extra_info.update(info)
    print(f"\nprefix cache [{config}, k={boundary}, {BATCHES} batches x {EPOCHS} epochs]: cache / no cache per epoch "
          + ", ".join(f"{r:.2f}" for r in per_epoch) + f"; all epochs {overall:.2f}; hits {cache.stats()['hits']}")
