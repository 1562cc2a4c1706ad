"""The moving boundary's mean step time over a run, against full fine-tuning and against the static default.

    pytest benchmarks/bench_moving.py --benchmark-only -s                      # tiny llama (CI speed)
    FREEZEKERN_BENCH_FULL=1 OMP_NUM_THREADS=1 pytest benchmarks/bench_moving.py --benchmark-only -s   # + SmolLM2

Three copies of the model train side by side on the same batches: full
fine-tuning, the static boundary k, and a boundary that moves from 0 to k
over the run (``moving_plan``'s default schedule: k = 0 until 10 % of the
run, then one block at a time until k at 60 %). Every step, the three take
their step in a rotating order, so load on the machine hits all alike; the
moving copy's step is timed at whatever boundary the run has reached. The
ratios of the mean step times over the run (moving / full, moving / static)
and the boundary at each step are recorded in ``benchmark.extra_info``;
``expected_flops_ratio`` is the same ratio of estimated FLOPs
(``freezekern.policy.cost``). Nothing is asserted about time.
"""

from __future__ import annotations

import copy
import functools
import os
import statistics

import pytest
import torch

from freezekern import MovingBoundary, apply, discover, tiny_model
from freezekern.cut import trainable_parameters
from freezekern.policy.cost import StepSetup, flop_costs, full_finetuning, step_cost
from freezekern.policy.moving import MovingSchedule
from freezekern.profiler.timing import timed, train_step

FULL = os.environ.get("FREEZEKERN_BENCH_FULL") == "1"


def _setup(name: str):
    if name == "tiny":
        model = tiny_model("llama", num_layers=12, hidden=128, vocab=2048, tie=True)
        gen = torch.Generator().manual_seed(0)
        ids = [torch.randint(3, 2048, (4, 128), generator=gen) for _ in range(4)]
        batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]
        return model, batches, 9, 40
    from freezekern import load_default_model, make_batches

    model, tokenizer = load_default_model()
    batches = make_batches(tokenizer, seq_len=256, num_tokens=4 * 4 * 256, batch_size=4)
    return model, batches, 19, int(os.environ.get("FREEZEKERN_BENCH_STEPS", "60"))


@pytest.mark.parametrize("config", ["tiny"] + (["smollm2"] if FULL else []))
def test_moving_boundary_mean_step_time(benchmark, config):
    base, batches, k, steps = _setup(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base.to(device).train()
    batches = [{key: v.to(device) for key, v in b.items()} for b in batches]
    schedule = MovingSchedule(start=0, end=k, begin=0.1, finish=0.6)
    models, optimizers, handles = {}, {}, {}
    for variant, first in (("full", None), ("static", k), ("moving", schedule.start)):
        model = copy.deepcopy(base)
        handles[variant] = apply(model, first) if first is not None else None
        models[variant] = model
        optimizers[variant] = torch.optim.AdamW(trainable_parameters(model), lr=1e-5)
    mover = MovingBoundary(handles["moving"], schedule, optimizer=optimizers["moving"])
    times = {name: [] for name in models}
    boundaries = []
    order = list(models)

    def run():
        for step in range(steps):
            batch = batches[step % len(batches)]
            boundaries.append(mover.boundary)
            for name in order[step % 3:] + order[:step % 3]:
                step_fn = functools.partial(train_step, models[name], batch, optimizers[name])
                times[name].append(timed(step_fn, device)[1])
            mover.update((step + 1) / steps, step + 1)

    benchmark.pedantic(run, rounds=1, iterations=1)
    costs = flop_costs(discover(base).parameter_counts())
    full = step_cost(costs, full_finetuning())

    def flops(b):
        return step_cost(costs, StepSetup(boundary=b, train_head=False)) / full

    expected = statistics.fmean(flops(b) for b in boundaries)
    mean = {name: statistics.fmean(t) for name, t in times.items()}
    info = {"config": config, "steps": steps, "boundary": k, "device": str(device),
            "threads": torch.get_num_threads(), "mean_step_s": mean,
            "moving_over_full": mean["moving"] / mean["full"], "moving_over_static": mean["moving"] / mean["static"],
            "expected_flops_ratio": {"moving_over_full": expected, "moving_over_static": expected / flops(k)},
            "boundaries": boundaries}
    benchmark.extra_info.update(info)
    print(f"\n[{config}] k={k}, {steps} steps on {device}: mean step moving {mean['moving']:.3f} s, "
          f"full {mean['full']:.3f} s, static {mean['static']:.3f} s; moving / full {info['moving_over_full']:.3f} "
          f"(FLOPs {expected:.3f}), moving / static {info['moving_over_static']:.3f} "
          f"(FLOPs {expected / flops(k):.3f})")
    for handle in (mover.handle, handles["static"]):
        handle.remove()
