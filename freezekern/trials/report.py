"""The comparison's plot: held-out loss against compute for every arm."""

from __future__ import annotations

from pathlib import Path

from freezekern.io import save_png


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
