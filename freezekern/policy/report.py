"""Human-readable output of a trace and a plan: a text table and a PNG plot."""

from __future__ import annotations

from pathlib import Path

from freezekern.analysis.trace import DeviationTrace
from freezekern.io import save_png
from freezekern.policy.depth_law import ScalingFit
from freezekern.policy.freeze_plan import FreezePlan


def _plan_fit(plan: FreezePlan | None) -> ScalingFit | None:
    """The depth law the plan was chosen with (None for policies that fit none)."""
    return ScalingFit(**plan.fit) if plan is not None and plan.fit else None


def trace_table(trace: DeviationTrace, plan: FreezePlan | None = None) -> str:
    """One row per latent space: D_k, the fitted law, the reduction and gain of layer k."""
    gains = plan.gains if plan is not None and plan.gains else None
    reductions = plan.reductions if plan is not None and plan.reductions else None
    fit = _plan_fit(plan)
    lines = [f"{'space':>6} {'D_k':>11} {'fit':>11} {'r_k':>10} {'G_k':>10}  "]
    for k, value in enumerate(trace.deviations):
        fitted = f"{float(fit(k)):11.4f}" if fit is not None and k >= fit.start else " " * 11
        red = f"{reductions[k]:10.4f}" if reductions and reductions[k] is not None else " " * 10
        gain = f"{gains[k]:10.4f}" if gains and gains[k] is not None else " " * 10
        mark = ""
        if plan is not None and k == plan.boundary:
            mark = "  <- boundary: frozen up to here"
        label = "h_0" if k == 0 else f"h_{k}"
        lines.append(f"{label:>6} {value:11.4f} {fitted} {red} {gain}{mark}")
    return "\n".join(lines)


def plot_trace(trace: DeviationTrace, plan: FreezePlan | None, path) -> Path:
    """Deviation per space (with the fitted law), gains as bars, the boundary as a line -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    spaces = list(range(len(trace.deviations)))
    fig, (ax_dev, ax_gain) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 2]})
    ax_dev.plot(spaces[1:], trace.deviations[1:], "o-", color="tab:blue", label=f"D_k ({trace.metric})")
    fit = _plan_fit(plan)
    if fit is not None:
        fitted = spaces[fit.start:]
        ax_dev.plot(fitted, [float(fit(k)) for k in fitted], "--", color="tab:gray",
                    label=f"fit E + A(k+1)^-a, a={fit.alpha:.2f}")
    ax_dev.set_ylabel("mean deviation")
    ax_dev.set_title(f"{trace.model_id}: {trace.metric} trace over {trace.token_count:,} tokens "
                     f"(h_0 = {trace.deviations[0]:.3g}, not fitted)")
    if plan is not None and plan.gains:
        layers = [k for k, g in enumerate(plan.gains) if g is not None]
        values = [plan.gains[k] for k in layers]
        colors = ["tab:red" if k == plan.boundary else "tab:orange" for k in layers]
        ax_gain.bar(layers, values, color=colors)
        ax_gain.axhline(0, color="black", linewidth=0.6)
    ax_gain.set_ylabel("gain G_l")
    ax_gain.set_xlabel("latent space k / layer l")
    if plan is not None:
        for ax in (ax_dev, ax_gain):
            ax.axvline(plan.boundary + 0.5, color="tab:red", linestyle=":")
        ax_dev.text(plan.boundary + 0.6, ax_dev.get_ylim()[1], f" train {plan.boundary + 1}..{plan.num_layers}",
                    va="top", color="tab:red")
    ax_dev.legend(loc="lower left")
    fig.tight_layout()
    save_png(fig, path)
    return path
