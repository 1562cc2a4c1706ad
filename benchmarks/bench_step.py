"""Training-step benchmarks: full fine-tuning, plain freezing, PEFT, and freezekern's truncated backward.

    pytest benchmarks/bench_step.py --benchmark-only                         # tiny llama (CI speed)
    FREEZEKERN_BENCH_FULL=1 pytest benchmarks/bench_step.py --benchmark-only -s \\
        --benchmark-json=bench_step.json                                     # + SmolLM2-135M, 4 x 256

One step = zero_grad, forward with labels, backward, AdamW step over the
trainable parameters, on the same batch for every variant:

  full          all parameters trained
  freeze        requires_grad=False on the embeddings and blocks 1..k (the same trainable set as freezekern)
  freeze_gc     the same + Hugging Face activation checkpointing (which calls enable_input_require_grads)
  lora_gc       PEFT LoRA on blocks k+1..L only, + checkpointing (PEFT's usual memory-saving recipe)
  fk            freezekern.apply(model, plan)
  fk_gc         the same + checkpointing
  fk_lora_gc    LoRA on blocks k+1..L + checkpointing + freezekern
  fk_cache      freezekern + prefix cache, epoch 2+ (the boundary state of the batch is cached)

The boundary comes from the plan (SALF, cosine, traced on the benchmark
batch), or from FREEZEKERN_BENCH_K; FREEZEKERN_BENCH_ROUNDS sets the measured
rounds. ``test_paired_ratio`` steps the two variants of each tracked ratio
alternately (ABBA), which keeps the ratio meaningful on a shared machine. Recorded in ``benchmark.extra_info``:
step seconds (median), peak memory during the measured steps (CUDA:
max_memory_allocated above the starting allocation; CPU: the kernel's peak-RSS
counter VmHWM, reset at the start, minus the starting RSS, after returning
freed heap pages with malloc_trim; ``freezekern.profiler.memory.PeakMemory``), the analytic ideal step of the variant's trainable set
(``freezekern.policy.cost.step_cost``, the formula the plan and ``freezekern profile``
use: every forward, the recomputation of the checkpointed trained blocks,
the backward of the trained parts only, the LM head's included) over
per-part seconds measured once per config with
``freezekern.profiler.part_costs.measure_part_costs`` (FREEZEKERN_BENCH_PARTS=0: over
``flop_costs`` FLOPs scaled to the full step instead), and the ratios the
project tracks. A summary table is printed at the end (use ``-s``) and
written to FREEZEKERN_BENCH_SUMMARY when that is set. Nothing is asserted
about time.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import warnings

import pytest
import torch

from freezekern import analyze, discover, tiny_model
from freezekern.cut import apply, trainable_parameters
from freezekern.model.training import enable_checkpointing
from freezekern.policy.cost import StepSetup, flop_costs, full_finetuning, step_cost, step_fraction
from freezekern.policy.rules import plan as make_plan
from freezekern.profiler.memory import PeakMemory, release_memory
from freezekern.profiler.part_costs import measure_part_costs
from freezekern.profiler.timing import paired_times

warnings.filterwarnings("ignore", category=FutureWarning)

FULL = os.environ.get("FREEZEKERN_BENCH_FULL") == "1"
MEASURE_PARTS = os.environ.get("FREEZEKERN_BENCH_PARTS", "1") != "0"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CONFIGS = ["tiny"] + (["smollm2"] if FULL else [])
VARIANTS = ["full", "freeze", "freeze_gc", "lora_gc", "fk", "fk_gc", "fk_lora_gc", "fk_cache"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RATIOS = {  # name: (numerator, denominator, target)
    "fk_gc / freeze_gc": ("fk_gc", "freeze_gc", 0.65),
    "fk / freeze": ("fk", "freeze", 1.03),
    "fk_lora_gc / lora_gc": ("fk_lora_gc", "lora_gc", 0.65),
    "fk_cache / full": ("fk_cache", "full", 0.5),
    "fk_gc / full": ("fk_gc", "full", None),
    "fk / full": ("fk", "full", None),
}
RESULTS: dict[str, dict[str, dict]] = {}


# -- setup ------------------------------------------------------------------------------------

class _Setup:
    def __init__(self, name, model, batch, boundary, rounds, warmup):
        self.name, self.model, self.batch, self.boundary = name, model, batch, boundary
        self.rounds, self.warmup = rounds, warmup
        parts = discover(model)
        self.num_layers = parts.num_layers
        self.tied = parts.tied
        self.flop_costs = flop_costs(parts.parameter_counts())
        self.tokens = int(batch["attention_mask"].sum())
        self.part_costs = _measured_parts(model, batch) if MEASURE_PARTS else None


def _measured_parts(model, batch):
    """Seconds per part with every parameter trainable (so every weight gradient is priced), once per config."""
    trainable = copy.deepcopy(model)
    trainable.train()
    for p in trainable.parameters():
        p.requires_grad_(True)
    costs = measure_part_costs(trainable, batch, repeats=3)
    del trainable
    return costs


def _ideal_setup(variant: str, setup: _Setup) -> StepSetup:
    """What the variant's trainable set costs at least: the cut's computation (the prefix cache's: no prefix)."""
    if variant == "full":
        return full_finetuning()
    lora = "lora" in variant
    return StepSetup(boundary=setup.boundary, train_head=not setup.tied and not lora, block_weights=not lora,
                     checkpointing=variant.endswith("_gc"), cut=True, prefix_skipped=variant == "fk_cache")


def _load(name: str) -> _Setup:
    if name == "tiny":
        model = tiny_model("llama", num_layers=12, hidden=128, vocab=2048, tie=True)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 2048, (4, 128), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        rounds, warmup = 5, 1
    else:
        from freezekern import load_default_model, make_batches

        model, tokenizer = load_default_model()
        batch = make_batches(tokenizer, seq_len=256, num_tokens=4 * 256, batch_size=4)[0]
        rounds, warmup = 4, 1
    if os.environ.get("FREEZEKERN_BENCH_ROUNDS"):
        rounds = int(os.environ["FREEZEKERN_BENCH_ROUNDS"])
    model.to(DEVICE)
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    if os.environ.get("FREEZEKERN_BENCH_K"):
        boundary = int(os.environ["FREEZEKERN_BENCH_K"])
    else:
        trace = analyze(model, [batch], "cosine", progress=False)
        boundary = make_plan(trace, "salf").boundary
    return _Setup(name, model, batch, boundary, rounds, warmup)


@pytest.fixture(scope="module", params=CONFIGS)
def setup(request):
    loaded = _load(request.param)
    yield loaded
    _print_summary(loaded.name)
    del loaded.model
    _release()


def _release():
    release_memory(DEVICE)


def _freeze_plainly(model, boundary):
    handle = apply(model, boundary)
    trainable = {id(p) for p in trainable_parameters(model)}
    handle.remove()
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def _lora(model, boundary, num_layers):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                             layers_to_transform=list(range(boundary, num_layers)), layers_pattern="layers",
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def _build(setup: _Setup, variant: str):
    model = copy.deepcopy(setup.model)
    model.train()
    k = setup.boundary
    cache = None
    if variant.startswith("freeze"):
        _freeze_plainly(model, k)
    if "lora" in variant:
        model = _lora(model, k, setup.num_layers)
    if variant.endswith("_gc"):
        enable_checkpointing(model)
    if variant.startswith("fk"):
        handle = apply(model, k)
        if variant == "fk_cache":
            from freezekern.cut.prefix_cache import PrefixCache

            cache = PrefixCache(max_bytes=2 << 30)
            cache.attach(handle)
    return model, cache


# -- measurement ------------------------------------------------------------------------------

def _stepper(setup: _Setup, variant: str):
    """(step function, model, prefix cache) for one variant; a step is zero_grad, forward, backward, AdamW."""
    model, cache = _build(setup, variant)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-5)
    batch = setup.batch

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return step, model, cache


def _run(benchmark, setup: _Setup, variant: str):
    step, model, cache = _stepper(setup, variant)
    batch = setup.batch
    for _ in range(setup.warmup):  # also fills the prefix cache: measured steps are epoch 2+
        step()
    _release()
    with PeakMemory(DEVICE) as memory:
        benchmark.pedantic(step, rounds=setup.rounds, iterations=1)
    stats = benchmark.stats.stats
    median = stats.median
    L, k = setup.num_layers, setup.boundary
    ideal = _ideal_setup(variant, setup)
    flops_fraction = step_fraction(setup.flop_costs, ideal)
    info = {
        "config": setup.name, "variant": variant, "device": str(DEVICE), "boundary": k, "num_layers": L,
        "batch_shape": list(batch["input_ids"].shape), "step_s_median": median,
        "tokens_per_s": setup.tokens / median, "peak_memory_mb": memory.peak_bytes / 2**20,
        "trainable_params": sum(p.numel() for p in trainable_parameters(model)),
        "ideal_flops_fraction_of_full": flops_fraction,
    }
    full = RESULTS.get(setup.name, {}).get("full")
    if setup.part_costs is not None:
        info["ideal_step_s"] = step_cost(setup.part_costs, ideal)
        info["ideal_fraction_of_full"] = info["ideal_step_s"] / step_cost(setup.part_costs, full_finetuning())
        info["ideal_from"] = "measured parts"
    elif full is not None:
        info["ideal_step_s"] = full["step_s_median"] * flops_fraction
        info["ideal_from"] = "flop_costs x the full step"
    if full is not None:
        info["fraction_of_full"] = median / full["step_s_median"]
    if cache is not None:
        info["prefix_cache"] = cache.stats()
    RESULTS.setdefault(setup.name, {})[variant] = info
    for name, (num, den, target) in RATIOS.items():
        if variant in (num, den) and num in RESULTS[setup.name] and den in RESULTS[setup.name]:
            ratio = RESULTS[setup.name][num]["step_s_median"] / RESULTS[setup.name][den]["step_s_median"]
            info[f"ratio {name}"] = ratio
            if target is not None:
                info[f"target {name}"] = target
    benchmark.extra_info.update(info)


def _print_summary(config: str):
    rows = RESULTS.get(config, {})
    if not rows:
        return
    boundary = next((r["boundary"] for name, r in rows.items() if name != "_paired"), "?")
    lines = [f"\nfreezekern step benchmark [{config}] on {DEVICE}, boundary {boundary}",
             f"{'variant':<12}{'step s':>9}{'tok/s':>10}{'peak MB':>10}{'x full':>8}{'ideal s':>9}"]
    for variant in VARIANTS:
        r = rows.get(variant)
        if r is None:
            continue
        lines.append(f"{variant:<12}{r['step_s_median']:>9.3f}{r['tokens_per_s']:>10.0f}{r['peak_memory_mb']:>10.0f}"
                     f"{r.get('fraction_of_full', float('nan')):>8.2f}{r.get('ideal_step_s', float('nan')):>9.3f}")
    ratios = {}
    for name, (num, den, target) in RATIOS.items():
        if num in rows and den in rows:
            ratios[name] = rows[num]["step_s_median"] / rows[den]["step_s_median"]
            memory = rows[num]["peak_memory_mb"] / max(rows[den]["peak_memory_mb"], 1e-9)
            lines.append(f"  {name:<22} time {ratios[name]:.3f}" + (f" (target <= {target})" if target else "")
                         + f"   peak memory {memory:.2f}")
    for name, ratio in rows.get("_paired", {}).items():
        lines.append(f"  paired (ABBA) {name:<22} time {ratio:.3f} (target <= {RATIOS[name][2]})")
    print("\n".join(lines))
    out = os.environ.get("FREEZEKERN_BENCH_SUMMARY")
    if out:
        summary = {}
        if os.path.isfile(out):
            with open(out) as f:
                summary = json.load(f)
        summary[config] = {"device": str(DEVICE), "rows": rows, "ratios": ratios,
                           "paired_ratios": rows.get("_paired", {})}
        with open(out, "w") as f:
            json.dump(summary, f, indent=2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_step(benchmark, setup, variant):
    if variant == "fk_cache":
        pytest.importorskip("freezekern.cut.prefix_cache")
    benchmark.group = f"step[{setup.name}]"
    _run(benchmark, setup, variant)
    _release()  # the variant's model and optimizer went out of scope with _run


PAIRS = {name: (num, den, target) for name, (num, den, target) in RATIOS.items()
         if name in ("fk_gc / freeze_gc", "fk / freeze", "fk_lora_gc / lora_gc")}


@pytest.mark.parametrize("pair", list(PAIRS), ids=lambda name: name.replace(" / ", "_over_"))
def test_paired_ratio(benchmark, setup, pair):
    """Both variants of a ratio, stepped alternately (ABBA) so that load on the machine hits both alike.

    extra_info["paired_ratio_median"] is the median over rounds of t(numerator) / t(denominator).
    """
    num, den, target = PAIRS[pair]
    benchmark.group = f"paired[{setup.name}]"
    steppers = {name: _stepper(setup, name)[0] for name in (num, den)}
    if setup.warmup:  # warm-up rounds, not counted
        paired_times(steppers[num], steppers[den], setup.warmup, DEVICE)
    measured = {}

    def both():
        measured["ratios"], measured["times"] = paired_times(steppers[num], steppers[den], max(setup.rounds, 4),
                                                             DEVICE)

    benchmark.pedantic(both, rounds=1, iterations=1)
    ratios = measured["ratios"]
    times = {num: measured["times"][0], den: measured["times"][1]}
    median = statistics.median(ratios)
    info = {"config": setup.name, "pair": pair, "boundary": setup.boundary, "device": str(DEVICE),
            "paired_ratio_median": median, "paired_ratios": ratios, "target": target,
            f"{num}_s": sorted(times[num]), f"{den}_s": sorted(times[den])}
    benchmark.extra_info.update(info)
    RESULTS.setdefault(setup.name, {}).setdefault("_paired", {})[pair] = median
    steppers.clear()
    _release()
