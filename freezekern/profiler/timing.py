"""Timing a training step: one step, its wall time (device-synchronised), and two setups paired A B B A.

The one home of the timed step that ``finetune``, the trials and the
benchmarks run, and of the pairing that keeps a ratio meaningful on a
shared, noisy machine: both setups step in turn, the order flipping every
round, and the ratio is taken per round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from freezekern.profiler.step_timing import output_loss


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device="cpu") -> tuple[object, float]:
    """``fn()``'s result and its wall seconds, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def train_step(model, batch: dict, optimizer, *, clip: float | None = None, params=None,
               clear: str = "after") -> torch.Tensor:
    """One optimizer step on ``batch`` (forward, backward, optional gradient-norm clipping over ``params``,
    step); returns the detached loss.

    ``clear``: when the gradients are set to None: "after" the step (they are
    not alive between steps), or "before" the forward (they stay alive between
    steps, as in a loop that zeroes first: the profiler's setting, whose memory
    figures then include them).
    """
    if clear not in ("after", "before"):
        raise ValueError(f"clear must be 'after' or 'before', got {clear!r}")
    if clear == "before":
        optimizer.zero_grad(set_to_none=True)
    loss = output_loss(model(**batch, use_cache=False))
    if loss is None:
        raise ValueError(f"{type(model).__name__} returned no loss for a batch with labels")
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    if clear == "after":
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def paired_times(first: Callable[[], object], second: Callable[[], object], rounds: int,
                 device="cpu") -> tuple[list[float], dict[int, list[float]]]:
    """Step ``first`` and ``second`` in turn (A B B A ...) for ``rounds`` rounds.

    Returns the sorted per-round ratios t(first) / t(second) and each side's
    seconds ``{0: [...], 1: [...]}`` in round order.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    times: dict[int, list[float]] = {0: [], 1: []}
    for r in range(rounds):
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[side].append(timed((first, second)[side], device)[1])
    return sorted(a / b for a, b in zip(times[0], times[1])), times


def paired_ratio(first, second, rounds: int, device="cpu") -> float:
    """The median of ``paired_times``' per-round ratios."""
    return statistics.median(paired_times(first, second, rounds, device)[0])
