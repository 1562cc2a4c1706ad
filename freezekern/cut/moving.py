"""Drive an applied cut along a ``MovingSchedule``: shallow early, the trace's boundary late.

The first steps of a fine-tuning run gain most from training much of the
network; later steps can be cheap. ``MovingSchedule`` says where the
boundary starts (``start``, shallow), where it ends (``end``, e.g. the
trace's boundary) and over which share of the run it moves (``begin`` ..
``finish``): blocks freeze bottom-up, one at a time, evenly spaced over that
window, the last at ``finish``. With ``settle`` the training signal can
freeze a block earlier: once the window has begun, the next block to freeze
freezes as soon as its relative update size per update call (||W_t -
W_{t-1}|| / ||W_t|| over all its weights) falls below ``settle`` times the
first such figure measured since it became the next block, i.e. when it has
settled.

``MovingBoundary(handle, schedule, optimizer=)`` drives an applied cut:
call ``update(fraction)`` after each optimizer step with the share of the
run done (steps / max_steps, or spent / budget); it moves the boundary when
due (``freezekern.move_boundary``: checked first, exact) and returns the
current handle. Exactness: a block it freezes never changes again. Its
parameters lose their gradient and their optimizer state (Adam moments), a
PyTorch optimizer skips parameters without a gradient, so neither momentum
nor weight decay moves them; its backward stops at once (the cut moves
above it). Engines that update flat buffers regardless of ``.grad``
(DeepSpeed ZeRO) hold the newly frozen parameters instead
(``freezekern.model.zero_pins``, through ``move_boundary``).
"""

from __future__ import annotations

import logging

import torch

from freezekern.cut.move import move_boundary
from freezekern.model.engines import is_fsdp2, is_zero3_partitioned
from freezekern.policy.moving import MovingSchedule, schedule_of

logger = logging.getLogger("freezekern.cut.moving")


class MovingBoundary:
    """Moves an applied cut along a ``MovingSchedule`` (see the module docstring).

    ``handle``: the active ``FreezeHandle`` (its boundary must equal
    ``schedule.start``); ``schedule``: default the one of the plan the
    handle applied (``freezekern.policy.moving_plan``); ``optimizer``: the
    optimizer to clear the state of newly frozen parameters from; ``model``:
    the model as the training engine wrapped it, when it did (a
    ``DistributedDataParallel``, whose reducer is rebuilt at each move; a
    DeepSpeedEngine). ``handle`` always names the current one. The settle
    signal reads whole weights: refused where they are sharded (ZeRO-3, FSDP2).

        plan = freezekern.policy.moving_plan(freezekern.plan(trace), run_steps=1000)
        mover = freezekern.MovingBoundary(freezekern.apply(model, plan), optimizer=optimizer)
        for step in range(1000):
            ...; optimizer.step(); mover.update((step + 1) / 1000)
    """

    def __init__(self, handle, schedule: MovingSchedule | None = None, *, optimizer=None, model=None):
        if schedule is None:
            schedule = schedule_of(handle.plan) if handle.plan is not None else None
            if schedule is None:
                raise ValueError("the handle's plan does not move: pass a MovingSchedule, or apply a plan made "
                                 "by freezekern.policy.moving_plan")
        if not handle.active or not handle.cut:
            raise ValueError("a moving boundary needs an applied cut (freezekern.apply(model, k))")
        if handle.boundary != schedule.start:
            raise ValueError(f"the handle's boundary is {handle.boundary}, the schedule starts at {schedule.start}")
        if schedule.end >= handle.num_layers:
            raise ValueError(f"the schedule ends at k={schedule.end}; the model has {handle.num_layers} blocks "
                             "and at least one must train")
        if schedule.settle is not None and (is_zero3_partitioned(handle.model) or is_fsdp2(handle.model)):
            raise ValueError("the moving boundary's settle signal compares whole block weights between steps, and "
                             "this model's are sharded (DeepSpeed ZeRO-3 or FSDP2), so each rank would see only "
                             "its shard: move on the schedule alone (settle=None), or train with DDP or ZeRO-1/2")
        self.handle = handle
        self.schedule = schedule
        self.optimizer = optimizer
        self.model = model
        self.moves: list[dict] = []
        self._last: dict[int, torch.Tensor] = {}
        self._first_rate: dict[int, float] = {}

    @property
    def boundary(self) -> int:
        return self.handle.boundary

    def update(self, fraction: float, step: int | None = None):
        """Move the boundary if the schedule (or a settled block) says so; returns the current handle."""
        target = max(self.schedule.target(fraction), self.boundary)
        reason = "schedule"
        if self.schedule.settle is not None and target == self.boundary and self.boundary < self.schedule.end:
            if fraction >= self.schedule.begin and self._settled(self.boundary):
                target, reason = self.boundary + 1, "settled"
        if target > self.boundary:
            old = self.boundary
            self.handle = move_boundary(self.handle, target, optimizer=self.optimizer, model=self.model)
            for index in range(old, target):
                self._last.pop(index, None)
            self.moves.append({"fraction": fraction, "step": step, "from": old, "to": target, "why": reason})
            logger.info("moving boundary %d -> %d at %.1f%% of the run (%s)", old, target, 100 * fraction, reason)
        return self.handle

    def _settled(self, index: int) -> bool:
        """Whether block ``index + 1`` (0-based ``index``) has settled: see the module docstring."""
        block = self.handle.parts.blocks[index]
        weights = [p for p in block.parameters() if p.requires_grad]
        if not weights:
            return False
        now = torch.cat([p.detach().reshape(-1).float() for p in weights])
        previous = self._last.get(index)
        self._last[index] = now.clone()
        if previous is None:
            return False
        rate = float((now - previous).norm() / now.norm().clamp_min(1e-30))
        first = self._first_rate.setdefault(index, rate)
        return first > 0 and rate < self.schedule.settle * first

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.to_dict(), "boundary": self.boundary, "moves": list(self.moves)}
