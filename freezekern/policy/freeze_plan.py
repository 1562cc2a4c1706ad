"""``FreezePlan``: where to cut, why, and what it costs (plain data that round-trips through JSON)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

from freezekern.io import JsonRecord
from freezekern.policy.cost import StepSetup, flop_costs, step_fraction

PLAN_FILE = "freezekern_plan.json"  # where a plan is saved beside a checkpoint or a trained model


@dataclass
class FreezePlan(JsonRecord):
    """Where to cut: embeddings and blocks 1..``boundary`` frozen, the rest trained.

    Plain data; ``to_json``/``from_json`` round-trip it, so a plan saved with a
    checkpoint restores the same boundary. ``gains``/``reductions`` are indexed
    by layer 0..L (NaN-free JSON: undefined entries are None). ``cut=False``
    (policy "none") means full fine-tuning: nothing is frozen, not even the
    embeddings. ``rule`` says in words why this boundary; ``runner_up`` is the
    next-best candidate at least two blocks away; ``probe`` holds the figures
    of a probe (``freezekern.trials.probe_plan``) when one chose the boundary.
    """

    policy: str
    boundary: int
    num_layers: int
    train_head: bool
    train_final_norm: bool
    tied: bool
    model_id: str
    fingerprint: str
    backward_fraction: float
    step_flops_fraction: float
    trainable_params: int
    total_params: int
    metric: str | None = None
    deviations: list[float] | None = None
    reductions: list[float | None] | None = None
    gains: list[float | None] | None = None
    fit: dict | None = None
    candidates: list[int] | None = None
    trained_share: float | None = None
    min_trainable: int = 1
    notes: list[str] = field(default_factory=list)
    cut: bool = True
    rule: str = ""
    runner_up: int | None = None
    flops_budget: float | None = None
    gain_share: float | None = None
    probe: dict | None = None
    moving: dict | None = None  # a boundary that moves with training: MovingSchedule fields, ``end`` = boundary
    run_steps: int | None = None  # the run length a budget-aware decision was made for

    @classmethod
    def from_dict(cls, data: Mapping):
        data = dict(data)
        if "budget" in data:  # the name of trained_share in plans saved by freezekern 0.1
            data.setdefault("trained_share", data.pop("budget"))
        return cls(**data)

    @property
    def trainable_blocks(self) -> list[int]:
        """1-based indices of the blocks that train."""
        return list(range(self.boundary + 1, self.num_layers + 1))

    def to_peft_config(self, **lora_kwargs):
        """A ``peft.LoraConfig`` with adapters in the trained blocks only (``model=`` to read the block list's
        name); see ``freezekern.policy.lora.lora_config_for_plan``."""
        from freezekern.policy.lora import to_peft_config

        return to_peft_config(self, **lora_kwargs)

    @property
    def budget(self) -> float | None:
        """Deprecated name of ``trained_share``."""
        warnings.warn("FreezePlan.budget is deprecated: use trained_share", DeprecationWarning, stacklevel=2)
        return self.trained_share

    def __str__(self) -> str:
        head = "trained" if self.train_head else ("frozen (tied to the input embedding)" if self.tied else "frozen")
        if not self.cut:
            lines = [f"FreezePlan[{self.policy}] for {self.model_id}",
                     "  full fine-tuning: nothing frozen, no cut (embeddings, every block, norm and head train)"]
        else:
            lines = [
                f"FreezePlan[{self.policy}{'/' + self.metric if self.metric else ''}] for {self.model_id}",
                f"  freeze: embeddings + blocks 1..{self.boundary} of {self.num_layers}"
                + (" by the end of the run" if self.moving else "") if self.boundary
                else "  freeze: embeddings only (boundary 0: every block trains, the backward stops at block 1)",
                f"  train:  blocks {self.boundary + 1}..{self.num_layers}" if self.boundary < self.num_layers
                else "  train:  no blocks",
                f"          final norm {'trained' if self.train_final_norm else 'frozen'}, LM head {head}",
            ]
        if self.rule:
            lines.append(f"  why:    {self.rule}")
        if self.runner_up is not None:
            lines.append(f"          runner-up: boundary {self.runner_up}")
        if self.moving:
            m = self.moving
            lines.append(f"  moves:  from k={m['start']} (until {m['begin']:.0%} of the run) bottom-up to "
                         f"k={self.boundary} (at {m['finish']:.0%})"
                         + (f" over a run of {self.run_steps} steps" if self.run_steps else "")
                         + (f"; a settled block freezes early (settle {m['settle']:g})" if m.get("settle") else ""))
        limits = []
        if self.trained_share is not None:
            limits.append(f"at most {self.trained_share:.0%} of the blocks trained")
        if self.flops_budget is not None:
            limits.append(f"step FLOPs at most {self.flops_budget:.0%} of full fine-tuning")
        if limits:
            lines.append(f"  limits: {'; '.join(limits)}")
        if self.probe:
            lines.append("  probe:  " + ", ".join(f"k={row['boundary']}: {row['loss']:.4f}" for row in self.probe["rows"])
                         + f" (held-out loss after {self.probe['budget_steps']:g} full-step equivalents each)")
        lines += [
            f"  backward through {self.backward_fraction:.1%} of the blocks; "
            f"estimated step FLOPs {self.step_flops_fraction:.1%} of full fine-tuning"
            + (" (at the final boundary)" if self.moving else ""),
            f"  trainable parameters: {self.trainable_params:,} of {self.total_params:,} "
            f"({self.trainable_params / max(self.total_params, 1):.1%})",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def summary_field(source, name: str):
    if isinstance(source, Mapping):
        return source[name]
    return getattr(source, name)


def cost_model(parameter_counts: Mapping, num_layers: int, boundary: int, train_head: bool,
               train_final_norm: bool, cut: bool = True) -> dict:
    """Backward fraction, estimated step-FLOPs fraction (``freezekern.policy.cost``) and trainable parameters."""
    if not cut:
        return {"backward_fraction": 1.0, "step_flops_fraction": 1.0,
                "trainable_params": int(parameter_counts["total"]), "total_params": int(parameter_counts["total"])}
    trainable = sum(parameter_counts["blocks"][boundary:])
    if train_final_norm:
        trainable += parameter_counts["final_norm"]
    if train_head:
        trainable += parameter_counts.get("lm_head_trainable", parameter_counts["lm_head"])
    setup = StepSetup(boundary=boundary, train_head=train_head)
    return {
        "backward_fraction": (num_layers - boundary) / num_layers,
        "step_flops_fraction": step_fraction(flop_costs(parameter_counts), setup),
        "trainable_params": int(trainable),
        "total_params": int(parameter_counts["total"]),
    }
