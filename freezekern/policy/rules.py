"""Selection policy: scaling-law fit of the trace, per-layer gains, the freeze boundary.

Definitions follow docs/method.md (freezekern's documented reconstruction):

* the depth law and the gains: ``freezekern.policy.depth_law``;
* ``salf``: the candidate with the largest gain (ties to the deeper layer);
  when no gain reaches ``MIN_MOVE_SHARE`` of the drop D_s - D_L the trace
  has no semantic move and the plan falls back to freezing half the blocks;
* ``gain_share`` (the default): the deepest candidate whose trained layers
  hold at least a share q of the total positive gain, with salf's fallback;
* ``flops``: the salf choice among candidates whose estimated step FLOPs are
  at most a share of full fine-tuning's (``freezekern.policy.cost``);
* ``reduction`` (argmax r_l), ``fixed``, ``fraction`` and ``none`` (full
  fine-tuning: nothing frozen, no cut) for baselines.

Every rule is invariant under D -> c D (c > 0) and D -> D + c. The probe
rule, which trains, lives in ``freezekern.trials``. This module knows traces
and plain model summaries only.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict

from freezekern.policy.cost import StepSetup, flop_costs, step_fraction
from freezekern.policy.depth_law import (
    TRANSIENT_RATIO,
    fit_scaling_law,
    layer_gains,
    move_is_significant,
    regime_start,
)
from freezekern.policy.freeze_plan import PLAN_FILE, FreezePlan, cost_model, summary_field

POLICIES = ("salf", "gain_share", "flops", "reduction", "fixed", "fraction", "none")
TRACE_POLICIES = ("salf", "gain_share", "flops", "reduction")
FALLBACK_FROZEN_SHARE = 0.5
DEFAULT_GAIN_SHARE = 0.9
# chosen on the validation splits of the quality study (docs/results.md); "salf" is the paper's rule
DEFAULT_POLICY = "gain_share"

__all__ = ["DEFAULT_POLICY", "PLAN_FILE", "POLICIES", "TRACE_POLICIES", "FreezePlan", "cost_model", "plan"]


def _renamed(new, old, new_name: str, old_name: str):
    if old is None:
        return new
    if new is not None:
        raise TypeError(f"pass {new_name} only ({old_name} is its deprecated name)")
    warnings.warn(f"plan(..., {old_name}=) is deprecated: use {new_name}=", DeprecationWarning, stacklevel=3)
    return old


def _best(score: list[float], candidates: list[int]) -> int:
    best = candidates[0]
    for layer in candidates:
        if score[layer] >= score[best]:  # ties go to the deeper layer
            best = layer
    return best


def _runner_up(score: list[float], candidates: list[int], chosen: int) -> int | None:
    others = [c for c in candidates if abs(c - chosen) >= 2]
    return _best(score, others) if others else None


def _gain_share_boundary(gains: list[float], candidates: list[int], share: float) -> tuple[int, float]:
    positive = [max(g, 0.0) if not math.isnan(g) else 0.0 for g in gains]
    total = sum(positive)
    if total <= 0:
        return candidates[0], 1.0
    for layer in sorted(candidates, reverse=True):
        held = sum(positive[layer + 1:]) / total
        if held >= share:
            return layer, held
    return candidates[0], sum(positive[candidates[0] + 1:]) / total


def plan(
    trace,
    policy: str = DEFAULT_POLICY,
    *,
    trained_share: float | None = None,
    min_trainable: int = 1,
    boundary: int | None = None,
    frozen_share: float | None = None,
    flops_budget: float | None = None,
    gain_share: float | None = None,
    train_head: bool | None = None,
    train_final_norm: bool = True,
    budget: float | None = None,
    n_frozen: int | None = None,
    fraction: float | None = None,
) -> FreezePlan:
    """Choose the freeze boundary for a traced model.

    ``trace``: a DeviationTrace (all policies) or a model summary mapping with
    num_layers, parameter_counts, fingerprint, tied, model_id (policies that
    need no trace: fixed, fraction, none).

    ``trained_share`` in (0, 1]: at most ceil(share * L) blocks train (trace
    policies). ``boundary``: the number of frozen blocks for ``fixed``;
    ``frozen_share`` in [0, 1] the share frozen for ``fraction``;
    ``flops_budget`` in (0, 1] the step-FLOPs share of full fine-tuning for
    ``flops``; ``gain_share`` q in (0, 1] for ``gain_share`` (default 0.9).
    ``train_head`` defaults to True unless the head is tied to the input
    embedding. ``budget``, ``n_frozen`` and ``fraction`` are the deprecated
    names of ``trained_share``, ``boundary`` and ``frozen_share``.
    """
    trained_share = _renamed(trained_share, budget, "trained_share", "budget")
    boundary = _renamed(boundary, n_frozen, "boundary", "n_frozen")
    frozen_share = _renamed(frozen_share, fraction, "frozen_share", "fraction")
    _check_arguments(policy, trained_share, flops_budget, gain_share, min_trainable)
    num_layers = int(summary_field(trace, "num_layers"))
    tied = bool(summary_field(trace, "tied"))
    counts = summary_field(trace, "parameter_counts")
    cut = policy != "none"
    head_trains = True if not cut else ((not tied) if train_head is None else bool(train_head))
    notes: list[str] = []
    if tied and head_trains and cut:
        notes.append("head tied to the input embedding is trained through its output use only; the cut stays")
    extra: dict = {}
    runner_up = None
    if policy in TRACE_POLICIES:
        boundary, runner_up, rule, extra = _trace_rule(trace, policy, num_layers, counts, head_trains, notes,
                                                       trained_share=trained_share, min_trainable=min_trainable,
                                                       flops_budget=flops_budget, gain_share=gain_share)
        if policy == "gain_share" and gain_share is None:
            gain_share = DEFAULT_GAIN_SHARE
    else:
        boundary, rule = _asked_rule(policy, boundary, frozen_share, num_layers)
    if not 0 <= boundary <= num_layers:
        raise ValueError(f"boundary {boundary} is outside [0, {num_layers}]")
    if policy in ("fixed", "fraction") and num_layers - boundary < min_trainable:
        raise ValueError(
            f"freezing {boundary} of {num_layers} blocks leaves fewer than min_trainable={min_trainable} trained"
        )
    cost = cost_model(counts, num_layers, boundary, head_trains, train_final_norm, cut=cut)
    return FreezePlan(
        policy=policy,
        boundary=boundary,
        num_layers=num_layers,
        train_head=head_trains,
        train_final_norm=True if not cut else train_final_norm,
        tied=tied,
        model_id=str(summary_field(trace, "model_id")),
        fingerprint=str(summary_field(trace, "fingerprint")),
        trained_share=trained_share,
        min_trainable=min_trainable,
        notes=notes,
        cut=cut,
        rule=rule,
        runner_up=runner_up,
        flops_budget=flops_budget,
        gain_share=gain_share if policy == "gain_share" else None,
        **cost,
        **extra,
    )


def _check_arguments(policy, trained_share, flops_budget, gain_share, min_trainable) -> None:
    if policy == "probe":
        raise ValueError("policy 'probe' trains candidate boundaries: use freezekern.probe_plan(model, plan, ...)")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if trained_share is not None and not (0.0 < trained_share <= 1.0):
        raise ValueError(f"trained_share must lie in (0, 1], got {trained_share}")
    if flops_budget is not None and not (0.0 < flops_budget <= 1.0):
        raise ValueError(f"flops_budget must lie in (0, 1], got {flops_budget}")
    if policy == "flops" and flops_budget is None:
        raise ValueError("policy 'flops' needs flops_budget (the step-FLOPs share of full fine-tuning, e.g. 0.5)")
    if gain_share is not None and not (0.0 < gain_share <= 1.0):
        raise ValueError(f"gain_share must lie in (0, 1], got {gain_share}")
    if min_trainable < 0:
        raise ValueError(f"min_trainable must be >= 0, got {min_trainable}")


def _candidates(policy, num_layers, start, counts, head_trains, *, trained_share, min_trainable,
                flops_budget) -> list[int]:
    """The boundaries a trace rule may choose: [max(2, s + 1), L - min_trainable], within the limits."""
    if num_layers < 3:
        raise ValueError(
            f"no candidate boundary: the model has {num_layers} blocks; policy {policy!r} needs L >= 3 "
            "(use policy 'fixed' for small models)"
        )
    lo, hi = max(2, start + 1), num_layers - min_trainable
    if trained_share is not None:
        lo = max(lo, num_layers - math.ceil(trained_share * num_layers))
    if hi < max(2, start + 1):
        raise ValueError(
            f"no candidate boundary: the model has {num_layers} blocks and min_trainable={min_trainable}; "
            f"policy {policy!r} needs min_trainable <= L - {max(2, start + 1)} (use policy 'fixed')"
        )
    if lo > hi:
        raise ValueError(
            f"no candidate boundary meets trained_share={trained_share} with min_trainable={min_trainable} on "
            f"{num_layers} blocks: the share allows at most {math.ceil(trained_share * num_layers)} trained "
            "blocks; raise trained_share or lower min_trainable"
        )
    candidates = list(range(lo, hi + 1))
    if policy != "flops":
        return candidates
    costs = flop_costs(counts)
    affordable = [c for c in candidates
                  if step_fraction(costs, StepSetup(boundary=c, train_head=head_trains)) <= flops_budget + 1e-12]
    if not affordable:
        cheapest = step_fraction(costs, StepSetup(boundary=hi, train_head=head_trains))
        raise ValueError(
            f"no candidate boundary fits flops_budget={flops_budget}: the cheapest candidate (k={hi}) costs "
            f"{cheapest:.1%} of a full fine-tuning step; raise flops_budget or lower min_trainable"
        )
    return affordable


def _trace_rule(trace, policy, num_layers, counts, head_trains, notes, *, trained_share, min_trainable,
                flops_budget, gain_share) -> tuple[int, int | None, str, dict]:
    """A trace policy's boundary, runner-up, rule text and the trace figures the plan keeps."""
    deviations = getattr(trace, "deviations", None)
    if deviations is None:
        raise ValueError(f"policy {policy!r} needs a DeviationTrace (run freezekern.analyze first)")
    start = regime_start(deviations)
    candidates = _candidates(policy, num_layers, start, counts, head_trains, trained_share=trained_share,
                             min_trainable=min_trainable, flops_budget=flops_budget)
    fit = fit_scaling_law(deviations, start=start)
    r, rhat, gains = layer_gains(deviations, fit)
    if start > 1:
        notes.append(f"latent spaces 1..{start - 1} open with a transient (a reduction over "
                     f"{TRANSIENT_RATIO:g}x the median): left out of the fit and of the candidates")
    significant, why = (True, "") if policy == "reduction" else \
        move_is_significant(deviations, gains, candidates, start)
    runner_up = None
    if policy == "reduction":
        boundary = _best(r, candidates)
        runner_up = _runner_up(r, candidates, boundary)
        rule = f"reduction: layer {boundary} has the largest observed reduction ({r[boundary]:.4g})"
    elif not significant:  # the gains are noise around the law: any rule on them would pick at random
        wanted = int(round(FALLBACK_FROZEN_SHARE * num_layers))
        boundary = min(candidates, key=lambda c: (abs(c - wanted), -c))
        rule = (f"{policy} fallback: no semantic move stands out ({why}); "
                f"froze {FALLBACK_FROZEN_SHARE:.0%} of the blocks")
        notes.append("the trace follows the depth law without a clear move: the boundary is the fallback")
    elif policy == "gain_share":
        share = DEFAULT_GAIN_SHARE if gain_share is None else gain_share
        boundary, held = _gain_share_boundary(gains, candidates, share)
        runner_up = _runner_up(gains, candidates, boundary)
        rule = (f"gain_share: the deepest boundary whose trained layers hold at least {share:.0%} of the "
                f"positive gain (they hold {held:.0%})")
    else:
        boundary = _best(gains, candidates)
        runner_up = _runner_up(gains, candidates, boundary)
        rule = (f"{policy}: layer {boundary}'s reduction exceeds the depth law's by the most "
                f"(gain {gains[boundary]:.4g})")
    extra = {
        "metric": trace.metric,
        "deviations": list(deviations),
        "reductions": [None if math.isnan(v) else v for v in r],
        "gains": [None if math.isnan(v) else v for v in gains],
        "fit": asdict(fit),
        "candidates": [candidates[0], candidates[-1]],
    }
    return boundary, runner_up, rule, extra


def _asked_rule(policy, boundary, frozen_share, num_layers) -> tuple[int, str]:
    """The boundary of the policies that need no trace: fixed, fraction, none."""
    if policy == "fixed":
        if boundary is None:
            raise ValueError("policy 'fixed' needs boundary= (the number of blocks to freeze)")
        return int(boundary), f"fixed: {int(boundary)} blocks frozen as asked"
    if policy == "fraction":
        if frozen_share is None or not (0.0 <= frozen_share <= 1.0):
            raise ValueError(f"policy 'fraction' needs frozen_share in [0, 1], got {frozen_share}")
        return int(round(frozen_share * num_layers)), f"fraction: {frozen_share:.0%} of the blocks frozen as asked"
    return 0, "none: full fine-tuning"
