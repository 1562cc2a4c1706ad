"""The schedule of a boundary that moves with training: shallow early, the trace's boundary late.

``MovingSchedule(start, end, begin, finish, settle=None)``: the boundary k
is ``start`` until ``begin`` of the run is done, then ``end - start`` blocks
freeze bottom-up, evenly over (``begin``, ``finish``], the last at
``finish``; ``settle`` lets a settled block freeze earlier (see
``freezekern.cut.moving``, which drives an applied cut along it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MovingSchedule:
    """``start`` <= ``end`` in [0, L-1]: the boundary k at the beginning and at the end of the run;
    ``begin`` < ``finish`` in [0, 1]: the share of the run at which the first block freezes and at which
    ``end`` is reached; ``settle``: optional signal threshold in (0, 1) (see the module docstring)."""

    start: int
    end: int
    begin: float = 0.1
    finish: float = 0.6
    settle: float | None = None

    def __post_init__(self):
        if not 0 <= self.start <= self.end:
            raise ValueError(f"a moving boundary goes deeper: need 0 <= start <= end, got {self.start} -> {self.end}")
        if not 0 <= self.begin < self.finish <= 1:
            raise ValueError(f"need 0 <= begin < finish <= 1 (shares of the run), got {self.begin}, {self.finish}")
        if self.settle is not None and not 0 < self.settle < 1:
            raise ValueError(f"settle must lie in (0, 1), got {self.settle}")

    def target(self, fraction: float) -> int:
        """The scheduled boundary once ``fraction`` of the run is done: ``end - start`` blocks freeze evenly
        over (``begin``, ``finish``], the last at ``finish`` (a step function, never shallower)."""
        span = self.end - self.start
        share = (fraction - self.begin) / (self.finish - self.begin)
        return self.start + min(span, max(0, math.floor(share * span + 1e-9)))

    def mean_boundary(self) -> float:
        """The boundary averaged over the run (for cost estimates; the signal only moves it earlier)."""
        steps = 4096
        return sum(self.target((i + 0.5) / steps) for i in range(steps)) / steps

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MovingSchedule:
        return cls(**data)


DEFAULT_MOVING = {"start": 0, "begin": 0.1, "finish": 0.6}
MIN_STEPS_PER_MOVE = 4


def moving_plan(plan, run_steps: int | None = None, *, start: int | None = None, begin: float | None = None,
                finish: float | None = None, settle: float | None = None,
                min_steps_per_move: int = MIN_STEPS_PER_MOVE):
    """``plan`` (a static FreezePlan with a cut) turned into a boundary that moves with training.

    The boundary starts at ``start`` (default 0: every block trains early),
    holds until ``begin`` of the run, then moves bottom-up to the plan's
    boundary by ``finish`` (defaults in ``DEFAULT_MOVING``). Budget-aware:
    with ``run_steps`` (the Trainer's ``max_steps``, a finetune's steps) the
    blocks that cannot each get ``min_steps_per_move`` steps of the moving
    window are frozen from the start instead (the start moves up); a run too
    short for any move keeps the static plan. The returned plan says why
    (``rule``), and its step FLOPs are those at the final boundary.
    """
    import dataclasses

    if not plan.cut:
        raise ValueError("a full-fine-tuning plan (policy 'none') has no boundary to move towards")
    settings = {**DEFAULT_MOVING, **{k: v for k, v in (("start", start), ("begin", begin), ("finish", finish))
                                     if v is not None}}
    if run_steps is not None and run_steps < 1:
        raise ValueError(f"run_steps must be positive, got {run_steps}")
    first = min(int(settings["start"]), plan.boundary)
    span = plan.boundary - first
    why = []
    if run_steps is not None and span > 0:
        window_steps = (settings["finish"] - settings["begin"]) * run_steps
        affordable = int(window_steps // max(min_steps_per_move, 1))
        if affordable < span:
            first = plan.boundary - max(affordable, 0)
            why.append(f"a run of {run_steps} steps affords {max(affordable, 0)} moves of at least "
                       f"{min_steps_per_move} steps each, so blocks 1..{first} are frozen from the start")
    if first >= plan.boundary:
        reason = f"; static: {why[0]}" if why else "; static: nothing to move"
        return dataclasses.replace(plan, rule=(plan.rule + reason) if plan.rule else reason.lstrip("; "),
                                   run_steps=run_steps, moving=None)
    schedule = MovingSchedule(start=first, end=plan.boundary, begin=settings["begin"], finish=settings["finish"],
                              settle=settle)
    text = (f"moving boundary: k={first} until {schedule.begin:.0%} of the run, then blocks {first + 1}..{plan.boundary} "
            f"freeze bottom-up by {schedule.finish:.0%} (the early steps train more of the network, the later ones "
            f"are cheap); it ends at the {plan.policy} boundary ({plan.rule or 'k=' + str(plan.boundary)})")
    if why:
        text += "; " + why[0]
    moving = {k: v for k, v in schedule.to_dict().items() if k != "end"}
    return dataclasses.replace(plan, rule=text, moving=moving, run_steps=run_steps)


def schedule_of(plan) -> MovingSchedule | None:
    """The ``MovingSchedule`` of a plan (None for a static one)."""
    if not getattr(plan, "moving", None):
        return None
    return MovingSchedule(end=plan.boundary, **plan.moving)
