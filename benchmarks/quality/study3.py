"""Study v3: the compute each setup needs for full fine-tuning's quality, at realistic budgets.

Every arm trains the built-in SmolLM2-135M-Instruct (30 blocks, fp32) for
the same compute budget, counted in full-step equivalents of estimated
training FLOPs (``freezekern.cost``: an arm whose step costs half a full
step takes twice the steps), 150 per final run by default (``--budget``;
1,000 or more on a GPU), with the schedule people use: AdamW, weight decay
0.1 on matrices, 5 % linear warmup, cosine decay over the budget
(``freezekern.schedule``), gradient norm clipped at 1. Validation and test
losses are measured every 10 % of the budget, so the report can read off the
compute each arm needs to reach full fine-tuning's best validation loss
(linearly between checkpoints). On chat a checkpoint's two evaluations (6k
tokens each) cost about as much as 10 % of the run's training on this CPU,
so checkpoints every 10 % make its final runs about a third shorter than
every 5 % would.

Tasks (``tasks.py``, disjoint train / validation / test splits): code, chat,
classify (as in study v2, resized to steps of about 256 tokens) and speeches
(new in v3). Arms: full fine-tuning | freeze half (k = L/2) | a shallow
fixed boundary (k = round(L/3)) | the default (gain_share/cosine's k) |
salf/cosine's k | LoRA on every block | a moving boundary from k = 0 to the
default's k (blocks freeze bottom-up between 10 % and 60 % of the run) |
the same towards salf's k where it differs. Arms that train identically
(same boundary, LoRA, schedule) train once and are reported under each name.

Learning rate per arm: a grid of three (full weights 3e-5, 1e-4, 3e-4; LoRA
3e-4, 1e-3, 3e-3) at 25 % of the budget (the schedule compressed to it),
seed 0, chosen by validation loss; where the best rate is at an edge of the
grid, the grid grows by a half-decade past it (1e-5 below 3e-5, 1e-3 above
3e-4, ...), at most twice on each side, until the best rate is inside it;
then the whole budget at that rate, seeds 0 and 1. Test is only reported,
never used for a choice.

The settings, the arms, the rate grid and the queue's order are defined in
``design3.py`` (read by this script and by ``report3.py``); this script
traces, trains and records.

One global queue, in this order: every task's plans; every task's grid;
the finals at seed 0 (code, chat, classify, speeches); then at seed 1. A
job enters the queue when what it needs is done (a final: its arm's whole
grid, which sets its rate); each process takes the first job that no live
process has claimed (``runs.claim``; a dead process's claim is taken over),
so ``--shard i/n`` only names the process. Every finished run is one line
of OUT/runs.jsonl (a re-run skips what is there); a run in progress writes
its state at every checkpoint to OUT/.state/, and a process started again
continues it from there.

    python benchmarks/quality/study3.py --out docs/study3 --shard 0/2 --threads 1 &   # one process per core
    python benchmarks/quality/study3.py --out docs/study3 --shard 1/2 --threads 1 &
    python benchmarks/quality/study3.py --out docs/study3 --report-only               # rebuild results.md
    python benchmarks/quality/study3.py --out docs/study3-gpu --device cuda --budget 1000
    python benchmarks/quality/study3.py --quick --out /tmp/quick3                     # tiny model, CI
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from design3 import ALL_TASKS, FULL, QUICK, Job, Settings, arms_for, job_list  # noqa: E402
from report3 import write_report  # noqa: E402
from runs import claim, load_runs, release  # noqa: E402

import freezekern as fk  # noqa: E402
from freezekern.io import atomic_write_json  # noqa: E402
from freezekern.model.loading import default_tokenizer  # noqa: E402
from freezekern.trials import train_arm  # noqa: E402
from freezekern.trials.schedule import Schedule  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- plans ------------------------------------------------------------------------------------

def make_plans(model, task, settings: Settings) -> dict:
    """Traces (cosine, logit lens), the trace rules' boundaries, their calibration-subset stability, the
    untrained model's losses and the task's description."""
    plans, traces = {}, {}
    for metric in ("cosine", "logit_lens"):
        traces[metric] = fk.analyze(model, task.calibration, metric=metric, progress=False)
        for policy in ("gain_share", "salf"):
            plans[f"{policy}/{metric}"] = fk.plan(traces[metric], policy)
    stability = {}
    for subset in task.calibration_subsets:
        trace = fk.analyze(model, subset, metric="cosine", progress=False)
        for policy in ("gain_share", "salf"):
            stability.setdefault(f"{policy}/cosine", []).append(fk.plan(trace, policy).boundary)
    seq_len, batch_size, *_ = settings.sizes[task.name]
    return {
        "task": task.name, "notes": task.notes, "seq_len": seq_len, "batch_size": batch_size,
        "train_batches": len(task.train), "num_layers": fk.discover(model).num_layers,
        "eval_tokens": {s: sum(int(b["attention_mask"].sum()) for b in getattr(task, s))
                        for s in ("validation", "test")},
        "scored_tokens": {s: sum(int((b["labels"][:, 1:] != -100).sum()) for b in getattr(task, s))
                          for s in ("validation", "test")},
        "traces": {m: t.to_dict() for m, t in traces.items()},
        "plans": {name: p.to_dict() for name, p in plans.items()},
        "stability": stability,
        "baseline": {split: task.evaluate(model, getattr(task, split)) for split in ("validation", "test")},
    }


# -- running the queue --------------------------------------------------------------------------

def state_path(out: Path, key: str) -> Path:
    return out / ".state" / (hashlib.sha1(key.encode()).hexdigest() + ".pt")


def run_job(job: Job, model, task, settings: Settings, out: Path) -> dict | None:
    """Train one grid or final run; returns its record (a diverged run: ``failed`` and no rows)."""
    grid = job.stage == "grid"
    started = time.perf_counter()
    eval_sets = {"validation": task.validation} if grid else {"validation": task.validation, "test": task.test}
    record = {"key": job.key, "task": job.task, "stage": job.stage, "threads": torch.get_num_threads(),
              "device": str(next(model.parameters()).device)}
    path = state_path(out, job.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = train_arm(model, job.arm, task.train, eval_sets, budget_steps=job.budget,
                           checkpoints=settings.grid_checkpoints if grid else settings.checkpoints, seed=job.seed,
                           evaluate_fn=task.evaluate, progress=False, schedule=Schedule(**settings.schedule),
                           state_path=path)
    except FloatingPointError as error:  # a rate too high for this arm: recorded, never chosen
        path.unlink(missing_ok=True)
        return {**record, "wall_s": time.perf_counter() - started, "arm": dataclasses.asdict(job.arm),
                "seed": job.seed, "rows": [], "failed": str(error)}
    return {**record, "wall_s": time.perf_counter() - started, **result.to_dict()}


def work(model, tokenizer, tasks: list[str], settings: Settings, out: Path) -> None:
    """Take jobs from the global queue until every job is done (by this process or another)."""
    runs_path = out / "runs.jsonl"
    built = {}

    def task_of(name):
        if name not in built:
            built[name] = ALL_TASKS[name](tokenizer, *settings.sizes[name])
        return built[name]

    waiting_since = None
    while True:
        runs = load_runs(runs_path)
        jobs, complete = job_list(tasks, settings, out, runs)
        pending = [j for j in jobs if not _done(j, out, runs)]
        if not pending and complete:
            return
        for job in pending:  # the first job in the queue's order that no live process has claimed
            if not claim(out, job.key):
                continue
            try:
                runs = load_runs(runs_path)
                if _done(job, out, runs):
                    continue
                waiting_since = None
                _run_and_record(job, model, task_of(job.task), settings, out, runs_path)
            finally:
                release(out, job.key)
            break
        else:
            if waiting_since is None:
                waiting_since = time.time()
                log(f"waiting: {len(pending)} jobs left, none free ({'' if complete else 'some not yet known, '}"
                    "the others are claimed by other processes)")
            time.sleep(15)


def _done(job: Job, out: Path, runs: dict) -> bool:
    return (out / f"plans_{job.task}.json").is_file() if job.stage == "plans" else job.key in runs


def _run_and_record(job: Job, model, task, settings: Settings, out: Path, runs_path: Path) -> None:
    if job.stage == "plans":
        log(f"[{job.task}] tracing and planning")
        atomic_write_json(out / f"plans_{job.task}.json", make_plans(model, task, settings))
        plans = json.loads((out / f"plans_{job.task}.json").read_text())
        log(f"[{job.task}] arms: " + ", ".join(f"{n} k={a.boundary}" for n, a in arms_for(plans, settings.moving)
                                                 .items()))
        return
    resumed = " (resuming)" if state_path(out, job.key).is_file() else ""
    log(f"[{job.task}] {job.stage} {job.arm.name} lr {job.arm.lr:g} seed {job.seed}: "
        f"{job.budget:g} full-step equivalents{resumed}")
    record = run_job(job, model, task, settings, out)
    with open(runs_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if record.get("failed"):
        log(f"[{job.task}] {job.stage} {job.arm.name} lr {job.arm.lr:g}: FAILED ({record['failed']})")
        return
    last = record["rows"][-1]
    log(f"[{job.task}] {job.stage} {job.arm.name} lr {job.arm.lr:g} seed {job.seed}: {record['steps']} steps, "
        f"validation {last['validation_loss']:.4f}" + (f", test {last['test_loss']:.4f}" if "test_loss" in last
                                                       else "") + f" ({record['wall_s']:.0f} s)")


def check_settings(out: Path, settings: Settings) -> None:
    """Write OUT/settings.json, or refuse to mix runs of different settings in one folder."""
    path = out / "settings.json"
    mine = settings.to_dict()
    if path.is_file():
        theirs = json.loads(path.read_text())
        if theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise SystemExit(f"{out} holds runs of other settings (differing: {', '.join(diff)}); use another --out")
    else:
        atomic_write_json(path, mine)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, a budget of four steps (CI)")
    parser.add_argument("--out", default="docs/study3")
    parser.add_argument("--tasks", nargs="+", default=list(ALL_TASKS), choices=list(ALL_TASKS))
    parser.add_argument("--budget", type=float, default=None,
                        help="full-step equivalents per final run (default 150; 1000 or more on a GPU)")
    parser.add_argument("--shard", default="0/1", help="i/n: this process's name in the logs (claims share the work)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 per process on 2 cores)")
    parser.add_argument("--report-only", action="store_true", help="rebuild results.md from OUT without training")
    args = parser.parse_args(argv)
    shard = tuple(int(x) for x in args.shard.split("/"))
    if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
        raise SystemExit(f"--shard must be i/n with 0 <= i < n, got {args.shard}")
    if args.budget is not None and not args.budget > 0:
        raise SystemExit("--budget must be positive")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        settings = QUICK if args.quick else FULL
        if args.budget is not None:
            settings = dataclasses.replace(settings, budget=args.budget)
        check_settings(out, settings)
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.quick:
            tokenizer = default_tokenizer()
            model = fk.tiny_model("llama", num_layers=6, hidden=64, vocab=len(tokenizer), tie=True)
        else:
            model, tokenizer = fk.load_default_model()
        model.to(device)
        log(f"shard {args.shard}: {settings.budget:g} full-step equivalents per final run, tasks "
            f"{', '.join(args.tasks)}, {torch.get_num_threads()} thread(s) on {device}")
        work(model, tokenizer, args.tasks, settings, out)
    write_report(out)
    log(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
