"""Selection policy: scaling-law fit of the trace, per-layer gains, the freeze boundary.

Definitions follow docs/method.md (freezekern's documented reconstruction):
the depth law D_hat(k) = E + A (k + 1)^-alpha is fitted over the spaces
k = 1..L; the gain of layer l = 2..L is its observed reduction
r_l = D_{l-1} - D_l minus the reduction the law expects,
rhat_l = D_hat(l-1) - D_hat(l); the boundary k* is the candidate with the
largest gain (ties to the deeper layer). Blocks 1..k* and the embeddings are
frozen. This module knows traces and plain model summaries only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from freezekern.io import JsonRecord

POLICIES = ("salf", "reduction", "fixed", "fraction", "none")
ALPHA_GRID = np.geomspace(1e-3, 20.0, 4000)


@dataclass
class ScalingFit:
    """D_hat(k) = E + A * (k + 1) ** -alpha, least squares over k = 1..L."""

    E: float
    A: float
    alpha: float
    sse: float

    def __call__(self, k) -> np.ndarray:
        return self.E + self.A * np.power(np.asarray(k, dtype=np.float64) + 1.0, -self.alpha)


def fit_scaling_law(deviations: list[float] | np.ndarray, alphas: np.ndarray = ALPHA_GRID) -> ScalingFit:
    """Fit the depth law to D_1..D_L (``deviations`` holds D_0..D_L; D_0 is left out).

    For each alpha on a fixed grid, (E, A) is the closed-form non-negative least
    squares solution; the alpha with the smallest squared error wins (first on ties).
    """
    y = np.asarray(deviations, dtype=np.float64)[1:]
    if y.size < 2:
        raise ValueError("the scaling-law fit needs at least two latent spaces after the embedding")
    k = np.arange(1, y.size + 1, dtype=np.float64)
    x = np.power(k[None, :] + 1.0, -alphas[:, None])  # [G, L]
    n = y.size
    sx, sy = x.sum(1), y.sum()
    sxx, sxy = (x * x).sum(1), (x * y).sum(1)
    det = n * sxx - sx * sx
    with np.errstate(divide="ignore", invalid="ignore"):
        a_free = np.where(det > 0, (n * sxy - sx * sy) / det, 0.0)
        e_free = (sy - a_free * sx) / n
    a_only = np.maximum(np.where(sxx > 0, sxy / np.where(sxx > 0, sxx, 1.0), 0.0), 0.0)
    e_only = max(sy / n, 0.0)
    candidates = [
        (e_free, a_free, (a_free >= 0) & (e_free >= 0)),
        (np.zeros_like(sx), a_only, np.ones_like(sx, dtype=bool)),
        (np.full_like(sx, e_only), np.zeros_like(sx), np.ones_like(sx, dtype=bool)),
    ]
    best_sse = np.full(sx.shape, np.inf)
    best_e, best_a = np.zeros_like(sx), np.zeros_like(sx)
    for e, a, ok in candidates:
        sse = ((e[:, None] + a[:, None] * x - y[None, :]) ** 2).sum(1)
        better = ok & (sse < best_sse - 1e-300)
        best_sse = np.where(better, sse, best_sse)
        best_e, best_a = np.where(better, e, best_e), np.where(better, a, best_a)
    g = int(np.argmin(best_sse))
    return ScalingFit(E=float(best_e[g]), A=float(best_a[g]), alpha=float(alphas[g]), sse=float(best_sse[g]))


def layer_gains(deviations: list[float], fit: ScalingFit) -> tuple[list[float], list[float], list[float]]:
    """Observed reductions r_l, expected reductions rhat_l and gains G_l for l = 2..L.

    Each returned list has L + 1 entries indexed by layer l; entries 0 and 1 are NaN.
    """
    d = np.asarray(deviations, dtype=np.float64)
    num_layers = d.size - 1
    r = [math.nan] * (num_layers + 1)
    rhat = [math.nan] * (num_layers + 1)
    gains = [math.nan] * (num_layers + 1)
    for layer in range(2, num_layers + 1):
        r[layer] = float(d[layer - 1] - d[layer])
        rhat[layer] = float(fit(layer - 1) - fit(layer))
        gains[layer] = r[layer] - rhat[layer]
    return r, rhat, gains


@dataclass
class FreezePlan(JsonRecord):
    """Where to cut: embeddings and blocks 1..``boundary`` frozen, the rest trained.

    Plain data; ``to_json``/``from_json`` round-trip it, so a plan saved with a
    checkpoint restores the same boundary. ``gains``/``reductions`` are indexed
    by layer 0..L (NaN-free JSON: undefined entries are None).
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
    budget: float | None = None
    min_trainable: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_blocks(self) -> list[int]:
        """1-based indices of the blocks that train."""
        return list(range(self.boundary + 1, self.num_layers + 1))

    def __str__(self) -> str:
        head = "trained" if self.train_head else ("frozen (tied to the input embedding)" if self.tied else "frozen")
        lines = [
            f"FreezePlan[{self.policy}{'/' + self.metric if self.metric else ''}] for {self.model_id}",
            f"  freeze: embeddings + blocks 1..{self.boundary} of {self.num_layers}",
            f"  train:  blocks {self.boundary + 1}..{self.num_layers}" if self.boundary < self.num_layers
            else "  train:  no blocks",
            f"          final norm {'trained' if self.train_final_norm else 'frozen'}, LM head {head}",
            f"  backward through {self.backward_fraction:.1%} of the blocks; "
            f"estimated step FLOPs {self.step_flops_fraction:.1%} of full fine-tuning",
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
               train_final_norm: bool) -> dict:
    """Backward fraction, estimated step-FLOPs fraction and trainable parameters of a cut."""
    trained_blocks = num_layers - boundary
    trainable = sum(parameter_counts["blocks"][boundary:])
    if train_final_norm:
        trainable += parameter_counts["final_norm"]
    if train_head:
        trainable += parameter_counts.get("lm_head_trainable", parameter_counts["lm_head"])
    backward_fraction = trained_blocks / num_layers
    return {
        "backward_fraction": backward_fraction,
        "step_flops_fraction": (1.0 + 2.0 * backward_fraction) / 3.0,
        "trainable_params": int(trainable),
        "total_params": int(parameter_counts["total"]),
    }


def plan(
    trace,
    policy: str = "salf",
    *,
    budget: float | None = None,
    min_trainable: int = 1,
    n_frozen: int | None = None,
    fraction: float | None = None,
    train_head: bool | None = None,
    train_final_norm: bool = True,
) -> FreezePlan:
    """Choose the freeze boundary for a traced model.

    ``trace``: a DeviationTrace (all policies) or a model summary mapping with
    num_layers, parameter_counts, fingerprint, tied, model_id (policies that
    need no trace: fixed, fraction, none). ``budget`` beta in (0, 1] limits the
    trained blocks to ceil(beta * L). ``n_frozen`` is for ``fixed``,
    ``fraction`` for ``fraction``. ``train_head`` defaults to True unless the
    head is tied to the input embedding.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if budget is not None and not (0.0 < budget <= 1.0):
        raise ValueError(f"budget must lie in (0, 1], got {budget}")
    if min_trainable < 0:
        raise ValueError(f"min_trainable must be >= 0, got {min_trainable}")
    num_layers = int(_summary_field(trace, "num_layers"))
    tied = bool(_summary_field(trace, "tied"))
    head_trains = (not tied) if train_head is None else bool(train_head)
    notes: list[str] = []
    if tied and head_trains:
        notes.append("head tied to the input embedding is trained through its output use only; the cut stays")
    extra: dict = {}

    if policy in ("salf", "reduction"):
        deviations = getattr(trace, "deviations", None)
        if deviations is None:
            raise ValueError(f"policy {policy!r} needs a DeviationTrace (run freezekern.analyze first)")
        lo, hi = 2, num_layers - min_trainable
        if budget is not None:
            lo = max(lo, num_layers - math.ceil(budget * num_layers))
        if num_layers < 3 or hi < 2:
            raise ValueError(
                f"no candidate boundary: the model has {num_layers} blocks and min_trainable={min_trainable}; "
                "policy 'salf' needs L >= 3 and min_trainable <= L - 2 (use policy 'fixed' for small models)"
            )
        if lo > hi:
            raise ValueError(
                f"no candidate boundary meets budget={budget} with min_trainable={min_trainable} on {num_layers} "
                f"blocks: the budget allows at most {math.ceil(budget * num_layers)} trained blocks; "
                "raise the budget or lower min_trainable"
            )
        fit = fit_scaling_law(deviations)
        r, rhat, gains = layer_gains(deviations, fit)
        score = gains if policy == "salf" else r
        boundary = lo
        for layer in range(lo, hi + 1):
            if score[layer] >= score[boundary]:
                boundary = layer
        extra = {
            "metric": trace.metric,
            "deviations": list(deviations),
            "reductions": [None if math.isnan(v) else v for v in r],
            "gains": [None if math.isnan(v) else v for v in gains],
            "fit": asdict(fit),
            "candidates": [lo, hi],
        }
    elif policy == "fixed":
        if n_frozen is None:
            raise ValueError("policy 'fixed' needs n_frozen (the number of blocks to freeze)")
        boundary = int(n_frozen)
    elif policy == "fraction":
        if fraction is None or not (0.0 <= fraction <= 1.0):
            raise ValueError(f"policy 'fraction' needs fraction in [0, 1], got {fraction}")
        boundary = int(round(fraction * num_layers))
    else:
        boundary = 0
    if not 0 <= boundary <= num_layers:
        raise ValueError(f"boundary {boundary} is outside [0, {num_layers}]")
    if policy in ("fixed", "fraction") and num_layers - boundary < min_trainable:
        raise ValueError(
            f"freezing {boundary} of {num_layers} blocks leaves fewer than min_trainable={min_trainable} trained"
        )
    counts = _summary_field(trace, "parameter_counts")
    cost = cost_model(counts, num_layers, boundary, head_trains, train_final_norm)
    return FreezePlan(
        policy=policy,
        boundary=boundary,
        num_layers=num_layers,
        train_head=head_trains,
        train_final_norm=train_final_norm,
        tied=tied,
        model_id=str(_summary_field(trace, "model_id")),
        fingerprint=str(_summary_field(trace, "fingerprint")),
        budget=budget,
        min_trainable=min_trainable,
        notes=notes,
        **cost,
        **extra,
    )
