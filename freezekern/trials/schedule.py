"""The training schedule people use: AdamW with weight decay, linear warmup, linear or cosine decay.

The Hugging Face Trainer's recipe, expressed over the share of a compute
budget already spent instead of a step count, so that arms whose steps cost
different amounts (a frozen prefix makes a step cheaper, a prefix-cache hit
cheaper still) follow the same curve over the same compute:

    factor(f) = f_end / warmup                         while f_end < warmup   (linear warmup)
              = 1                                      decay "constant"
              = (1 - f) / (1 - warmup)                 decay "linear"
              = (1 + cos(pi (f - warmup) / (1 - warmup))) / 2   decay "cosine"

with f the share of the budget spent before the step and f_end after it
(so the first step does not run at a learning rate of 0, and the last one
not at exactly 0 either). Weight decay applies to matrices only (ndim >= 2:
linear layers and embeddings); norms' weights and biases are not decayed,
as in the Trainer's ``get_decay_parameter_names``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

DECAYS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """``warmup``: share of the budget in [0, 1) spent warming up; ``decay``: one of ``DECAYS``;
    ``weight_decay``: AdamW's decoupled weight decay (matrices only)."""

    warmup: float = 0.0
    decay: str = "constant"
    weight_decay: float = 0.0

    def __post_init__(self):
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a share of the budget in [0, 1), got {self.warmup}")
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")

    def factor(self, start: float, end: float) -> float:
        """The learning-rate multiplier of a step that takes the spent share from ``start`` to ``end``."""
        start, end = min(max(start, 0.0), 1.0), min(max(end, 0.0), 1.0)
        if self.warmup > 0 and end < self.warmup:
            return end / self.warmup
        if self.decay == "constant":
            return 1.0
        progress = min(max((start - self.warmup) / (1.0 - self.warmup), 0.0), 1.0)
        if self.decay == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def describe(self) -> str:
        parts = [f"AdamW (weight decay {self.weight_decay:g})"]
        if self.warmup:
            parts.append(f"{self.warmup:.0%} linear warmup")
        parts.append(f"{self.decay} decay" if self.decay != "constant" else "constant rate")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def adamw(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], lr: float,
          weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on matrices only (each parameter once).

    The learning rate set here is the base rate; ``set_lr`` scales it per step.
    """
    decay, no_decay, seen = [], [], set()
    for _, p in named_parameters:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    for group in optimizer.param_groups:
        group["base_lr"] = lr
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group's rate to ``factor`` times its base rate."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
