"""Where a training step's time goes, block by block: the user's setup as it is, beside freezekern's cut.

    report = freezekern.profile(model, batches)          # the model as the user set it up
    print(freezekern.profiler.report.profile_table(report))
    report.save("profile.json"); freezekern.profiler.report.plot_profile(report, "profile.png")

``profile`` runs a few training steps (zero_grad, forward with labels,
backward, AdamW) of the model exactly as it is given (its ``requires_grad``
flags, gradient checkpointing, PEFT adapters, ``enable_input_require_grads``)
and, alternating with them (A B B A ...), the same steps with freezekern's
cut at the same boundary k (the number of leading blocks with nothing to
train): ``freezekern.apply(model, k)``, removed again after each of
its steps. The model's parameters, flags and gradients are restored at the
end; nothing it does outlives the call.

What is measured, with module and tensor hooks (``freezekern.profiler.step_timing``),
never inferred: the forward of the embedding, every block, the final norm,
the LM head and the loss; the recomputation of checkpointed blocks; each
part's backward and whether it ran at all (a block is *reached* when a
gradient arrived at its output). Wall time on the CPU, CUDA events on a GPU.

Peak memory (``freezekern.profiler.memory.PeakMemory``) is measured in the last
warm-up round (the first step of a process carries one-time allocations, so
the default is two warm-up rounds), not in the timed steps: on the CPU it
hands freed heap pages back to the system first, and faulting them in again
would slow the step it measures (with ``warmup=0`` the timed steps measure
it, and the report says so). The optimizer's state is created before the
first step, so no step pays for it.

The analytic ideal is ``freezekern.policy.cost.step_cost`` (the formula of the
plan's cost model and of ``benchmarks/bench_step.py``) over per-part seconds
read from these same hooks (``step_part_costs``), for the cut's setup: every
forward, the recomputation of the checkpointed trained blocks, and the
backward of the trained parts only (the LM head's input gradient, its weight
gradient when it trains, the loss). Each part's cost is the least over the
two setups' measured steps (the same alternating steps), so the ideal is a
lower bound of every step of the cut (each of them ran all of these parts,
one after another) and of any step that trains the same parameters: it
leaves out the final norm, the optimizer and everything between parts.
Parts no step ran (the cut's weight-only backward of block k+1 when there is
no comparison) come from ``freezekern.profiler.part_costs.measure_part_costs``, which
times each part alone, when that is asked for (``isolated_parts=True``), else
count zero.

``freezekern.profile`` (the package attribute) is this module's ``profile``.

With torch.distributed every rank profiles its own steps (the report names
the rank); nothing here is collective.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import asdict

import torch
from torch import nn

from freezekern.cut import active_handle, apply
from freezekern.model.parts import ModelParts, discover
from freezekern.model.training import device_of
from freezekern.policy.cost import PartCosts, step_cost_parts
from freezekern.profiler.memory import PeakMemory
from freezekern.profiler.part_costs import as_batch, measure_part_costs
from freezekern.profiler.result import (
    CUT,
    YOURS,
    ProfileReport,
    cost_setups,
    plain_dict,
    step_part_costs,
    summarise_steps,
    verdict,
)
from freezekern.profiler.setup import SetupFacts, describe_setup
from freezekern.profiler.step_timing import (
    StepRecorder,
    StepTiming,
)
from freezekern.profiler.timing import train_step

logger = logging.getLogger("freezekern.profile")


def _rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_optimizer_state(optimizer) -> None:
    """Create the optimizer's state now (one step on zero gradients), so that no measured step pays for it.

    The step moves the parameters by at most weight decay x lr; ``profile`` restores them afterwards.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def profile(
    model: nn.Module,
    batches: Iterable,
    *,
    boundary: int | None = None,
    steps: int = 4,
    warmup: int = 2,
    compare: bool = True,
    parts: ModelParts | None = None,
    lr: float = 1e-5,
    isolated_parts: bool = False,
    repeats: int = 2,
    progress: bool = True,
    model_id: str | None = None,
) -> ProfileReport:
    """Profile ``steps`` training steps of ``model`` as it is set up, beside freezekern's cut (see the module doc).

    ``batches``: dicts with ``input_ids`` (and ``attention_mask``, ``labels``;
    labels default to the inputs) or [B, T] LongTensors, used round-robin;
    both setups get the same batch in each round. ``boundary``: k for the
    cut (default: the number of leading blocks that train nothing).
    ``warmup`` rounds are run first and not timed, the last of them measures
    the peak memory; ``compare=False``
    profiles the user's setup only. ``parts``: the model's parts when
    ``discover`` cannot find them (``freezekern.discover(model, layers=...)``).
    ``isolated_parts``: also time each part alone (``measure_part_costs``,
    ``repeats`` times) for the parts the steps do not show. The parameters,
    their flags and gradients, and the training mode are restored afterwards.
    Returns a ProfileReport.
    """
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (a median and an alternation need two), got {steps}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    handle = active_handle(model)
    if handle is not None and handle.active:
        raise ValueError("a freeze plan is already applied to this model; profile the setup without it "
                         "(handle.remove()): profile compares your setup with freezekern's cut itself")
    parts = parts or discover(model)
    device = device_of(model)
    batches = [as_batch(b, device) for b in batches]
    if not batches:
        raise ValueError("profile needs at least one batch")
    facts = describe_setup(model, parts)
    if facts.trainable_params == 0:
        raise ValueError("no parameter of the model requires grad: there is no training step to profile")
    L = parts.num_layers
    k = facts.frozen_prefix if boundary is None else int(boundary)
    if not 0 <= k <= L:
        raise ValueError(f"boundary {k} is outside [0, {L}] (the model has {L} blocks)")
    notes: list[str] = []
    if compare and facts.embedding_trains:
        notes.append("your setup trains the input embedding; freezekern's cut freezes it (the two setups train "
                     "different parameters)")
    if compare and boundary is not None and facts.blocks_trained and facts.blocks_trained[0] <= k:
        notes.append(f"the cut at k={k} also freezes trained blocks {facts.blocks_trained[0]}..{k} of your setup")
    if compare and facts.tied and facts.head_trains:
        notes.append("your setup trains the tied input/output embedding; under the cut it trains through its "
                     "output use only")

    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in trainable]
    saved_grads = [p.grad for p in model.parameters()]
    was_training = model.training
    recorder = StepRecorder(model, parts, device)
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    timings: dict[str, list[StepTiming]] = {YOURS: [], CUT: []}
    peaks: dict[str, list[int]] = {YOURS: [], CUT: []}
    labels = [YOURS, CUT] if compare else [YOURS]
    rounds = warmup + steps
    costs = None
    memory_kind = PeakMemory(device).kind
    if warmup == 0:
        notes.append("warmup=0: peak memory was measured in the timed steps, which it slows a little")
    from tqdm.auto import tqdm

    bar = tqdm(total=rounds * len(labels), desc="profile", unit="step", disable=not progress)
    cut_handle = None
    try:
        model.train()
        init_optimizer_state(optimizer)
        recorder.install()
        for r in range(rounds):
            order = labels if r % 2 == 0 else labels[::-1]
            batch = batches[r % len(batches)]
            measure_memory = r == warmup - 1 or warmup == 0
            for label in order:
                if label == CUT:
                    cut_handle = apply(model, k, train_head=facts.head_trains, train_final_norm=True, parts=parts,
                                       frozen_adapters="freeze", freeze_outside=True)
                try:
                    with PeakMemory(device) if measure_memory else nullcontext() as memory:
                        recorder.begin_step()
                        train_step(model, batch, optimizer, clear="before")
                        timing = recorder.end_step()
                finally:
                    if cut_handle is not None:
                        cut_handle.remove()
                        cut_handle = None
                if memory is not None:
                    peaks[label].append(int(memory.peak_bytes))
                if r >= warmup:
                    timings[label].append(timing)
                bar.update(1)
        bar.close()
        recorder.remove()
        if isolated_parts:
            optimizer.zero_grad(set_to_none=True)
            if progress:
                tqdm.write("profile: timing each part alone")
            costs = measure_part_costs(model, batches[0], parts=parts, repeats=repeats)
    finally:
        bar.close()
        recorder.remove()
        if cut_handle is not None and cut_handle.active:
            cut_handle.remove()
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        with torch.no_grad():
            for p, value in zip(trainable, saved):
                p.copy_(value)
        for p, grad in zip(model.parameters(), saved_grads):
            p.grad = grad
        model.train(was_training)

    return assemble_report(model, recorder, facts, k, timings, peaks=peaks, isolated=costs, compared=compare,
                           batch_shape=list(batches[0]["input_ids"].shape), warmup=warmup, memory_kind=memory_kind,
                           notes=notes, model_id=model_id,
                           descriptions=("the model as given", f"freezekern.apply(model, {k}) for alternate steps"))


def assemble_report(model: nn.Module, recorder: StepRecorder, facts: SetupFacts, boundary: int,
                    timings: Mapping[str, list[StepTiming]], *, peaks: Mapping[str, list[int]] | None = None,
                    isolated: PartCosts | None, compared: bool,
                    batch_shape: list[int], warmup: int, memory_kind: str, notes: list[str],
                    model_id: str | None = None, descriptions: tuple[str, str] = ("", "")) -> ProfileReport:
    """The ProfileReport of measured steps (``timings[YOURS]``, ``timings[CUT]``), optionally isolated part costs."""
    k = boundary
    peaks = peaks or {}
    yours = summarise_steps(YOURS, descriptions[0], timings[YOURS], recorder.names, recorder.hooked, facts,
                            peaks.get(YOURS))
    fk = None
    if compared and timings.get(CUT):
        cut_facts = SetupFacts(**{**asdict(facts), "embedding_trains": False,
                                  "blocks_trained": [b for b in facts.blocks_trained if b > k]})
        fk = summarise_steps(CUT, descriptions[1], timings[CUT], recorder.names, recorder.hooked, cut_facts,
                             peaks.get(CUT))
    costs, cost_notes = step_part_costs(yours, fk, facts, k, isolated)
    plain_setup, cut_setup = cost_setups(facts, yours, k)
    yours.modeled = step_cost_parts(costs, plain_setup)
    ideal = step_cost_parts(costs, cut_setup)
    if fk is not None:
        fk.modeled = dict(ideal)
    notes = list(notes) + cost_notes
    rank, world = _rank()
    config = getattr(model, "config", None)
    report = ProfileReport(
        model_id=model_id or str(getattr(config, "_name_or_path", "") or type(model).__name__),
        num_layers=facts.num_layers, boundary=k, device=str(recorder.device), clock=recorder.clock.kind,
        batch_shape=list(batch_shape), steps=len(timings[YOURS]), warmup=warmup,
        checkpointing=facts.checkpointing, lora=facts.lora, tied=facts.tied, memory_kind=memory_kind,
        yours=yours, freezekern=fk, part_costs=plain_dict(asdict(costs)), ideal=ideal,
        isolated_part_costs=plain_dict(asdict(isolated)) if isolated is not None else None,
        rank=rank, world_size=world, notes=list(notes),
    )
    if fk is not None:
        report.time_ratio = _paired_ratio(timings[CUT], timings[YOURS])
        if fk.peak_memory_bytes and yours.peak_memory_bytes:
            report.memory_ratio = fk.peak_memory_bytes / yours.peak_memory_bytes
    report.verdict = verdict(report)
    return report


def _paired_ratio(numerator: list[StepTiming], denominator: list[StepTiming]) -> float:
    """Median over rounds of t(cut) / t(yours): each round's two steps ran back to back."""
    ratios = [a.step_s / b.step_s for a, b in zip(numerator, denominator) if b.step_s > 0]
    return statistics.median(ratios) if ratios else math.nan
