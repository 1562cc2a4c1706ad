"""The ``probe`` policy: short equal-compute trials of a few boundaries choose the plan's boundary."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from freezekern.model.parts import discover
from freezekern.policy.rules import FreezePlan, cost_model
from freezekern.trials.arms import Arm
from freezekern.trials.compare import run_trials


def probe_candidates(plan: FreezePlan) -> list[int]:
    """The probe's candidates: the trace rule's boundary k*, k*/2 and 0 (every block trained), distinct."""
    k = plan.boundary
    return sorted({k, k // 2, 0}, reverse=True)


def probe_plan(
    model,
    plan: FreezePlan,
    train_batches: Sequence[dict],
    holdout_batches: Sequence[dict],
    *,
    candidates: Sequence[int] | None = None,
    budget_steps: float = 4.0,
    lr: float = 1e-4,
    tolerance: float = 0.01,
    seed: int = 0,
    progress: bool = True,
) -> FreezePlan:
    """The ``probe`` policy: short equal-compute trials of a few boundaries; the plan of the winner.

    Each candidate (default ``probe_candidates(plan)``) trains a copy of the
    model for ``budget_steps`` full-step equivalents on ``train_batches`` and
    is scored on ``holdout_batches`` (taken from the training data: a probe
    never sees the user's validation or test data). At equal compute a lower
    loss is a larger reduction per FLOP; the deepest candidate within
    ``tolerance`` (relative) of the lowest loss wins. The returned plan is
    ``plan`` with that boundary, policy "probe" and the figures in ``probe``.
    """

    candidates = sorted(set(candidates if candidates is not None else probe_candidates(plan)), reverse=True)
    if not candidates:
        raise ValueError("the probe needs at least one candidate boundary")
    bad = [c for c in candidates if not 0 <= c < plan.num_layers]
    if bad:
        raise ValueError(f"probe candidates {bad} are outside [0, {plan.num_layers - 1}]")
    arms = [Arm(f"k={k}", k, lr=lr, train_head=plan.train_head) for k in candidates]
    outcome = run_trials(model, train_batches, holdout_batches, arms, budget_steps=budget_steps, checkpoints=(1.0,),
                      seed=seed, tolerance=tolerance, progress=progress)
    rows = [{"boundary": r.arm.boundary, "loss": r.rows[-1]["heldout_loss"], "steps": r.steps,
             "step_cost": r.step_cost} for r in outcome.results]
    best = min(row["loss"] for row in rows)
    chosen = max(row["boundary"] for row in rows if row["loss"] <= best + tolerance * abs(best))
    counts = discover(model).parameter_counts()
    cost = cost_model(counts, plan.num_layers, chosen, plan.train_head, plan.train_final_norm)
    others = [row["boundary"] for row in sorted(rows, key=lambda r: r["loss"]) if row["boundary"] != chosen]
    rule = (f"probe: {len(rows)} boundaries trained {budget_steps:g} full-step equivalents each; k={chosen} is the "
            f"deepest within {tolerance:.0%} of the lowest held-out loss ({best:.4f}); the trace rule proposed "
            f"k={plan.boundary}")
    return dataclasses.replace(
        plan, policy="probe", boundary=chosen, rule=rule, runner_up=others[0] if others else None,
        probe={"rows": rows, "budget_steps": budget_steps, "lr": lr, "tolerance": tolerance,
               "baseline_loss": outcome.baseline["heldout_loss"], "trace_policy": plan.policy,
               "trace_boundary": plan.boundary, "spent_full_steps": sum(r.steps * r.step_cost
                                                                        for r in outcome.results)},
        **cost,
    )
