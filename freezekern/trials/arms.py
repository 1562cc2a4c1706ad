"""What one arm of a trial is: a boundary (static or moving), LoRA or the prefix cache, its learning rate;
what one of its steps costs; and a fresh copy of the model set up for it.

The budget of a trial is counted in *full-step equivalents*: estimated
training FLOPs (``freezekern.policy.cost``) divided by the FLOPs of one full
fine-tuning step, so an arm whose step costs half as much takes twice the
steps.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass, field

from freezekern.cut import apply
from freezekern.model.parts import discover
from freezekern.model.training import enable_checkpointing, seed_everything
from freezekern.policy.cost import StepSetup, flop_costs, full_finetuning, step_cost
from freezekern.policy.lora import DEFAULT_LORA, lora_config

DEFAULT_CHECKPOINTS = (0.125, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Arm:
    """One way to fine-tune: ``boundary`` k (blocks 1..k and the embeddings frozen) or None (full fine-tuning).

    ``lora``: LoRA adapters (``lora_kwargs`` over ``DEFAULT_LORA``, every
    linear layer of a block) on blocks k+1..L instead of training their
    weights. ``prefix_cache``: serve the boundary state of samples seen
    before (``freezekern.cut.prefix_cache``). ``train_head``: as for
    ``freezekern.apply`` (None: the plan's default). ``moving``: a boundary
    that moves with training (``freezekern.cut.moving.MovingSchedule`` fields
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
        from freezekern.policy.moving import MovingSchedule

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

        if arm.boundary is None:
            raise ValueError(f"arm {arm.name!r}: LoRA needs a boundary (0 for every block)")
        work = peft.get_peft_model(work, lora_config(arm.boundary, work, **(arm.lora_kwargs or {})))
    if checkpointing:
        enable_checkpointing(work)
    handle = cache = None
    if arm.boundary is not None:
        first = arm.moving["start"] if arm.moving is not None else arm.boundary
        handle = apply(work, first, train_head=False if arm.lora else arm.train_head)
        if arm.prefix_cache:
            from freezekern.cut.prefix_cache import PrefixCache

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
