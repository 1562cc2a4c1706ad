"""Selection policy: scaling-law fit of the trace, per-layer gains, the freeze boundary.

Definitions follow docs/method.md (freezekern's documented reconstruction):

* the depth law D_hat(k) = E + A (k + 1)^-alpha (A >= 0) is fitted to the
  reductions of the spaces k = s..L, robustly (the largest residuals, the
  moves, are trimmed), where s skips a leading *transient*: first
  reductions far above the median reduction after them and as large as all
  the trace still drops (``regime_start``; tied, scaled input embeddings make
  D_1, D_2 ... tens of times the rest, and a fit that serves them explains
  nothing above);
* the gain of layer l = s+1..L is its observed reduction r_l = D_{l-1} - D_l
  minus the reduction the law expects, rhat_l = D_hat(l-1) - D_hat(l);
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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from freezekern.io import JsonRecord
from freezekern.policy.cost import StepSetup, flop_costs, step_fraction

POLICIES = ("salf", "gain_share", "flops", "reduction", "fixed", "fraction", "none")
TRACE_POLICIES = ("salf", "gain_share", "flops", "reduction")
ALPHA_GRID = np.geomspace(1e-3, 20.0, 4000)
TRANSIENT_RATIO = 10.0
TRANSIENT_SHARE = 0.5
TRIM_SHARE = 0.2
MAX_TRANSIENT_SHARE = 1.0 / 3.0
MIN_MOVE_SHARE = 0.02
FALLBACK_FROZEN_SHARE = 0.5
DEFAULT_GAIN_SHARE = 0.9
# chosen on the validation splits of the quality study (docs/results.md); "salf" is the paper's rule
DEFAULT_POLICY = "gain_share"
PLAN_FILE = "freezekern_plan.json"  # where a plan is saved beside a checkpoint or a trained model


@dataclass
class ScalingFit:
    """D_hat(k) = E + A * (k + 1) ** -alpha over the spaces k = start..L.

    ``trimmed``: the layers whose reductions were left out of the fit as moves
    (the largest residuals); ``sse``: the squared error of the kept reductions.
    """

    E: float
    A: float
    alpha: float
    sse: float
    start: int = 1
    trimmed: list[int] = field(default_factory=list)

    def __call__(self, k) -> np.ndarray:
        return self.E + self.A * np.power(np.asarray(k, dtype=np.float64) + 1.0, -self.alpha)


def regime_start(deviations) -> int:
    """First latent space of the depth-law regime: 1, or later when the trace opens with a transient.

    Space s is dropped while its reduction into s+1 is both ``TRANSIENT_RATIO``
    times the median absolute reduction of the spaces after it and at least
    ``TRANSIENT_SHARE`` of everything the trace still drops after it
    (D_{s+1} - D_L): a level far above the rest, not the steep start of a power
    law. At most a third of the blocks are dropped. Reductions are differences
    of the trace, and the tests compare them with each other, so the result does
    not change under D -> c D or D -> D + c.
    """
    d = np.asarray(deviations, dtype=np.float64)
    num_layers = d.size - 1
    start = 1
    limit = max(1, int(num_layers * MAX_TRANSIENT_SHARE))
    while start < limit and num_layers - start >= 3:
        first = d[start] - d[start + 1]
        rest = np.abs(d[start + 1:-1] - d[start + 2:])
        remaining = d[start + 1] - d[-1]
        if not (first > 0 and first > TRANSIENT_RATIO * float(np.median(rest))
                and first >= TRANSIENT_SHARE * remaining):
            break
        start += 1
    return start


def fit_scaling_law(deviations, alphas: np.ndarray = ALPHA_GRID, start: int = 1) -> ScalingFit:
    """Fit the depth law to the reductions of D_start..D_L (``deviations`` holds D_0..D_L).

    The law's reduction of layer l is A (l^-alpha - (l+1)^-alpha). For each
    alpha on a fixed grid, A >= 0 is the closed-form least-squares value over
    the kept reductions; the alpha with the smallest squared error wins (first
    on ties). Then the ``TRIM_SHARE`` largest residuals are left out and the fit
    is repeated (up to three times): a move is one large reduction, and a fit
    that bends towards it would hide it. Fitting reductions makes the law
    blind to a constant shift of the trace; E only places the curve (the
    median level left over by the fitted A and alpha).
    """
    d = np.asarray(deviations, dtype=np.float64)
    num_layers = d.size - 1
    layers = np.arange(start + 1, num_layers + 1)
    if start < 1 or layers.size < 2:
        raise ValueError("the scaling-law fit needs at least three latent spaces after the embedding")
    r = d[layers - 1] - d[layers]
    x = np.power(layers[None, :].astype(np.float64), -alphas[:, None]) \
        - np.power(layers[None, :] + 1.0, -alphas[:, None])  # [G, n]
    keep = np.ones(layers.size, dtype=bool)
    drop = int(TRIM_SHARE * layers.size) if layers.size >= 3 else 0
    for _ in range(3):
        xk, rk = x[:, keep], r[keep]
        sxx, sxr = (xk * xk).sum(1), (xk * rk).sum(1)
        a = np.maximum(np.where(sxx > 0, sxr / np.where(sxx > 0, sxx, 1.0), 0.0), 0.0)
        sse = ((rk[None, :] - a[:, None] * xk) ** 2).sum(1)
        g = int(np.argmin(sse))
        residual = np.abs(r - a[g] * x[g])
        new_keep = np.ones(layers.size, dtype=bool)
        if drop:
            new_keep[np.argsort(-residual, kind="stable")[:drop]] = False
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    spaces = np.arange(start, num_layers + 1)
    level = float(np.median(d[spaces] - a[g] * np.power(spaces + 1.0, -alphas[g])))
    return ScalingFit(E=level, A=float(a[g]), alpha=float(alphas[g]), sse=float(sse[g]), start=start,
                      trimmed=[int(v) for v in layers[~keep]])


def layer_gains(deviations, fit: ScalingFit) -> tuple[list[float], list[float], list[float]]:
    """Observed reductions r_l, expected reductions rhat_l and gains G_l for l = fit.start+1..L.

    Each returned list has L + 1 entries indexed by layer l; entries outside
    that range are NaN.
    """
    d = np.asarray(deviations, dtype=np.float64)
    num_layers = d.size - 1
    r = [math.nan] * (num_layers + 1)
    rhat = [math.nan] * (num_layers + 1)
    gains = [math.nan] * (num_layers + 1)
    for layer in range(fit.start + 1, num_layers + 1):
        r[layer] = float(d[layer - 1] - d[layer])
        rhat[layer] = float(fit(layer - 1) - fit(layer))
        gains[layer] = r[layer] - rhat[layer]
    return r, rhat, gains


def move_is_significant(deviations, gains: list[float], candidates: list[int], start: int) -> tuple[bool, str]:
    """Whether the best candidate's gain is at least ``MIN_MOVE_SHARE`` of the trace's drop D_start - D_L.

    A trace that follows the depth law leaves gains of rounding size; any
    layer would then be an arbitrary pick.
    """
    best = max(gains[c] for c in candidates)
    drop = abs(float(deviations[start] - deviations[-1]))
    if best <= MIN_MOVE_SHARE * drop:
        return False, f"the largest gain ({best:.3g}) is below {MIN_MOVE_SHARE:.0%} of the trace's drop ({drop:.3g})"
    return True, ""


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


def _summary_field(source, name: str):
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
    num_layers = int(_summary_field(trace, "num_layers"))
    tied = bool(_summary_field(trace, "tied"))
    counts = _summary_field(trace, "parameter_counts")
    cut = policy != "none"
    head_trains = True if not cut else ((not tied) if train_head is None else bool(train_head))
    notes: list[str] = []
    if tied and head_trains and cut:
        notes.append("head tied to the input embedding is trained through its output use only; the cut stays")
    extra: dict = {}
    rule = ""
    runner_up = None

    if policy in TRACE_POLICIES:
        deviations = getattr(trace, "deviations", None)
        if deviations is None:
            raise ValueError(f"policy {policy!r} needs a DeviationTrace (run freezekern.analyze first)")
        if num_layers < 3:
            raise ValueError(
                f"no candidate boundary: the model has {num_layers} blocks; policy {policy!r} needs L >= 3 "
                "(use policy 'fixed' for small models)"
            )
        start = regime_start(deviations)
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
        if policy == "flops":
            costs = flop_costs(counts)
            affordable = [c for c in candidates
                          if step_fraction(costs, StepSetup(boundary=c, train_head=head_trains)) <= flops_budget + 1e-12]
            if not affordable:
                cheapest = step_fraction(costs, StepSetup(boundary=hi, train_head=head_trains))
                raise ValueError(
                    f"no candidate boundary fits flops_budget={flops_budget}: the cheapest candidate (k={hi}) costs "
                    f"{cheapest:.1%} of a full fine-tuning step; raise flops_budget or lower min_trainable"
                )
            candidates = affordable
        fit = fit_scaling_law(deviations, start=start)
        r, rhat, gains = layer_gains(deviations, fit)
        if start > 1:
            notes.append(f"latent spaces 1..{start - 1} open with a transient (a reduction over "
                         f"{TRANSIENT_RATIO:g}x the median): left out of the fit and of the candidates")
        significant, why = (True, "") if policy == "reduction" else \
            move_is_significant(deviations, gains, candidates, start)
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
            gain_share = DEFAULT_GAIN_SHARE if gain_share is None else gain_share
            boundary, held = _gain_share_boundary(gains, candidates, gain_share)
            runner_up = _runner_up(gains, candidates, boundary)
            rule = (f"gain_share: the deepest boundary whose trained layers hold at least {gain_share:.0%} of the "
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
    elif policy == "fixed":
        if boundary is None:
            raise ValueError("policy 'fixed' needs boundary= (the number of blocks to freeze)")
        boundary = int(boundary)
        rule = f"fixed: {boundary} blocks frozen as asked"
    elif policy == "fraction":
        if frozen_share is None or not (0.0 <= frozen_share <= 1.0):
            raise ValueError(f"policy 'fraction' needs frozen_share in [0, 1], got {frozen_share}")
        boundary = int(round(frozen_share * num_layers))
        rule = f"fraction: {frozen_share:.0%} of the blocks frozen as asked"
    else:
        boundary = 0
        rule = "none: full fine-tuning"
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
        model_id=str(_summary_field(trace, "model_id")),
        fingerprint=str(_summary_field(trace, "fingerprint")),
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
