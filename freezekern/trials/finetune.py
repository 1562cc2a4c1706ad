"""Fine-tune with a freeze plan, measure it, and (optionally) measure full fine-tuning beside it.

``finetune(model, tokenizer, train_batches, eval_batches, plan, steps=..., lr=...)``
applies the plan (``freezekern.apply``), optionally on top of LoRA
adapters placed above the boundary and of activation checkpointing, trains
with AdamW over the trainable parameters only, and returns a plain-dict
report: held-out loss before and after, tokens/s, step time, peak memory,
and with ``compare="full"`` the same numbers for full fine-tuning of a copy
of the model, measured in the same run on the same batches.

Resuming: with ``output_dir`` a checkpoint is written to
``output_dir/checkpoint`` every ``save_every`` steps and when the run is
interrupted (Ctrl-C). A later call with the same plan, data and settings
continues from it; anything that differs is reported and the run starts
over (``report["resume"]`` says which). A finished full-fine-tuning
comparison is kept in ``output_dir/compare_full.json`` and reused.

Peak memory is CUDA's max_memory_allocated above the starting allocation on
a GPU, and on CPU the peak resident set size above the starting RSS: the
kernel's high-water mark (VmHWM, reset at the start) on Linux, after freed
heap pages were returned with malloc_trim (``freezekern.profiler.memory.PeakMemory``).

Seeding: ``seed`` seeds Python, NumPy and torch before LoRA adapters are
initialised and before training, so two identical runs give identical
weights.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import os
import random
import shutil
import statistics
import sys
from pathlib import Path

import torch

from freezekern.cut import apply, trainable_parameters
from freezekern.cut.moving import MovingBoundary
from freezekern.io import atomic_write_json
from freezekern.model.training import (
    device_of,
    disable_checkpointing,
    enable_checkpointing,
    evaluate,
    seed_everything,
    to_device,
)
from freezekern.policy.rules import PLAN_FILE, FreezePlan
from freezekern.profiler.memory import PeakMemory, release_memory
from freezekern.profiler.timing import timed, train_step

logger = logging.getLogger("freezekern.trials.finetune")

CHECKPOINT = "checkpoint"
COMPARE_FILE = "compare_full.json"
REPORT_FILE = "report.json"


# -- helpers ----------------------------------------------------------------------------------

def _say(message: str, progress: bool) -> None:
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    logger.info(message)


def _data_signature(batches) -> str:
    digest = hashlib.blake2b(digest_size=12)
    digest.update(str(len(batches)).encode())
    for batch in (batches[0], batches[-1]):
        digest.update(batch["input_ids"].cpu().numpy().tobytes())
    return digest.hexdigest()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(folder: Path, model, optimizer, step: int, meta: dict, history: dict) -> None:
    """Write the trainable tensors, optimizer, step and RNG state; the folder is replaced atomically."""
    staging = folder.with_name(folder.name + ".new")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"trainable": trainable, "optimizer": optimizer.state_dict(), "step": step,
                "rng": _rng_state(), "history": history}, staging / "state.pt")
    (staging / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)


def _find_checkpoint(output_dir: Path) -> Path | None:
    for name in (CHECKPOINT, CHECKPOINT + ".old"):  # .old survives a crash between the two renames
        folder = output_dir / name
        if (folder / "state.pt").is_file() and (folder / "meta.json").is_file():
            return folder
    return None


def _mismatch(saved: dict, meta: dict) -> str | None:
    for key in ("boundary", "fingerprint", "lora", "gradient_checkpointing", "lr", "data", "seed", "cut",
                "fused_loss", "moving"):
        if saved.get(key) != meta.get(key):
            return f"{key} differs (checkpoint: {saved.get(key)!r}, now: {meta.get(key)!r})"
    return None


# -- one training run -------------------------------------------------------------------------

def _train(model, train_batches, steps: int, lr: float, *, label: str, progress: bool, device,
           start_step: int = 0, optimizer=None, checkpoint=None, history=None, mover=None) -> dict:
    """Run steps start_step..steps-1; returns timing, loss and memory numbers for the steps run.

    ``mover``: a ``MovingBoundary`` told the share of the run done after each step.
    """
    from tqdm.auto import tqdm

    optimizer = optimizer or torch.optim.AdamW(trainable_parameters(model), lr=lr)
    history = history if history is not None else {"loss": [], "step_s": [], "tokens": []}
    model.train()
    bar = tqdm(total=steps, initial=start_step, desc=label, disable=not progress, unit="step", leave=True)
    step_times, tokens_run = [], 0
    step = start_step
    try:
        with PeakMemory(device) as memory:
            for step in range(start_step, steps):
                batch = to_device(train_batches[step % len(train_batches)], device)
                tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
                loss, elapsed = timed(functools.partial(train_step, model, batch, optimizer), device)
                if mover is not None:
                    mover.update((step + 1) / steps, step + 1)
                loss_value = float(loss)
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"{label}: the training loss became {loss_value} at step {step + 1}")
                step_times.append(elapsed)
                tokens_run += tokens
                history["loss"].append(loss_value)
                history["step_s"].append(elapsed)
                history["tokens"].append(tokens)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens / elapsed:,.0f}")
                bar.update(1)
                if checkpoint is not None and checkpoint["every"] and (step + 1) % checkpoint["every"] == 0 \
                        and step + 1 < steps:
                    _save_checkpoint(checkpoint["folder"], model, optimizer, step + 1, checkpoint["meta"], history)
    except KeyboardInterrupt:
        bar.close()
        if checkpoint is not None:
            done = len(history["loss"])
            _save_checkpoint(checkpoint["folder"], model, optimizer, done, checkpoint["meta"], history)
            _say(f"interrupted after step {done}: checkpoint saved to {checkpoint['folder']}; "
                 "run again with the same arguments to resume", True)
        raise
    bar.close()
    times = step_times or history["step_s"]
    tokens_all = history["tokens"][-len(times):] if times else []
    return {
        "optimizer": optimizer,
        "history": history,
        "steps_run": len(step_times),
        "step_time_s": statistics.median(times) if times else None,
        "step_time_mean_s": statistics.fmean(times) if times else None,
        "tokens_per_s": (sum(tokens_all) / sum(times)) if times else None,
        "peak_memory_mb": memory.peak_bytes / 2**20 if step_times else None,
        "memory_kind": memory.kind,
        "train_loss_first": history["loss"][0] if history["loss"] else None,
        "train_loss_last": history["loss"][-1] if history["loss"] else None,
    }


def _numbers(result: dict, eval_before: float, eval_after: float, model) -> dict:
    keys = ("steps_run", "step_time_s", "step_time_mean_s", "tokens_per_s", "peak_memory_mb", "memory_kind",
            "train_loss_first", "train_loss_last")
    out = {k: result[k] for k in keys}
    out.update(eval_loss_before=eval_before, eval_loss_after=eval_after,
               trainable_params=sum(p.numel() for p in trainable_parameters(model)))
    return out


# -- the entry point --------------------------------------------------------------------------

def finetune(
    model,
    tokenizer,
    train_batches,
    eval_batches,
    plan: FreezePlan,
    *,
    steps: int,
    lr: float,
    gradient_checkpointing: bool = False,
    lora: bool = False,
    output_dir=None,
    resume: bool = True,
    progress: bool = True,
    compare: str | None = None,
    save_every: int | None = None,
    lora_kwargs: dict | None = None,
    seed: int = 0,
    fused_loss: bool = False,
) -> dict:
    """Train ``model`` under ``plan`` for ``steps`` steps and report what it cost and gained.

    ``train_batches``/``eval_batches``: lists of dicts with ``input_ids``,
    ``attention_mask``, ``labels`` [B, T] (``freezekern.make_batches``);
    training cycles through ``train_batches``. ``lora``: LoRA adapters
    (``lora_kwargs`` over ``freezekern.policy.lora.DEFAULT_LORA``, every linear layer of the blocks) in blocks
    k+1..L only, merged into the weights at the end. ``compare="full"`` also
    fine-tunes a copy of the untouched model with every parameter trainable
    (same steps, batches, lr and checkpointing) and reports both. With
    ``output_dir``: checkpoints for resuming, ``model/`` (the trained model and
    tokenizer), ``freezekern_plan.json`` and ``report.json``. The model is
    trained in place; the freeze is removed before returning. ``seed`` seeds
    LoRA initialisation and training (a resumed run restores its RNG state).
    ``fused_loss``: the loss of both runs comes from the fused LM-head op
    (``freezekern.cut.fused_loss``).
    """
    train_batches, eval_batches = _checked(steps, lr, compare, train_batches, eval_batches)
    device = device_of(model)
    output = Path(output_dir) if output_dir is not None else None
    meta = _run_meta(model, plan, train_batches, steps=steps, lr=lr, lora=lora, seed=seed, fused_loss=fused_loss,
                     gradient_checkpointing=gradient_checkpointing)
    report = _new_report(plan, meta, device, train_batches, eval_batches, output)
    saved_state = _resume_point(output, meta, resume, report, progress)
    original = copy.deepcopy(model) if compare == "full" and not _compare_cached(output, meta) else None
    eval_before = saved_state["history"].get("eval_before") if saved_state else None
    if eval_before is None:
        eval_before = evaluate(model, eval_batches)
    _say(f"held-out loss before training: {eval_before:.4f}", progress)
    work = _train_with_plan(model, plan, train_batches, eval_batches, report, meta, saved_state, eval_before,
                            output=output, progress=progress, lora_kwargs=lora_kwargs, save_every=save_every)
    if compare == "full":
        _compare_full(original, train_batches, eval_batches, report, meta, eval_before, output=output,
                      progress=progress)
    if output is not None:
        _save_outputs(work, tokenizer, plan, output, report)
    return report


# -- its steps ------------------------------------------------------------------------------

def _checked(steps, lr, compare, train_batches, eval_batches) -> tuple[list, list]:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not (lr > 0):
        raise ValueError(f"lr must be positive, got {lr}")
    if compare not in (None, "none", "full"):
        raise ValueError(f"compare must be 'full' or None, got {compare!r}")
    train_batches, eval_batches = list(train_batches), list(eval_batches)
    if not train_batches or not eval_batches:
        raise ValueError("finetune needs at least one training batch and one held-out batch")
    return train_batches, eval_batches


def _run_meta(model, plan: FreezePlan, train_batches, *, steps, lr, lora, seed, fused_loss,
              gradient_checkpointing) -> dict:
    """What makes two runs the same run (a checkpoint resumes only a run with equal meta)."""
    from freezekern.model.parts import discover

    return {"boundary": plan.boundary, "fingerprint": discover(model).fingerprint(), "lora": bool(lora),
            "gradient_checkpointing": bool(gradient_checkpointing), "lr": lr, "steps": steps,
            "data": _data_signature(train_batches), "seed": seed, "cut": plan.cut,
            "fused_loss": bool(fused_loss), "moving": plan.moving}


def _new_report(plan: FreezePlan, meta: dict, device, train_batches, eval_batches, output) -> dict:
    return {
        "plan": {"policy": plan.policy, "metric": plan.metric, "boundary": plan.boundary,
                 "num_layers": plan.num_layers, "backward_fraction": plan.backward_fraction,
                 "step_flops_fraction": plan.step_flops_fraction, "train_head": plan.train_head,
                 "moving": plan.moving},
        "setup": {"steps": meta["steps"], "lr": meta["lr"], "gradient_checkpointing": meta["gradient_checkpointing"],
                  "lora": meta["lora"], "device": str(device), "seed": meta["seed"],
                  "fused_loss": meta["fused_loss"],
                  "batch_shape": list(train_batches[0]["input_ids"].shape),
                  "train_batches": len(train_batches), "eval_batches": len(eval_batches)},
        "resume": {"resumed": False, "from_step": 0, "reason": "no output_dir" if output is None else None},
    }


def _resume_point(output: Path | None, meta: dict, resume: bool, report: dict, progress: bool) -> dict | None:
    """The saved state to continue from (None: start at step 0); ``report["resume"]`` says why."""
    if output is None:
        return None
    output.mkdir(parents=True, exist_ok=True)
    found = _find_checkpoint(output)
    saved_state = None
    if found is None:
        report["resume"]["reason"] = f"no checkpoint in {output}: starting from step 0"
    elif not resume:
        report["resume"]["reason"] = f"resume=False: starting over (the checkpoint in {found} will be replaced)"
    else:
        problem = _mismatch(json.loads((found / "meta.json").read_text()), meta)
        if problem is not None:
            report["resume"]["reason"] = f"checkpoint in {found} does not match this run ({problem}): starting over"
        else:
            saved_state = torch.load(found / "state.pt", map_location="cpu", weights_only=False)
            report["resume"] = {"resumed": True, "from_step": int(saved_state["step"]),
                                "reason": f"resuming from {found} at step {saved_state['step']} of {meta['steps']}"}
    _say(f"freezekern finetune: {report['resume']['reason']}", progress)
    return saved_state


def _set_up(model, plan: FreezePlan, meta: dict, lora_kwargs):
    """LoRA above the boundary (optional), checkpointing (optional) and the cut on ``model``: (work, handle)."""
    work = model
    seed_everything(meta["seed"])
    if meta["lora"]:
        import peft

        from freezekern.policy.lora import lora_config

        work = peft.get_peft_model(model, lora_config(plan.boundary, model, **(lora_kwargs or {})))
    try:
        if meta["gradient_checkpointing"]:
            enable_checkpointing(work)
        return work, apply(work, plan, fused_loss=meta["fused_loss"])
    except BaseException:
        _take_down(model, work, None, meta, merge=False)
        raise


def _take_down(model, work, handle, meta: dict, *, merge: bool):
    """Undo ``_set_up``: the cut, checkpointing, and LoRA (merged after a finished run, removed otherwise)."""
    if handle is not None and handle.active:
        handle.remove()
    if meta["gradient_checkpointing"]:
        disable_checkpointing(work)
    if work is not model:
        work = work.merge_and_unload() if merge else work.unload()
    return work


def _restore(work, optimizer, saved_state: dict) -> tuple[dict, int]:
    named = dict(work.named_parameters())
    missing = [n for n in saved_state["trainable"] if n not in named]
    if missing:
        raise RuntimeError(f"checkpoint holds parameters this model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, value in saved_state["trainable"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(saved_state["optimizer"])
    _set_rng_state(saved_state["rng"])
    return saved_state["history"], int(saved_state["step"])


def _train_with_plan(model, plan: FreezePlan, train_batches, eval_batches, report: dict, meta: dict, saved_state,
                     eval_before: float, *, output, progress: bool, lora_kwargs, save_every):
    """The freezekern run: set up, (resume,) train, evaluate, take down; returns the trained model."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    steps = meta["steps"]
    work, handle = _set_up(model, plan, meta, lora_kwargs)
    trainable = sum(p.numel() for p in trainable_parameters(work))
    total = sum(p.numel() for p in work.parameters())
    what = f"LoRA adapters on blocks {plan.boundary + 1}..{plan.num_layers}" if meta["lora"] else \
        ("every parameter" if not plan.cut else f"blocks {plan.boundary + 1}..{plan.num_layers}, norm, head as planned")
    if plan.moving:
        what += f"; the boundary moves from k={plan.moving['start']}"
    _say(f"training {trainable:,} of {total:,} parameters ({trainable / max(total, 1):.2%}: {what})", progress)
    finished, mover = False, None
    try:
        optimizer = torch.optim.AdamW(trainable_parameters(work), lr=meta["lr"])
        mover = MovingBoundary(handle, optimizer=optimizer) if plan.moving else None
        history, start = {"loss": [], "step_s": [], "tokens": [], "eval_before": eval_before}, 0
        if saved_state is not None:
            history, start = _restore(work, optimizer, saved_state)
        if mover is not None:
            handle = mover.update(start / steps, start)
        checkpoint = None
        if output is not None:
            every = save_every if save_every is not None else max(1, steps // 10)
            checkpoint = {"folder": output / CHECKPOINT, "every": every, "meta": meta}
        label = f"freezekern k={plan.boundary}/{plan.num_layers}" + (" +LoRA" if meta["lora"] else "") + \
            (" +GC" if meta["gradient_checkpointing"] else "") + (" moving" if mover is not None else "")
        result = _train(work, train_batches, steps, meta["lr"], label=label, progress=progress,
                        device=device_of(work), start_step=start, optimizer=optimizer, checkpoint=checkpoint,
                        history=history, mover=mover)
        if mover is not None:
            handle = mover.handle
            report["moves"] = list(mover.moves)
        report["freezekern"] = _numbers(result, eval_before, evaluate(work, eval_batches), work)
        if checkpoint is not None:  # the finished state, so a re-run only reports
            _save_checkpoint(checkpoint["folder"], work, result["optimizer"], steps, meta, result["history"])
        finished = True
    finally:
        if mover is not None:
            handle = mover.handle
        work = _take_down(model, work, handle, meta, merge=finished)
        for p in work.parameters():  # LoRA and the cut froze weights: give the caller its flags back
            if id(p) in flags:
                p.requires_grad_(flags[id(p)])
    _say(f"held-out loss after training: {report['freezekern']['eval_loss_after']:.4f}", progress)
    del optimizer, result
    release_memory(device_of(work))
    return work


def _compare_full(original, train_batches, eval_batches, report: dict, meta: dict, eval_before: float, *,
                  output, progress: bool) -> None:
    """Full fine-tuning of the untouched copy, same steps, batches, lr and checkpointing (or its cached numbers)."""
    cached = _compare_cached(output, meta)
    if cached is not None:
        report["full"] = cached
        _say(f"full fine-tuning numbers reused from {output / COMPARE_FILE}", progress)
    else:
        baseline = original
        for p in baseline.parameters():
            p.requires_grad_(True)
        if meta["gradient_checkpointing"]:
            enable_checkpointing(baseline)
        if meta["fused_loss"]:
            from freezekern.cut.fused_loss import fused_loss as apply_fused_loss

            apply_fused_loss(baseline)  # the copy is dropped after the comparison
        full = _train(baseline, train_batches, meta["steps"], meta["lr"], label="full fine-tuning" +
                      (" +GC" if meta["gradient_checkpointing"] else ""), progress=progress,
                      device=device_of(baseline))
        report["full"] = _numbers(full, eval_before, evaluate(baseline, eval_batches), baseline)
        device = device_of(baseline)
        del baseline, original, full
        release_memory(device)
        if output is not None:
            atomic_write_json(output / COMPARE_FILE, {"meta": meta, "full": report["full"]})
    fk, fl = report["freezekern"], report["full"]
    report["comparison"] = {
        "step_time_ratio": _ratio(fk["step_time_s"], fl["step_time_s"]),
        "speedup": _ratio(fl["step_time_s"], fk["step_time_s"]),
        "peak_memory_ratio": _ratio(fk["peak_memory_mb"], fl["peak_memory_mb"]),
        "eval_loss_after_difference": fk["eval_loss_after"] - fl["eval_loss_after"],
    }


def _save_outputs(work, tokenizer, plan: FreezePlan, output: Path, report: dict) -> None:
    saved = {"model": str(output / "model"), "plan": str(output / PLAN_FILE), "report": str(output / REPORT_FILE)}
    work.save_pretrained(output / "model")
    if tokenizer is not None:
        tokenizer.save_pretrained(output / "model")
    plan.save(output / PLAN_FILE)
    report["saved"] = saved
    atomic_write_json(output / REPORT_FILE, report)


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def _compare_cached(output: Path | None, meta: dict) -> dict | None:
    if output is None:
        return None
    path = output / COMPARE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return None
    return data["full"] if data.get("meta") == meta else None


def format_report(report: dict) -> str:
    """A short human-readable table of a finetune report."""
    rows = [("freezekern", report.get("freezekern"))]
    if report.get("full"):
        rows.append(("full FT", report["full"]))
    plan = report["plan"]
    lines = [f"boundary k={plan['boundary']} of {plan['num_layers']} "
             f"(backward through {plan['backward_fraction']:.0%} of the blocks)",
             f"{'run':<12}{'loss before':>12}{'loss after':>12}{'step s':>9}{'tok/s':>10}{'peak MB':>10}"]
    for name, r in rows:
        if r is None:
            continue
        step = f"{r['step_time_s']:.3f}" if r["step_time_s"] is not None else "-"
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] is not None else "-"
        mem = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
        lines.append(f"{name:<12}{r['eval_loss_before']:>12.4f}{r['eval_loss_after']:>12.4f}{step:>9}{tps:>10}{mem:>10}")
    if report.get("comparison") and report["comparison"]["speedup"]:
        c = report["comparison"]
        lines.append(f"speedup x{c['speedup']:.2f}, peak memory x{c['peak_memory_ratio'] or float('nan'):.2f}")
    return "\n".join(lines)
