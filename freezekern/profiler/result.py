"""A profile's data: per-part rows, each setup's steps, the report, the analytic ideal and the verdict."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from freezekern.io import JsonRecord
from freezekern.policy.cost import PartCosts, StepSetup
from freezekern.profiler.setup import SetupFacts
from freezekern.profiler.step_timing import (
    StepTiming,
)

YOURS = "your setup"
CUT = "freezekern cut"


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


def plain_dict(data: dict) -> dict:
    """Tuples as lists, as JSON gives them back."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def part_costs_from_report(report: ProfileReport, isolated: bool = False) -> PartCosts | None:
    """The PartCosts a report holds: read from its steps, or (``isolated``) each part timed alone."""
    data = report.isolated_part_costs if isolated else report.part_costs
    if data is None:
        return None
    return PartCosts(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
