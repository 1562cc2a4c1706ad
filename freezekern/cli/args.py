"""The command line's parser and its checks: every argument, path and data file refused before a model loads."""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

from freezekern.policy.default import default_in_words
from freezekern.policy.rules import DEFAULT_POLICY, POLICIES

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
    moves = finetune.add_mutually_exclusive_group()
    moves.add_argument("--moving", action="store_true", default=None,
                       help="move the boundary with training: every block trains early, the plan's boundary "
                            "from 60%% of the steps on (budget-aware: a short run freezes more from the start)")
    moves.add_argument("--static", dest="moving", action="store_false",
                       help="keep the plan's boundary from the first step, whatever the run's length "
                            "(without --moving or --static, policies gain_share and salf without --lora: "
                            + default_in_words() + ")")
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
    compare.add_argument("--no-moving", action="store_true",
                         help="leave out the arm whose boundary moves from 0 to the plan's over the run")
    compare.add_argument("--lr-scheduler-type", choices=["constant", "linear", "cosine"], default="linear",
                         help="learning-rate decay over the budget, as the Trainer's (default linear)")
    compare.add_argument("--warmup-steps", type=float, default=0.0,
                         help="linear warmup: a share of the budget when below 1, else full-step equivalents "
                              "(the Trainer's warmup_steps; default 0)")
    compare.add_argument("--weight-decay", type=float, default=0.0,
                         help="AdamW weight decay on matrices (the Trainer's weight_decay; default 0)")
    compare.add_argument("--lr", type=float, default=None, help="learning rate of every arm (default 1e-4; LoRA 1e-3)")
    compare.add_argument("--tolerance", type=float, default=0.02,
                         help="recommend the cheapest arm within this relative loss of the best (default 0.02)")
    compare.add_argument("--out", default="freezekern-compare", help="output folder (table, JSON, PNG, runs)")
    compare.add_argument("--restart", action="store_true", help="ignore finished arms in --out and train again")

    bench = sub.add_parser("bench", help="run the pytest-benchmark suites in benchmarks/")
    bench.add_argument("suite", nargs="?", default="", help="a file in benchmarks/ (default: all)")
    bench.add_argument("--json", default="freezekern-out/bench.json")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and run none")
    bench.add_argument("--dir", default=None,
                       help="the benchmarks/ folder of a freezekern source checkout (default: beside the package, "
                            "then ./benchmarks, then $FREEZEKERN_BENCHMARKS)")

    verify = sub.add_parser("verify", help="check every kernel on this machine against an fp64 reference")
    verify.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    verify.add_argument("--triton-interpret", action="store_true",
                        help="also run the Triton kernels in Triton's CPU interpreter (slow)")
    verify.add_argument("--op", action="append", default=None, help="check only this op (repeatable)")

    sub.add_parser("env", help="versions, devices and which kernels are available")
    _add_profile_parser(sub)
    _add_export_parser(sub)
    return parser


# -- checks that run before any model is loaded -------------------------------------------------

def check_writable_dir(path: Path, flag: str) -> None:
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


def check_writable_file(path: Path, flag: str) -> None:
    if path.exists() and path.is_dir():
        raise ValueError(f"{flag} {path} is a folder, not a file")
    check_writable_dir(path.parent, f"the folder of {flag}")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{flag} {path} is not writable")


def check_positive(value, flag: str, integer: bool = False, minimum: float = 0.0, inclusive: bool = False) -> None:
    ok = value is not None and math.isfinite(value) and (value >= minimum if inclusive else value > minimum)
    if not ok or (integer and int(value) != value):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise ValueError(f"{flag} must be {'an integer ' if integer else 'a number '}{bound}, got {value}")


def check_share(value, flag: str, low_open: bool = True) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and ((0.0 < value) if low_open else (0.0 <= value)) and value <= 1.0
    if not ok:
        raise ValueError(f"{flag} must lie in {'(' if low_open else '['}0, 1], got {value}")


def renamed_flags(args) -> None:
    for old, new in (("budget", "trained_share"), ("fraction", "frozen_share")):
        value = getattr(args, old, None)
        if value is None:
            continue
        if getattr(args, new) is not None:
            raise ValueError(f"pass --{new.replace('_', '-')} only (--{old} is its old name)")
        warnings.warn(f"--{old} is deprecated: use --{new.replace('_', '-')}", DeprecationWarning, stacklevel=2)
        print(f"freezekern: note: --{old} is deprecated, use --{new.replace('_', '-')}", file=sys.stderr)
        setattr(args, new, value)


def check_common(args) -> None:
    renamed_flags(args)
    check_share(args.trained_share, "--trained-share")
    check_share(args.frozen_share, "--frozen-share", low_open=False)
    check_share(args.flops_budget, "--flops-budget")
    check_share(args.gain_share, "--gain-share")
    check_positive(args.tokens, "--tokens", integer=True)
    check_positive(args.batch_size, "--batch-size", integer=True)
    check_positive(args.seq_len, "--seq-len", integer=True, minimum=2, inclusive=True)
    check_positive(args.min_trainable, "--min-trainable", integer=True, inclusive=True)
    if args.policy == "fixed" and args.freeze is None:
        raise ValueError("--policy fixed needs --freeze K (the number of blocks to freeze)")
    if args.freeze is not None and args.policy != "fixed":
        raise ValueError("--freeze K goes with --policy fixed")
    if args.policy == "fraction" and args.frozen_share is None:
        raise ValueError("--policy fraction needs --frozen-share S")
    if args.policy == "flops" and args.flops_budget is None:
        raise ValueError("--policy flops needs --flops-budget F (e.g. 0.5)")
    if args.freeze is not None:
        check_positive(args.freeze, "--freeze", integer=True, inclusive=True)
    if args.model is not None:
        model = Path(args.model)
        if not model.is_dir():
            raise FileNotFoundError(f"model directory {model} does not exist")
        if not (model / "config.json").is_file():
            raise FileNotFoundError(f"{model} has no config.json: not a Hugging Face model directory")
    args.examples = read_data(args.data)


def read_data(path):
    """The user's records, read (and checked to be text) before any model work; None for the default corpus."""
    if path is None:
        return None
    from freezekern.model.data import read_examples

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
