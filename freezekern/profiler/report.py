"""A profile as a text table and a PNG of per-block forward, recomputation and backward."""

from __future__ import annotations

from pathlib import Path

from freezekern.io import save_png


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
                     f"{i['recompute']:.3f} + backward {i['backward']:.3f} (freezekern.policy.cost over measured parts)")
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
