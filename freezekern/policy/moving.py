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
