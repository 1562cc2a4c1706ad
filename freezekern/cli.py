"""Command line: ``freezekern analyze | finetune | bench | env``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, RuntimeError, TypeError)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local Hugging Face model directory (default: built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--data", help="text file, folder or JSONL (default: Python standard-library source)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")


def _add_plan_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metric", choices=["cosine", "logit_lens"], default="cosine")
    parser.add_argument("--policy", choices=["salf", "reduction", "fixed", "fraction", "none"], default="salf")
    parser.add_argument("--budget", type=float, default=None, help="backward budget in (0, 1]: share of blocks trained")
    parser.add_argument("--min-trainable", type=int, default=1)
    parser.add_argument("--freeze", type=int, default=None, help="blocks to freeze (policy fixed)")
    parser.add_argument("--fraction", type=float, default=None, help="share of blocks to freeze (policy fraction)")
    parser.add_argument("--train-head", action="store_true", default=None,
                        help="train the LM head even when it is tied to the input embedding")
    parser.add_argument("--impl", choices=["auto", "torch", "triton", "native"], default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freezekern", description="Where to fine-tune a language model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (shows the kernel chosen)")
    sub = parser.add_subparsers(dest="command", required=True)

    analyze = sub.add_parser("analyze", help="trace per-layer deviations and choose the freeze boundary")
    _add_model_args(analyze)
    _add_plan_args(analyze)
    analyze.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    analyze.add_argument("--out", default="freezekern-out", help="output folder (default ./freezekern-out)")
    analyze.add_argument("--json", help="plan JSON path (default OUT/plan.json; the trace goes beside it)")
    analyze.add_argument("--plot", help="PNG plot path (default OUT/trace.png)")

    finetune = sub.add_parser("finetune", help="analyse, plan and train above the boundary")
    _add_model_args(finetune)
    _add_plan_args(finetune)
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

    bench = sub.add_parser("bench", help="run the pytest-benchmark suites in benchmarks/")
    bench.add_argument("suite", nargs="?", default="", help="a file in benchmarks/ (default: all)")
    bench.add_argument("--json", default="freezekern-out/bench.json")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and run none")

    sub.add_parser("env", help="versions, devices and which kernels are available")
    return parser


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch sees no CUDA device")
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


def _check_plan_args(args) -> None:
    if args.budget is not None and not (0.0 < args.budget <= 1.0):
        raise ValueError(f"--budget must lie in (0, 1], got {args.budget}")
    if args.tokens < 1 or args.seq_len < 2 or args.batch_size < 1:
        raise ValueError("--tokens, --batch-size must be positive and --seq-len at least 2")


def _trace_and_plan(args, model, tokenizer, batches=None):
    import freezekern as fk

    if batches is None:
        batches = fk.make_batches(tokenizer, args.data, seq_len=args.seq_len, num_tokens=args.tokens,
                                  batch_size=args.batch_size, seed=args.seed)
    trace = fk.analyze(model, batches, metric=args.metric, impl=args.impl, model_id=args.model or None)
    plan = fk.plan(trace, args.policy, budget=args.budget, min_trainable=args.min_trainable,
                   n_frozen=args.freeze, fraction=args.fraction, train_head=args.train_head)
    return trace, plan


def cmd_analyze(args) -> int:
    from freezekern.report import plot_trace, trace_table

    _check_plan_args(args)
    out = Path(args.out)
    plan_path = Path(args.json) if args.json else out / "plan.json"
    trace_path = plan_path.with_name(plan_path.stem.replace("plan", "trace") + ".json")
    if trace_path == plan_path:
        trace_path = plan_path.with_suffix(".trace.json")
    plot_path = Path(args.plot) if args.plot else out / "trace.png"
    started = time.perf_counter()
    model, tokenizer = _load(args)
    loaded = time.perf_counter()
    trace, plan = _trace_and_plan(args, model, tokenizer)
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


def cmd_finetune(args) -> int:
    import freezekern as fk
    from freezekern.finetune import finetune, format_report

    _check_plan_args(args)
    if args.steps < 1:
        raise ValueError("--steps must be positive")
    model, tokenizer = _load(args)
    train_source, eval_source = _train_eval_split(args)
    sizes = {"seq_len": args.seq_len, "batch_size": args.batch_size}
    calibration = fk.make_batches(tokenizer, **train_source, num_tokens=args.tokens, seed=args.seed, **sizes)
    trace, plan = _trace_and_plan(args, model, tokenizer, calibration)
    print(plan)
    train_batches = fk.make_batches(tokenizer, **train_source, seed=args.seed + 1, **sizes,
                                    num_tokens=args.steps * args.batch_size * args.seq_len)
    eval_batches = fk.make_batches(tokenizer, **eval_source, num_tokens=args.eval_tokens, seed=args.seed, **sizes)
    report = finetune(model, tokenizer, train_batches, eval_batches, plan, steps=args.steps, lr=args.lr,
                      gradient_checkpointing=args.gradient_checkpointing, lora=args.lora, output_dir=args.out,
                      resume=not args.restart, compare=None if args.compare == "none" else args.compare,
                      fused_loss=args.fused_loss)
    trace.save(Path(args.out) / "trace.json")
    print(format_report(report))
    return 0


def _train_eval_split(args) -> tuple[dict, dict]:
    """Disjoint training and held-out sources: stdlib files split by file, user records 90/10."""
    import random

    from freezekern.data import Example, read_examples, split_files, stdlib_files

    if args.data is None:
        train_files, held_files = split_files(stdlib_files(args.seed))
        return {"files": train_files}, {"files": held_files}
    examples = read_examples(args.data)
    if len(examples) == 1 and examples[0].prompt is None:  # one text: hold out its last tenth
        text = examples[0].text
        cut = int(len(text) * 0.9)
        return {"source": [Example(text=text[:cut])]}, {"source": [Example(text=text[cut:])]}
    if len(examples) < 2:
        raise ValueError(f"{args.data} holds one record: finetune needs at least two to hold one out")
    order = list(range(len(examples)))
    random.Random(args.seed).shuffle(order)
    cut = max(1, len(order) // 10)
    return ({"source": [examples[i] for i in order[cut:]]}, {"source": [examples[i] for i in order[:cut]]})


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


def cmd_env(args) -> int:
    from freezekern.env import env_report

    for key, value in env_report().items():
        print(f"{key:>24}: {value}")
    return 0


COMMANDS = {"analyze": cmd_analyze, "finetune": cmd_finetune, "bench": cmd_bench, "env": cmd_env}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"freezekern: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("freezekern: interrupted; files already written are complete, nothing half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
