"""Where a training step's time goes, block by block: the user's setup as it is, beside freezekern's cut.

    report = freezekern.profile(model, batches)          # the model as the user set it up
    print(freezekern.report.profile_table(report))
    report.save("profile.json"); freezekern.report.plot_profile(report, "profile.png")

``profile`` runs a few training steps (zero_grad, forward with labels,
backward, AdamW) of the model exactly as it is given (its ``requires_grad``
flags, gradient checkpointing, PEFT adapters, ``enable_input_require_grads``)
and, alternating with them (A B B A ...), the same steps with freezekern's
cut at the same boundary k (the number of leading blocks with nothing to
train): ``freezekern.truncate.apply(model, k)``, removed again after each of
its steps. The model's parameters, flags and gradients are restored at the
end; nothing it does outlives the call.

What is measured, with module and tensor hooks (``freezekern.step_timing``),
never inferred: the forward of the embedding, every block, the final norm,
the LM head and the loss; the recomputation of checkpointed blocks; each
part's backward and whether it ran at all (a block is *reached* when a
gradient arrived at its output). Wall time on the CPU, CUDA events on a GPU.

Peak memory (``freezekern.profiling.PeakMemory``) is measured in the last
warm-up round (the first step of a process carries one-time allocations, so
the default is two warm-up rounds), not in the timed steps: on the CPU it
hands freed heap pages back to the system first, and faulting them in again
would slow the step it measures (with ``warmup=0`` the timed steps measure
it, and the report says so). The optimizer's state is created before the
first step, so no step pays for it.

The analytic ideal is ``freezekern.cost.step_cost`` (the formula of the
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
no comparison) come from ``freezekern.part_costs.measure_part_costs``, which
times each part alone, when that is asked for (``isolated_parts=True``), else
count zero.

``freezekern.profile`` (the package attribute) is this module's ``profile``.

With torch.distributed every rank profiles its own steps (the report names
the rank); nothing here is collective.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from freezekern.adapters import ModelParts, discover
from freezekern.cost import PartCosts, StepSetup, step_cost_parts
from freezekern.io import JsonRecord
from freezekern.part_costs import as_batch, measure_part_costs, trainable_of
from freezekern.profiling import PeakMemory
from freezekern.step_timing import StepRecorder, StepTiming, analyse_timeline, input_embedding, output_loss
from freezekern.training import device_of
from freezekern.truncate import active_handle, apply

__all__ = ["CUT", "YOURS", "PartRow", "ProfileReport", "SetupFacts", "SetupProfile", "StepRecorder", "StepTiming",
           "analyse_timeline", "assemble_report", "cost_setups", "describe_setup", "input_embedding",
           "measure_part_costs", "part_costs_from_report", "profile", "step_part_costs", "summarise_steps",
           "verdict"]

logger = logging.getLogger("freezekern.profile")

YOURS = "your setup"
CUT = "freezekern cut"


# -- what a setup trains ------------------------------------------------------------------------

@dataclass
class SetupFacts:
    """What a model's current setup trains and switches on (read from its flags and modules)."""

    num_layers: int
    embedding_trains: bool
    blocks_trained: list[int]  # 1-based
    final_norm_trains: bool
    head_trains: bool
    tied: bool
    checkpointing: str | None  # None | "reentrant" | "non-reentrant"
    input_grads_forced: bool  # enable_input_require_grads' hook on the embedding
    lora: bool
    trainable_params: int

    @property
    def lowest_trainable(self) -> int | None:
        """0: the embedding; 1..L: that block; L + 1: only the norm or head train; None: nothing trains."""
        if self.embedding_trains:
            return 0
        if self.blocks_trained:
            return self.blocks_trained[0]
        if self.final_norm_trains or self.head_trains:
            return self.num_layers + 1
        return None

    @property
    def frozen_prefix(self) -> int:
        """k: the number of leading blocks with nothing to train (the cut's boundary for this setup)."""
        return self.blocks_trained[0] - 1 if self.blocks_trained else self.num_layers


def _checkpointing_kind(block: nn.Module) -> str | None:
    impl = getattr(block, "checkpoint_impl", None)
    if impl is not None:
        return "reentrant" if getattr(impl, "name", "") == "REENTRANT" else "non-reentrant"
    if not getattr(block, "gradient_checkpointing", False):
        return None
    func = getattr(block, "_gradient_checkpointing_func", None)
    keywords: dict = {}
    while isinstance(func, functools.partial):
        for key, value in func.keywords.items():
            keywords.setdefault(key, value)
        func = func.func
    return "non-reentrant" if keywords.get("use_reentrant", True) is False else "reentrant"


def describe_setup(model: nn.Module, parts: ModelParts | None = None) -> SetupFacts:
    """Read what ``model`` trains now: embeddings, blocks, norm, head, checkpointing, adapters."""
    parts = parts or discover(model)
    embedding = input_embedding(model)
    forced = embedding is not None and any(
        getattr(hook, "__name__", "") == "make_inputs_require_grads" for hook in embedding._forward_hooks.values())
    lora = any("lora_" in name for name, _ in model.named_parameters())
    return SetupFacts(
        num_layers=parts.num_layers,
        embedding_trains=embedding is not None and bool(trainable_of(embedding)),
        blocks_trained=[i + 1 for i, b in enumerate(parts.blocks) if trainable_of(b)],
        final_norm_trains=parts.final_norm is not None and bool(trainable_of(parts.final_norm)),
        head_trains=bool(trainable_of(parts.lm_head)),
        tied=parts.tied,
        checkpointing=_checkpointing_kind(parts.blocks[0]),
        input_grads_forced=forced,
        lora=lora,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )


# -- reports ------------------------------------------------------------------------------------

@dataclass
class PartRow:
    """Seconds of one part over a setup's measured steps: medians, and the minima the ideal is priced with."""

    name: str
    forward_s: float
    recompute_s: float
    backward_s: float
    reached: bool
    input_grad: bool
    trainable: bool
    hooked: bool
    forward_min_s: float = math.nan
    recompute_min_s: float = math.nan
    backward_min_s: float = math.nan


@dataclass
class SetupProfile:
    """One setup's measured steps: medians, peak memory, how far its backward went."""

    label: str
    description: str
    step_s: list[float]
    step_s_median: float
    forward_s: float
    backward_s: float
    other_s: float
    loss_forward_s: float | None
    loss_backward_s: float | None
    peak_memory_bytes: int | None
    parts: list[PartRow]
    lowest_reached: int | None  # 0: the embedding output; 1..L: block; None: no block reached
    lowest_trainable: int | None
    blocks_reached: int
    blocks_trained: int
    backward_floor: int | None  # cost.StepSetup's backward_floor read from the hooks
    modeled: dict | None = None  # cost.step_cost_parts over the measured part costs
    loss_forward_min_s: float | None = None
    loss_backward_min_s: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping) -> SetupProfile:
        data = dict(data)
        data["parts"] = [PartRow(**row) for row in data["parts"]]
        return cls(**data)


@dataclass
class ProfileReport(JsonRecord):
    """The result of ``profile``: both setups, the part costs, the ideal and the verdict (JSON round-trip)."""

    model_id: str
    num_layers: int
    boundary: int
    device: str
    clock: str
    batch_shape: list[int]
    steps: int
    warmup: int
    checkpointing: str | None
    lora: bool
    tied: bool
    memory_kind: str
    yours: SetupProfile
    freezekern: SetupProfile | None = None
    part_costs: dict | None = None  # cost.PartCosts (seconds) read from the steps
    ideal: dict | None = None
    isolated_part_costs: dict | None = None  # cost.PartCosts of each part timed alone, when asked for
    time_ratio: float | None = None
    memory_ratio: float | None = None
    verdict: str = ""
    rank: int = 0
    world_size: int = 1
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Mapping) -> ProfileReport:
        data = dict(data)
        data["yours"] = SetupProfile.from_dict(data["yours"])
        if data.get("freezekern") is not None:
            data["freezekern"] = SetupProfile.from_dict(data["freezekern"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return self.verdict


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _optional_median(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _minimum(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return min(values) if values else math.nan


def summarise_steps(label: str, description: str, timings: list[StepTiming], names: list[str], hooked: list[bool],
                    facts: SetupFacts, peaks: list[int] | None = None) -> SetupProfile:
    """Medians of a setup's measured steps and how far its backward reached (1-based blocks); ``peaks``: the
    peak memory of its memory-measuring steps (default: what the timings carry)."""
    L = facts.num_layers
    trainable = [facts.embedding_trains] + [i in facts.blocks_trained for i in range(1, L + 1)] + \
        [facts.final_norm_trains, facts.head_trains]
    rows = []
    for j, name in enumerate(names):
        rows.append(PartRow(
            name=name,
            forward_s=_median([t.part_forward[j] for t in timings]),
            recompute_s=_median([t.part_recompute[j] for t in timings]),
            backward_s=_median([t.part_backward[j] for t in timings]),
            reached=any(t.reached[j] for t in timings),
            input_grad=any(t.input_grad[j] for t in timings),
            trainable=trainable[j],
            hooked=hooked[j],
            forward_min_s=_minimum([t.part_forward[j] for t in timings]),
            recompute_min_s=_minimum([t.part_recompute[j] for t in timings]),
            backward_min_s=_minimum([t.part_backward[j] for t in timings]),
        ))
    reached_blocks = [i for i in range(1, L + 1) if rows[i].reached]
    lowest = 0 if rows[0].reached else (reached_blocks[0] if reached_blocks else None)
    passed = [i for i in range(1, L + 1) if rows[i].input_grad]
    floor = (passed[0] - 1) if passed else None
    steps = [t.step_s for t in timings]
    step = _median(steps)
    forward, backward = _median([t.forward_s for t in timings]), _median([t.backward_s for t in timings])
    if not peaks:
        peaks = [t.peak_memory_bytes for t in timings if t.peak_memory_bytes is not None]
    return SetupProfile(
        label=label, description=description, step_s=steps, step_s_median=step, forward_s=forward,
        backward_s=backward, other_s=step - forward - backward,
        loss_forward_s=_optional_median([t.loss_forward_s for t in timings]),
        loss_backward_s=_optional_median([t.loss_backward_s for t in timings]),
        peak_memory_bytes=max(peaks) if peaks else None, parts=rows, lowest_reached=lowest,
        lowest_trainable=facts.lowest_trainable, blocks_reached=len(reached_blocks),
        blocks_trained=len(facts.blocks_trained), backward_floor=floor,
        loss_forward_min_s=min((t.loss_forward_s for t in timings if t.loss_forward_s is not None), default=None),
        loss_backward_min_s=min((t.loss_backward_s for t in timings if t.loss_backward_s is not None), default=None),
    )


def cost_setups(facts: SetupFacts, yours: SetupProfile | None, boundary: int) -> tuple[StepSetup, StepSetup]:
    """``cost.StepSetup`` of the user's setup (as its hooks saw it) and of freezekern's cut at ``boundary``."""
    checkpointing = facts.checkpointing is not None
    floor = yours.backward_floor if yours is not None else (0 if facts.input_grads_forced else None)
    user_k = min(facts.frozen_prefix, facts.num_layers)
    plain = StepSetup(boundary=user_k, train_head=facts.head_trains, train_embeddings=facts.embedding_trains,
                      block_weights=True, checkpointing=checkpointing, cut=False,
                      backward_floor=floor if floor is not None and floor < user_k else None)
    cut = StepSetup(boundary=boundary, train_head=facts.head_trains, train_embeddings=False, block_weights=True,
                    checkpointing=checkpointing, cut=True)
    return plain, cut


def _why_deeper(facts: SetupFacts) -> str:
    if facts.embedding_trains:
        return "the embeddings train, so the gradient must reach them"
    if facts.input_grads_forced:
        what = "gradient checkpointing" if facts.checkpointing else "PEFT"
        return (f"enable_input_require_grads (switched on with {what}) makes the embedding output require grad, "
                "so autograd differentiates every frozen block on the way down")
    return "something below the trained blocks requires grad"


def _blocks(n: int) -> str:
    return f"{n} block{'s' if n != 1 else ''}"


def verdict(report: ProfileReport) -> str:
    """The plain-language summary: how far the backward runs, what the cut saves, how close to the ideal."""
    yours, cut = report.yours, report.freezekern
    L = report.num_layers
    lines = []
    lowest = yours.lowest_reached
    if lowest is None:
        lines.append("your backward reaches no block (only the head or norm train)")
    else:
        where = "the embedding output" if lowest == 0 else f"block {lowest}"
        lines.append(f"your backward runs through {_blocks(yours.blocks_reached)} (down to {where}), "
                     f"{yours.blocks_trained} of which train")
    lowest_trained = yours.lowest_trainable
    facts_deeper = lowest is not None and lowest_trained is not None and lowest < lowest_trained
    if facts_deeper:
        wasted = (lowest_trained if lowest_trained <= L else L + 1) - max(lowest, 1)
        lines[-1] += (f": {_blocks(wasted)} below the lowest trained one (block {lowest_trained}) are "
                      "differentiated for nothing")
    if cut is not None and report.time_ratio is not None:
        memory = f", {report.memory_ratio:.2f}x the peak memory" if report.memory_ratio is not None else ""
        stop = f"block {cut.lowest_reached}" if cut.lowest_reached else "the head"
        lines.append(f"freezekern's cut at k={report.boundary} (backward stops at {stop}): "
                     f"{report.time_ratio:.2f}x the step time{memory}")
        if not facts_deeper and lowest is not None:
            lines.append("your backward already stops at the lowest trained block; the cut changes little here")
    if report.ideal is not None:
        ideal = report.ideal["total"]
        parts = [f"your step {yours.step_s_median / ideal:.2f}x it"]
        if cut is not None:
            parts.append(f"freezekern's {cut.step_s_median / ideal:.2f}x")
        lines.append(f"analytic ideal (every forward, backward of the trained parts only, priced from the measured "
                     f"parts): {ideal:.3f} s per step; " + ", ".join(parts))
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def _row_value(setup: SetupProfile | None, index: int, name: str, *, reached: bool = False) -> float | None:
    if setup is None:
        return None
    row = setup.parts[index]
    value = getattr(row, name)
    if not row.hooked or value is None or math.isnan(value) or (reached and not row.reached):
        return None
    return value


def _least(values) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def step_part_costs(yours: SetupProfile, cut: SetupProfile | None, facts: SetupFacts, boundary: int,
                    isolated: PartCosts | None = None) -> tuple[PartCosts, list[str]]:
    """``cost.PartCosts`` in seconds from the profiled steps: per part, the least over both setups' steps.

    Per block: the forward; the recomputation (``block_recompute``); the
    backward of a frozen block the gradient passes through (input gradient
    only); for the lowest trained block k+1, the cut's weight-only backward
    as its weight gradient and what the plain setup spent on top as its input
    gradient; for the blocks above, whose input and weight gradients are
    always computed together, their whole backward, booked as weight
    gradient. The head's backward is booked as input gradient when anything
    below it trains (the weight gradient otherwise). Parts no step measured
    come from ``isolated`` (``measure_part_costs``) or count zero; the notes
    say which.
    """
    L, k = facts.num_layers, boundary
    setups = [s for s in (yours, cut) if s is not None]
    notes: list[str] = []
    unmeasured: list[str] = []

    def iso(name: str, i: int | None = None) -> float:
        if isolated is None:
            return 0.0
        value = getattr(isolated, name)
        return value[i] if i is not None else value

    forward, recompute, inputs, weights = [], [], [], []
    for i in range(1, L + 1):
        f = _least(_row_value(s, i, "forward_min_s") for s in setups)
        forward.append(f if f is not None else iso("block_forward", i - 1))
        r = _least(_row_value(s, i, "recompute_min_s", reached=True) for s in setups if s.parts[i].recompute_s > 0)
        recompute.append(r if r is not None else forward[-1])
        if i not in facts.blocks_trained:
            passed = _row_value(yours, i, "backward_min_s", reached=True)
            if passed is None and i > k:
                passed = _least(_row_value(s, i, "backward_min_s", reached=True) for s in setups)
            if passed is None and i > k:  # a frozen block below k that no backward reached is priced by nothing
                unmeasured.append(f"block {i}")
            inputs.append(passed if passed is not None else iso("block_input_grad", i - 1))
            weights.append(0.0)
        elif i == k + 1:
            weight_only = [_row_value(cut, i, "backward_min_s", reached=True)]
            if not yours.parts[i].input_grad:
                weight_only.append(_row_value(yours, i, "backward_min_s", reached=True))
            w = _least(weight_only)
            if w is None:
                unmeasured.append(f"block {i} (weight-only)")
                w = iso("block_weight_grad", i - 1)
            both = _row_value(yours, i, "backward_min_s", reached=True) if yours.parts[i].input_grad else None
            inputs.append(max(0.0, both - w) if both is not None else iso("block_input_grad", i - 1))
            weights.append(w)
        else:
            both = _least(_row_value(s, i, "backward_min_s", reached=True) for s in setups)
            if both is None:
                unmeasured.append(f"block {i}")
                both = iso("block_input_grad", i - 1) + iso("block_weight_grad", i - 1)
            inputs.append(0.0)
            weights.append(both)
    head = L + 2
    head_forward = _least(_row_value(s, head, "forward_min_s") for s in setups)
    head_backward = _least(_row_value(s, head, "backward_min_s", reached=True) for s in setups)
    below = facts.embedding_trains or bool(facts.blocks_trained) or facts.final_norm_trains
    if head_backward is None:
        unmeasured.append("lm_head")
        head_backward = iso("head_input_grad") + iso("head_weight_grad")
    embedding_forward = _least(_row_value(s, 0, "forward_min_s") for s in setups)
    embedding_grad = _row_value(yours, 0, "backward_min_s", reached=True) if facts.embedding_trains else 0.0
    loss = _least(s.loss_forward_min_s for s in setups)
    loss_backward = _least(s.loss_backward_min_s for s in setups)
    if unmeasured:
        notes.append(f"not measured in the steps ({', '.join(unmeasured[:4])}{' ...' if len(unmeasured) > 4 else ''}): "
                     + ("priced from isolated timings" if isolated is not None else "counted as zero in the ideal"))
    costs = PartCosts(
        block_forward=tuple(forward), block_input_grad=tuple(inputs), block_weight_grad=tuple(weights),
        head_forward=head_forward if head_forward is not None else iso("head_forward"),
        head_input_grad=head_backward if below else 0.0,
        head_weight_grad=0.0 if below else head_backward,
        embedding_forward=embedding_forward if embedding_forward is not None else iso("embedding_forward"),
        embedding_grad=embedding_grad if embedding_grad is not None else iso("embedding_grad"),
        loss=loss if loss is not None else iso("loss"),
        loss_backward=loss_backward if loss_backward is not None else (iso("loss_backward") or 0.0),
        block_recompute=tuple(recompute),
    )
    return costs, notes


# -- the profile ------------------------------------------------------------------------------

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


def _train_step(model, batch, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)
    loss = output_loss(out)
    if loss is None:
        raise ValueError(f"{type(model).__name__} returned no loss for a batch with labels")
    loss.backward()
    optimizer.step()


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
                                       frozen_adapters="freeze")
                try:
                    with PeakMemory(device) if measure_memory else nullcontext() as memory:
                        recorder.begin_step()
                        _train_step(model, batch, optimizer)
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
        yours=yours, freezekern=fk, part_costs=_plain(asdict(costs)), ideal=ideal,
        isolated_part_costs=_plain(asdict(isolated)) if isolated is not None else None,
        rank=rank, world_size=world, notes=list(notes),
    )
    if fk is not None:
        report.time_ratio = _paired_ratio(timings[CUT], timings[YOURS])
        if fk.peak_memory_bytes and yours.peak_memory_bytes:
            report.memory_ratio = fk.peak_memory_bytes / yours.peak_memory_bytes
    report.verdict = verdict(report)
    return report


def _plain(data: dict) -> dict:
    """Tuples as lists, as JSON gives them back."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def part_costs_from_report(report: ProfileReport, isolated: bool = False) -> PartCosts | None:
    """The PartCosts a report holds: read from its steps, or (``isolated``) each part timed alone."""
    data = report.isolated_part_costs if isolated else report.part_costs
    if data is None:
        return None
    return PartCosts(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _paired_ratio(numerator: list[StepTiming], denominator: list[StepTiming]) -> float:
    """Median over rounds of t(cut) / t(yours): each round's two steps ran back to back."""
    ratios = [a.step_s / b.step_s for a, b in zip(numerator, denominator) if b.step_s > 0]
    return statistics.median(ratios) if ratios else math.nan


# -- the setups users build by hand (for the command line) ----------------------------------------

def prepare_setup(model: nn.Module, *, boundary: int | None = None, plan=None, lora: bool = False, lora_r: int = 16,
                  gradient_checkpointing: bool = False, reentrant: bool = False,
                  parts: ModelParts | None = None) -> nn.Module:
    """Set ``model`` up the way users do without freezekern; returns the model to train (a PeftModel with LoRA).

    ``boundary`` k or ``plan``: plain ``requires_grad_(False)`` on what the
    plan (or freezekern.apply(model, k)) would freeze, without any cut;
    ``lora``: PEFT LoRA (rank ``lora_r``, every linear of the block) on the
    blocks above k, which freezes every base weight; ``gradient_checkpointing``:
    Hugging Face activation checkpointing with ``enable_input_require_grads``,
    as the Trainer and PEFT switch it on (``reentrant`` picks the reentrant
    implementation; the default is transformers' non-reentrant one).
    """
    from freezekern.training import enable_checkpointing
    from freezekern.truncate import trainable_parameters

    parts = parts or discover(model)
    k = 0
    if plan is not None or boundary is not None:
        handle = apply(model, plan if plan is not None else int(boundary), parts=parts)
        trainable = {id(p) for p in trainable_parameters(model)}
        k = handle.boundary
        handle.remove()
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
    if lora:
        from peft import LoraConfig, get_peft_model

        from freezekern.integrations.peft import block_linear_names, layers_to_transform

        config = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                            target_modules=block_linear_names(model),
                            layers_to_transform=layers_to_transform(k, parts.num_layers),
                            layers_pattern=parts.blocks_path.rsplit(".", 1)[-1], task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    if gradient_checkpointing:
        enable_checkpointing(model, use_reentrant=True if reentrant else None)
    return model


def discover_for_command_line(model: nn.Module, layers: str | None) -> ModelParts:
    """``discover`` whose error names the command line's ``--layers`` override."""
    try:
        return discover(model, layers=layers)
    except ValueError as exc:
        if layers is not None:
            raise
        raise ValueError(f"{exc}; on the command line pass --layers PATH, the dotted path of the model's block "
                         "list (e.g. --layers model.layers or --layers transformer.h)") from None


def check_profile_args(args) -> None:
    """Refuse bad command-line values before any model is loaded."""
    if args.steps < 2:
        raise ValueError(f"--steps must be at least 2 (a median and an alternation need two), got {args.steps}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.seq_len < 2 or args.batch_size < 1:
        raise ValueError("--batch-size must be positive and --seq-len at least 2")
    if args.freeze is not None and args.freeze < 0:
        raise ValueError(f"--freeze must be >= 0, got {args.freeze}")
    if args.lora_r < 1:
        raise ValueError(f"--lora-r must be positive, got {args.lora_r}")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    if args.plan is not None:
        from pathlib import Path

        if not Path(args.plan).is_file():
            raise FileNotFoundError(f"plan file {args.plan} does not exist")
    if args.lora:
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise ValueError("--lora needs peft: pip install 'freezekern[peft]'")


def profile_command(args, model, tokenizer) -> ProfileReport:
    """``freezekern profile``: build the setup the flags describe, profile it, print and write the report."""
    from pathlib import Path

    from freezekern.data import make_batches
    from freezekern.policy import FreezePlan
    from freezekern.report import plot_profile, profile_table

    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    parts = discover_for_command_line(model, args.layers)
    plan = FreezePlan.load(args.plan) if args.plan else None
    if args.freeze is not None and args.freeze > parts.num_layers:
        raise ValueError(f"--freeze {args.freeze} exceeds the model's {parts.num_layers} blocks")
    model = prepare_setup(model, boundary=args.freeze, plan=plan, lora=args.lora, lora_r=args.lora_r,
                          gradient_checkpointing=args.gradient_checkpointing, reentrant=args.reentrant, parts=parts)
    if args.lora:
        layers = f"base_model.model.{parts.blocks_path}" if args.layers else None
        parts = discover_for_command_line(model, layers)
    batches = make_batches(tokenizer, args.data, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                           num_tokens=2 * args.batch_size * args.seq_len)
    report = profile(model, batches, steps=args.steps, warmup=args.warmup, compare=not args.no_compare,
                     parts=parts, model_id=args.model or None)
    out = Path(args.out)
    report.save(out / "profile.json")
    plot_profile(report, out / "profile.png")
    print(profile_table(report))
    print(f"\nwrote {out / 'profile.json'}, {out / 'profile.png'}")
    return report
