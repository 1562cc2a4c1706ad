"""results.md of study v3: the compute each arm needs for full fine-tuning's quality, curves, Pareto fronts.

Reads OUT/settings.json, OUT/plans_<task>.json and OUT/runs.jsonl (every
finished run) and writes OUT/results.md with PNG plots beside it. It works
on partial results: what has not run yet is listed, and every figure says
how many seeds it rests on. Choices (learning rates) are made on validation
losses only; test losses are reported.

The savings-at-equal-quality figure: the target is full fine-tuning's best
validation loss (the lowest point of its mean curve over seeds); the compute
an arm needs is where its mean validation curve first reaches the target,
interpolated linearly between checkpoints (every 10 % of the budget; the
untrained model's loss at 0); it is given as a share of the compute full
fine-tuning needs to reach that point of its own curve, "not reached" when
the arm never gets there within the budget. Only the seeds both arms have
finished enter.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from design3 import ALL_TASKS, Settings, arms_for, best_rate, config_key, grown_grid, job_list
from report import mean_curve, pareto, value_at
from runs import claimed_by, load_runs, run_key

from freezekern.trials import Arm

DEFAULT, MOVING_DEFAULT = "default", "moving -> default"
HALF, FULL = "freeze half", "full"
TABLE_FRACTIONS = (0.2, 0.5, 1.0)  # checkpoints of the finals (every 10 %)
SAVINGS_TARGET = 0.70  # the acceptance: at most 70 % of full fine-tuning's compute
SAVINGS_TASKS = 2  # on at least two tasks


def load_settings(out: Path) -> Settings:
    data = json.loads((out / "settings.json").read_text())
    return Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def reach(points: list[tuple], start: float, target: float) -> float | None:
    """The first x at which a curve [(x, y, ...)] (y = ``start`` at x = 0) reaches ``target`` or below,
    interpolated linearly between points; None when it never does."""
    previous = (0.0, start)
    if start <= target:
        return 0.0
    for x, y, *_ in points:
        if y <= target:
            x0, y0 = previous
            return x0 + (x - x0) * (y0 - target) / (y0 - y) if y0 != y else x
        previous = (x, y)
    return None


class TaskView:
    """One task's plans, arms, grid and final runs (whatever of them exists)."""

    def __init__(self, out: Path, name: str, settings: Settings, runs: dict):
        self.task, self.settings = name, settings
        self.plans = json.loads((out / f"plans_{name}.json").read_text())
        self.baseline = self.plans["baseline"]
        self.classify = "accuracy" in self.baseline["validation"]
        self.arms = arms_for(self.plans, settings.moving)
        first: dict[str, str] = {}
        self.same_as = {n: first.setdefault(config_key(a), n) for n, a in self.arms.items()}  # shared runs
        grown = {n: grown_grid(a, settings, runs, name) for n, a in self.arms.items()}
        self.grid = {n: scores for n, (_, scores) in grown.items()}
        self.grid_partial = {n: {lr: runs.get(run_key(name, dataclasses.replace(self.arms[n], lr=lr), 0,
                                                      settings.grid_share * settings.budget))
                                 for lr in rates} for n, (rates, _) in grown.items()}
        self.tuned: dict[str, Arm | None] = {}
        self.records: dict[str, dict[int, dict]] = {}
        for n, arm in self.arms.items():
            scores = self.grid[n]
            lr = None if scores is None else best_rate(scores)
            self.tuned[n] = None if lr is None else dataclasses.replace(arm, lr=lr)
            found = {}
            if lr is not None:
                for seed in settings.seeds:
                    record = runs.get(run_key(name, self.tuned[n], seed, settings.budget))
                    if record is not None and record.get("stage") == "final":
                        found[seed] = record
            self.records[n] = found

    def ok(self, name: str, seeds=None) -> list[dict]:
        """The arm's finished (not failed) final runs, of ``seeds`` if given."""
        return [r for s, r in sorted(self.records[name].items())
                if r.get("rows") and (seeds is None or s in seeds)]

    def seeds_of(self, name: str) -> set[int]:
        return {s for s, r in self.records[name].items() if r.get("rows")}

    def curve(self, name: str, split: str, axis: str = "flops", metric: str = "loss", seeds=None) -> list[tuple]:
        return mean_curve(self.ok(name, seeds), f"{split}_{metric}", 0.0, axis)

    def at(self, name: str, split: str, fraction: float, metric: str = "loss", seeds=None) -> tuple | None:
        """(mean, half-range over seeds, n) at ``fraction`` of the budget; None before it has run."""
        records = self.ok(name, seeds)
        if not records:
            return None
        values = []
        for r in records:
            v = value_at([(row["flops"], row[f"{split}_{metric}"]) for row in r["rows"]], fraction *
                         self.settings.budget, self.baseline[split][metric], reach=r["rows"][-1]["flops"] /
                         max(r["rows"][-1]["steps"], 1))
            if v is not None:
                values.append(v)
        if not values:
            return None
        return statistics.fmean(values), (max(values) - min(values)) / 2, len(values)

    def savings(self, name: str, axis: str = "flops") -> dict | None:
        """The compute ``name`` needs to reach full fine-tuning's best validation loss (see the module
        docstring): {"share", "arm", "full", "target", "seeds", "per_seed": [share or None]}; ``axis``
        "seconds": measured training seconds instead of estimated FLOPs."""
        seeds = self.seeds_of(name) & self.seeds_of(FULL)
        if not seeds:
            return None
        start = self.baseline["validation"]["loss"]
        full = self.curve(FULL, "validation", axis, seeds=seeds)
        target_x, target = min(((p[0], p[1]) for p in full), key=lambda p: (p[1], p[0]))
        if target >= start:  # nothing to reach: the figure is undefined, not 0 %
            return {"share": None, "arm": None, "full": None, "target": target, "seeds": sorted(seeds),
                    "per_seed": [], "undefined": "full fine-tuning never beats the untrained model's validation loss"}
        mine = reach(self.curve(name, "validation", axis, seeds=seeds), start, target)
        per_seed = []
        for seed in sorted(seeds):
            f = self.curve(FULL, "validation", axis, seeds={seed})
            fx, fy = min(((p[0], p[1]) for p in f), key=lambda p: (p[1], p[0]))
            x = reach(self.curve(name, "validation", axis, seeds={seed}), start, fy)
            per_seed.append(None if x is None else x / fx)
        return {"share": None if mine is None else mine / target_x, "arm": mine, "full": target_x,
                "target": target, "seeds": sorted(seeds), "per_seed": per_seed}

    def missing(self) -> list[str]:
        lines = []
        for n in self.arms:
            grid = self.grid_partial[n]
            if self.grid[n] is None:
                done = sum(r is not None for r in grid.values())
                lines.append(f"{n}: learning-rate grid {done}/{len(grid)} done")
                continue
            absent = [s for s in self.settings.seeds if s not in self.records[n]]
            failed = [s for s, r in self.records[n].items() if r.get("failed")]
            if absent:
                lines.append(f"{n}: final seed(s) {', '.join(map(str, absent))} not run yet")
            if failed:
                lines.append(f"{n}: final seed(s) {', '.join(map(str, failed))} failed")
        return lines


# -- plots --------------------------------------------------------------------------------------

def _colors():
    import matplotlib.pyplot as plt

    return plt.get_cmap("tab10").colors


def plot_task(out: Path, view: TaskView) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from freezekern.io import save_png

    if not any(view.ok(n) for n in view.arms):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    colors = _colors()
    for i, name in enumerate(view.arms):
        if not view.ok(name) or view.same_as[name] != name:
            continue
        twins = [n for n in view.arms if n != name and view.same_as[n] == name]
        style = "-" if {name, *twins} & {DEFAULT, MOVING_DEFAULT, FULL} else "--"
        label = f"{' = '.join([name, *twins])} ({_k(view.arms[name])}, {len(view.ok(name))} seed(s))"
        for ax, split, axis in zip(axes, ("validation", "test", "test"), ("flops", "flops", "seconds")):
            points = view.curve(name, split, axis)
            ax.plot([0.0] + [p[0] for p in points], [view.baseline[split]["loss"]] + [p[1] for p in points], style,
                    marker="o", markersize=2, color=colors[i % len(colors)], label=label)
    saving = view.savings(FULL)
    if saving is not None and not saving.get("undefined"):
        axes[0].axhline(saving["target"], color="black", linestyle=":", label="full fine-tuning's best")
    front = pareto([(n, p[0], p[1]) for n in view.arms if view.ok(n) for p in view.curve(n, "test")])
    axes[1].step([p[1] for p in front], [p[2] for p in front], where="post", color="black", alpha=0.3,
                 linewidth=4, label="Pareto front")
    for ax in axes:  # the untrained model's loss would flatten the curves: start the view at the first checkpoint
        ys = [p[1] for n in view.arms if view.ok(n) for p in view.curve(n, "validation" if ax is axes[0] else "test")]
        if ys:
            low, high = min(ys), max(ys)
            ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.15 * (high - low + 1e-9))
    axes[0].set_ylabel("validation loss")
    axes[1].set_ylabel("test loss")
    axes[2].set_ylabel("test loss")
    for ax in axes[:2]:
        ax.set_xlabel("training compute (full fine-tuning step equivalents, estimated FLOPs)")
    axes[2].set_xlabel("training seconds (measured by each run; shared CPU, noisy)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{view.task}: loss against compute (mean over seeds; budget {view.settings.budget:g})")
    fig.tight_layout()
    name = f"{view.task}_compute.png"
    save_png(fig, out / name)
    return name


def plot_moving(out: Path, views: list[TaskView]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from freezekern.io import save_png

    lines = []
    for view in views:
        for name, arm in view.arms.items():
            if arm.moving is None:
                continue
            for seed, record in sorted(view.records[name].items()):
                if record.get("rows") and record.get("moves") is not None:
                    lines.append((f"{view.task}: {name} (seed {seed})", arm, record))
                    break
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = _colors()
    for i, (label, arm, record) in enumerate(lines):
        xs, ks = [0.0], [arm.moving["start"]]
        for move in record["moves"]:
            xs += [move["fraction"], move["fraction"]]
            ks += [ks[-1], move["to"]]
        xs.append(1.0)
        ks.append(ks[-1])
        ax.plot(xs, ks, color=colors[i % len(colors)], label=label)
    ax.set_xlabel("share of the budget spent (estimated FLOPs)")
    ax.set_ylabel("boundary k (blocks frozen)")
    ax.set_title("The moving boundary over a run")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out / "moving_boundary.png")
    return "moving_boundary.png"


# -- the page -----------------------------------------------------------------------------------

def _k(arm: Arm) -> str:
    if arm.boundary is None:
        return "k = none"
    if arm.moving is not None:
        return f"k = {arm.moving['start']} -> {arm.boundary}"
    return f"k = {arm.boundary}" + (", LoRA" if arm.lora else "")


def _fmt(value: tuple | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    mean, half, n = value
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if n > 1 else " (1 seed)")


def _share(saving: dict | None) -> str:
    if saving is None:
        return "–"
    if saving.get("undefined"):
        return f"undefined ({saving['undefined']})"
    main = "not reached" if saving["share"] is None else f"{saving['share']:.0%}"
    seeds = ", ".join("not reached" if s is None else f"{s:.0%}" for s in saving["per_seed"])
    return f"{main} (per seed: {seeds})" if len(saving["per_seed"]) > 1 else f"{main} (1 seed)"


def task_section(out: Path, view: TaskView) -> list[str]:
    plans = view.plans
    lines = [f"## Task: {view.task}", "", *[f"- {n}" for n in plans["notes"]],
             f"- sequences of {plans['seq_len']} tokens (padding trimmed), batches of {plans['batch_size']}, a "
             f"cycled training pool of {plans['train_batches']} batches; validation {plans['eval_tokens']['validation']:,}"
             f" tokens ({plans['scored_tokens']['validation']:,} scored), test {plans['eval_tokens']['test']:,} "
             f"({plans['scored_tokens']['test']:,} scored)",
             f"- no training: validation {view.baseline['validation']['loss']:.4f}, test "
             f"{view.baseline['test']['loss']:.4f}"
             + (f" (test accuracy {view.baseline['test']['accuracy']:.1%})" if view.classify else ""),
             "- boundaries on training-split calibration data (three disjoint calibration subsets in brackets): "
             + "; ".join(f"{n} k = {p['boundary']}"
                         + (f" ({', '.join(map(str, plans['stability'][n]))})" if n in plans["stability"] else "")
                         for n, p in plans["plans"].items()), ""]
    head = ("| arm | boundary | lr (grid: validation loss) | steps | mean step cost | "
            + " | ".join(f"test @ {int(f * 100)} %" for f in TABLE_FRACTIONS)
            + " | best validation | compute to full's best validation |")
    if view.classify:
        head += " test accuracy @ 100 % |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, arm in view.arms.items():
        partial = view.grid_partial[name]
        grid = ", ".join(f"{lr:g}: " + ("…" if r is None else "diverged" if not r.get("rows") else
                                        f"{r['rows'][-1]['validation_loss']:.3f}") for lr, r in partial.items())
        tuned = view.tuned[name]
        edge = tuned is not None and tuned.lr in (min(partial), max(partial))
        lr = (f"**{tuned.lr:g}**{' (at the edge)' if edge else ''} ({grid})" if tuned is not None
              else f"({grid})")
        records = view.ok(name)
        if view.same_as[name] != name:
            lines.append(f"| {name} | {_k(arm)} | (the runs of {view.same_as[name]}) | | | "
                         + " | ".join("" for _ in TABLE_FRACTIONS) + " | | |" + (" |" if view.classify else ""))
            continue
        if not records:
            lines.append(f"| {name} | {_k(arm)} | {lr} | | | " + " | ".join("–" for _ in TABLE_FRACTIONS)
                         + " | – | – |" + (" – |" if view.classify else ""))
            continue
        last = [r["rows"][-1] for r in records]
        steps = statistics.fmean(r["steps"] for r in last)
        cost = statistics.fmean(r["flops"] / max(r["steps"], 1) for r in last)
        best = min(p[1] for p in view.curve(name, "validation"))
        row = (f"| {name} | {_k(arm)} | {lr} | {steps:.0f} | {cost:.2f} | "
               + " | ".join(_fmt(view.at(name, "test", f)) for f in TABLE_FRACTIONS)
               + f" | {best:.4f} | {_share(view.savings(name))} |")
        if view.classify:
            acc = view.at(name, "test", 1.0, "accuracy")
            row += f" {acc[0]:.1%} |" if acc is not None else " – |"
        lines.append(row)
    lines.append("")
    saving = view.savings(FULL)
    if saving is not None and saving.get("undefined"):
        lines += [f"Compute to full fine-tuning's best validation loss: undefined ({saving['undefined']}).", ""]
    elif saving is not None:
        lines += [f"Full fine-tuning's best validation loss: {saving['target']:.4f}, reached at "
                  f"{saving['full']:.1f} full-step equivalents ({saving['full'] / view.settings.budget:.0%} of the "
                  "budget); the last column is each arm's compute to reach it, as a share of that.", ""]
    a, b = view.at(FULL, "validation", 0.75), view.at(FULL, "validation", 1.0)
    if a is not None and b is not None:
        lines += [f"Full fine-tuning's validation loss changes by {(b[0] - a[0]) / a[0]:+.2%} over the last quarter "
                  "of the budget (near 0: converged for this schedule).", ""]
    front = pareto([(n, p[0], p[1]) for n in view.arms if view.ok(n) for p in view.curve(n, "test")])
    if front:
        lines += ["Pareto front (mean test loss against estimated compute, every checkpoint of every arm): "
                  + ", ".join(f"{n} at {x:.1f} ({y:.4f})" for n, x, y in front), ""]
    image = plot_task(out, view)
    if image:
        lines += [f"![{view.task}: loss against compute]({image})", ""]
    missing = view.missing()
    if missing:
        lines += ["Not finished yet: " + "; ".join(missing) + ".", ""]
    return lines


def acceptance(views: list[TaskView]) -> list[str]:
    """The issue's two criteria, for the default (gain_share's static boundary) and the moving boundary."""
    lines = ["## Acceptance", "",
             "1. At the full budget, the default's test loss is no worse than the best of full fine-tuning and "
             "freeze half beyond the seed spread (gap <= half-range of the one + half-range of the other).",
             f"2. The default reaches full fine-tuning's best validation loss with at most {SAVINGS_TARGET:.0%} of "
             f"its compute on at least {SAVINGS_TASKS} tasks.", "",
             "The same is shown for the moving boundary towards the default's k (a candidate default).", "",
             "| task | arm | test @ 100 % | best of full / freeze half | gap | spread | 1 | compute to full's best "
             "validation | 2 |", "|---|---|---|---|---|---|---|---|---|"]
    passed = {DEFAULT: [], MOVING_DEFAULT: []}
    verdicts = {DEFAULT: [], MOVING_DEFAULT: []}
    for view in views:
        for name in (DEFAULT, MOVING_DEFAULT):
            if name not in view.arms:
                lines.append(f"| {view.task} | {name} | (no such arm: the default's k is "
                             f"{view.arms[DEFAULT].boundary}) | | | | | | |")
                continue
            mine = view.at(name, "test", 1.0)
            others = {n: view.at(n, "test", 1.0) for n in (FULL, HALF)}
            others = {n: v for n, v in others.items() if v is not None}
            saving = view.savings(name)
            ok2 = None if saving is None or saving.get("undefined") else (
                saving["share"] is not None and saving["share"] <= SAVINGS_TARGET)
            if ok2:
                passed[name].append(view.task)
            if ok2 is not None:
                verdicts[name].append(view.task)
            if mine is None or not others:
                lines.append(f"| {view.task} | {name} | {_fmt(mine)} | (not run yet) | | | – | {_share(saving)} | "
                             f"{_yes(ok2)} |")
                continue
            best_name = min(others, key=lambda n: others[n][0])
            best = others[best_name]
            gap = mine[0] - best[0]
            spread = mine[1] + best[1]
            ok1 = gap <= spread + 1e-12
            seeds = min(mine[2], best[2])
            lines.append(f"| {view.task} | {name} | {_fmt(mine)} | {best_name} {_fmt(best)} | {gap:+.4f} "
                         f"({gap / best[0]:+.2%}) | {spread:.4f}{' (1 seed: no spread yet)' if seeds < 2 else ''} | "
                         f"{_yes(ok1)} | {_share(saving)} | {_yes(ok2)} |")
    lines.append("")
    for name in (DEFAULT, MOVING_DEFAULT):
        done = verdicts[name]
        lines.append(f"- {name}: criterion 2 holds on {len(passed[name])} of {len(done)} task(s) measured "
                     f"({', '.join(passed[name]) or 'none'}); it needs {SAVINGS_TASKS}"
                     + ("." if len(done) == len(views) else f" ({len(views) - len(done)} task(s) not measured yet)."))
    return lines + [""]


CANDIDATES = (FULL, HALF, "shallow L/3", DEFAULT, "salf", MOVING_DEFAULT, "moving -> salf")  # the default's rules
SAME_WHEN_ABSENT = {"moving -> salf": MOVING_DEFAULT}  # absent where salf's k is the default's


def _candidate(row: dict, name: str):
    """``row[name]``, or the value of the arm that trains alike where ``name`` is absent from the task."""
    return row.get(name) if name in row else row.get(SAME_WHEN_ABSENT.get(name))


def choose_default(losses: dict[str, dict[str, tuple | None]]) -> dict:
    """The rule for the default, chosen on validation: ``losses`` task -> candidate -> (mean, half-range, n) of
    the validation loss at the end of the budget (None: not run yet). Only tasks where every candidate has
    run count; on each, a candidate's gap is its loss over the best candidate's, minus 1. Returns {"tasks":
    [counted], "gaps": {candidate: {task: gap}}, "mean_gap": {candidate: mean}, "choice": the candidate with
    the lowest mean gap (None before any task counts), "freezing_loses": [tasks where full fine-tuning beats
    every freezing rule beyond the seed spread]}."""
    tasks = [t for t, row in losses.items() if all(_candidate(row, c) is not None for c in CANDIDATES)]
    gaps = {c: {} for c in CANDIDATES}
    loses = []
    for t in tasks:
        row = {c: _candidate(losses[t], c) for c in CANDIDATES}
        best = min(v[0] for v in row.values())
        for c, v in row.items():
            gaps[c][t] = v[0] / best - 1.0
        full = row[FULL]
        if all(full[0] + full[1] < v[0] - v[1] for c, v in row.items() if c != FULL):
            loses.append(t)
    mean_gap = {c: statistics.fmean(g.values()) for c, g in gaps.items() if g}
    choice = min(mean_gap, key=lambda c: (mean_gap[c], CANDIDATES.index(c))) if mean_gap else None
    return {"tasks": tasks, "gaps": gaps, "mean_gap": mean_gap, "choice": choice, "freezing_loses": loses}


def default_section(views: list[TaskView]) -> list[str]:
    """Which rule the default should be, on validation (the choice item 4 of the study asks for)."""
    losses = {v.task: {n: v.at(n, "validation", 1.0) for n in CANDIDATES if n in v.arms} for v in views}
    chosen = choose_default(losses)
    lines = ["## The default, chosen on validation", "",
             "Candidates: every boundary rule the default could be, \"full\" (do not freeze) included; LoRA is "
             "reported, not a candidate. Mean validation loss over the seeds at the end of the budget, and its gap "
             "to the task's best candidate; only tasks where every candidate has finished count (moving -> salf "
             "is moving -> default where salf's k is the default's). Test is not used.", "",
             "| candidate | " + " | ".join(v.task for v in views) + " | mean gap |",
             "|---" * (len(views) + 2) + "|"]
    for c in CANDIDATES:
        cells = []
        for v in views:
            value = _candidate(losses[v.task], c)
            gap = chosen["gaps"][c].get(v.task)
            cells.append("–" if value is None else f"{value[0]:.4f}" + ("" if gap is None else f" ({gap:+.2%})"))
        mean = chosen["mean_gap"].get(c)
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {'–' if mean is None else f'{mean:+.2%}'} |")
    lines.append("")
    if chosen["choice"] is None:
        lines.append("No choice yet: no task has every candidate's finals.")
    else:
        lines.append(f"On {len(chosen['tasks'])} task(s) ({', '.join(chosen['tasks'])}) the lowest mean gap is "
                     f"**{chosen['choice']}**" + (" (do not freeze)" if chosen["choice"] == FULL else "") + ". "
                     + ("Full fine-tuning beats every freezing rule beyond the seed spread on: "
                        + ", ".join(chosen["freezing_loses"]) + "." if chosen["freezing_loses"] else
                        "On no counted task does full fine-tuning beat every freezing rule beyond the seed spread."))
    return lines + [""]


def _yes(value: bool | None) -> str:
    return "–" if value is None else ("yes" if value else "**no**")


def savings_table(views: list[TaskView]) -> list[str]:
    names = list(dict.fromkeys(n for v in views for n in v.arms))
    lines = ["## Savings at equal quality", "",
             "Compute each arm needs to reach full fine-tuning's best validation loss, as a share of the compute "
             "full fine-tuning needs to reach it (mean curves over the seeds both have; lower is better; 'not "
             "reached': never within the budget). Estimated FLOPs, and in brackets measured training seconds "
             "(noisy: a shared machine):", "",
             "| arm | " + " | ".join(v.task for v in views) + " |", "|---" * (len(views) + 1) + "|"]

    def cell(saving):
        return ("–" if saving is None else "undefined" if saving.get("undefined") else
                "not reached" if saving["share"] is None else f"{saving['share']:.0%}")

    for name in names:
        cells = []
        for view in views:
            if name not in view.arms or view.savings(name) is None:
                cells.append("–")
                continue
            cells.append(f"{cell(view.savings(name))} ({cell(view.savings(name, 'seconds'))})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def end_of_budget_table(views: list[TaskView]) -> list[str]:
    """Every arm's validation / test loss at the end of the budget, per task: the mean over the seeds
    finished (their count where fewer than the study's seeds)."""
    names = list(dict.fromkeys(n for v in views for n in v.arms))
    lines = ["## At the end of the budget", "",
             "Validation / test loss at 100 % of the budget, each arm at its rate chosen on validation, the mean "
             "over the seeds finished (their count in brackets where fewer than the study's):", "",
             "| arm | " + " | ".join(v.task for v in views) + " |", "|---" * (len(views) + 1) + "|"]
    for name in names:
        cells = []
        for view in views:
            val, test = ((view.at(name, "validation", 1.0), view.at(name, "test", 1.0)) if name in view.arms
                         else (None, None))
            if val is None or test is None:
                cells.append("–")
                continue
            few = f" ({val[2]} seed{'s' if val[2] > 1 else ''})" if val[2] < len(view.settings.seeds) else ""
            cells.append(f"{val[0]:.3f} / {test[0]:.3f}{few}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def in_progress(out: Path, settings: Settings, runs: dict) -> list[str]:
    """The jobs a live process holds now, and how many jobs are known to remain."""
    jobs, complete = job_list(list(ALL_TASKS), settings, out, runs)
    held = []
    for job in jobs:
        pid = claimed_by(out, job.key)
        if pid is not None:
            what = "plans" if job.stage == "plans" else f"{job.stage} {job.arm.name} lr {job.arm.lr:g} seed {job.seed}"
            held.append(f"{job.task}: {what} (process {pid})")
    left = sum(1 for j in jobs if (j.key not in runs if j.stage != "plans"
                                   else not (out / f"plans_{j.task}.json").is_file()))
    lines = [f"Jobs known to remain: {left}" + ("" if complete else " (more follow once the plans and grids "
                                                                     "they depend on are done)") + "."]
    if held:
        lines[0] += " In progress now: " + "; ".join(held) + "."
    return lines + [""]


def write_report(out: Path) -> None:
    out = Path(out)
    lines = ["# Study v3: compute to reach full fine-tuning's quality, at realistic budgets", ""]
    if not (out / "settings.json").is_file():
        (out / "results.md").write_text("\n".join(lines + ["Nothing has run yet.", ""]))
        return
    settings = load_settings(out)
    runs = load_runs(out / "runs.jsonl")
    planned = [t for t in ALL_TASKS if (out / f"plans_{t}.json").is_file()]
    views = [TaskView(out, t, settings, runs) for t in planned]
    finals = [r for r in runs.values() if r.get("stage") == "final"]
    hours = sum(r.get("wall_s", 0.0) for r in runs.values()) / 3600
    devices = sorted({f"{r.get('device', '?')} ({r.get('threads', '?')} thread(s))" for r in runs.values()})
    schedule = settings.schedule
    lines += [
        f"Model: {settings.model}, fp32. Budget: {settings.budget:g} full-step equivalents of estimated training "
        "FLOPs per final run (freezekern.cost; an arm whose step costs less takes more steps). Schedule for every "
        f"arm: AdamW, weight decay {schedule['weight_decay']:g} on matrices, {schedule['warmup']:.0%} linear "
        f"warmup, {schedule['decay']} decay over the budget, gradient norm clipped at 1. Learning rate per arm: "
        f"grid {', '.join(map(str, settings.full_lrs))} (LoRA {', '.join(map(str, settings.lora_lrs))}) at "
        f"{settings.grid_share:.0%} of the budget (schedule compressed), seed 0, chosen on validation loss"
        + (f" (a best rate at an edge grows the grid a half-decade past it, at most {settings.grid_extend} times "
           "a side)" if settings.grid_extend else "") + "; "
        f"finals at seeds {', '.join(map(str, settings.seeds))}. Validation and test at every "
        f"{settings.checkpoints[0]:.0%} of the budget. Moving boundary: blocks freeze bottom-up from "
        f"k = {settings.moving['start']} to the arm's k, evenly between {settings.moving['begin']:.0%} and "
        f"{settings.moving['finish']:.0%} of the budget. ± is half the range over seeds.",
        "",
        f"So far: {len(runs)} runs ({len(finals)} finals), {hours:.1f} hours of process time, on "
        f"{', '.join(devices) or '–'}; tasks planned: {', '.join(planned) or 'none'}"
        + (f"; not yet planned: {', '.join(t for t in ALL_TASKS if t not in planned)}" if len(planned) < len(ALL_TASKS)
           else "") + ".", "",
        "The seconds axis is each run's own measured training time (evaluation excluded) on a shared machine: "
        "two study processes and other work, so it is noisy; the FLOPs axis is exact by construction.", ""]
    lines += in_progress(out, settings, runs)
    if not views:
        (out / "results.md").write_text("\n".join(lines))
        return
    lines += acceptance(views)
    lines += default_section(views)
    lines += savings_table(views)
    lines += end_of_budget_table(views)
    moving = plot_moving(out, views)
    if moving:
        lines += ["## The moving boundary", "", f"![the moving boundary over a run]({moving})", ""]
    for view in views:
        lines += task_section(out, view)
    reading = out / "reading.md"
    if reading.is_file():
        lines += [reading.read_text()]
    (out / "results.md").write_text("\n".join(lines))



