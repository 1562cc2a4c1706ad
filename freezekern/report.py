"""Human-readable output of a trace and a plan: a text table and a PNG plot."""

from __future__ import annotations

import io
from pathlib import Path

from freezekern.io import atomic_write_bytes
from freezekern.policy import FreezePlan, ScalingFit
from freezekern.trace import DeviationTrace


def save_png(fig, path) -> None:
    """Write a matplotlib figure to ``path`` atomically and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


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


def plot_compare(result, path) -> Path:
    """Held-out loss against compute (full-step equivalents, and measured seconds) for every arm -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    base = result.baseline["heldout_loss"]
    for r in result.results:
        width = 2.6 if r.arm.name == result.recommended else 1.4
        for ax, axis in zip(axes, ("flops", "seconds")):
            xs = [0.0] + [row[axis] for row in r.rows]
            ax.plot(xs, [base] + [row["heldout_loss"] for row in r.rows], "o-", linewidth=width,
                    label=f"{r.arm.name} ({r.step_cost:.0%} step)")
    axes[0].set_xlabel("compute spent (full fine-tuning steps, estimated FLOPs)")
    axes[1].set_xlabel("training seconds (measured)")
    axes[0].set_ylabel("held-out loss")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"equal-compute comparison; recommended: {result.recommended}")
    fig.tight_layout()
    save_png(fig, path)
    return Path(path)


# -- profile ----------------------------------------------------------------------------------

def _ms(value) -> str:
    if value is None or value != value:  # None or NaN
        return "      -"
    return f"{value * 1e3:7.1f}"


def _mb(value) -> str:
    return f"{value / 2**20:,.0f} MB" if value else "-"


def profile_table(report) -> str:
    """``freezekern.profile``'s report as a text table: per part, both setups' forward / recompute / backward (ms)."""
    yours, cut = report.yours, report.freezekern
    setups = [s for s in (yours, cut) if s is not None]
    head = f"{'part':<12}" + "".join(f" | {s.label:^33}" for s in setups)
    sub = f"{'':<12}" + "".join(f" | {'fwd ms':>7} {'recomp':>7} {'bwd ms':>7} {'':>9}" for _ in setups)
    lines = [f"freezekern profile: {report.model_id}, {report.num_layers} blocks, batch {report.batch_shape}, "
             f"{report.steps} steps per setup after {report.warmup} warm-up, {report.device} ({report.clock} clock)"
             + (f", rank {report.rank} of {report.world_size}" if report.world_size > 1 else ""),
             f"checkpointing: {report.checkpointing or 'off'}; LoRA: {'yes' if report.lora else 'no'}; "
             f"tied embeddings: {'yes' if report.tied else 'no'}; cut boundary k={report.boundary}",
             "", head, sub]
    for j, row in enumerate(yours.parts):
        if not row.hooked:
            continue
        cells = []
        for s in setups:
            r = s.parts[j]
            mark = ("reached" if r.reached else "") + ("*" if r.trainable else "")
            cells.append(f" | {_ms(r.forward_s)} {_ms(r.recompute_s)} {_ms(r.backward_s if r.reached else None)} "
                         f"{mark:>9}")
        lines.append(f"{row.name:<12}" + "".join(cells))
    loss = [f" | {_ms(s.loss_forward_s)} {'':>7} {_ms(s.loss_backward_s)} {'':>9}" for s in setups]
    lines.append(f"{'loss':<12}" + "".join(loss))
    lines.append("(* trains; reached: its backward ran)")
    lines.append("")
    for s in setups:
        reached = "the embedding output" if s.lowest_reached == 0 else (
            f"block {s.lowest_reached}" if s.lowest_reached else "no block")
        lowest = {None: "nothing", 0: "the embedding"}.get(s.lowest_trainable, f"block {s.lowest_trainable}")
        lines.append(f"{s.label:<15} step {s.step_s_median:.3f} s (forward {s.forward_s:.3f}, backward "
                     f"{s.backward_s:.3f}, optimizer and rest {s.other_s:.3f}); peak memory "
                     f"{_mb(s.peak_memory_bytes)}; backward down to {reached}, lowest trainable {lowest}")
    if report.time_ratio is not None:
        memory = f", peak memory {report.memory_ratio:.2f}x" if report.memory_ratio is not None else ""
        lines.append(f"cut / yours (paired, median over rounds): step time {report.time_ratio:.3f}x{memory}")
    if report.ideal is not None:
        i = report.ideal
        lines.append(f"analytic ideal {i['total']:.3f} s = forward {i['forward']:.3f} + recompute "
                     f"{i['recompute']:.3f} + backward {i['backward']:.3f} (freezekern.cost over measured parts)")
    lines += ["", report.verdict]
    return "\n".join(lines)


def plot_profile(report, path) -> Path:
    """Per-block stacked bars (forward / recompute / backward), the user's setup and the cut side by side -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    setups = [s for s in (report.yours, report.freezekern) if s is not None]
    L = report.num_layers
    fig, axes = plt.subplots(1, len(setups), figsize=(6.5 * len(setups), 4.6), sharey=True, squeeze=False)
    labels = [str(i) for i in range(1, L + 1)] + ["head"]
    colors = {"forward": "tab:blue", "recompute": "tab:orange", "backward": "tab:red"}
    for ax, s in zip(axes[0], setups):
        rows = s.parts[1:L + 1] + [s.parts[L + 2]]
        forward = [r.forward_s * 1e3 for r in rows]
        recompute = [r.recompute_s * 1e3 for r in rows]
        backward = [(r.backward_s if r.reached else 0.0) * 1e3 for r in rows]
        x = list(range(len(rows)))
        ax.bar(x, forward, color=colors["forward"], label="forward")
        ax.bar(x, recompute, bottom=forward, color=colors["recompute"], label="recompute")
        ax.bar(x, backward, bottom=[f + r for f, r in zip(forward, recompute)], color=colors["backward"],
               label="backward")
        if s.lowest_trainable is not None and 1 <= s.lowest_trainable <= L:
            ax.axvline(s.lowest_trainable - 1.5, color="black", linestyle=":", linewidth=1)
            ax.text(s.lowest_trainable - 1.4, ax.get_ylim()[1] * 0.97, " trained", va="top", fontsize=8)
        step = f"{s.step_s_median:.2f} s/step"
        memory = f", peak {s.peak_memory_bytes / 2**20:,.0f} MB" if s.peak_memory_bytes else ""
        ax.set_title(f"{s.label}: {step}{memory}", fontsize=10)
        ticks = sorted(set(x[:-1][::max(1, L // 15)] + [x[-1]]))
        ax.set_xticks(ticks)
        ax.set_xticklabels([labels[i] for i in ticks], fontsize=8)
        ax.set_xlabel("block")
    axes[0][0].set_ylabel("ms per step (median)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    ratio = f"; cut / yours {report.time_ratio:.2f}x step time" if report.time_ratio is not None else ""
    fig.suptitle(f"{report.model_id}: where the backward goes (k={report.boundary}, checkpointing "
                 f"{report.checkpointing or 'off'}){ratio}", fontsize=11)
    fig.tight_layout()
    save_png(fig, path)
    return path
