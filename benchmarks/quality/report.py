"""results.md of the quality study: curves at equal compute, tables, the default policy, acceptance checks.

Reads OUT/study_<task>.json (what each arm was), OUT/plans_<task>.json (traces,
boundaries, stability, the untrained model's losses) and OUT/runs.jsonl (every
run), and writes OUT/results.md with PNG plots beside it. Choices (the
default policy) are made on validation losses only; test losses are reported.
A hand-written reading in OUT/reading.md is appended when present.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from runs import load_runs, run_key

from freezekern.trials import Arm

POLICY_ARMS = ("salf/cosine", "salf/logit_lens", "gain_share/cosine", "flops/cosine", "probe")
HEURISTIC_ARMS = ("freeze half", "freeze 75%")
TABLE_FRACTIONS = (0.25, 0.5, 1.0)


# -- reading the runs ---------------------------------------------------------------------------

def _arm(data: dict) -> Arm:
    return Arm(**data)


def final_runs(runs: dict, task: str, arm: Arm, seeds, budget: float) -> list[dict]:
    found = (runs.get(run_key(task, arm, seed, budget)) for seed in seeds)
    return [r for r in found if r is not None and r.get("stage") == "final"]


def offset_of(name: str, plans: dict) -> float:
    """Compute an arm spent before training (the probe's trials), in full-step equivalents."""
    if name == "probe":
        return float(plans["plans"]["probe"]["probe"]["spent_full_steps"])
    return 0.0


def mean_curve(records: list[dict], metric: str, offset: float = 0.0, axis: str = "flops") -> list[tuple]:
    """[(x, mean, half-range, n)] over seeds at each checkpoint; x includes the arm's offset (flops only)."""
    if not records:
        return []
    points = []
    for i in range(min(len(r["rows"]) for r in records)):
        values = [r["rows"][i][metric] for r in records if metric in r["rows"][i]]
        if not values:
            continue
        x = statistics.fmean(r["rows"][i][axis] for r in records) + (offset if axis == "flops" else 0.0)
        points.append((x, statistics.fmean(values), (max(values) - min(values)) / 2, len(values)))
    return points


def value_at(points: list[tuple], x: float, start: float, reach: float = 0.0) -> float | None:
    """Linear interpolation of a curve [(x, y, ...)] at ``x``; ``start`` is y at x = 0.

    Past the curve's end by less than ``reach`` (one step of the arm: the
    budget left could not buy another) the last value holds; further, None.
    """
    xs = [0.0] + [p[0] for p in points]
    ys = [start] + [p[1] for p in points]
    if x > xs[-1] + reach + 1e-9:
        return None
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1 + 1e-9:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def pareto(points: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The (name, compute, loss) points that no cheaper-or-equal point beats."""
    front, best = [], math.inf
    for name, x, y in sorted(points, key=lambda p: (p[1], p[2])):
        if y < best - 1e-12:
            front.append((name, x, y))
            best = y
    return front


# -- one task -----------------------------------------------------------------------------------

def _calibrate_seconds(record: dict, arm: Arm, timing: dict, pool: int) -> None:
    """Each row's seconds as steps x the arm's paired step time (a cache arm's first epoch at its misses')."""
    seconds = timing["seconds"]
    own = seconds.get(arm.key())
    if own is None:
        return
    miss = seconds.get(Arm(arm.name, arm.boundary, arm.lr, arm.lora, False, arm.train_head,
                           arm.lora_kwargs).key(), own) if arm.prefix_cache else own
    for row in record["rows"]:
        first = min(row["steps"], pool)
        row["measured_seconds"] = row["seconds"]
        row["seconds"] = first * miss + (row["steps"] - first) * own


class TaskView:
    """Everything the report says about one task."""

    def __init__(self, out: Path, meta: dict, runs: dict):
        self.meta = meta
        self.task = meta["task"]
        self.plans = json.loads((out / f"plans_{self.task}.json").read_text())
        self.budget = meta["budget"]
        self.seeds = meta["seeds"]
        self.arms = {name: _arm(a) for name, a in meta["arms"].items()}
        self.records = {name: final_runs(runs, self.task, arm, self.seeds, self.budget)
                        for name, arm in self.arms.items()}
        self.sweep = [(_arm(a), final_runs(runs, self.task, _arm(a), [0], self.budget)) for a in meta["sweep"]]
        self.baseline = self.plans["baseline"]
        self.classify = "accuracy" in self.baseline["validation"]
        timing = out / f"timing_{self.task}.json"
        self.timing = json.loads(timing.read_text()) if timing.is_file() else None
        if self.timing is not None:  # the seconds axis from paired step times instead of loaded wall time
            for name, arm in self.arms.items():
                for record in self.records[name]:
                    _calibrate_seconds(record, arm, self.timing, meta["train_batches"])

    def curve(self, name: str, split: str, metric: str = "loss", axis: str = "flops") -> list[tuple]:
        return mean_curve(self.records[name], f"{split}_{metric}", offset_of(name, self.plans), axis)

    def at_budget(self, name: str, split: str, fraction: float, metric: str = "loss") -> float | None:
        """The arm's mean ``split`` metric after ``fraction`` of the budget, its own overhead included."""
        start = self.baseline[split][metric]
        step = self.records[name][0]["step_cost"] if self.records[name] else 0.0
        return value_at(self.curve(name, split, metric), fraction * self.budget, start, reach=step)

    def spread_at(self, name: str, split: str, fraction: float) -> float:
        points = self.curve(name, split)
        near = [p for p in points if abs(p[0] - fraction * self.budget) <= 0.05 * self.budget]
        return near[0][2] if near else 0.0

    def last_quarter_change(self, name: str = "full", split: str = "validation") -> float | None:
        a, b = self.at_budget(name, split, 0.75), self.at_budget(name, split, 1.0)
        return None if a is None or b is None else (b - a) / a


def choose_default(views: list[TaskView]) -> tuple[str, dict]:
    """The policy whose validation loss at the full budget, relative to full fine-tuning's, is lowest on average."""
    scores = {}
    for name in POLICY_ARMS:
        ratios = []
        for view in views:
            mine, full = view.at_budget(name, "validation", 1.0), view.at_budget("full", "validation", 1.0)
            if mine is None or full is None:
                break
            ratios.append(mine / full)
        else:
            if ratios:
                scores[name] = statistics.fmean(ratios)
    if not scores:
        return "", {}
    return min(scores, key=scores.get), scores


# -- plots --------------------------------------------------------------------------------------

def plot_task(out: Path, view: TaskView) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from freezekern.io import save_png

    names = []
    metric = "loss"
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    start = view.baseline["test"][metric]
    colors = plt.get_cmap("tab20").colors  # one colour per arm: there are more arms than tab10 has
    for i, (name, records) in enumerate(view.records.items()):
        if not records:
            continue
        style = "-" if name in POLICY_ARMS else "--"
        for ax, axis in zip(axes, ("flops", "seconds")):
            points = view.curve(name, "test", metric, axis)
            offset = offset_of(name, view.plans) if axis == "flops" else 0.0
            ax.plot([offset] + [p[0] for p in points], [start] + [p[1] for p in points], style, marker="o",
                    markersize=3, color=colors[(2 * i) % 20 + (2 * i) // 20 % 2], label=f"{name} (k={view.arms[name].boundary})")
    everything = [(n, p[0], p[1]) for n, r in view.records.items() if r for p in view.curve(n, "test")]
    front = pareto(everything)
    axes[0].step([p[1] for p in front], [p[2] for p in front], where="post", color="black", alpha=0.35,
                 linewidth=4, label="Pareto front")
    axes[0].set_xlabel("training compute (full fine-tuning steps, estimated FLOPs; the probe's trials included)")
    axes[1].set_xlabel("training seconds (steps x paired step time)" if view.timing else
                       "training seconds (measured; shared 2-core CPU, see the caveats)")
    axes[0].set_ylabel("test loss")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{view.task}: test loss at equal compute (mean over seeds)")
    fig.tight_layout()
    name = f"{view.task}_compute.png"
    save_png(fig, out / name)
    names.append(name)
    losses: dict[int, float] = {}
    for arm, records in view.sweep:
        if records:
            losses[arm.boundary] = mean_curve(records, "test_loss")[-1][1]
    for name, arm in view.arms.items():
        if view.records[name] and not arm.lora and arm.boundary is not None and not arm.prefix_cache:
            if name != "probe":
                losses[arm.boundary] = view.at_budget(name, "test", 1.0)
            else:  # its boundary by its own training run: the sweep compares boundaries, not the probe's charge
                losses.setdefault(arm.boundary, mean_curve(view.records[name], "test_loss")[-1][1])
    sweep = sorted(losses.items())
    if sweep:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot([k for k, _ in sweep], [v for _, v in sweep], "o-", label="boundary k, test loss at the full budget")
        full = view.at_budget("full", "test", 1.0)
        if full is not None:
            ax.axhline(full, color="tab:green", linestyle="--", label="full fine-tuning")
        untrained = view.baseline["test"]["loss"]
        if untrained <= 2 * max(v for _, v in sweep):  # far above, it would flatten the sweep to a line
            ax.axhline(untrained, color="gray", linestyle=":", label="no training")
        for policy, color in (("salf/cosine", "tab:red"), ("probe", "tab:purple")):
            ax.axvline(view.arms[policy].boundary, color=color, linestyle=":", label=f"{policy} boundary")
        ax.set_xlabel("boundary k (blocks frozen)")
        ax.set_ylabel("test loss at equal compute")
        ax.legend(fontsize=8)
        ax.set_title(f"{view.task}: the boundary sweep at {view.budget:g} full-step equivalents")
        fig.tight_layout()
        name = f"{view.task}_sweep.png"
        save_png(fig, out / name)
        names.append(name)
    return names


# -- the page -----------------------------------------------------------------------------------

def _fmt(value, spread=None, digits=4):
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    return text + (f" ± {spread:.{digits}f}" if spread else "")


def task_section(out: Path, view: TaskView) -> list[str]:
    meta, plans = view.meta, view.plans
    images = plot_task(out, view)
    lines = [f"## Task: {view.task}", "", *[f"- {n}" for n in meta["notes"]],
             f"- sequences of {meta['seq_len']} tokens (padding trimmed), batches of {meta['batch_size']}, a cycled "
             f"training pool of {meta['train_batches']} batches; budget {view.budget:g} full-step equivalents",
             f"- no training: validation {_fmt(view.baseline['validation']['loss'])}, test "
             f"{_fmt(view.baseline['test']['loss'])}"
             + (f" (accuracy {view.baseline['test']['accuracy']:.1%})" if view.classify else ""), ""]
    lines += ["Boundaries chosen on training-split calibration data (three disjoint calibration subsets in brackets):",
              "", "| policy | boundary | why | calibration subsets |", "|---|---|---|---|"]
    for name, plan in plans["plans"].items():
        subsets = plans["stability"].get(name, [])
        lines.append(f"| {name} | {plan['boundary']} | {plan['rule']} | {', '.join(map(str, subsets))} |")
    lines.append("")
    head = "| arm | k | lr | step cost | trainable | " + " | ".join(
        f"test @ {int(f * 100)} %" for f in TABLE_FRACTIONS) + " | validation @ 100 % |"
    if view.classify:
        head += " test accuracy @ 100 % |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, arm in view.arms.items():
        records = view.records[name]
        if not records:
            lines.append(f"| {name} | {arm.boundary} | {arm.lr:g} | | | (not run yet) |")
            continue
        cells = [_fmt(view.at_budget(name, "test", f), view.spread_at(name, "test", f)) for f in TABLE_FRACTIONS]
        row = (f"| {name} | {arm.boundary if arm.boundary is not None else 'none'} | {arm.lr:g} | "
               f"{records[0]['step_cost']:.2f} | {records[0]['trainable_params']:,} | " + " | ".join(cells)
               + f" | {_fmt(view.at_budget(name, 'validation', 1.0))} |")
        if view.classify:
            acc = view.at_budget(name, "test", 1.0, "accuracy")
            row += f" {acc:.1%} |" if acc is not None else " – |"
        lines.append(row)
    change = view.last_quarter_change()
    lines += ["", f"Full fine-tuning's validation loss changes by {change:+.2%} over the last quarter of the budget."
              if change is not None else "", ""]
    everything = [(n, p[0], p[1]) for n, r in view.records.items() if r for p in view.curve(n, "test")]
    front = pareto(everything)
    lines += ["Pareto front (test loss against estimated compute): " + ", ".join(
        f"{n} at {x:.1f} ({y:.4f})" for n, x, y in front), ""]
    lines += [f"![{n}]({n})" for n in images] + [""]
    return lines


def acceptance(views: list[TaskView], default: str) -> list[str]:
    lines = [f"## Acceptance, for the default policy ({default})", "",
             "| task | default @ 50 % / full @ 100 % (test) | within 2 %? | no worse than freeze half / 75 % at "
             "every checkpoint (beyond the seed spread)? | cosine vs logit-lens boundaries | calibration subsets |",
             "|---|---|---|---|---|---|"]
    for view in views:
        mine, full = view.at_budget(default, "test", 0.5), view.at_budget("full", "test", 1.0)
        ratio = None if mine is None or full is None else mine / full - 1
        worse = []
        for heuristic in HEURISTIC_ARMS:
            for fraction in view.meta["checkpoints"]:
                a, b = view.at_budget(default, "test", fraction), view.at_budget(heuristic, "test", fraction)
                if a is None or b is None:
                    continue
                slack = view.spread_at(default, "test", fraction) + view.spread_at(heuristic, "test", fraction)
                if a > b + slack:
                    worse.append(f"{heuristic} @ {fraction:g}")
        k = {n: p["boundary"] for n, p in view.plans["plans"].items()}
        metric_gap = abs(k["salf/cosine"] - k["salf/logit_lens"])
        subsets = view.plans["stability"].get("salf/cosine", [])
        spread = max(subsets) - min(subsets) if subsets else None
        lines.append(f"| {view.task} | {_fmt(ratio * 100 if ratio is not None else None, digits=2)} % | "
                     f"{'yes' if ratio is not None and ratio <= 0.02 else 'no'} | "
                     f"{'yes' if not worse else 'no: ' + ', '.join(worse)} | "
                     f"salf {k['salf/cosine']} vs {k['salf/logit_lens']} ({'within' if metric_gap <= 3 else 'beyond'} 3) | "
                     f"salf/cosine {', '.join(map(str, subsets))} "
                     f"({'within' if spread is not None and spread <= 2 else 'beyond'} 2) |")
    return lines + [""]


def write_report(out: Path) -> None:
    out = Path(out)
    runs = load_runs(out / "runs.jsonl")
    metas = [json.loads(p.read_text()) for p in sorted(out.glob("study_*.json"))]
    views = [TaskView(out, meta, runs) for meta in metas]
    lines = ["# Quality study: the best model for the compute spent", ""]
    if not views:
        (out / "results.md").write_text("\n".join(lines + ["No task has finished yet.", ""]))
        return
    first = metas[0]
    lines += [
        f"Model: {first.get('model', 'smollm2-135m-instruct')} ({first['num_layers']} blocks), fp32, on {first['device']} with "
        f"{first['threads']} torch thread(s) per process. Every arm trains under the same compute budget, counted in "
        "full-step equivalents of estimated training FLOPs (freezekern.policy.cost: the plan's cost model, LM head "
        "included), with AdamW at a constant learning rate, no weight decay, gradient norm clipped at 1. Learning "
        f"rates: a grid of {first['full_lrs']} (LoRA: {first['lora_lrs']}) on seed 0 at {first['grid_share']:.0%} of "
        "the budget, chosen by validation loss; then seeds "
        + ", ".join(f"{m['task']} {tuple(m['seeds'])}" for m in metas)
        + " at the chosen rate over the whole budget. The probe's own trials are charged to it (its curve starts at their cost). ± is half the range "
        "over seeds. Losses are mean next-token losses (nats) on the answer tokens (chat, classify) or every token "
        "(code). The seconds axis: where OUT/timing_<task>.json exists, each run's steps times its arm's step "
        "time measured in steps paired with full fine-tuning (one process, alternating steps, so the machine's "
        "load hits both alike); otherwise the wall time the run measured, from two study processes sharing a "
        "2-core machine with other work (indicative only). The FLOPs axis is exact by construction.", ""]
    default, scores = choose_default(views)
    if scores:
        lines += ["## The default policy, chosen on validation data", "",
                  "Mean over tasks of (validation loss at the full budget) / (full fine-tuning's):", "",
                  "| policy | score |", "|---|---|"]
        lines += [f"| {name} | {score:.4f} |" for name, score in sorted(scores.items(), key=lambda kv: kv[1])]
        lines += ["", f"Chosen: **{default}**.", ""]
        lines += acceptance(views, default)
    for view in views:
        lines += task_section(out, view)
    reading = out / "reading.md"
    if reading.is_file():
        lines += [reading.read_text()]
    (out / "results.md").write_text("\n".join(lines))
