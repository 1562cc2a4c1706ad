"""Command line: ``freezekern analyze | finetune | compare | profile | export | bench | env``.

Every argument, output path and data source is checked before a model is
loaded; user errors (bad values, missing or unreadable files, data that is
not text) end with one line and exit status 2, anything else is reported as
a bug with a pointer to ``-v`` for the traceback (exit status 1).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

from freezekern.policy import DEFAULT_POLICY

USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError)
TRACE_POLICIES = ("salf", "gain_share", "flops", "reduction")
POLICIES = (*TRACE_POLICIES, "fixed", "fraction", "none")
MIN_HELDOUT_CHARS = 64


def _add_model_args(parser: argparse.ArgumentParser, seq_len: int = 256) -> None:
    parser.add_argument("--model", help="local Hugging Face model directory (default: built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--data", help="text file, folder or JSONL (default: Python standard-library source)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per sequence (default {seq_len})")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")


def _add_plan_args(parser: argparse.ArgumentParser, policies=POLICIES) -> None:
    parser.add_argument("--metric", choices=["cosine", "logit_lens"], default="cosine")
    parser.add_argument("--policy", choices=policies, default=DEFAULT_POLICY,
                        help=f"boundary rule (default {DEFAULT_POLICY})")
    parser.add_argument("--trained-share", type=float, default=None,
                        help="at most this share of the blocks trains, in (0, 1] (trace policies)")
    parser.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)  # old name of --trained-share
    parser.add_argument("--min-trainable", type=int, default=1, help="blocks that train at least (default 1)")
    parser.add_argument("--freeze", type=int, default=None, metavar="K",
                        help="policy fixed: freeze blocks 1..K (K is the boundary)")
    parser.add_argument("--frozen-share", type=float, default=None,
                        help="policy fraction: share of the blocks frozen, in [0, 1]")
    parser.add_argument("--fraction", type=float, default=None, help=argparse.SUPPRESS)  # old name of --frozen-share
    parser.add_argument("--flops-budget", type=float, default=None,
                        help="policy flops: step FLOPs at most this share of full fine-tuning's, in (0, 1]")
    parser.add_argument("--gain-share", type=float, default=None,
                        help="policy gain_share: share of the positive gain the trained layers hold (default 0.9)")
    parser.add_argument("--train-head", action=argparse.BooleanOptionalAction, default=None,
                        help="train the LM head (default: yes unless tied to the input embedding)")
    parser.add_argument("--train-final-norm", action=argparse.BooleanOptionalAction, default=True,
                        help="train the final norm (default: yes)")
    parser.add_argument("--impl", choices=["auto", "torch", "triton", "native"], default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freezekern", description="Where to fine-tune a language model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    analyze = sub.add_parser("analyze", help="trace per-layer deviations and choose the freeze boundary")
    _add_model_args(analyze)
    _add_plan_args(analyze)
    analyze.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    analyze.add_argument("--out", default="freezekern-out", help="output folder (default ./freezekern-out)")
    analyze.add_argument("--json", help="plan JSON path (default OUT/plan.json; the trace goes beside it as "
                                        "<name>.trace.json, or OUT/trace.json by default)")
    analyze.add_argument("--plot", help="PNG plot path (default OUT/trace.png)")

    finetune = sub.add_parser("finetune", help="analyse, plan and train above the boundary")
    _add_model_args(finetune)
    _add_plan_args(finetune, (*POLICIES, "probe"))
    finetune.add_argument("--tokens", type=int, default=2048, help="calibration tokens (default 2048)")
    finetune.add_argument("--steps", type=int, default=20)
    finetune.add_argument("--lr", type=float, default=1e-4)
    finetune.add_argument("--eval-tokens", type=int, default=2048)
    finetune.add_argument("--gradient-checkpointing", action="store_true")
    finetune.add_argument("--lora", action="store_true", help="LoRA adapters on the trained blocks only")
    finetune.add_argument("--fused-loss", action="store_true",
                          help="fused LM-head loss: no [B, T, V] logits, no weight gradient of a frozen head")
    finetune.add_argument("--compare", choices=["full", "none"], default="none",
                          help="also measure full fine-tuning in the same run")
    finetune.add_argument("--out", default="freezekern-finetune", help="output folder (model, plan, report)")
    finetune.add_argument("--restart", action="store_true", help="ignore a checkpoint in --out and start over")

    compare = sub.add_parser("compare", help="train a few boundaries at equal compute on your data; recommend one")
    _add_model_args(compare, seq_len=128)
    _add_plan_args(compare)
    compare.add_argument("--tokens", type=int, default=2048, help="calibration tokens (default 2048)")
    compare.add_argument("--train-tokens", type=int, default=16384, help="training pool, cycled (default 16384)")
    compare.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens (default 2048)")
    budget = compare.add_mutually_exclusive_group()
    budget.add_argument("--budget-steps", type=float, default=None,
                        help="compute per arm in full fine-tuning steps (FLOPs-equivalent; default 10)")
    budget.add_argument("--budget-seconds", type=float, default=None, help="measured training seconds per arm")
    compare.add_argument("--boundaries", default="auto",
                         help="auto (the policy's boundary, its runner-up, freeze half, full) or k1,k2,..,full")
    compare.add_argument("--lora", action="store_true", help="LoRA above each boundary instead")
    compare.add_argument("--lr", type=float, default=None, help="learning rate of every arm (default 1e-4; LoRA 1e-3)")
    compare.add_argument("--tolerance", type=float, default=0.02,
                         help="recommend the cheapest arm within this relative loss of the best (default 0.02)")
    compare.add_argument("--out", default="freezekern-compare", help="output folder (table, JSON, PNG, runs)")
    compare.add_argument("--restart", action="store_true", help="ignore finished arms in --out and train again")

    bench = sub.add_parser("bench", help="run the pytest-benchmark suites in benchmarks/")
    bench.add_argument("suite", nargs="?", default="", help="a file in benchmarks/ (default: all)")
    bench.add_argument("--json", default="freezekern-out/bench.json")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and run none")

    sub.add_parser("env", help="versions, devices and which kernels are available")
    _add_profile_parser(sub)
    _add_export_parser(sub)
    return parser


# -- checks that run before any model is loaded -------------------------------------------------

def _check_writable_dir(path: Path, flag: str) -> None:
    """``path`` is (or can become) a writable directory; raises with the flag's name otherwise."""
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{flag} {path} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{flag} {path} is not writable")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path} cannot be created: {parent} is not a writable folder")


def _check_writable_file(path: Path, flag: str) -> None:
    if path.exists() and path.is_dir():
        raise ValueError(f"{flag} {path} is a folder, not a file")
    _check_writable_dir(path.parent, f"the folder of {flag}")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{flag} {path} is not writable")


def _positive(value, flag: str, integer: bool = False, minimum: float = 0.0, inclusive: bool = False) -> None:
    ok = value is not None and math.isfinite(value) and (value >= minimum if inclusive else value > minimum)
    if not ok or (integer and int(value) != value):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise ValueError(f"{flag} must be {'an integer ' if integer else 'a number '}{bound}, got {value}")


def _share(value, flag: str, low_open: bool = True) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and ((0.0 < value) if low_open else (0.0 <= value)) and value <= 1.0
    if not ok:
        raise ValueError(f"{flag} must lie in {'(' if low_open else '['}0, 1], got {value}")


def _renamed_flags(args) -> None:
    for old, new in (("budget", "trained_share"), ("fraction", "frozen_share")):
        value = getattr(args, old, None)
        if value is None:
            continue
        if getattr(args, new) is not None:
            raise ValueError(f"pass --{new.replace('_', '-')} only (--{old} is its old name)")
        warnings.warn(f"--{old} is deprecated: use --{new.replace('_', '-')}", DeprecationWarning, stacklevel=2)
        print(f"freezekern: note: --{old} is deprecated, use --{new.replace('_', '-')}", file=sys.stderr)
        setattr(args, new, value)


def _check_common(args) -> None:
    _renamed_flags(args)
    _share(args.trained_share, "--trained-share")
    _share(args.frozen_share, "--frozen-share", low_open=False)
    _share(args.flops_budget, "--flops-budget")
    _share(args.gain_share, "--gain-share")
    _positive(args.tokens, "--tokens", integer=True)
    _positive(args.batch_size, "--batch-size", integer=True)
    _positive(args.seq_len, "--seq-len", integer=True, minimum=2, inclusive=True)
    _positive(args.min_trainable, "--min-trainable", integer=True, inclusive=True)
    if args.policy == "fixed" and args.freeze is None:
        raise ValueError("--policy fixed needs --freeze K (the number of blocks to freeze)")
    if args.freeze is not None and args.policy != "fixed":
        raise ValueError("--freeze K goes with --policy fixed")
    if args.policy == "fraction" and args.frozen_share is None:
        raise ValueError("--policy fraction needs --frozen-share S")
    if args.policy == "flops" and args.flops_budget is None:
        raise ValueError("--policy flops needs --flops-budget F (e.g. 0.5)")
    if args.freeze is not None:
        _positive(args.freeze, "--freeze", integer=True, inclusive=True)
    if args.model is not None:
        model = Path(args.model)
        if not model.is_dir():
            raise FileNotFoundError(f"model directory {model} does not exist")
        if not (model / "config.json").is_file():
            raise FileNotFoundError(f"{model} has no config.json: not a Hugging Face model directory")
    args.examples = _read_data(args.data)


def _read_data(path):
    """The user's records, read (and checked to be text) before any model work; None for the default corpus."""
    if path is None:
        return None
    from freezekern.data import read_examples

    return read_examples(path)

def _add_profile_parser(sub) -> None:
    profile = sub.add_parser("profile", help="measure where a training step's time goes, beside freezekern's cut")
    _add_model_args(profile)
    profile.add_argument("--gradient-checkpointing", action="store_true",
                         help="Hugging Face activation checkpointing with enable_input_require_grads")
    profile.add_argument("--reentrant", action="store_true", help="reentrant checkpointing (default: non-reentrant)")
    profile.add_argument("--lora", action="store_true", help="PEFT LoRA on the trained blocks (every linear)")
    profile.add_argument("--lora-r", type=int, default=16)
    frozen = profile.add_mutually_exclusive_group()
    frozen.add_argument("--freeze", type=int, default=None,
                        help="freeze the embeddings and blocks 1..K plainly (requires_grad_(False))")
    frozen.add_argument("--plan", help="freeze plainly what this plan.json freezes")
    profile.add_argument("--steps", type=int, default=4, help="measured steps per setup (at least 2; default 4)")
    profile.add_argument("--warmup", type=int, default=2,
                         help="untimed warm-up rounds, the last measures peak memory (default 2)")
    profile.add_argument("--layers", help="dotted path of the decoder block list when it is not found")
    profile.add_argument("--no-compare", action="store_true", help="profile your setup only, without the cut")
    profile.add_argument("--threads", type=int, default=None,
                         help="CPU threads for torch (default: torch's; 1 is steadier on a machine shared with other jobs)")
    profile.add_argument("--out", default="freezekern-profile", help="output folder (profile.json, profile.png)")


def _add_export_parser(sub) -> None:
    export = sub.add_parser("export", help="write a plan as a PEFT config, axolotl YAML, a TRL snippet or JSON")
    export.add_argument("plan", help="plan.json written by analyze (or FreezePlan.save)")
    export.add_argument("--format", required=True, choices=["peft", "axolotl", "trl", "json"])
    export.add_argument("--model", help="the model folder (its config.json names the parameters; default: the "
                                        "plan's model when it is a local folder or the built-in model)")
    export.add_argument("--out", help="output file (peft: a folder for adapter_config.json); default: stdout")
    export.add_argument("--lora-r", type=int, default=16, help="peft: LoRA rank (default 16)")
    export.add_argument("--lora-alpha", type=int, default=None, help="peft: LoRA alpha (default 2 r)")
    export.add_argument("--target-modules", nargs="+", default=None,
                        help="peft: module names to adapt (default: every linear of a block)")


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA device")
    return device


def _load(args):
    from freezekern.models import load_default_model, load_model, parse_dtype

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
    from freezekern.report import plot_trace, trace_table

    _check_common(args)
    out = Path(args.out)
    if args.json:
        plan_path = Path(args.json)
        trace_path = plan_path.with_name(plan_path.name.removesuffix(".json") + ".trace.json")
    else:
        plan_path, trace_path = out / "plan.json", out / "trace.json"
    plot_path = Path(args.plot) if args.plot else out / "trace.png"
    for path, flag in ((plan_path, "--json"), (trace_path, "the trace path"), (plot_path, "--plot")):
        _check_writable_file(path, flag)
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
    return 0


def _check_training(args) -> None:
    _check_common(args)
    if args.lr is not None:
        _positive(args.lr, "--lr")
    _positive(args.eval_tokens, "--eval-tokens", integer=True)
    _check_writable_dir(Path(args.out), "--out")


def cmd_finetune(args) -> int:
    import freezekern as fk
    from freezekern.finetune import finetune, format_report

    _check_training(args)
    _positive(args.steps, "--steps", integer=True)
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

    from freezekern.data import Example, split_files, stdlib_files

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


def cmd_compare(args) -> int:
    import json

    import freezekern as fk
    from freezekern.io import atomic_write_json
    from freezekern.report import plot_compare
    from freezekern.trials import ArmResult, format_table

    _check_training(args)
    _positive(args.train_tokens, "--train-tokens", integer=True)
    if args.budget_seconds is not None:
        _positive(args.budget_seconds, "--budget-seconds")
    budget_steps = args.budget_steps if args.budget_steps is not None or args.budget_seconds is not None else 10.0
    if budget_steps is not None:
        _positive(budget_steps, "--budget-steps")
    if not 0 <= args.tolerance < 1:
        raise ValueError(f"--tolerance must lie in [0, 1), got {args.tolerance}")
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
                "budget_steps": budget_steps, "budget_seconds": args.budget_seconds, "dtype": args.dtype}
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
                        budget_steps=budget_steps if args.budget_seconds is None else None,
                        budget_seconds=args.budget_seconds, tolerance=args.tolerance, seed=args.seed,
                        done=done, on_result=save)
    print(format_table(result))
    atomic_write_json(out / "compare.json", {"settings": settings, "plan": plan.to_dict(), **result.to_dict()})
    plot_compare(result, out / "compare.png")
    print(f"wrote {out / 'compare.json'}, {out / 'compare.png'}")
    return 0


def cmd_bench(args) -> int:
    import subprocess

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not root.is_dir():
        raise FileNotFoundError("benchmarks/ not found: run `freezekern bench` from a source checkout")
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
    from freezekern.backward_profile import check_profile_args, profile_command

    check_profile_args(args)
    model, tokenizer = _load(args)
    profile_command(args, model, tokenizer)
    return 0


def cmd_export(args) -> int:
    from freezekern.integrations.export import check_export_args, export_command

    check_export_args(args)
    export_command(args)
    return 0


def cmd_env(args) -> int:
    from freezekern.env import env_report

    for key, value in env_report().items():
        print(f"{key:>24}: {value}")
    return 0


COMMANDS = {"analyze": cmd_analyze, "finetune": cmd_finetune, "compare": cmd_compare, "profile": cmd_profile,
            "export": cmd_export, "bench": cmd_bench, "env": cmd_env}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("freezekern: interrupted; files already written are complete, nothing half-written", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"freezekern: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - anything else is a bug: say so, and how to see the traceback
        if args.verbose:
            raise
        print(f"freezekern: internal error ({type(exc).__name__}): {exc}\n"
              "this is a bug in freezekern or its use of a library; run again with -v for the traceback and "
              "report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
