"""Equal-compute trials of freeze boundaries: the cost-benefit curve on the user's own data.

Each *arm* (a boundary, or full fine-tuning, optionally LoRA above the
boundary or the prefix cache) trains a fresh copy of the same model under the
same compute budget and is scored on held-out batches at common checkpoints
of that budget. The budget is counted in *full-step equivalents*: estimated
training FLOPs (``freezekern.policy.cost``, the plan's cost model) divided by the
FLOPs of one full fine-tuning step, so an arm whose step costs half as much
takes twice the steps. ``budget_seconds`` counts measured training seconds
instead (evaluation excluded).

    result = freezekern.compare(model, train_batches, heldout_batches, plan=plan, budget_steps=20)
    print(freezekern.trials.format_table(result))          # the plan's boundary, its runner-up, half, full

    result = freezekern.trials.run_trials(model, train_batches, heldout_batches,
                                          [Arm("full", None), Arm("k=12", 12, lr=3e-4)], budget_steps=20)

Arms are defined in ``freezekern.trials.arms`` and trained by
``freezekern.trials.engine.train_arm``; ``freezekern.trials.probe`` uses the
same engine on a few candidate boundaries to choose one (the ``probe``
policy).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from freezekern.model.parts import discover
from freezekern.model.training import evaluate
from freezekern.policy.default import capped, default_rule
from freezekern.policy.moving import DEFAULT_MOVING, moving_plan
from freezekern.policy.rules import FreezePlan
from freezekern.trials.arms import DEFAULT_CHECKPOINTS, Arm, ArmResult, arm_step_cost
from freezekern.trials.engine import train_arm
from freezekern.trials.schedule import Schedule


@dataclass
class CompareResult:
    """Every arm's curve, the starting point and the recommendation (plain data, JSON-ready)."""

    results: list[ArmResult]
    baseline: dict
    budget_steps: float | None
    budget_seconds: float | None
    tolerance: float
    recommended: str | None = None
    reason: str = ""
    to_quality: dict | None = None  # arm name -> compute to reach full fine-tuning's best loss (``compute_to_quality``)
    schedule: dict | None = None

    def to_dict(self) -> dict:
        return {"results": [r.to_dict() for r in self.results], "baseline": self.baseline,
                "budget_steps": self.budget_steps, "budget_seconds": self.budget_seconds,
                "tolerance": self.tolerance, "recommended": self.recommended, "reason": self.reason,
                "to_quality": self.to_quality, "schedule": self.schedule}

    @classmethod
    def from_dict(cls, data: dict) -> CompareResult:
        data = dict(data)
        data["results"] = [ArmResult.from_dict(r) for r in data["results"]]
        return cls(**data)


def compute_to_reach(rows: Sequence[dict], target: float, baseline: float | None = None, *,
                     metric: str = "heldout_loss", axis: str = "flops") -> float | None:
    """The compute (``axis`` of the rows) at which ``metric`` first reaches ``target``, or None if never.

    Linear between checkpoints, from (0, ``baseline``) when given; rows in
    budget order.
    """
    points = ([(0.0, baseline)] if baseline is not None else []) + [(r[axis], r[metric]) for r in rows]
    for i, (x, y) in enumerate(points):
        if y <= target:
            if i == 0:
                return x
            x0, y0 = points[i - 1]
            return x0 + (x - x0) * (y0 - target) / (y0 - y) if y0 != y else x
    return None


def compute_to_quality(results: Sequence[ArmResult], baseline: float | None, *, reference: str | None = None,
                       metric: str = "heldout_loss") -> dict | None:
    """Per arm, the compute it needs to reach the reference arm's best ``metric`` (the savings-at-equal-quality
    figure): ``{"target", "reference", name: {"flops", "share"}}``; ``share`` is that compute over the reference's own
    compute to its best (None: not reached within the budget). The reference is full fine-tuning by default."""
    by_name = {r.arm.name: r for r in results if r.rows}
    if reference is None:
        reference = next((r.arm.name for r in results if r.arm.boundary is None and not r.arm.lora), None)
    if reference not in by_name:
        return None
    ref_rows = by_name[reference].rows
    best = min(ref_rows, key=lambda row: row[metric])
    target = best[metric]
    ref_compute = compute_to_reach(ref_rows, target, baseline, metric=metric)
    out: dict = {"target": target, "reference": reference}
    for name, r in by_name.items():
        spent = compute_to_reach(r.rows, target, baseline, metric=metric)
        out[name] = {"flops": spent, "share": spent / ref_compute if spent is not None and ref_compute else None}
    return out


def recommend(results: Sequence[ArmResult], tolerance: float, metric: str = "heldout_loss") -> tuple[str, str]:
    """The cheapest arm whose final ``metric`` is within ``tolerance`` (relative) of the best arm's.

    Cheapest: lowest estimated step cost (the most blocks frozen); ties by name.
    """
    finals = {r.arm.name: r.rows[-1][metric] for r in results if r.rows}
    if not finals:
        raise ValueError("no arm finished a checkpoint")
    best_name = min(finals, key=finals.get)
    best = finals[best_name]
    within = [r for r in results if r.rows and finals[r.arm.name] <= best + tolerance * abs(best)]
    chosen = min(within, key=lambda r: (r.step_cost, r.arm.name))
    if chosen.arm.name == best_name:
        reason = f"{best_name} reached the lowest {metric} ({best:.4f})"
    else:
        reason = (f"{chosen.arm.name} ({finals[chosen.arm.name]:.4f}) is within {tolerance:.0%} of the best, "
                  f"{best_name} ({best:.4f}), at {chosen.step_cost:.0%} of a full step's FLOPs per step")
    return chosen.arm.name, reason


def run_trials(
    model,
    train_batches: Sequence[dict],
    heldout_batches: Sequence[dict],
    arms: Sequence[Arm],
    *,
    budget_steps: float | None = None,
    budget_seconds: float | None = None,
    checkpoints: Sequence[float] = DEFAULT_CHECKPOINTS,
    seed: int = 0,
    tolerance: float = 0.02,
    checkpointing: bool = False,
    done: dict[str, ArmResult] | None = None,
    on_result: Callable[[ArmResult], None] | None = None,
    progress: bool = True,
    schedule: Schedule | None = None,
) -> CompareResult:
    """Train every arm at equal compute and recommend the cheapest within ``tolerance`` of the best.

    ``done``: results already computed (by ``Arm.key()``), reused instead of
    retrained (resuming); ``on_result`` is called with each new result.
    """
    if not arms:
        raise ValueError("compare needs at least one arm")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must lie in [0, 1), got {tolerance}")
    parts = discover(model)
    if budget_steps is not None:
        too_small = [a.name for a in arms if arm_step_cost(a, parts, checkpointing=checkpointing) > budget_steps]
        if too_small:
            raise ValueError(f"the budget of {budget_steps:g} full-step equivalents is smaller than one step of "
                             f"{', '.join(too_small)}: raise the budget")
    baseline = {"heldout_loss": evaluate(model, heldout_batches)}
    done = dict(done or {})
    results = []
    for index, arm in enumerate(arms):
        key = f"{arm.key()}|seed={seed}"
        if key in done:
            result = dataclasses.replace(done[key], arm=arm)
        else:
            if progress:
                print(f"[{index + 1}/{len(arms)}] {arm.name}", file=sys.stderr, flush=True)
            result = train_arm(model, arm, train_batches, {"heldout": heldout_batches}, budget_steps=budget_steps,
                               budget_seconds=budget_seconds, checkpoints=checkpoints, seed=seed,
                               checkpointing=checkpointing, progress=progress, schedule=schedule)
            if on_result is not None:
                on_result(result)
        results.append(result)
    name, reason = recommend(results, tolerance)
    return CompareResult(results=results, baseline=baseline, budget_steps=budget_steps,
                         budget_seconds=budget_seconds, tolerance=tolerance, recommended=name, reason=reason,
                         to_quality=compute_to_quality(results, baseline["heldout_loss"]),
                         schedule=(schedule or Schedule()).to_dict())


def arms_for(plan: FreezePlan | None, boundaries="auto", *, num_layers: int | None = None, lora: bool = False,
             lr: float | None = None, moving: bool = True) -> list[Arm]:
    """The arms ``compare`` trains.

    ``boundaries="auto"``: the plan's boundary, its runner-up, freeze half and
    full fine-tuning, and (``moving``, without LoRA) a boundary that moves
    from 0 to the plan's over the run (the plan's own schedule when it moves);
    or a list of boundaries (ints; None or "full" for full fine-tuning).
    ``lora``: LoRA above each boundary instead (full fine-tuning becomes LoRA
    on every block). ``lr``: every arm's learning rate (default 1e-4, LoRA
    1e-3).
    """
    num_layers = num_layers if num_layers is not None else plan.num_layers
    if boundaries == "auto":
        if plan is None:
            raise ValueError("boundaries='auto' needs a plan (freezekern.plan(trace))")
        chosen = [(f"{plan.policy} (k={plan.boundary})", plan.boundary)]
        if plan.runner_up is not None:
            chosen.append((f"runner-up (k={plan.runner_up})", plan.runner_up))
        chosen += [(f"freeze half (k={num_layers // 2})", num_layers // 2), ("full fine-tuning", None)]
    else:
        chosen = [("full fine-tuning", None) if k in (None, "full") else (f"k={int(k)}", int(k)) for k in boundaries]
    arms, seen = [], set()
    for name, k in chosen:
        if k is not None and not 0 <= k < num_layers:
            raise ValueError(f"boundary {k} is outside [0, {num_layers - 1}] (at least one block must train)")
        if lora:
            k = 0 if k is None else k
            name = "LoRA on every block" if name == "full fine-tuning" else f"LoRA above {name}"
        if (k, lora) in seen:
            continue
        seen.add((k, lora))
        arms.append(Arm(name, k, lr=lr if lr is not None else (1e-3 if lora else 1e-4), lora=lora))
    if boundaries == "auto" and not lora and plan.cut and (moving or plan.moving) and plan.boundary > 0:
        settings = dict(plan.moving) if plan.moving else dict(DEFAULT_MOVING)
        settings = {k: v for k, v in settings.items() if v is not None}
        name = f"moving (k={settings['start']}->{plan.boundary})"
        arms.insert(1, Arm(name, plan.boundary, lr=lr if lr is not None else 1e-4, moving=settings))
    return arms


def compare(
    model,
    train_batches: Sequence[dict],
    heldout_batches: Sequence[dict],
    *,
    plan: FreezePlan | None = None,
    boundaries="auto",
    lora: bool = False,
    lr: float | None = None,
    moving: bool = True,
    **trial_kwargs,
) -> CompareResult:
    """The cost-benefit curve of a few boundaries on the user's data, at equal compute.

    Trains the arms of ``arms_for(plan, boundaries, lora=, lr=, moving=)`` with
    ``run_trials`` (``budget_steps`` or ``budget_seconds``, ``checkpoints``,
    ``tolerance``, ``seed``, ``schedule`` (warmup, decay, weight decay),
    ``done``/``on_result`` for resuming) and
    recommends the cheapest arm within ``tolerance`` of the best final
    held-out loss.
    """
    parts = discover(model)
    arms = arms_for(plan, boundaries, num_layers=parts.num_layers, lora=lora, lr=lr, moving=moving)
    if trial_kwargs.get("budget_steps") is not None:
        arms = [_fit_to_budget(arm, plan, parts, trial_kwargs["budget_steps"]) for arm in arms]
        arms = [arm for arm in arms if arm is not None]
    if boundaries == "auto" and not lora:
        steps = trial_kwargs.get("budget_steps")
        arms = _mark_default(arms, plan, run_steps=max(int(steps), 1) if steps is not None else None)
    return run_trials(model, train_batches, heldout_batches, arms, **trial_kwargs)


def _mark_default(arms: list[Arm], plan: FreezePlan, run_steps: int | None = None) -> list[Arm]:
    """The arm ``FreezeKernCallback()`` would train with ``plan``'s policy for a run of ``run_steps`` steps
    (``default_rule``) named so ("..., default)"): full fine-tuning where the run is too short for freezing
    to pay, the moving one where the default moves and the budget affords a move, else the static one at
    the plan's boundary."""
    if not plan.cut:
        return arms
    rule = default_rule(plan.policy, run_steps, capped=capped(plan))
    full = [a for a in arms if a.boundary is None and not a.lora]
    moving = [a for a in arms if a.moving is not None]
    static = [a for a in arms if a.moving is None and not a.lora and a.boundary == plan.boundary]
    chosen = full if rule == "none" else moving if rule == "moving" and moving else static
    if not chosen:
        return arms
    marked = dataclasses.replace(chosen[0], name=chosen[0].name[:-1] + ", default)"
                                 if chosen[0].name.endswith(")") else chosen[0].name + " (default)")
    return [marked if a is chosen[0] else a for a in arms]


def _fit_to_budget(arm: Arm, plan: FreezePlan, parts, budget_steps: float) -> Arm | None:
    """A moving arm made budget-aware (``moving_plan``) for the steps the budget buys at its final boundary;
    None when the budget is too short for any move (the static arm at the plan's boundary covers it)."""
    if arm.moving is None or plan.moving:
        return arm
    steps = int(budget_steps / arm_step_cost(dataclasses.replace(arm, moving=None), parts))
    fitted = moving_plan(dataclasses.replace(plan, moving=None, run_steps=None), run_steps=max(steps, 1),
                         **{k: v for k, v in arm.moving.items() if k != "settle"})
    if not fitted.moving:
        return None
    name = f"moving (k={fitted.moving['start']}->{plan.boundary})"
    return dataclasses.replace(arm, name=name, moving={k: v for k, v in fitted.moving.items() if v is not None})


def format_table(result: CompareResult, metric: str = "heldout_loss") -> str:
    """Held-out loss of every arm at each checkpoint, with step cost and the recommendation marked."""
    fractions = [row["fraction"] for row in result.results[0].rows] if result.results else []
    unit = "full steps" if result.budget_steps is not None else "s"
    budget = result.budget_steps if result.budget_steps is not None else result.budget_seconds
    head = f"{'arm':<22}{'step cost':>10}{'steps':>7}" + "".join(f"{f * budget:>10.4g}" for f in fractions)
    lines = [f"held-out loss at equal compute (budget {budget:g} {unit}; before training: "
             f"{result.baseline['heldout_loss']:.4f})", head + f"  ({unit})"]
    for r in result.results:
        mark = "  <- recommended" if r.arm.name == result.recommended else ""
        values = "".join(f"{row[metric]:>10.4f}" for row in r.rows)
        lines.append(f"{r.arm.name:<22}{r.step_cost:>10.2f}{r.steps:>7}{values}{mark}")
    quality = result.to_quality
    if quality:
        shares = [f"{name} {value['share']:.0%}" if value["share"] is not None else f"{name} not reached"
                  for name, value in quality.items() if isinstance(value, dict)]
        lines.append(f"compute to reach {quality['reference']}'s best held-out loss ({quality['target']:.4f}), as a "
                     f"share of its own: " + ", ".join(shares))
    if result.reason:
        lines.append(f"recommended: {result.recommended}: {result.reason}")
    return "\n".join(lines)
