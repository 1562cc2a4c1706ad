"""The library's default: whether and how to freeze when the user does not say, by the run's length.

Chosen on the validation splits of the quality study v3 (``docs/results.md``,
"The default, chosen on validation"; test losses are only reported), by the
rule fixed before its finals ran (the lowest mean relative gap to each
task's best candidate), over its four tasks at two seeds each. At the one
budget the study measured, ``STUDIED_STEPS`` steps of full fine-tuning per
run (AdamW, warmup, cosine decay), full
fine-tuning had the lowest gap; among the freezing rules the trace's static
boundary had the lowest (the boundary that moves with training towards it
was lower on three tasks of four, but far higher on classify). Hence:

* a run of at most ``FULL_UP_TO`` steps does not freeze (``"none"``);
* a longer run freezes at the trace's boundary, static from the first step,
  or moving with training where ``DEFAULT_MOVES`` says so and the engine
  allows it. Lengths beyond the study are the method's claim, not measured
  here; the plan says so.

It applies where the library chooses the boundary itself from a trace (policy
gain_share or salf, no ``trained_share`` or ``flops_budget`` cap) on weights
that train in full; a boundary, share or budget the user gave, and PEFT/LoRA
adapters (the study moved and compared none), keep the user's static plan. ``FreezeKernCallback``, ``freezekern
finetune`` and ``compare`` (which arm it names the default) ask ``default_rule``.
"""

from __future__ import annotations

import dataclasses

STUDIED_STEPS = 150
# The longest run (in optimizer steps) for which the default trains in full; None: always freeze.
FULL_UP_TO: int | None = STUDIED_STEPS
# Whether the default boundary of a longer run moves with training (False: static from the first step).
DEFAULT_MOVES = False
# What the study measured, quoted by the plans the default makes.
EVIDENCE = ("full fine-tuning was best on validation (mean gap +0.2 % over four tasks, two seeds each; the best "
            "freezing rule, the static trace boundary, +4.6 %; the moving boundary +8.3 %)")

DEFAULT_RULES = ("gain_share", "salf")


def default_rule(policy: str, run_steps: int | None, *, adapters: bool = False, engine_builds_once: bool = False,
                 capped: bool = False) -> str:
    """What the default does with ``policy``'s traced boundary for a run of ``run_steps`` optimizer steps
    (None: unknown): ``"none"`` (train in full), ``"moving"`` or ``"static"``. ``adapters``: PEFT/LoRA
    weights train; ``engine_builds_once``: the engine fixes the trained set when it is built (DeepSpeed
    ZeRO), so the boundary cannot move later; ``capped``: the user capped the trained share or the step
    FLOPs (``trained_share``, ``flops_budget``), which the plan keeps from the first step."""
    if run_steps is not None and run_steps < 1:
        raise ValueError(f"run_steps must be positive, got {run_steps}")
    if policy not in DEFAULT_RULES or adapters or capped:
        return "static"
    if FULL_UP_TO is not None and run_steps is not None and run_steps <= FULL_UP_TO:
        return "none"
    return "moving" if DEFAULT_MOVES and not engine_builds_once else "static"


def default_in_words() -> str:
    """The default as a help text says it, e.g. "no freezing for runs of up to 150 steps, static beyond"."""
    beyond = "moving" if DEFAULT_MOVES else "static"
    if FULL_UP_TO is None:
        return f"{beyond} at every length"
    return f"no freezing for runs of up to {FULL_UP_TO} steps, {beyond} beyond"


def capped(plan) -> bool:
    """Whether ``plan`` keeps a cap the user set (``trained_share``, ``flops_budget``)."""
    return plan.trained_share is not None or plan.flops_budget is not None


def unfrozen_plan(trace, plan, run_steps: int):
    """The default's plan for a run too short for freezing to pay: full fine-tuning (policy "none", no cut)
    for ``trace``'s model, saying why and which boundary ``plan`` (the traced rule's) would have frozen."""
    from freezekern.policy.rules import plan as make_plan

    full = make_plan(trace, "none")
    why = (f"do not freeze: a run of {run_steps} steps is at most {FULL_UP_TO}; at {STUDIED_STEPS} steps the "
           f"quality study found that {EVIDENCE}; the "
           f"{plan.policy} boundary would have been k={plan.boundary}. To freeze anyway, fix the boundary "
           "(FreezeKernCallback(moving=False) or plan=k; freezekern finetune --static or --moving)")
    return dataclasses.replace(full, rule=why, run_steps=run_steps)


def noted(plan, decided_for: int | None):
    """``plan`` (a freezing plan the default chose for a run of ``decided_for`` steps, None: unknown) with
    ``rule`` saying that freezing at that length is past what the quality study measured."""
    if FULL_UP_TO is None or not plan.cut:
        return plan
    length = (f"a run of {decided_for} steps is longer than {FULL_UP_TO}" if decided_for is not None
              else "the run's length was unknown when the boundary was decided")
    note = (f"the default freezes: {length} (it trains runs of up to {FULL_UP_TO} steps in full: at "
            f"{STUDIED_STEPS} steps the quality study found that {EVIDENCE}); savings at longer runs are the "
            "method's claim, not measured here")
    return dataclasses.replace(plan, rule=f"{plan.rule}; {note}" if plan.rule else note,
                               run_steps=plan.run_steps if plan.run_steps is not None else decided_for)


def default_plan(trace, plan, run_steps: int | None, *, adapters: bool = False, engine_builds_once: bool = False,
                 moving: dict | None = None, rule: str | None = None):
    """The plan the default trains, from ``plan`` (static, traced on ``trace``, a DeviationTrace or a model
    summary) for a run of ``run_steps`` steps: ``unfrozen_plan``, a moving plan (``moving_plan`` with
    ``moving``'s settings, budget-aware) or ``plan`` itself, each saying in ``rule`` why where the run's
    length decided it; a plan the rule leaves to the user (``default_rule`` "static" for a fixed boundary,
    a cap, adapters) comes back unchanged. ``rule``: ``default_rule``'s answer when the caller resolved it
    already (once per run)."""
    from freezekern.policy.moving import moving_plan

    if rule is None:
        rule = default_rule(plan.policy, run_steps, adapters=adapters, engine_builds_once=engine_builds_once,
                            capped=capped(plan))
    if rule == "none":
        if run_steps is None:
            raise ValueError("the default trains in full only for a run of known length: pass run_steps")
        return unfrozen_plan(trace, plan, run_steps)
    if plan.policy not in DEFAULT_RULES or adapters or capped(plan):
        return plan
    if rule == "moving" and plan.cut:
        plan = moving_plan(plan, run_steps=run_steps, **(moving or {}))
    return noted(plan, run_steps)
