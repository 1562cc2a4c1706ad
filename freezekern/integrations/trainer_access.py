"""What the Trainer callback reads off the Trainer: the Trainer itself, its engine, its first training batches, and
the trace of a model that an engine may hold sharded."""

from __future__ import annotations

import inspect
import random
import types
from itertools import islice

import torch

from freezekern.analysis.trace import DeviationTrace, analyze
from freezekern.integrations.distributed import is_distributed
from freezekern.model.engines import (
    full_head,
    gathered_blocks,
    is_fsdp2,
    reshard_fsdp2,
)


def trace_model(model, batches, metric: str) -> DeviationTrace:
    """``freezekern.analyze`` with sharded parameters made whole where needed (ZeRO-3, FSDP2): each
    ZeRO-3 module gathered around its own forward, the LM head and final norm for the semantic basis."""
    from freezekern.model.parts import discover

    parts = discover(model)
    try:
        with gathered_blocks(model), full_head(parts) as whole:
            trace = analyze(model, batches, metric, parts=whole, progress=False, full_forward=is_fsdp2(model))
    finally:
        reshard_fsdp2(model)
    if whole is not parts:
        trace.parameter_counts = parts.parameter_counts()
    return trace


def find_trainer(callback):
    """The Trainer whose ``__init__`` is calling ``callback`` (callbacks get no reference to it), or None."""
    try:
        from transformers import Trainer
    except ImportError:
        return None
    frame = inspect.currentframe()
    try:
        for _ in range(16):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            handler = getattr(owner, "callback_handler", None)
            if isinstance(owner, Trainer) and any(cb is callback for cb in getattr(handler, "callbacks", ())):
                return owner
        return None
    finally:
        del frame


def under_engine(trainer) -> bool:
    """True when the Trainer will wrap or shard the model (DDP, DeepSpeed, FSDP): decide before it does."""
    return bool(is_distributed() or getattr(trainer, "is_deepspeed_enabled", False)
                or getattr(trainer, "is_fsdp_enabled", False))


def trainer_calibration_batches(trainer, count: int) -> list:
    """The first ``count`` training batches of ``trainer`` as its train dataloader would collate them.

    Read at init, before the dataloader exists: the dataset with the columns
    the model does not take removed (or the collator wrapped to drop them), the
    per-device batch size, each rank its strided share; every rank keeps the
    same number of batches (collective forwards under ZeRO-3 and FSDP2).
    """
    dataset, collate = trainer.train_dataset, trainer.data_collator
    try:
        import datasets

        is_hf_dataset = isinstance(dataset, datasets.Dataset)
    except ImportError:
        is_hf_dataset = False
    if is_hf_dataset and hasattr(trainer, "_remove_unused_columns"):
        dataset = trainer._remove_unused_columns(dataset, description="freezekern calibration")
    elif hasattr(trainer, "_get_collator_with_removed_columns"):
        collate = trainer._get_collator_with_removed_columns(collate, description="freezekern calibration")
    loader = types.SimpleNamespace(dataset=dataset, collate_fn=collate,
                                   batch_size=trainer.args.per_device_train_batch_size)
    batches = calibration_batches(loader, count)
    if is_distributed():
        import torch.distributed as dist

        from freezekern.integrations.distributed import _collective_device

        n = torch.tensor([len(batches)], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        batches = batches[: int(n.item())]
    if not batches:
        raise ValueError("the training set gave no calibration batch on some rank; pass FreezeKernCallback(plan=...)")
    return batches


def calibration_batches(train_dataloader, count: int) -> list:
    """The first ``count`` training batches, read in order without disturbing the training iterator.

    Builds a plain DataLoader over the same dataset and collator (each rank
    takes its own strided share) so the Trainer's sampler, accelerate's
    dataloader state and the RNG streams are left as they were.
    """
    from torch.utils.data import DataLoader, IterableDataset, Subset

    dataset = getattr(train_dataloader, "dataset", None)
    collate = getattr(train_dataloader, "collate_fn", None)
    batch_size = getattr(train_dataloader, "batch_size", None)
    if batch_size is None:
        batch_size = getattr(getattr(train_dataloader, "batch_sampler", None), "batch_size", None) or 1
    rng_state = (torch.get_rng_state(), random.getstate())
    try:
        if dataset is None:
            return list(islice(iter(train_dataloader), count))
        rank, world = 0, 1
        if is_distributed():
            import torch.distributed as dist

            rank, world = dist.get_rank(), dist.get_world_size()
        if isinstance(dataset, IterableDataset):
            loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
            return [b for i, b in enumerate(islice(loader, count * world)) if i % world == rank]
        wanted = min(len(dataset), count * batch_size * world)
        indices = list(range(rank, wanted, world))
        loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=collate, shuffle=False)
        return list(islice(loader, count))
    finally:
        torch.set_rng_state(rng_state[0])
        random.setstate(rng_state[1])


def planned_steps(trainer) -> int | None:
    """The optimizer steps ``trainer.train()`` will run, counted at init as the Trainer will count them
    (``set_initial_training_values``): ``max_steps`` when set, else the epochs times one epoch's updates,
    this rank's batches (accelerate's ``BatchSamplerShard`` share of the training set, ``split_batches``,
    ``even_batches`` and ``dataloader_drop_last`` included) over the gradient accumulation steps; None where
    the training set has no length. The callback compares it with ``state.max_steps`` when training starts."""
    import math

    args = trainer.args
    if args.max_steps > 0:
        return int(args.max_steps)
    try:
        examples = len(trainer.train_dataset)
    except TypeError:
        return None
    accelerator = getattr(trainer, "accelerator", None)
    config = getattr(accelerator, "dataloader_config", None)
    processes = int(getattr(accelerator, "num_processes", 1) or 1)
    drop_last = bool(args.dataloader_drop_last)
    batch = args.train_batch_size
    batches = examples // batch if drop_last else math.ceil(examples / batch)
    if processes > 1 and not getattr(config, "split_batches", False):
        share, remainder = divmod(batches, processes)
        rank = int(getattr(accelerator, "process_index", 0) or 0)
        even = getattr(config, "even_batches", True)
        batches = share + int(remainder > 0 and not drop_last and (even or rank < remainder))
    sequence_parallel = getattr(trainer, "get_sp_size", None)
    if callable(sequence_parallel):
        batches *= max(int(sequence_parallel()), 1)
    accumulation = args.gradient_accumulation_steps
    updates = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return math.ceil(args.num_train_epochs * updates)
