"""Does the chosen boundary keep fine-tuning quality? A cost-benefit study.

Model: the built-in SmolLM2-135M-Instruct (fp32, CPU). Two tasks, each with
disjoint train and held-out splits:

- code: next-token loss on Python standard-library source, split by file;
- chat: question/answer pairs of chatterbot-corpus 1.3.3 in the model's chat
  template, loss on answer tokens only, split by category file.

Arms (same optimiser, same token budget, a learning-rate sweep, several
seeds): full fine-tuning | salf/cosine | salf/logit_lens | reduction |
freeze half | freeze 75% | LoRA on all blocks | LoRA above the salf/cosine
boundary | no training. A cost-benefit sweep trains above boundaries k over a
grid of 0..L-1 and records held-out loss, step time and peak memory.

Every finished run is appended to OUT/runs.jsonl, so an interrupted study
resumes where it stopped. At the end OUT/results.md and PNG plots are written.

    python benchmarks/quality/study.py --out docs/results            # the full study
    python benchmarks/quality/study.py --quick --out /tmp/quick       # tiny model, a few steps
"""

from __future__ import annotations

import argparse
import copy
import glob
import importlib.util
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import freezekern as fk
from freezekern.data import Example, make_batches, split_files, stdlib_files
from freezekern.finetune import evaluate
from freezekern.integrations.peft import block_linear_names, layers_to_transform
from freezekern.profiling import PeakMemory
from freezekern.truncate import apply as apply_cut

FULL_LRS = (2e-5, 1e-4)
LORA_LRS = (2e-4, 1e-3)
SWEEP_LR = 1e-4
HELD_OUT_CHAT_EVERY = 5  # every 5th category file (sorted) is held out


@dataclass
class Task:
    name: str
    seq_len: int
    batch_size: int
    train: object  # callable(seed, num_tokens) -> batches
    eval_batches: list
    calibration: list
    notes: list[str] = field(default_factory=list)


def code_task(tokenizer, seq_len: int, batch_size: int, eval_tokens: int, calib_tokens: int) -> Task:
    train_files, held_files = split_files(stdlib_files(seed=0), heldout_fraction=0.2)

    def train(seed: int, num_tokens: int):
        files = list(train_files)
        random.Random(seed).shuffle(files)
        return make_batches(tokenizer, files=files, seq_len=seq_len, num_tokens=num_tokens, batch_size=batch_size)

    return Task(
        name="code", seq_len=seq_len, batch_size=batch_size, train=train,
        eval_batches=make_batches(tokenizer, files=held_files, seq_len=seq_len, num_tokens=eval_tokens,
                                  batch_size=batch_size),
        calibration=make_batches(tokenizer, files=train_files[::-1], seq_len=seq_len, num_tokens=calib_tokens,
                                 batch_size=batch_size),
        notes=[f"{len(train_files)} train files, {len(held_files)} held-out files"],
    )


def chat_examples(tokenizer) -> tuple[list[Example], list[Example], list[str]]:
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise RuntimeError("the chat task needs chatterbot-corpus: pip install --no-deps chatterbot-corpus==1.3.3")
    root = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    files = sorted(glob.glob(str(root / "*.yml")))
    train, held, held_names = [], [], []
    for index, path in enumerate(files):
        target = held if index % HELD_OUT_CHAT_EVERY == 0 else train
        if target is held:
            held_names.append(Path(path).stem)
        for conversation in yaml.safe_load(Path(path).read_text()).get("conversations", []):
            if len(conversation) < 2:
                continue
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": str(conversation[0])}],
                                                   add_generation_prompt=True, tokenize=False)
            target.append(Example(prompt=prompt, completion=str(conversation[1]) + "<|im_end|>"))
    return train, held, held_names


def chat_task(tokenizer, seq_len: int, batch_size: int, eval_tokens: int, calib_tokens: int) -> Task:
    train_examples, held_examples, held_names = chat_examples(tokenizer)

    def train(seed: int, num_tokens: int):
        return make_batches(tokenizer, train_examples, seq_len=seq_len, num_tokens=num_tokens,
                            batch_size=batch_size, seed=seed)

    return Task(
        name="chat", seq_len=seq_len, batch_size=batch_size, train=train,
        eval_batches=make_batches(tokenizer, held_examples, seq_len=seq_len, num_tokens=eval_tokens,
                                  batch_size=batch_size, seed=0),
        calibration=make_batches(tokenizer, train_examples, seq_len=seq_len, num_tokens=calib_tokens,
                                 batch_size=batch_size, seed=12345),
        notes=[f"{len(train_examples)} train pairs, {len(held_examples)} held-out pairs "
               f"(held-out categories: {', '.join(held_names)})"],
    )


def lora_model(model, boundary: int, num_layers: int):
    """LoRA (r=8) on every linear layer of blocks boundary+1..L."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                        layers_to_transform=layers_to_transform(boundary, num_layers),
                        target_modules=block_linear_names(model))
    return get_peft_model(model, config)


def train_run(base, task: Task, *, boundary: int, lora: bool, lr: float, seed: int, steps: int) -> dict:
    """Train a fresh copy of ``base`` above ``boundary`` and measure it."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    num_layers = fk.discover(model).num_layers
    if lora:
        model = lora_model(model, boundary, num_layers)
    handle = apply_cut(model, boundary) if boundary > 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches = task.train(seed, steps * task.batch_size * task.seq_len)
    step_times, tokens = [], 0
    model.train()
    started = time.perf_counter()
    with PeakMemory("cpu") as memory:
        for step in range(steps):
            batch = batches[step % len(batches)]
            t0 = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - t0)
            tokens += int(batch["attention_mask"].sum())
    wall = time.perf_counter() - started
    result = {
        "held_out_loss": evaluate(model, task.eval_batches),
        "train_loss_last": float(loss.detach()),
        "trainable_params": sum(p.numel() for p in params),
        "step_time_s": statistics.median(step_times[1:] if len(step_times) > 1 else step_times),
        "peak_mem_mib": memory.peak_bytes / 2**20,
        "tokens_seen": tokens,
        "wall_s": wall,
    }
    if handle is not None:
        handle.remove()
    return result


def arms_for(task: Task, base, num_layers: int, plans: dict) -> list[dict]:
    salf_cos = plans["salf/cosine"].boundary
    arms = [
        {"arm": "full", "boundary": 0, "lora": False},
        {"arm": "salf/cosine", "boundary": salf_cos, "lora": False},
        {"arm": "salf/logit_lens", "boundary": plans["salf/logit_lens"].boundary, "lora": False},
        {"arm": "reduction", "boundary": plans["reduction/cosine"].boundary, "lora": False},
        {"arm": "freeze half", "boundary": round(0.5 * num_layers), "lora": False},
        {"arm": "freeze 75%", "boundary": round(0.75 * num_layers), "lora": False},
        {"arm": "LoRA all", "boundary": 0, "lora": True},
        {"arm": "LoRA above salf", "boundary": salf_cos, "lora": True},
    ]
    return arms


def run_key(task: str, boundary: int, lora: bool, lr: float, seed: int, steps: int) -> str:
    return f"{task}|k={boundary}|lora={int(lora)}|lr={lr:g}|seed={seed}|steps={steps}"


def load_runs(path: Path) -> dict[str, dict]:
    runs = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                runs[record["key"]] = record
    return runs


def run_jobs(jobs: list[tuple], runs: dict, runs_path: Path, base, task: Task, steps: int,
             shard: tuple[int, int] = (0, 1)) -> None:
    """Train every job of this shard not yet in ``runs``; append each result to ``runs_path``.

    With several shards (processes), each trains the jobs whose index is its own
    modulo the shard count, then waits until the other shards' results are on disk.
    """
    mine, count = shard
    keys = [run_key(task.name, j[1], j[2], j[3], j[4], steps) for j in jobs]
    for index, (arm, boundary, lora, lr, seed) in enumerate(jobs):
        key = keys[index]
        if index % count != mine:
            continue
        if key not in runs:
            result = train_run(base, task, boundary=boundary, lora=lora, lr=lr, seed=seed, steps=steps)
            runs[key] = {"key": key, "task": task.name, "boundary": boundary, "lora": lora, "lr": lr,
                         "seed": seed, "steps": steps, **result}
            with open(runs_path, "a") as f:
                f.write(json.dumps(runs[key]) + "\n")
        r = runs[key]
        print(f"[{task.name} {index + 1}/{len(jobs)}] {arm:16s} k={boundary:2d} lr={lr:g} seed={seed}: "
              f"held-out {r['held_out_loss']:.4f}, step {r['step_time_s']:.2f} s, "
              f"peak {r['peak_mem_mib']:.0f} MiB", flush=True)
    while count > 1 and not all(k in runs for k in keys):
        time.sleep(10)
        runs.update(load_runs(runs_path))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, a few steps (CI)")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--tasks", nargs="+", default=["code", "chat"], choices=["code", "chat"])
    parser.add_argument("--sweep-points", type=int, default=8)
    parser.add_argument("--shard", default="0/1", help="i/n: this process trains every n-th job from i")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild results.md from OUT/study_*.json and OUT/runs.jsonl without training")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 keeps step times comparable on a shared machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    runs = load_runs(runs_path)
    if args.report_only:
        return write_merged_report(out, runs)
    shard = tuple(int(x) for x in args.shard.split("/"))
    if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
        raise SystemExit(f"--shard must be i/n with 0 <= i < n, got {args.shard}")

    if args.quick:
        tokenizer = _default_tokenizer()
        base = fk.tiny_model("llama", num_layers=6, hidden=64, vocab=len(tokenizer), tie=True)
        steps, seeds = args.steps or 3, args.seeds or [0]
        sizes = {"code": (64, 2), "chat": (64, 2)}
        eval_tokens, calib_tokens = 256, 256
        full_lrs, lora_lrs = FULL_LRS[:1], LORA_LRS[:1]
    else:
        base, tokenizer = fk.load_default_model()
        steps, seeds = args.steps or 20, args.seeds or [0, 1]
        sizes = {"code": (128, 4), "chat": (96, 6)}
        eval_tokens, calib_tokens = 3072, 2048
        full_lrs, lora_lrs = FULL_LRS, LORA_LRS
    num_layers = fk.discover(base).num_layers
    sweep_lr = full_lrs[-1] if args.quick else SWEEP_LR
    meta = {"model": base.config._name_or_path, "num_layers": num_layers, "steps": steps, "seeds": seeds,
            "lr_sweep_seed": seeds[0],
            "full_lrs": full_lrs, "lora_lrs": lora_lrs, "sweep_lr": sweep_lr, "threads": torch.get_num_threads(),
            "tasks": {}}
    for task_name in args.tasks:
        seq_len, batch_size = sizes[task_name]
        make = code_task if task_name == "code" else chat_task
        task = make(tokenizer, seq_len, batch_size, eval_tokens, calib_tokens)
        traces = {m: fk.analyze(base, task.calibration, metric=m, progress=False) for m in ("cosine", "logit_lens")}
        plans = {
            "salf/cosine": fk.plan(traces["cosine"]),
            "salf/logit_lens": fk.plan(traces["logit_lens"]),
            "reduction/cosine": fk.plan(traces["cosine"], policy="reduction"),
        }
        baseline = evaluate(base, task.eval_batches)
        meta["tasks"][task_name] = {
            "seq_len": seq_len, "batch_size": batch_size, "notes": task.notes, "baseline_loss": baseline,
            "plans": {name: p.boundary for name, p in plans.items()},
            "traces": {m: t.deviations for m, t in traces.items()},
            "gains": {name: p.gains for name, p in plans.items()},
        }
        print(f"[{task_name}] baseline held-out loss {baseline:.4f}; boundaries "
              + ", ".join(f"{n}={p.boundary}" for n, p in plans.items()), flush=True)
        arms = arms_for(task, base, num_layers, plans)
        # Learning rates are swept on the first seed; the other seeds repeat each arm's best rate.
        jobs = [(a["arm"], a["boundary"], a["lora"], lr, seeds[0]) for a in arms
                for lr in (lora_lrs if a["lora"] else full_lrs)]
        grid = sorted({round(i * (num_layers - 1) / (args.sweep_points - 1)) for i in range(args.sweep_points)})
        jobs += [("sweep", k, False, sweep_lr, seeds[0]) for k in grid]
        run_jobs(jobs, runs, runs_path, base, task, steps, shard)
        repeats = []
        for a in arms:
            rates = lora_lrs if a["lora"] else full_lrs
            best = min(rates, key=lambda lr, a=a: runs[run_key(task_name, a["boundary"], a["lora"], lr, seeds[0],
                                                               steps)]["held_out_loss"])
            repeats += [(a["arm"], a["boundary"], a["lora"], best, seed) for seed in seeds[1:]]
        run_jobs(repeats, runs, runs_path, base, task, steps, shard)
        jobs += repeats
        meta["tasks"][task_name]["jobs"] = [list(j) for j in jobs]
        task_meta = {**meta, "tasks": {task_name: meta["tasks"][task_name]}}
        (out / f"study_{task_name}.json").write_text(json.dumps(task_meta, indent=2))
    return write_merged_report(out, runs)


def write_merged_report(out: Path, runs: dict) -> int:
    """results.md over every task whose study_<task>.json is in ``out`` (tasks may run in separate processes)."""
    from report import write_report

    metas = [json.loads(p.read_text()) for p in sorted(out.glob("study_*.json"))]
    if not metas:
        raise SystemExit(f"no study_*.json in {out}: run the study first")
    merged = {**metas[0], "tasks": {}}
    for meta in metas:
        merged["tasks"].update(meta["tasks"])
    write_report(out, merged, runs)
    print(f"wrote {out / 'results.md'}")
    return 0


def _default_tokenizer():
    from transformers import AutoTokenizer

    from freezekern.models import prepare_default_model

    return AutoTokenizer.from_pretrained(prepare_default_model(), local_files_only=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
