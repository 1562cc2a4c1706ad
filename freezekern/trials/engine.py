"""Training one arm until its compute budget is spent, evaluated at common checkpoints of that budget.

Training: AdamW with the run's ``Schedule`` (``freezekern.trials.schedule``:
weight decay on matrices, linear warmup, constant / linear / cosine decay
over the budget; the default is a constant rate without weight decay),
gradient norm clipped at 1, training batches cycled in a seeded order that
changes every epoch; every arm starts from the same weights and, for one
seed, sees the batches in the same order. A moving-boundary arm moves its
cut along its ``MovingSchedule`` as the budget is spent, each step priced at
the boundary it ran with.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from freezekern.cut import move_boundary, trainable_parameters
from freezekern.cut.moving import MovingBoundary
from freezekern.io import atomic_write_bytes
from freezekern.model.parts import discover
from freezekern.model.training import device_of, evaluate, to_device
from freezekern.profiler.timing import timed, train_step
from freezekern.trials.arms import DEFAULT_CHECKPOINTS, Arm, ArmResult, _build, _order, arm_step_cost
from freezekern.trials.schedule import Schedule, adamw, set_lr

logger = logging.getLogger("freezekern.trials")

def train_arm(
    model,
    arm: Arm,
    train_batches: Sequence[dict],
    eval_sets: dict[str, Sequence[dict]],
    *,
    budget_steps: float | None = None,
    budget_seconds: float | None = None,
    checkpoints: Sequence[float] = DEFAULT_CHECKPOINTS,
    seed: int = 0,
    checkpointing: bool = False,
    evaluate_fn: Callable | None = None,
    progress: bool = True,
    schedule: Schedule | None = None,
    state_path=None,
) -> ArmResult:
    """Train a copy of ``model`` as ``arm`` until the budget is spent; evaluate at each checkpoint.

    ``budget_steps``: full-step equivalents of estimated FLOPs; or
    ``budget_seconds``: measured training seconds (one of the two).
    ``checkpoints``: increasing fractions of the budget in (0, 1].
    ``evaluate_fn(model, batches) -> dict`` with at least ``"loss"`` (default:
    the token-weighted next-token loss). ``schedule``: weight decay, warmup
    and decay over the budget (default: constant rate, no weight decay).
    ``state_path``: a file where the run's state (trainable tensors,
    optimizer, position, rows so far) is written at every checkpoint; a run
    started again with the same file continues from its last checkpoint (the
    file is removed when the run ends). ``model`` is not changed.
    """
    from tqdm.auto import tqdm

    if (budget_steps is None) == (budget_seconds is None):
        raise ValueError("give exactly one of budget_steps and budget_seconds")
    budget = float(budget_steps if budget_steps is not None else budget_seconds)
    if not budget > 0:
        raise ValueError(f"the budget must be positive, got {budget}")
    checkpoints = sorted(float(c) for c in checkpoints)
    if not checkpoints or checkpoints[0] <= 0 or checkpoints[-1] > 1:
        raise ValueError(f"checkpoints must be fractions in (0, 1], got {checkpoints}")
    if not train_batches:
        raise ValueError("no training batches")
    evaluate_fn = evaluate_fn or (lambda m, b: {"loss": evaluate(m, b)})
    parts = discover(model)
    moving = arm.schedule()
    static = dataclasses.replace(arm, boundary=moving.start, moving=None) if moving is not None else arm
    cost_miss = arm_step_cost(static, parts, checkpointing=checkpointing)
    cost_hit = arm_step_cost(arm, parts, checkpointing=checkpointing, prefix_skipped=True) \
        if arm.prefix_cache else cost_miss
    if budget_steps is not None and budget_steps < cost_miss:
        raise ValueError(f"arm {arm.name!r}: the budget ({budget_steps:g} full-step equivalents) is smaller than "
                         f"one of its steps ({cost_miss:.3f})")
    schedule = schedule or Schedule()
    work, handle, cache = _build(model, arm, seed, checkpointing)
    device = device_of(work)
    params = trainable_parameters(work)
    optimizer = adamw(work.named_parameters(), arm.lr, schedule.weight_decay)
    mover = None
    if moving is not None:
        mover = MovingBoundary(handle, moving, optimizer=optimizer)
    result = ArmResult(arm=arm, seed=seed, step_cost=cost_miss, trainable_params=sum(p.numel() for p in params))
    order = _order(len(train_batches), seed)
    flops = seconds = 0.0
    pending = list(checkpoints)
    identity = {"arm": arm.key(), "seed": seed, "budget": budget, "unit": "steps" if budget_steps else "seconds",
                "checkpoints": checkpoints, "schedule": schedule.to_dict(), "batches": len(train_batches)}
    saved = _load_run_state(state_path, identity)
    if saved is not None:
        if mover is not None and saved.get("boundary", moving.start) > mover.boundary:
            mover.handle = handle = move_boundary(handle, saved["boundary"], optimizer=optimizer)
            mover.moves = saved["moves"]
            cost_miss = arm_step_cost(dataclasses.replace(static, boundary=handle.boundary), parts,
                                      checkpointing=checkpointing)
        _restore_run_state(work, optimizer, saved)
        result.rows, result.steps, flops, seconds = saved["rows"], saved["steps"], saved["flops"], saved["seconds"]
        result.train_loss_last = saved["train_loss_last"]
        pending = [c for c in checkpoints if c not in {row["fraction"] for row in result.rows}]
        for _ in range(result.steps):
            next(order)
    unit = "full steps" if budget_steps is not None else "s"
    bar = tqdm(total=round(budget, 2), desc=f"{arm.name} (lr {arm.lr:g}, seed {seed})", unit=unit,
               disable=not progress, leave=False, file=sys.stderr,
               bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} {unit} [{elapsed}<{remaining}]")
    try:
        while pending:
            spent = flops if budget_steps is not None else seconds
            hits_before = handle.stats["served"] if handle is not None else 0
            next_cost = cost_hit if cache is not None and result.steps >= len(train_batches) else cost_miss
            if budget_steps is not None and spent + next_cost > budget * (1 + 1e-9):
                break
            batch = to_device(train_batches[next(order)], device)
            set_lr(optimizer, schedule.factor(spent / budget, (spent + next_cost) / budget)
                   if budget_steps is not None else schedule.factor(spent / budget, spent / budget))
            loss, elapsed = timed(functools.partial(train_step, work, batch, optimizer, clip=1.0, params=params), device)
            seconds += elapsed
            served = handle is not None and handle.stats["served"] > hits_before
            flops += cost_hit if served else cost_miss
            result.steps += 1
            if mover is not None:
                now = flops if budget_steps is not None else seconds
                k = mover.boundary
                handle = mover.update(now / budget, result.steps)
                if handle.boundary != k:
                    params = trainable_parameters(work)
                    cost_miss = arm_step_cost(dataclasses.replace(static, boundary=handle.boundary), parts,
                                              checkpointing=checkpointing)
            value = float(loss)
            if not math.isfinite(value):
                raise FloatingPointError(f"arm {arm.name!r} (lr {arm.lr:g}): the training loss became {value} "
                                         f"at step {result.steps}; lower the learning rate")
            result.train_loss_last = value
            now = flops if budget_steps is not None else seconds
            bar.update(round(min(now, budget), 2) - bar.n)
            while pending and now >= pending[0] * budget * (1 - 1e-9):
                result.rows.append(_checkpoint(work, eval_sets, evaluate_fn, pending.pop(0), result.steps,
                                               flops, seconds))
                if pending:
                    _save_run_state(state_path, identity, work, optimizer, result, flops, seconds, mover)
        for fraction in pending:  # the budget ran out between checkpoints: the last ones get the final state
            result.rows.append(_checkpoint(work, eval_sets, evaluate_fn, fraction, result.steps, flops, seconds))
    finally:
        bar.close()
        if mover is not None:
            result.moves = list(mover.moves)
            if result.steps and budget_steps is not None:
                result.step_cost = flops / result.steps  # the run's mean: the boundary moved
        if cache is not None:
            result.cache = cache.stats()
            cache.detach()
        if handle is not None and handle.active:
            handle.remove()
        del work, optimizer
    if state_path is not None:
        Path(state_path).unlink(missing_ok=True)
    return result


def _save_run_state(path, identity: dict, work, optimizer, result: ArmResult, flops: float, seconds: float,
                    mover=None) -> None:
    """The state a run needs to continue after its last checkpoint (written atomically)."""
    if path is None:
        return
    state = {"identity": identity, "trainable": {n: p.detach().cpu() for n, p in work.named_parameters()
                                                 if p.requires_grad},
             "optimizer": optimizer.state_dict(), "rows": result.rows, "steps": result.steps, "flops": flops,
             "seconds": seconds, "train_loss_last": result.train_loss_last, "rng": torch.get_rng_state()}
    if mover is not None:
        state.update(boundary=mover.boundary, moves=list(mover.moves))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def _load_run_state(path, identity: dict) -> dict | None:
    if path is None or not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a damaged file: start over
        logger.warning("ignoring the run state in %s (%s); starting the run over", path, error)
        return None
    if state.get("identity") != identity:
        logger.warning("the run state in %s belongs to another run; starting over", path)
        return None
    return state


def _restore_run_state(work, optimizer, state: dict) -> None:
    named = dict(work.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])


def _checkpoint(model, eval_sets, evaluate_fn, fraction, steps, flops, seconds) -> dict:
    row = {"fraction": fraction, "steps": steps, "flops": flops, "seconds": seconds}
    for name, batches in eval_sets.items():
        for metric, value in evaluate_fn(model, batches).items():
            row[f"{name}_{metric}"] = value
    return row
