"""Tables, plots and verdicts of the quality study (results.md beside the runs)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path


def _runs_for(runs: dict, meta: dict, task: str, boundary: int, lora: bool, lr: float, seeds) -> list[dict]:
    from study import run_key

    keys = (run_key(task, boundary, lora, lr, s, meta["steps"]) for s in seeds)
    return [runs[k] for k in keys if k in runs]


def arm_summary(meta: dict, runs: dict, task: str) -> list[dict]:
    """Per arm: the learning rate with the best held-out loss on the sweep seed, and that loss over seeds."""
    rows, seen = [], set()
    for arm, boundary, lora, _lr, _seed in meta["tasks"][task]["jobs"]:
        if arm == "sweep" or arm in seen:
            continue
        seen.add(arm)
        by_lr = {}
        for lr_ in (meta["lora_lrs"] if lora else meta["full_lrs"]):
            found = _runs_for(runs, meta, task, boundary, lora, lr_, meta["seeds"])
            if found:
                by_lr[lr_] = found
        sweep_seed = meta["lr_sweep_seed"]
        best_lr = min(by_lr, key=lambda x: min(r["held_out_loss"] for r in by_lr[x] if r["seed"] == sweep_seed))
        best = by_lr[best_lr]
        losses = [r["held_out_loss"] for r in best]
        rows.append({
            "arm": arm, "boundary": boundary, "lora": lora, "best_lr": best_lr,
            "loss": statistics.mean(losses), "spread": (max(losses) - min(losses)) / 2, "n": len(losses),
            "trainable": best[0]["trainable_params"],
            "step": statistics.mean(r["step_time_s"] for r in best),
            "mem": statistics.mean(r["peak_mem_mib"] for r in best),
            "all": {lr_: [r["held_out_loss"] for r in rs] for lr_, rs in by_lr.items()},
        })
    return rows


def sweep_rows(meta: dict, runs: dict, task: str) -> list[dict]:
    rows = []
    for arm, boundary, lora, lr, seed in meta["tasks"][task]["jobs"]:
        if arm != "sweep":
            continue
        found = _runs_for(runs, meta, task, boundary, lora, lr, [seed])
        if found:
            r = found[0]
            rows.append({"k": boundary, "loss": r["held_out_loss"], "step": r["step_time_s"],
                         "mem": r["peak_mem_mib"], "trainable": r["trainable_params"]})
    return sorted(rows, key=lambda r: r["k"])


def flops_fraction(boundary: int, num_layers: int) -> float:
    """Estimated step FLOPs of training above ``boundary`` relative to full fine-tuning."""
    return (1 + 2 * (num_layers - boundary) / num_layers) / 3


def verdict(rows: list[dict], baseline: float, num_layers: int) -> str:
    by_arm = {r["arm"]: r for r in rows}
    full, salf = by_arm["full"], by_arm["salf/cosine"]
    heuristics = [by_arm[a] for a in ("freeze half", "freeze 75%", "reduction") if a in by_arm]
    best_heuristic = min(heuristics, key=lambda r: r["loss"])
    gain_full = baseline - full["loss"]
    gain_salf = baseline - salf["loss"]
    share = gain_salf / gain_full if gain_full > 0 else float("nan")
    parts = [
        f"salf/cosine (freeze {salf['boundary']}) reaches held-out loss {salf['loss']:.4f} ± {salf['spread']:.4f} "
        f"against {full['loss']:.4f} ± {full['spread']:.4f} for full fine-tuning "
        f"(no training: {baseline:.4f}); it keeps {share:.0%} of full fine-tuning's improvement "
        f"at {flops_fraction(salf['boundary'], num_layers):.0%} of its estimated step FLOPs.",
    ]
    if best_heuristic["loss"] < salf["loss"] - max(salf["spread"], best_heuristic["spread"]):
        parts.append(f"The heuristic '{best_heuristic['arm']}' (freeze {best_heuristic['boundary']}) beats it: "
                     f"{best_heuristic['loss']:.4f} at {flops_fraction(best_heuristic['boundary'], num_layers):.0%} of the "
                     "full step FLOPs.")
    else:
        parts.append(f"Best heuristic: '{best_heuristic['arm']}' (freeze {best_heuristic['boundary']}) at "
                     f"{best_heuristic['loss']:.4f}, {flops_fraction(best_heuristic['boundary'], num_layers):.0%} of the "
                     "full step FLOPs.")
    return " ".join(parts)


def plot_task(out: Path, task: str, meta: dict, rows: list[dict], sweep: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    baseline = meta["tasks"][task]["baseline_loss"]
    plans = meta["tasks"][task]["plans"]
    if sweep:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ks = [r["k"] for r in sweep]
        ax.plot(ks, [r["loss"] for r in sweep], "o-", label="held-out loss after training")
        ax.axhline(baseline, color="gray", linestyle="--", label="no training")
        for name, style in (("salf/cosine", "r:"), ("salf/logit_lens", "m:")):
            ax.axvline(plans[name], color=style[0], linestyle=":", label=f"{name} boundary ({plans[name]})")
        ax.set_xlabel("boundary k (blocks frozen)")
        ax.set_ylabel("held-out loss")
        ax2 = ax.twinx()
        num_layers = meta["num_layers"]
        ax2.plot(ks, [flops_fraction(k, num_layers) for k in ks], "s--", color="tab:green", alpha=0.6)
        ax2.set_ylabel("estimated step FLOPs / full fine-tuning", color="tab:green")
        ax.legend(loc="upper left", fontsize=8)
        ax.set_title(f"{task}: quality against backward cost")
        fig.tight_layout()
        name = f"{task}_boundary_sweep.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [r["arm"] for r in rows] + ["no training"]
    values = [r["loss"] for r in rows] + [baseline]
    errors = [r["spread"] for r in rows] + [0]
    colors = ["tab:red" if lab.startswith("salf") else "tab:blue" for lab in labels[:-1]] + ["tab:gray"]
    ax.bar(range(len(labels)), values, yerr=errors, color=colors)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    low = min(values) - 0.05 * (max(values) - min(values) + 1e-9)
    ax.set_ylim(bottom=max(0.0, low - 0.1 * abs(low)))
    ax.set_ylabel("held-out loss (best lr, mean over seeds)")
    ax.set_title(f"{task}: held-out loss per arm")
    fig.tight_layout()
    name = f"{task}_arms.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    names.append(name)
    return names


def write_report(out: Path, meta: dict, runs: dict) -> None:
    lines = ["# Quality study: does the chosen boundary keep fine-tuning quality?", "",
             f"Model {meta['model']} ({meta['num_layers']} blocks), {meta['steps']} AdamW steps per run, "
             f"seeds {meta['seeds']}, learning rates {meta['full_lrs']} (full-parameter arms) and "
             f"{meta['lora_lrs']} (LoRA r=8), sweep at lr {meta['sweep_lr']:g}, CPU with "
             f"{meta['threads']} threads, fp32. Losses are mean next-token losses (nats) on held-out data "
             "never seen in training; ± is half the range over seeds. 'FLOPs' is the cost model's estimated "
             "step FLOPs relative to full fine-tuning, (1 + 2 (L - k) / L) / 3. Measured step times and peak "
             f"RSS come from {meta['threads']} thread(s) on a shared 2-core machine that other jobs loaded "
             "unevenly during the study: treat them as indicative, and see docs/benchmarks.md for controlled "
             "step timings.", ""]
    for task, info in meta["tasks"].items():
        rows = arm_summary(meta, runs, task)
        sweep = sweep_rows(meta, runs, task)
        images = plot_task(out, task, meta, rows, sweep)
        lines += [f"## Task: {task}", "", *[f"- {n}" for n in info["notes"]],
                  f"- sequence length {info['seq_len']}, batch {info['batch_size']}; boundaries chosen on "
                  "training data: " + ", ".join(f"{k} = {v}" for k, v in info["plans"].items()),
                  f"- no training: held-out loss {info['baseline_loss']:.4f} "
                  f"(perplexity {math.exp(info['baseline_loss']):.2f})", "",
                  "| arm | frozen blocks | best lr | held-out loss | perplexity | trainable params | FLOPs | "
                  "step (s) | peak mem (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['arm']} | {r['boundary']} | {r['best_lr']:g} | {r['loss']:.4f} ± {r['spread']:.4f} | "
                         f"{math.exp(r['loss']):.2f} | {r['trainable']:,} | "
                         f"{flops_fraction(r['boundary'], meta['num_layers']):.0%} | {r['step']:.2f} | {r['mem']:.0f} |")
        lines += ["", "**Verdict.** " + verdict(rows, info["baseline_loss"], meta["num_layers"]), ""]
        if sweep:
            lines += ["Cost-benefit sweep (one seed):", "", "| frozen blocks k | held-out loss | FLOPs | step (s) | "
                      "peak mem (MiB) | trainable params |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['k']} | {r['loss']:.4f} | {flops_fraction(r['k'], meta['num_layers']):.0%} | "
                      f"{r['step']:.2f} | {r['mem']:.0f} | {r['trainable']:,} |" for r in sweep]
            lines.append("")
        lines += [f"![{n}]({n})" for n in images] + [""]
        lines += ["All runs (held-out loss per seed, per learning rate):", ""]
        for r in rows:
            per_lr = "; ".join(f"lr {lr:g}: {', '.join(f'{v:.4f}' for v in vals)}" for lr, vals in r["all"].items())
            lines.append(f"- {r['arm']}: {per_lr}")
        lines.append("")
    discussion = out / "results_discussion.md"  # hand-written reading of the numbers, kept across regenerations
    if discussion.is_file():
        lines += ["", discussion.read_text()]
    (out / "results.md").write_text("\n".join(lines))
