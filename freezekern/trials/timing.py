"""Seconds per training step of each arm, paired with a reference arm on a noisy machine."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from freezekern.cut import trainable_parameters
from freezekern.model.training import device_of, to_device
from freezekern.profiler.timing import paired_times, train_step
from freezekern.trials.arms import Arm, _build


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
        optimizer = torch.optim.AdamW(trainable_parameters(work), lr=arm.lr, weight_decay=0.0)
        position = [0]

        def step() -> None:
            batch = batches[position[0] % len(batches)]
            position[0] += 1
            train_step(work, batch, optimizer)

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
            pairs, times = paired_times(built[1][3], built[0][3], rounds, device)
            ref_times += times[1]
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
