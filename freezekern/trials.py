"""Equal-compute trials of freeze boundaries: the cost-benefit curve on the user's own data.

Each *arm* (a boundary, or full fine-tuning, optionally LoRA above the
boundary or the prefix cache) trains a fresh copy of the same model under the
same compute budget and is scored on held-out batches at common checkpoints
of that budget. The budget is counted in *full-step equivalents*: estimated
training FLOPs (``freezekern.cost``, the plan's cost model) divided by the
FLOPs of one full fine-tuning step, so an arm whose step costs half as much
takes twice the steps. ``budget_seconds`` counts measured training seconds
instead (evaluation excluded).

    result = freezekern.compare(model, train_batches, heldout_batches, plan=plan, budget_steps=20)
    print(freezekern.trials.format_table(result))          # the plan's boundary, its runner-up, half, full

    result = freezekern.trials.run_trials(model, train_batches, heldout_batches,
                                          [Arm("full", None), Arm("k=12", 12, lr=3e-4)], budget_steps=20)

Training: AdamW with the arm's ``Schedule`` (``freezekern.schedule``:
weight decay on matrices, linear warmup, constant / linear / cosine decay
over the budget; the default is a constant rate without weight decay),
gradient norm clipped at 1, training batches cycled in a seeded order that
changes every epoch; every arm starts from the same weights and, for one seed, sees
the batches in the same order. ``probe_plan`` uses the same engine on a few
candidate boundaries to choose one (the ``probe`` policy).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from freezekern.adapters import discover
from freezekern.cost import StepSetup, flop_costs, full_finetuning, step_cost
from freezekern.io import atomic_write_bytes
from freezekern.policy import FreezePlan
from freezekern.schedule import Schedule, adamw, set_lr
from freezekern.training import device_of, enable_checkpointing, evaluate, seed_everything, to_device
from freezekern.truncate import apply, trainable_parameters

logger = logging.getLogger("freezekern.trials")

DEFAULT_CHECKPOINTS = (0.125, 0.25, 0.5, 0.75, 1.0)
DEFAULT_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}


@dataclass(frozen=True)
class Arm:
    """One way to fine-tune: ``boundary`` k (blocks 1..k and the embeddings frozen) or None (full fine-tuning).

    ``lora``: LoRA adapters (``lora_kwargs``, default r=8, alpha=16, every
    linear layer of a block) on blocks k+1..L instead of training their
    weights. ``prefix_cache``: serve the boundary state of samples seen
    before (``freezekern.prefix_cache``). ``train_head``: as for
    ``freezekern.apply`` (None: the plan's default). ``moving``: a boundary
    that moves with training (``freezekern.moving.MovingSchedule`` fields
    ``start``, ``begin``, ``finish``, optionally ``settle``; it ends at
    ``boundary``), e.g. ``{"start": 0, "begin": 0.1, "finish": 0.6}``.
    """

    name: str
    boundary: int | None
    lr: float = 1e-4
    lora: bool = False
    prefix_cache: bool = False
    train_head: bool | None = None
    lora_kwargs: dict | None = None
    moving: dict | None = None

    def __post_init__(self):
        if self.moving is not None:
            if self.boundary is None or self.lora or self.prefix_cache:
                raise ValueError(f"arm {self.name!r}: a moving boundary needs a final boundary, without LoRA or "
                                 "the prefix cache")
            self.schedule()  # checks the fields

    def schedule(self):
        """The arm's ``MovingSchedule`` (None for a static boundary)."""
        if self.moving is None:
            return None
        from freezekern.moving import MovingSchedule

        return MovingSchedule(end=self.boundary, **self.moving)

    def key(self) -> str:
        """What makes two arms train identically (the name is only a label)."""
        extra = f"|head={self.train_head}" if self.train_head is not None else ""
        lora = f"|lora={sorted((self.lora_kwargs or DEFAULT_LORA).items())}" if self.lora else ""
        moving = f"|moving={sorted(self.moving.items())}" if self.moving is not None else ""
        return f"k={self.boundary}|lr={self.lr:g}|cache={int(self.prefix_cache)}{lora}{extra}{moving}"


@dataclass
class ArmResult:
    """An arm's curve: one row per checkpoint, ``{"budget", "steps", "flops", "seconds", <metric>: ...}``.

    ``flops`` and ``budget`` in full-step equivalents; ``seconds`` measured
    training time; each evaluation set adds ``<set>_loss`` (and whatever the
    evaluation function returns, e.g. ``<set>_accuracy``).
    """

    arm: Arm
    seed: int
    step_cost: float
    steps: int = 0
    rows: list[dict] = field(default_factory=list)
    trainable_params: int = 0
    cache: dict | None = None
    train_loss_last: float | None = None
    moves: list[dict] | None = None  # a moving boundary's moves: {"fraction", "step", "from", "to", "why"}

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["arm"] = dataclasses.asdict(self.arm)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ArmResult:
        data = dict(data)
        data["arm"] = Arm(**data["arm"])
        return cls(**data)

    def at(self, fraction: float) -> dict:
        """The row at the checkpoint nearest to ``fraction`` of the budget."""
        return min(self.rows, key=lambda r: abs(r["fraction"] - fraction))


def _setup_for(arm: Arm, parts, checkpointing: bool, prefix_skipped: bool = False) -> StepSetup:
    if arm.boundary is None:
        return dataclasses.replace(full_finetuning(), checkpointing=checkpointing)
    train_head = arm.train_head if arm.train_head is not None else not parts.tied
    if arm.lora:
        train_head = False
    return StepSetup(boundary=arm.boundary, train_head=train_head, block_weights=not arm.lora,
                     checkpointing=checkpointing, prefix_skipped=prefix_skipped)


def arm_step_cost(arm: Arm, parts, *, checkpointing: bool = False, prefix_skipped: bool = False) -> float:
    """One step of ``arm`` in full-step equivalents (estimated FLOPs over a full fine-tuning step's)."""
    costs = flop_costs(parts.parameter_counts())
    return step_cost(costs, _setup_for(arm, parts, checkpointing, prefix_skipped)) / step_cost(costs, full_finetuning())


def _build(model, arm: Arm, seed: int, checkpointing: bool):
    """A fresh copy of ``model`` set up for ``arm``: (model, handle or None, prefix cache or None)."""
    seed_everything(seed)
    work = copy.deepcopy(model)
    parts = discover(work)
    if arm.boundary is not None and not 0 <= arm.boundary <= parts.num_layers:
        raise ValueError(f"arm {arm.name!r}: boundary {arm.boundary} is outside [0, {parts.num_layers}]")
    for p in work.parameters():
        p.requires_grad_(True)
    if arm.lora:
        import peft

        from freezekern.integrations.peft import block_linear_names, layers_to_transform

        if arm.boundary is None:
            raise ValueError(f"arm {arm.name!r}: LoRA needs a boundary (0 for every block)")
        kwargs = {**DEFAULT_LORA, "target_modules": block_linear_names(work), **(arm.lora_kwargs or {})}
        config = peft.LoraConfig(layers_to_transform=layers_to_transform(arm.boundary, parts.num_layers),
                                 layers_pattern=parts.blocks_path.rsplit(".", 1)[-1], **kwargs)
        work = peft.get_peft_model(work, config)
    if checkpointing:
        enable_checkpointing(work)
    handle = cache = None
    if arm.boundary is not None:
        first = arm.moving["start"] if arm.moving is not None else arm.boundary
        handle = apply(work, first, train_head=False if arm.lora else arm.train_head)
        if arm.prefix_cache:
            from freezekern.prefix_cache import PrefixCache

            cache = PrefixCache(max_bytes=8 << 30).attach(handle)
    elif arm.prefix_cache:
        raise ValueError(f"arm {arm.name!r}: the prefix cache needs a boundary")
    work.train()
    return work, handle, cache


def _order(num_batches: int, seed: int):
    """Batch indices, epoch after epoch, each epoch a fresh seeded permutation."""
    epoch = 0
    while True:
        order = list(range(num_batches))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        yield from order
        epoch += 1


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
        from freezekern.moving import MovingBoundary

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
            from freezekern.truncate import move_boundary

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
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            loss = work(**batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - start
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
            value = float(loss.detach())
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
    import io

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


def time_steps(model, arms: Sequence[Arm], batches: Sequence[dict], *, rounds: int = 4,
               reference: Arm | None = None, checkpointing: bool = False) -> dict:
    """Seconds per training step of each arm, from steps paired with a reference arm on a noisy machine.

    Each arm is built next to the reference (full fine-tuning by default) and
    the two step in turn (A B B A ...) over ``rounds`` rounds after a warm-up
    step each; the arm's time is the median paired ratio times the median of
    all the reference's steps. A prefix-cache arm is timed on cache hits (its
    batches were seen once before); its misses cost what the same arm
    without the cache costs. Returns ``{"reference_s": t, "ratios": {key: r},
    "seconds": {key: s}}`` keyed by ``Arm.key()``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    reference = reference or Arm("full", None)
    device = device_of(model)
    batches = [to_device(b, device) for b in batches]
    ref_times, ratios = [], {}

    def stepper(arm):
        work, handle, cache = _build(model, arm, 0, checkpointing)
        params = trainable_parameters(work)
        optimizer = torch.optim.AdamW(params, lr=arm.lr, weight_decay=0.0)
        position = [0]

        def step() -> float:
            batch = batches[position[0] % len(batches)]
            position[0] += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            work(**batch, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        return work, handle, cache, step

    for arm in arms:
        if arm.key() == reference.key() or arm.key() in ratios:
            continue
        built = [stepper(reference), stepper(arm)]
        try:
            warm = len(batches) if arm.prefix_cache else 1
            for _ in range(warm):
                built[1][3]()
            built[0][3]()
            pairs = []
            for i in range(rounds):
                order = (0, 1) if i % 2 == 0 else (1, 0)
                times = {}
                for j in order:
                    times[j] = built[j][3]()
                ref_times.append(times[0])
                pairs.append(times[1] / times[0])
            ratios[arm.key()] = statistics.median(pairs)
        finally:
            for _, handle, cache, _ in built:
                if cache is not None:
                    cache.detach()
                if handle is not None and handle.active:
                    handle.remove()
            del built
    reference_s = statistics.median(ref_times) if ref_times else None
    ratios[reference.key()] = 1.0
    return {"reference_s": reference_s, "ratios": ratios,
            "seconds": {k: (r * reference_s if reference_s is not None else None) for k, r in ratios.items()}}


@dataclass
class CompareResult:
    """Every arm's curve, the starting point and the recommendation (plain data, JSON-ready)."""

    results: list[ArmResult]
    baseline: dict
    budget_steps: float | None
    budget_seconds: float | None
    tolerance: float
    recommended: str | None = None
    reason: str = ""

    def to_dict(self) -> dict:
        return {"results": [r.to_dict() for r in self.results], "baseline": self.baseline,
                "budget_steps": self.budget_steps, "budget_seconds": self.budget_seconds,
                "tolerance": self.tolerance, "recommended": self.recommended, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: dict) -> CompareResult:
        data = dict(data)
        data["results"] = [ArmResult.from_dict(r) for r in data["results"]]
        return cls(**data)


def recommend(results: Sequence[ArmResult], tolerance: float, metric: str = "heldout_loss") -> tuple[str, str]:
    """The cheapest arm whose final ``metric`` is within ``tolerance`` (relative) of the best arm's.

    Cheapest: lowest estimated step cost (the most blocks frozen); ties by name.
    """
    finals = {r.arm.name: r.rows[-1][metric] for r in results if r.rows}
    if not finals:
        raise ValueError("no arm finished a checkpoint")
    best_name = min(finals, key=finals.get)
    best = finals[best_name]
    within = [r for r in results if r.rows and finals[r.arm.name] <= best + tolerance * abs(best)]
    chosen = min(within, key=lambda r: (r.step_cost, r.arm.name))
    if chosen.arm.name == best_name:
        reason = f"{best_name} reached the lowest {metric} ({best:.4f})"
    else:
        reason = (f"{chosen.arm.name} ({finals[chosen.arm.name]:.4f}) is within {tolerance:.0%} of the best, "
                  f"{best_name} ({best:.4f}), at {chosen.step_cost:.0%} of a full step's FLOPs per step")
    return chosen.arm.name, reason


def run_trials(
    model,
    train_batches: Sequence[dict],
    heldout_batches: Sequence[dict],
    arms: Sequence[Arm],
    *,
    budget_steps: float | None = None,
    budget_seconds: float | None = None,
    checkpoints: Sequence[float] = DEFAULT_CHECKPOINTS,
    seed: int = 0,
    tolerance: float = 0.02,
    checkpointing: bool = False,
    done: dict[str, ArmResult] | None = None,
    on_result: Callable[[ArmResult], None] | None = None,
    progress: bool = True,
    schedule: Schedule | None = None,
) -> CompareResult:
    """Train every arm at equal compute and recommend the cheapest within ``tolerance`` of the best.

    ``done``: results already computed (by ``Arm.key()``), reused instead of
    retrained (resuming); ``on_result`` is called with each new result.
    """
    if not arms:
        raise ValueError("compare needs at least one arm")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must lie in [0, 1), got {tolerance}")
    parts = discover(model)
    if budget_steps is not None:
        too_small = [a.name for a in arms if arm_step_cost(a, parts, checkpointing=checkpointing) > budget_steps]
        if too_small:
            raise ValueError(f"the budget of {budget_steps:g} full-step equivalents is smaller than one step of "
                             f"{', '.join(too_small)}: raise the budget")
    baseline = {"heldout_loss": evaluate(model, heldout_batches)}
    done = dict(done or {})
    results = []
    for index, arm in enumerate(arms):
        key = f"{arm.key()}|seed={seed}"
        if key in done:
            result = dataclasses.replace(done[key], arm=arm)
        else:
            if progress:
                print(f"[{index + 1}/{len(arms)}] {arm.name}", file=sys.stderr, flush=True)
            result = train_arm(model, arm, train_batches, {"heldout": heldout_batches}, budget_steps=budget_steps,
                               budget_seconds=budget_seconds, checkpoints=checkpoints, seed=seed,
                               checkpointing=checkpointing, progress=progress, schedule=schedule)
            if on_result is not None:
                on_result(result)
        results.append(result)
    name, reason = recommend(results, tolerance)
    return CompareResult(results=results, baseline=baseline, budget_steps=budget_steps,
                         budget_seconds=budget_seconds, tolerance=tolerance, recommended=name, reason=reason)


def arms_for(plan: FreezePlan | None, boundaries="auto", *, num_layers: int | None = None, lora: bool = False,
             lr: float | None = None) -> list[Arm]:
    """The arms ``compare`` trains.

    ``boundaries="auto"``: the plan's boundary, its runner-up, freeze half and
    full fine-tuning; or a list of boundaries (ints; None or "full" for full
    fine-tuning). ``lora``: LoRA above each boundary instead (full fine-tuning
    becomes LoRA on every block). ``lr``: every arm's learning rate (default
    1e-4, LoRA 1e-3).
    """
    num_layers = num_layers if num_layers is not None else plan.num_layers
    if boundaries == "auto":
        if plan is None:
            raise ValueError("boundaries='auto' needs a plan (freezekern.plan(trace))")
        chosen = [(f"{plan.policy} (k={plan.boundary})", plan.boundary)]
        if plan.runner_up is not None:
            chosen.append((f"runner-up (k={plan.runner_up})", plan.runner_up))
        chosen += [(f"freeze half (k={num_layers // 2})", num_layers // 2), ("full fine-tuning", None)]
    else:
        chosen = [("full fine-tuning", None) if k in (None, "full") else (f"k={int(k)}", int(k)) for k in boundaries]
    arms, seen = [], set()
    for name, k in chosen:
        if k is not None and not 0 <= k < num_layers:
            raise ValueError(f"boundary {k} is outside [0, {num_layers - 1}] (at least one block must train)")
        if lora:
            k = 0 if k is None else k
            name = "LoRA on every block" if name == "full fine-tuning" else f"LoRA above {name}"
        if (k, lora) in seen:
            continue
        seen.add((k, lora))
        arms.append(Arm(name, k, lr=lr if lr is not None else (1e-3 if lora else 1e-4), lora=lora))
    return arms


def compare(
    model,
    train_batches: Sequence[dict],
    heldout_batches: Sequence[dict],
    *,
    plan: FreezePlan | None = None,
    boundaries="auto",
    lora: bool = False,
    lr: float | None = None,
    **trial_kwargs,
) -> CompareResult:
    """The cost-benefit curve of a few boundaries on the user's data, at equal compute.

    Trains the arms of ``arms_for(plan, boundaries, lora=, lr=)`` with
    ``run_trials`` (``budget_steps`` or ``budget_seconds``, ``checkpoints``,
    ``tolerance``, ``seed``, ``done``/``on_result`` for resuming) and
    recommends the cheapest arm within ``tolerance`` of the best final
    held-out loss.
    """
    arms = arms_for(plan, boundaries, num_layers=discover(model).num_layers, lora=lora, lr=lr)
    return run_trials(model, train_batches, heldout_batches, arms, **trial_kwargs)


def probe_candidates(plan: FreezePlan) -> list[int]:
    """The probe's candidates: the trace rule's boundary k*, k*/2 and 0 (every block trained), distinct."""
    k = plan.boundary
    return sorted({k, k // 2, 0}, reverse=True)


def probe_plan(
    model,
    plan: FreezePlan,
    train_batches: Sequence[dict],
    holdout_batches: Sequence[dict],
    *,
    candidates: Sequence[int] | None = None,
    budget_steps: float = 4.0,
    lr: float = 1e-4,
    tolerance: float = 0.01,
    seed: int = 0,
    progress: bool = True,
) -> FreezePlan:
    """The ``probe`` policy: short equal-compute trials of a few boundaries; the plan of the winner.

    Each candidate (default ``probe_candidates(plan)``) trains a copy of the
    model for ``budget_steps`` full-step equivalents on ``train_batches`` and
    is scored on ``holdout_batches`` (taken from the training data: a probe
    never sees the user's validation or test data). At equal compute a lower
    loss is a larger reduction per FLOP; the deepest candidate within
    ``tolerance`` (relative) of the lowest loss wins. The returned plan is
    ``plan`` with that boundary, policy "probe" and the figures in ``probe``.
    """
    from freezekern.policy import cost_model

    candidates = sorted(set(candidates if candidates is not None else probe_candidates(plan)), reverse=True)
    if not candidates:
        raise ValueError("the probe needs at least one candidate boundary")
    bad = [c for c in candidates if not 0 <= c < plan.num_layers]
    if bad:
        raise ValueError(f"probe candidates {bad} are outside [0, {plan.num_layers - 1}]")
    arms = [Arm(f"k={k}", k, lr=lr, train_head=plan.train_head) for k in candidates]
    outcome = run_trials(model, train_batches, holdout_batches, arms, budget_steps=budget_steps, checkpoints=(1.0,),
                      seed=seed, tolerance=tolerance, progress=progress)
    rows = [{"boundary": r.arm.boundary, "loss": r.rows[-1]["heldout_loss"], "steps": r.steps,
             "step_cost": r.step_cost} for r in outcome.results]
    best = min(row["loss"] for row in rows)
    chosen = max(row["boundary"] for row in rows if row["loss"] <= best + tolerance * abs(best))
    counts = discover(model).parameter_counts()
    cost = cost_model(counts, plan.num_layers, chosen, plan.train_head, plan.train_final_norm)
    others = [row["boundary"] for row in sorted(rows, key=lambda r: r["loss"]) if row["boundary"] != chosen]
    rule = (f"probe: {len(rows)} boundaries trained {budget_steps:g} full-step equivalents each; k={chosen} is the "
            f"deepest within {tolerance:.0%} of the lowest held-out loss ({best:.4f}); the trace rule proposed "
            f"k={plan.boundary}")
    return dataclasses.replace(
        plan, policy="probe", boundary=chosen, rule=rule, runner_up=others[0] if others else None,
        probe={"rows": rows, "budget_steps": budget_steps, "lr": lr, "tolerance": tolerance,
               "baseline_loss": outcome.baseline["heldout_loss"], "trace_policy": plan.policy,
               "trace_boundary": plan.boundary, "spent_full_steps": sum(r.steps * r.step_cost
                                                                        for r in outcome.results)},
        **cost,
    )


def format_table(result: CompareResult, metric: str = "heldout_loss") -> str:
    """Held-out loss of every arm at each checkpoint, with step cost and the recommendation marked."""
    fractions = [row["fraction"] for row in result.results[0].rows] if result.results else []
    unit = "full steps" if result.budget_steps is not None else "s"
    budget = result.budget_steps if result.budget_steps is not None else result.budget_seconds
    head = f"{'arm':<22}{'step cost':>10}{'steps':>7}" + "".join(f"{f * budget:>10.4g}" for f in fractions)
    lines = [f"held-out loss at equal compute (budget {budget:g} {unit}; before training: "
             f"{result.baseline['heldout_loss']:.4f})", head + f"  ({unit})"]
    for r in result.results:
        mark = "  <- recommended" if r.arm.name == result.recommended else ""
        values = "".join(f"{row[metric]:>10.4f}" for row in r.rows)
        lines.append(f"{r.arm.name:<22}{r.step_cost:>10.2f}{r.steps:>7}{values}{mark}")
    if result.reason:
        lines.append(f"recommended: {result.recommended}: {result.reason}")
    return "\n".join(lines)
