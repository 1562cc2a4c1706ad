"""Study v2: which boundary gives the best model for the compute a user spends?

Every arm trains the built-in SmolLM2-135M-Instruct (fp32) under the same
compute budget, counted in full-step equivalents of estimated training FLOPs
(``freezekern.policy.cost``: an arm whose step costs half a full fine-tuning step
takes twice the steps), and is scored on validation and test data at common
checkpoints of that budget (``freezekern.trials.train_arm``). Three tasks
(``tasks.py``), each with disjoint train / validation / test splits: every
choice (learning rate, the default policy) is made on validation, test is
only reported.

Arms: full fine-tuning | k = 0 (embeddings and tied head frozen, every block
trained) | salf/cosine | salf/logit_lens | gain_share | flops (step FLOPs <=
60 %) | probe | freeze half | freeze 75 % | LoRA on every block | LoRA above
salf/cosine | salf/cosine with the prefix cache | a boundary sweep. Arms that
land on the same boundary train once and are reported under each name.

Stages, per task: plans (traces on training-split calibration data, the
probe, boundaries from three disjoint calibration subsets) -> learning-rate
grid (seed 0, a quarter of the budget, validation) -> every arm at its chosen
rate, seeds 0 and 1, the whole budget -> the sweep (seed 0, each boundary at
the rate chosen for the nearest arm; every arm's seed-0 run is a sweep point
too). Every finished run is one line of
OUT/runs.jsonl; a re-run skips what is there (resume), ``--shard i/n`` splits
the runs over processes, ``--report-only`` rebuilds results.md.

    python benchmarks/quality/study.py --out docs/study --shard 0/2 --threads 1 &    # one process per core
    python benchmarks/quality/study.py --out docs/study --shard 1/2 --threads 1 &
    python benchmarks/quality/study.py --out docs/study --device cuda                 # the same on a GPU
    python benchmarks/quality/study.py --tasks classify --seeds 0 ...                 # a one-seed subset first
    python benchmarks/quality/study.py --quick --out /tmp/quick                       # tiny model, CI
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from runs import claim, load_runs, release, run_key  # noqa: E402
from tasks import TASKS  # noqa: E402

import freezekern as fk  # noqa: E402
from freezekern.io import atomic_write_json  # noqa: E402
from freezekern.model.loading import default_tokenizer  # noqa: E402
from freezekern.trials import Arm, probe_candidates, probe_plan, time_steps, train_arm  # noqa: E402

FULL_LRS = (3e-5, 1e-4, 3e-4)
LORA_LRS = (3e-4, 1e-3, 3e-3)
CHECKPOINTS = (0.125, 0.25, 0.5, 0.75, 1.0)
GRID_SHARE = 0.25
SEEDS = (0, 1)
SWEEP = (6, 9, 27)  # extra boundaries; the sweep also reads every arm's seed-0 run
FLOPS_BUDGET = 0.6
PROBE = {"budget_steps": 3.0, "lr": 1e-4}


@dataclasses.dataclass
class Settings:
    budgets: dict  # task -> full-step equivalents per run
    sizes: dict  # task -> (seq_len, batch_size, train_tokens, eval_tokens, calib_tokens)
    full_lrs: tuple
    lora_lrs: tuple
    seeds: tuple
    sweep: tuple
    probe: dict
    flops_budget: float = FLOPS_BUDGET


# Chat and classify flatten within a few full steps; code keeps improving slowly (docs/study/results.md)
FULL = Settings(budgets={"code": 24.0, "chat": 16.0, "classify": 16.0}, sizes={"code": (128, 4, 48 * 512, 3072, 2048), "chat": (96, 6, 48 * 576, 96 * 96, 2048),
                                    "classify": (48, 8, 10 ** 9, 10 ** 9, 2048)},
                full_lrs=FULL_LRS, lora_lrs=LORA_LRS, seeds=SEEDS, sweep=SWEEP, probe=PROBE)
QUICK = Settings(budgets=dict.fromkeys(TASKS, 4.0), sizes={"code": (32, 2, 8 * 64, 128, 128), "chat": (64, 2, 8 * 128, 256, 256),
                                    "classify": (32, 2, 16 * 32, 256, 128)},
                 full_lrs=(1e-3, 3e-3), lora_lrs=(1e-2,), seeds=(0,), sweep=(1, 3), probe={"budget_steps": 1.0,
                                                                                         "lr": 1e-3},
                 flops_budget=0.9)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- plans --------------------------------------------------------------------------------------

def make_plans(model, task, settings: Settings) -> dict:
    """Traces, every policy's boundary, the probe, and the calibration-subset stability check."""
    traces = {m: fk.analyze(model, task.calibration, metric=m, progress=False) for m in ("cosine", "logit_lens")}
    plans = {}
    for metric, trace in traces.items():
        plans[f"salf/{metric}"] = fk.plan(trace, "salf")
        plans[f"gain_share/{metric}"] = fk.plan(trace, "gain_share")
        plans[f"reduction/{metric}"] = fk.plan(trace, "reduction")
        plans[f"flops/{metric}"] = fk.plan(trace, "flops", flops_budget=settings.flops_budget)
    log(f"[{task.name}] probing {probe_candidates(plans['salf/cosine'])}")
    plans["probe"] = probe_plan(model, plans["salf/cosine"], task.calibration, task.probe_holdout,
                                progress=False, **settings.probe)
    stability = {}
    for subset in task.calibration_subsets:
        for metric in ("cosine", "logit_lens"):
            trace = fk.analyze(model, subset, metric=metric, progress=False)
            for policy in ("salf", "gain_share"):
                stability.setdefault(f"{policy}/{metric}", []).append(fk.plan(trace, policy).boundary)
    return {
        "traces": {m: t.to_dict() for m, t in traces.items()},
        "plans": {name: p.to_dict() for name, p in plans.items()},
        "stability": stability,
        "baseline": {split: task.evaluate(model, getattr(task, split)) for split in ("validation", "test")},
    }


def get_plans(model, task, settings: Settings, out: Path, shard: tuple[int, int]) -> dict:
    path = out / f"plans_{task.name}.json"
    if not path.is_file():
        if shard[0] == 0:
            log(f"[{task.name}] tracing and planning")
            atomic_write_json(path, make_plans(model, task, settings))
        else:
            log(f"[{task.name}] waiting for shard 0's plans")
            while not path.is_file():
                time.sleep(10)
    return json.loads(path.read_text())


# -- arms ---------------------------------------------------------------------------------------

def arms_for(plans: dict, num_layers: int, settings: Settings) -> dict[str, Arm]:
    """Arm name -> Arm (learning rate still a placeholder), in the order the report lists them."""
    k = {name: p["boundary"] for name, p in plans["plans"].items()}
    arms = {
        "full": Arm("full", None),
        "k=0": Arm("k=0", 0),
        "salf/cosine": Arm("salf/cosine", k["salf/cosine"]),
        "salf/logit_lens": Arm("salf/logit_lens", k["salf/logit_lens"]),
        "gain_share/cosine": Arm("gain_share/cosine", k["gain_share/cosine"]),
        "flops/cosine": Arm("flops/cosine", k["flops/cosine"]),
        "probe": Arm("probe", k["probe"]),
        "freeze half": Arm("freeze half", round(0.5 * num_layers)),
        "freeze 75%": Arm("freeze 75%", round(0.75 * num_layers)),
        "LoRA all": Arm("LoRA all", 0, lora=True),
        "LoRA above salf": Arm("LoRA above salf", k["salf/cosine"], lora=True),
    }
    return arms


def grid_configs(arms: dict[str, Arm], settings: Settings) -> list[Arm]:
    """One arm per distinct (boundary, LoRA) and learning rate: the grid's runs."""
    seen, configs = set(), []
    for arm in arms.values():
        for lr in (settings.lora_lrs if arm.lora else settings.full_lrs):
            config = dataclasses.replace(arm, name=f"k={arm.boundary} lora={int(arm.lora)}", lr=lr)
            if config.key() not in seen:
                seen.add(config.key())
                configs.append(config)
    return configs


def chosen_lr(runs: dict, task: str, arm: Arm, settings: Settings) -> float:
    rates = settings.lora_lrs if arm.lora else settings.full_lrs
    budget = GRID_SHARE * settings.budgets[task]
    scores = {}
    for lr in rates:
        record = runs.get(run_key(task, dataclasses.replace(arm, lr=lr), 0, budget))
        if record is not None:
            scores[lr] = record["rows"][-1]["validation_loss"]
    if not scores:
        raise RuntimeError(f"no grid result for {arm.key()}")
    return min(scores, key=scores.get)


def run_jobs(model, task, jobs: list[tuple[Arm, int, float, tuple, tuple]], runs: dict, runs_path: Path,
             shard: tuple[int, int], stage: str) -> None:
    """Train this shard's share of ``jobs`` (arm, seed, budget, checkpoints, eval splits); wait for the rest."""
    mine, count = shard
    keys = [run_key(task.name, arm, seed, budget) for arm, seed, budget, _, _ in jobs]
    pending = [i for i, key in enumerate(keys) if key not in runs]
    log(f"[{task.name}] {stage}: {len(jobs)} runs, {len(keys) - len(pending)} done, {len(pending)} to train")
    # every shard starts at its own offset, then takes whatever no live process has claimed
    for i in pending[mine::count] + [i for j, i in enumerate(pending) if j % count != mine]:
        runs.update(load_runs(runs_path))
        if keys[i] in runs or not claim(runs_path.parent, keys[i]):
            continue
        arm, seed, budget, checkpoints, splits = jobs[i]
        started = time.perf_counter()
        result = train_arm(model, arm, task.train, {s: getattr(task, s) for s in splits}, budget_steps=budget,
                           checkpoints=checkpoints, seed=seed, evaluate_fn=task.evaluate, progress=False)
        record = {"key": keys[i], "task": task.name, "stage": stage, "wall_s": time.perf_counter() - started,
                  **result.to_dict()}
        with open(runs_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        runs[keys[i]] = record
        release(runs_path.parent, keys[i])
        last = record["rows"][-1]
        log(f"[{task.name}] {stage} {arm.key()} seed {seed}: {result.steps} steps, validation "
            f"{last['validation_loss']:.4f}" + (f", test {last['test_loss']:.4f}" if "test_loss" in last else "")
            + f" ({record['wall_s']:.0f} s)")
    while count > 1 and not all(k in runs for k in keys):
        time.sleep(15)
        runs.update(load_runs(runs_path))


def time_task(model, tokenizer, name: str, settings: Settings, out: Path, rounds: int = 3,
              max_arms: int | None = None) -> None:
    """Seconds per step of every final arm, paired with full fine-tuning (the report's seconds axis)."""
    path = out / f"timing_{name}.json"
    meta_path = out / f"study_{name}.json"
    if path.is_file() or not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text())
    seq_len, batch_size, train_tokens, eval_tokens, calib_tokens = settings.sizes[name]
    task = TASKS[name](tokenizer, seq_len, batch_size, train_tokens, eval_tokens, calib_tokens)
    arms = ([Arm(**a) for a in meta["arms"].values()] + [Arm(**a) for a in meta["sweep"]])[:max_arms]
    log(f"[{name}] timing {len(arms)} arms, {rounds} paired steps each")
    timing = time_steps(model, arms, task.train[:4], rounds=rounds)
    atomic_write_json(path, {**timing, "rounds": rounds, "threads": torch.get_num_threads(),
                             "device": str(next(model.parameters()).device)})


def study_task(model, tokenizer, name: str, settings: Settings, out: Path, shard: tuple[int, int]) -> None:
    seq_len, batch_size, train_tokens, eval_tokens, calib_tokens = settings.sizes[name]
    task = TASKS[name](tokenizer, seq_len, batch_size, train_tokens, eval_tokens, calib_tokens)
    runs_path = out / "runs.jsonl"
    runs = load_runs(runs_path)
    plans = get_plans(model, task, settings, out, shard)
    num_layers = fk.discover(model).num_layers
    arms = arms_for(plans, num_layers, settings)
    both = ("validation", "test")
    grid = grid_configs(arms, settings)
    run_jobs(model, task, [(a, 0, GRID_SHARE * settings.budgets[name], (0.5, 1.0), ("validation",)) for a in grid],
             runs, runs_path, shard, "grid")
    finals, seen = [], set()
    for arm in arms.values():
        tuned = dataclasses.replace(arm, lr=chosen_lr(runs, name, arm, settings))
        for seed in settings.seeds:
            if (tuned.key(), seed) not in seen:
                seen.add((tuned.key(), seed))
                finals.append((tuned, seed, settings.budgets[name], CHECKPOINTS, both))
    salf = dataclasses.replace(arms["salf/cosine"], lr=chosen_lr(runs, name, arms["salf/cosine"], settings))
    cached = dataclasses.replace(salf, name="salf/cosine + prefix cache", prefix_cache=True)
    finals += [(cached, seed, settings.budgets[name], CHECKPOINTS, both) for seed in settings.seeds]
    tuned_boundaries = {a.boundary: a for a in arms.values() if not a.lora and a.boundary is not None}
    for k in settings.sweep:
        if k >= num_layers:
            continue
        nearest = tuned_boundaries[min(tuned_boundaries, key=lambda b: (abs(b - k), b))]
        tuned = Arm(f"sweep k={k}", k, lr=chosen_lr(runs, name, nearest, settings))
        if (tuned.key(), 0) not in seen:
            seen.add((tuned.key(), 0))
            finals.append((tuned, 0, settings.budgets[name], CHECKPOINTS, both))
    run_jobs(model, task, finals, runs, runs_path, shard, "final")
    meta = {"task": name, "model": str(model.config._name_or_path), "seq_len": seq_len, "batch_size": batch_size, "notes": task.notes,
            "train_batches": len(task.train), "budget": settings.budgets[name], "grid_share": GRID_SHARE,
            "full_lrs": settings.full_lrs, "lora_lrs": settings.lora_lrs, "seeds": settings.seeds,
            "checkpoints": CHECKPOINTS, "num_layers": num_layers,
            "arms": {**{n: dataclasses.asdict(dataclasses.replace(a, lr=chosen_lr(runs, name, a, settings)))
                        for n, a in arms.items()}, cached.name: dataclasses.asdict(cached)},
            "sweep": [dataclasses.asdict(j[0]) for j in finals if j[0].name.startswith("sweep")],
            "threads": torch.get_num_threads(), "device": str(next(model.parameters()).device)}
    atomic_write_json(out / f"study_{name}.json", meta)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, a budget of two steps (CI)")
    parser.add_argument("--out", default="docs/study")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--budget", type=float, default=None,
                        help="full-step equivalents per run (default: code 24, chat and classify 16)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds of the final runs (default 0 1); fewer seeds is a subset a later run extends")
    parser.add_argument("--shard", default="0/1", help="i/n: this process trains every n-th run from i")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 per process on 2 cores)")
    parser.add_argument("--report-only", action="store_true", help="rebuild results.md from OUT without training")
    parser.add_argument("--timing-only", action="store_true",
                        help="only time the finished tasks' arms in paired steps (OUT/timing_<task>.json)")
    args = parser.parse_args(argv)
    shard = tuple(int(x) for x in args.shard.split("/"))
    if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
        raise SystemExit(f"--shard must be i/n with 0 <= i < n, got {args.shard}")
    if args.budget is not None and not args.budget > 0:
        raise SystemExit("--budget must be positive")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        if args.threads:
            torch.set_num_threads(args.threads)
        settings = QUICK if args.quick else FULL
        if args.budget is not None:
            settings = dataclasses.replace(settings, budgets=dict.fromkeys(TASKS, args.budget))
        if args.seeds:
            settings = dataclasses.replace(settings, seeds=tuple(args.seeds))
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.quick:
            tokenizer = default_tokenizer()
            model = fk.tiny_model("llama", num_layers=6, hidden=64, vocab=len(tokenizer), tie=True)
        else:
            model, tokenizer = fk.load_default_model()
        model.to(device)
        for name in args.tasks:
            if not args.timing_only:
                study_task(model, tokenizer, name, settings, out, shard)
            if shard[0] == 0:
                time_task(model, tokenizer, name, settings, out, rounds=1 if args.quick else 3,
                          max_arms=3 if args.quick else None)
    from report import write_report

    write_report(out)
    log(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
