"""What each command does once its arguments passed the checks: load, run, print, write."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from freezekern.cli.args import (
    MIN_HELDOUT_CHARS,
    check_common,
    check_positive,
    check_writable_dir,
    check_writable_file,
)
from freezekern.model.parts import ModelParts, discover


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA device")
    return device


def _load(args):
    from freezekern.model.loading import load_default_model, load_model, parse_dtype

    dtype = parse_dtype(args.dtype)
    device = _device(args.device)
    if args.model:
        model, tokenizer = load_model(args.model, dtype, trust_remote_code=args.trust_remote_code, device=device)
    else:
        model, tokenizer = load_default_model(dtype, device=device)
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if context is not None and args.seq_len > context:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's context of {context} tokens")
    return model, tokenizer


def _plan_kwargs(args) -> dict:
    return dict(trained_share=args.trained_share, min_trainable=args.min_trainable, boundary=args.freeze,
                frozen_share=args.frozen_share, flops_budget=args.flops_budget, gain_share=args.gain_share,
                train_head=args.train_head, train_final_norm=args.train_final_norm)


def _trace_and_plan(args, model, batches, policy=None):
    import freezekern as fk

    trace = fk.analyze(model, batches, metric=args.metric, impl=args.impl, model_id=args.model or None)
    policy = policy or args.policy
    plan = fk.plan(trace, policy, **_plan_kwargs(args))
    return trace, plan


def _warn_few_tokens(trace, asked: int, examples) -> None:
    if trace.token_count >= 0.5 * asked:
        return
    if examples is not None and any(e.prompt is not None for e in examples):
        why = "only completion tokens count in prompt/completion records"
    else:
        why = "the data holds fewer tokens than that"
    print(f"freezekern: warning: traced {trace.token_count:,} counted tokens of the {asked:,} asked ({why}); "
          "the trace is noisier than asked: pass more data", file=sys.stderr)


def _source(args) -> dict:
    return {"source": args.examples} if args.examples is not None else {}


# -- commands -----------------------------------------------------------------------------------

def cmd_analyze(args) -> int:
    import freezekern as fk
    from freezekern.policy.report import plot_trace, trace_table

    check_common(args)
    out = Path(args.out)
    if args.json:
        plan_path = Path(args.json)
        trace_path = plan_path.with_name(plan_path.name.removesuffix(".json") + ".trace.json")
    else:
        plan_path, trace_path = out / "plan.json", out / "trace.json"
    plot_path = Path(args.plot) if args.plot else out / "trace.png"
    for path, flag in ((plan_path, "--json"), (trace_path, "the trace path"), (plot_path, "--plot")):
        check_writable_file(path, flag)
    started = time.perf_counter()
    model, tokenizer = _load(args)
    loaded = time.perf_counter()
    batches = fk.make_batches(tokenizer, **_source(args), seq_len=args.seq_len, num_tokens=args.tokens,
                              batch_size=args.batch_size, seed=args.seed)
    trace, plan = _trace_and_plan(args, model, batches)
    _warn_few_tokens(trace, args.tokens, args.examples)
    print(trace_table(trace, plan))
    print()
    print(plan)
    trace.save(trace_path)
    plan.save(plan_path)
    plot_trace(trace, plan, plot_path)
    print(f"\ntraced {trace.token_count:,} tokens in {trace.seconds:.1f} s "
          f"({trace.token_count / max(trace.seconds, 1e-9):,.0f} tokens/s; model load {loaded - started:.1f} s)")
    print(f"wrote {plan_path}, {trace_path}, {plot_path}")
    print(EVIDENCE)
    return 0


EVIDENCE = ("\nwhat the evidence says (docs/results.md): at short budgets (10-24 full-step equivalents) freezing half "
            "the blocks beat this boundary on every task of the quality study; at 150 (study v3: four tasks, two "
            "seeds each) full fine-tuning led on validation, this boundary came next "
            "among the freezing rules and reached full fine-tuning's best validation loss on one task (classify, "
            "48 % of its compute), a moving boundary (--moving) on another (code, 58 %). So the default "
            "(FreezeKernCallback(), finetune) does not freeze runs of up to 150 steps and freezes at this boundary "
            "in longer ones, where savings are not yet measured. Before you rely on a boundary, run `freezekern "
            "compare` on your own data and budget.")


def _check_training(args) -> None:
    check_common(args)
    if args.lr is not None:
        check_positive(args.lr, "--lr")
    check_positive(args.eval_tokens, "--eval-tokens", integer=True)
    check_writable_dir(Path(args.out), "--out")


def cmd_finetune(args) -> int:
    import freezekern as fk
    from freezekern.trials.finetune import finetune, format_report

    _check_training(args)
    check_positive(args.steps, "--steps", integer=True)
    if args.moving and args.policy == "none":
        raise ValueError("--moving needs a boundary to move towards: not with --policy none")
    train_source, eval_source = _train_eval_split(args)
    model, tokenizer = _load(args)
    sizes = {"seq_len": args.seq_len, "batch_size": args.batch_size}
    calibration = fk.make_batches(tokenizer, **train_source, num_tokens=args.tokens, seed=args.seed, **sizes)
    eval_batches = fk.make_batches(tokenizer, **eval_source, num_tokens=args.eval_tokens, seed=args.seed, **sizes)
    train_batches = fk.make_batches(tokenizer, **train_source, seed=args.seed + 1, **sizes,
                                    num_tokens=args.steps * args.batch_size * args.seq_len)
    if args.policy == "probe":  # short trials on the training batches, scored on the calibration batches
        trace, plan = _trace_and_plan(args, model, calibration, policy="salf")
        plan = fk.probe_plan(model, plan, train_batches, calibration, lr=args.lr, seed=args.seed)
    else:
        trace, plan = _trace_and_plan(args, model, calibration)
    _warn_few_tokens(trace, args.tokens, args.examples)
    from freezekern.policy.default import default_plan
    from freezekern.policy.moving import moving_plan

    if args.moving and not plan.cut:
        raise ValueError("--moving needs a boundary to move towards: this plan freezes nothing")
    if args.moving:
        plan = moving_plan(plan, run_steps=args.steps)
    elif args.moving is None and plan.cut:
        plan = default_plan(trace, plan, args.steps, adapters=args.lora)
    print(plan)
    report = finetune(model, tokenizer, train_batches, eval_batches, plan, steps=args.steps, lr=args.lr,
                      gradient_checkpointing=args.gradient_checkpointing, lora=args.lora, output_dir=args.out,
                      resume=not args.restart, compare=None if args.compare == "none" else args.compare,
                      seed=args.seed, fused_loss=args.fused_loss)
    trace.save(Path(args.out) / "trace.json")
    print(format_report(report))
    return 0


def _train_eval_split(args) -> tuple[dict, dict]:
    """Disjoint training and held-out sources: stdlib files split by file, user records 90/10."""
    import random

    from freezekern.model.data import Example, split_files, stdlib_files

    if args.examples is None:
        train_files, held_files = split_files(stdlib_files(args.seed))
        return {"files": train_files}, {"files": held_files}
    examples = args.examples
    if len(examples) == 1 and examples[0].prompt is None:  # one text: hold out its last tenth
        text = examples[0].text
        cut = int(len(text) * 0.9)
        if len(text) - cut < MIN_HELDOUT_CHARS:
            raise ValueError(f"{args.data} is too short to split: its last tenth ({len(text) - cut} characters) "
                             f"would be the held-out data; pass at least {10 * MIN_HELDOUT_CHARS} characters")
        return {"source": [Example(text=text[:cut])]}, {"source": [Example(text=text[cut:])]}
    if len(examples) < 2:
        raise ValueError(f"{args.data} holds one record: at least two are needed to hold one out")
    order = list(range(len(examples)))
    random.Random(args.seed).shuffle(order)
    cut = max(1, len(order) // 10)
    return ({"source": [examples[i] for i in order[cut:]]}, {"source": [examples[i] for i in order[:cut]]})


def _parse_boundaries(text: str):
    if text == "auto":
        return "auto"
    out = []
    for item in text.split(","):
        item = item.strip()
        if item == "full":
            out.append(None)
        elif item.isdigit():
            out.append(int(item))
        else:
            raise ValueError(f"--boundaries takes 'auto' or a comma-separated list of block counts and 'full', "
                             f"got {text!r}")
    if not out:
        raise ValueError("--boundaries is empty")
    return out


def _compare_schedule(args, budget_steps):
    """The Trainer-named schedule flags as a ``Schedule`` over the budget."""
    from freezekern.trials import Schedule

    if not args.warmup_steps >= 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    warmup = args.warmup_steps
    if warmup >= 1:
        if budget_steps is None:
            raise ValueError("--warmup-steps of 1 or more counts full-step equivalents: give it as a share of the "
                             "budget (below 1) with --budget-seconds")
        warmup = warmup / budget_steps
    if warmup >= 1:
        raise ValueError(f"--warmup-steps {args.warmup_steps} is the whole budget or more")
    return Schedule(warmup=warmup, decay=args.lr_scheduler_type, weight_decay=args.weight_decay)


def cmd_compare(args) -> int:
    import json

    import freezekern as fk
    from freezekern.io import atomic_write_json
    from freezekern.trials import ArmResult, format_table
    from freezekern.trials.report import plot_compare

    _check_training(args)
    check_positive(args.train_tokens, "--train-tokens", integer=True)
    if args.budget_seconds is not None:
        check_positive(args.budget_seconds, "--budget-seconds")
    budget_steps = args.budget_steps if args.budget_steps is not None or args.budget_seconds is not None else 10.0
    if budget_steps is not None:
        check_positive(budget_steps, "--budget-steps")
    if not 0 <= args.tolerance < 1:
        raise ValueError(f"--tolerance must lie in [0, 1), got {args.tolerance}")
    schedule = _compare_schedule(args, budget_steps)
    boundaries = _parse_boundaries(args.boundaries)
    train_source, eval_source = _train_eval_split(args)
    out = Path(args.out)
    runs_path = out / "runs.jsonl"
    model, tokenizer = _load(args)
    num_layers = fk.discover(model).num_layers
    if boundaries != "auto":
        bad = [k for k in boundaries if k is not None and not 0 <= k < num_layers]
        if bad:
            raise ValueError(f"--boundaries {bad} outside [0, {num_layers - 1}]: the model has {num_layers} blocks")
    sizes = {"seq_len": args.seq_len, "batch_size": args.batch_size}
    calibration = fk.make_batches(tokenizer, **train_source, num_tokens=args.tokens, seed=args.seed, **sizes)
    train = fk.make_batches(tokenizer, **train_source, num_tokens=args.train_tokens, seed=args.seed + 1, **sizes)
    heldout = fk.make_batches(tokenizer, **eval_source, num_tokens=args.eval_tokens, seed=args.seed, **sizes)
    trace, plan = _trace_and_plan(args, model, calibration)
    _warn_few_tokens(trace, args.tokens, args.examples)
    print(plan, "\n", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": args.model, "data": args.data, "seq_len": args.seq_len, "batch_size": args.batch_size,
                "train_tokens": args.train_tokens, "eval_tokens": args.eval_tokens, "seed": args.seed,
                "budget_steps": budget_steps, "budget_seconds": args.budget_seconds, "dtype": args.dtype,
                "schedule": schedule.to_dict()}
    done = {}
    if runs_path.is_file() and not args.restart:
        for line in runs_path.read_text().splitlines():
            record = json.loads(line) if line.strip() else None
            if record and record.get("settings") == settings:
                done[record["key"]] = ArmResult.from_dict(record["result"])
        if done:
            print(f"reusing {len(done)} finished arm(s) from {runs_path}", file=sys.stderr)
    elif args.restart:
        runs_path.unlink(missing_ok=True)

    def save(result):
        with open(runs_path, "a") as f:
            f.write(json.dumps({"key": f"{result.arm.key()}|seed={result.seed}", "settings": settings,
                                "result": result.to_dict()}) + "\n")

    result = fk.compare(model, train, heldout, plan=plan, boundaries=boundaries, lora=args.lora, lr=args.lr,
                        moving=not args.no_moving, schedule=schedule,
                        budget_steps=budget_steps if args.budget_seconds is None else None,
                        budget_seconds=args.budget_seconds, tolerance=args.tolerance, seed=args.seed,
                        done=done, on_result=save)
    print(format_table(result))
    atomic_write_json(out / "compare.json", {"settings": settings, "plan": plan.to_dict(), **result.to_dict()})
    plot_compare(result, out / "compare.png")
    print(f"wrote {out / 'compare.json'}, {out / 'compare.png'}")
    return 0


BENCHMARKS_HOME = "the benchmarks/ folder at the top of the freezekern source repository (beside freezekern/)"


def benchmarks_root(given: str | None) -> Path:
    """The benchmarks/ folder: ``given`` (--dir), beside the package (a source checkout), ./benchmarks, or
    $FREEZEKERN_BENCHMARKS; raises FileNotFoundError saying where the suites live when none has them."""
    if given is not None:
        candidates = [Path(given)]
    else:
        candidates = [Path(__file__).resolve().parents[2] / "benchmarks", Path.cwd() / "benchmarks"]
        if os.environ.get("FREEZEKERN_BENCHMARKS"):
            candidates.append(Path(os.environ["FREEZEKERN_BENCHMARKS"]))
    for root in candidates:
        if root.is_dir() and any(root.glob("bench_*.py")):
            return root
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"no benchmark suites (bench_*.py) in {looked}. They are not part of the installed package: they live in "
        f"{BENCHMARKS_HOME}. Run `freezekern bench` inside a checkout, or pass --dir PATH/TO/benchmarks "
        "(or set FREEZEKERN_BENCHMARKS); `freezekern verify` checks the kernels without them"
    )


def cmd_bench(args) -> int:
    import subprocess

    root = benchmarks_root(args.dir)
    target = root / args.suite if args.suite else root  # a suite may name a test: bench_x.py::test_y
    if not (root / args.suite.split("::")[0]).exists():
        suites = ", ".join(sorted(p.name for p in root.glob("bench_*.py")))
        raise FileNotFoundError(f"no benchmark suite {args.suite!r} in {root}; suites: {suites}")
    if args.list:
        cmd = [sys.executable, "-m", "pytest", str(target), "--collect-only", "-q"]
    else:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pytest", str(target), "--benchmark-only", f"--benchmark-json={args.json}", "-q"]
    print(" ".join(cmd))
    return subprocess.call(cmd)


def cmd_profile(args) -> int:
    check_profile_args(args)
    model, tokenizer = _load(args)
    profile_command(args, model, tokenizer)
    return 0


def cmd_export(args) -> int:
    check_export_args(args)
    export_command(args)
    return 0


def cmd_verify(args) -> int:
    if args.triton_interpret and torch.cuda.is_available():
        print("freezekern verify: a GPU is present, Triton runs compiled on it; --triton-interpret ignored",
              file=sys.stderr)
        args.triton_interpret = False
    if args.triton_interpret and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET once, when torch first imports it: run the check in a fresh process
        import subprocess

        argv = ["verify", "--triton-interpret", *(["--json"] if args.json else []),
                *(f"--op={op}" for op in args.op or ())]
        return subprocess.call([sys.executable, "-m", "freezekern.cli", *argv],
                               env={**os.environ, "TRITON_INTERPRET": "1"})
    from freezekern.ops.verification import verify

    report = verify(ops=args.op, triton_interpret=args.triton_interpret)
    print(report.to_json() if args.json else report.table())
    return 0 if report.passed else 1


def cmd_env(args) -> int:
    from freezekern.env import env_report

    for key, value in env_report().items():
        print(f"{key:>24}: {value}")
    return 0


def discover_for_command_line(model: nn.Module, layers: str | None) -> ModelParts:
    """``discover`` whose error names the command line's ``--layers`` override."""
    try:
        return discover(model, layers=layers)
    except ValueError as exc:
        if layers is not None:
            raise
        raise ValueError(f"{exc}; on the command line pass --layers PATH, the dotted path of the model's block "
                         "list (e.g. --layers model.layers or --layers transformer.h)") from None


def check_profile_args(args) -> None:
    """Refuse bad command-line values before any model is loaded."""
    if args.steps < 2:
        raise ValueError(f"--steps must be at least 2 (a median and an alternation need two), got {args.steps}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.seq_len < 2 or args.batch_size < 1:
        raise ValueError("--batch-size must be positive and --seq-len at least 2")
    if args.freeze is not None and args.freeze < 0:
        raise ValueError(f"--freeze must be >= 0, got {args.freeze}")
    if args.lora_r < 1:
        raise ValueError(f"--lora-r must be positive, got {args.lora_r}")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    if args.plan is not None:
        from pathlib import Path

        if not Path(args.plan).is_file():
            raise FileNotFoundError(f"plan file {args.plan} does not exist")
    if args.lora:
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise ValueError("--lora needs peft: pip install 'freezekern[peft]'")


def profile_command(args, model, tokenizer):
    """``freezekern profile``: build the setup the flags describe, profile it, print and write the report."""
    from pathlib import Path

    from freezekern.model.data import make_batches
    from freezekern.policy.rules import FreezePlan
    from freezekern.profiler.report import plot_profile, profile_table
    from freezekern.profiler.run import profile
    from freezekern.profiler.setup import prepare_setup

    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    parts = discover_for_command_line(model, args.layers)
    plan = FreezePlan.load(args.plan) if args.plan else None
    if args.freeze is not None and args.freeze > parts.num_layers:
        raise ValueError(f"--freeze {args.freeze} exceeds the model's {parts.num_layers} blocks")
    model = prepare_setup(model, boundary=args.freeze, plan=plan, lora=args.lora, lora_r=args.lora_r,
                          gradient_checkpointing=args.gradient_checkpointing, reentrant=args.reentrant, parts=parts)
    if args.lora:
        layers = f"base_model.model.{parts.blocks_path}" if args.layers else None
        parts = discover_for_command_line(model, layers)
    batches = make_batches(tokenizer, args.data, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                           num_tokens=2 * args.batch_size * args.seq_len)
    report = profile(model, batches, steps=args.steps, warmup=args.warmup, compare=not args.no_compare,
                     parts=parts, model_id=args.model or None)
    out = Path(args.out)
    report.save(out / "profile.json")
    plot_profile(report, out / "profile.png")
    print(profile_table(report))
    print(f"\nwrote {out / 'profile.json'}, {out / 'profile.png'}")
    return report


def export_command(args) -> str:
    """``freezekern export PLAN --format F [--model DIR] [--out PATH]``: write (or print) the plan in format F.

    ``peft`` with ``--out DIR`` writes DIR/adapter_config.json (``LoraConfig.from_pretrained(DIR)`` reads it).
    """
    import json

    from freezekern.integrations.export import export_plan, jsonable, peft_skeleton
    from freezekern.io import atomic_write_text
    from freezekern.policy.lora import to_peft_config
    from freezekern.policy.rules import FreezePlan

    plan = FreezePlan.load(args.plan)
    if args.format == "peft":
        skeleton = peft_skeleton(plan, args.model)
        targets = args.target_modules
        if targets is None:
            if skeleton is None:
                raise ValueError(f"the plan's model {plan.model_id!r} is not a local model folder, so its linear "
                                 "layers are unknown: pass --model DIR or --target-modules NAME [NAME ...]")
            from freezekern.model.peft import block_linear_names

            targets = block_linear_names(skeleton)
        config = to_peft_config(plan, model=skeleton, r=args.lora_r, target_modules=list(targets),
                                lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r)
        if args.out:
            config.save_pretrained(args.out)
            print(f"wrote {Path(args.out) / 'adapter_config.json'}")
            return ""
        text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=jsonable) + "\n"
    else:
        text = export_plan(plan, args.format, model_dir=args.model, plan_path=args.plan)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return text


def check_export_args(args) -> None:
    """Refuse bad command-line values before anything is read."""
    if not Path(args.plan).is_file():
        raise FileNotFoundError(f"plan file {args.plan} does not exist")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"--model {args.model} has no config.json: not a Hugging Face model directory")
    if args.lora_r < 1:
        raise ValueError(f"--lora-r must be positive, got {args.lora_r}")
