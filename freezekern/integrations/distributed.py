"""torch.distributed: every rank must train the same parameters.

When each rank traces its own data, the ranks can arrive at different
boundaries. Two ways to agree, both collective (call them on every rank):

* ``merge_traces(trace)``: all-reduce the per-space deviation sums and token
  counts, so every rank plans from the same, token-weighted trace of all
  ranks' data (the preferred way: the plan is then the same everywhere);
* ``agree_on_boundary(k)`` / ``agree_on_plan(plan)``: all-reduce MIN of the
  boundary, i.e. freeze no more than the most cautious rank wants.

Without an initialised process group (or with one process) both return their
input unchanged.

DDP
---
Apply the plan to the bare model *before* wrapping it:

    handle = freezekern.apply(model, plan)
    model = DistributedDataParallel(model)     # no find_unused_parameters needed

DDP registers the parameters that require grad when it is built; the frozen
prefix is then simply not part of its buckets, nothing is all-reduced for it,
and the truncated backward produces a gradient for every parameter DDP knows.
Moving the boundary later: ``move_boundary(handle, k, optimizer=opt,
model=ddp_model)`` rebuilds DDP's reducer over the parameters still trained
(``freezekern.model.engines.stop_updating``), so no
``find_unused_parameters`` is needed either.

DeepSpeed ZeRO-1/2/3
--------------------
The boundary must be fixed before ``deepspeed.initialize`` (the Trainer's
``FreezeKernCallback()`` decides at Trainer init): ZeRO's fp32 partitions hold
only the trainable parameters then. Moving it later is refused
(``engines.stop_updating``). Under ZeRO-3 the trace gathers each block's
partitions around its own forward and the LM head for the semantic basis.

FSDP2
-----
Apply the plan, then ``fully_shard`` each block and the root:

    handle = freezekern.cut.freeze.apply(model, plan)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

Frozen blocks run graph-free, so they are all-gathered for the forward and
never take part in the backward or the reduce-scatter; the cut block does not
prefetch the frozen block below it in backward (``engines.stop_backward_prefetch_below``,
set at its first forward). ``handle.remove()`` finds the sharded parameters by
name. The fused loss runs as the LM head's forward when the head is its own
FSDP2 unit (the engine gathers it exactly while needed).

FSDP1 (``FullyShardedDataParallel``) is refused, by ``apply`` and at the first
forward: its wrappers replace the blocks the cut hooks and its flat parameters
mix frozen and trained tensors. Use FSDP2 (accelerate: ``fsdp_version: 2``).

Activation checkpointing wrappers (``apply_activation_checkpointing``)
replace the blocks in their ModuleList: wrap first, then apply the plan (a
forward after blocks were replaced under an applied plan raises).
"""

from __future__ import annotations

import dataclasses

import torch

from freezekern.analysis.trace import DeviationTrace
from freezekern.policy.rules import FreezePlan, cost_model


def is_distributed() -> bool:
    """True when a process group is initialised with more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_on_boundary(k: int, group=None) -> int:
    """The smallest boundary over all ranks (all_reduce MIN); ``k`` when not distributed."""
    if not is_distributed():
        return int(k)
    import torch.distributed as dist

    value = torch.tensor([int(k)], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return int(value.item())


def agree_on_plan(plan: FreezePlan, parameter_counts: dict | None = None, group=None) -> FreezePlan:
    """``plan`` with the boundary every rank agrees on (the minimum).

    The cost fields (step FLOPs, trainable parameters) are recomputed for the
    new boundary from ``parameter_counts`` (``ModelParts.parameter_counts()``
    or the trace's); without them only the backward fraction is. Collective.
    """
    k = agree_on_boundary(plan.boundary, group=group)
    if k == plan.boundary:
        return plan
    changes = {
        "boundary": k,
        "backward_fraction": (plan.num_layers - k) / plan.num_layers,
        "notes": [*plan.notes, f"boundary lowered from {plan.boundary} to {k} so that all ranks train the same "
                               "parameters"],
    }
    if parameter_counts is not None:
        changes.update(cost_model(parameter_counts, plan.num_layers, k, plan.train_head, plan.train_final_norm,
                                  cut=plan.cut))
    return dataclasses.replace(plan, **changes)


def merge_traces(trace: DeviationTrace, group=None) -> DeviationTrace:
    """The token-weighted trace of all ranks' data, identical on every rank. Collective.

    Refuses traces of different models, metrics or norm settings.
    """
    if not is_distributed():
        return trace
    import torch.distributed as dist

    key = (trace.fingerprint, trace.metric, trace.apply_final_norm, trace.num_layers)
    keys: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(keys, key, group=group)
    if any(tuple(other) != key for other in keys):
        raise ValueError(f"ranks traced different models or metrics: {sorted(set(map(tuple, keys)))}")
    device = _collective_device()
    sums = torch.tensor(trace.sums, dtype=torch.float64, device=device)
    count = torch.tensor([trace.token_count], dtype=torch.int64, device=device)
    seconds = torch.tensor([trace.seconds], dtype=torch.float64, device=device)
    dist.all_reduce(sums, group=group)
    dist.all_reduce(count, group=group)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=group)
    merged = DeviationTrace.from_dict(trace.to_dict())
    merged.sums = sums.tolist()
    merged.token_count = int(count.item())
    merged.deviations = [s / merged.token_count for s in merged.sums]
    merged.seconds = float(seconds.item())
    merged.notes = [*trace.notes, f"merged over {dist.get_world_size(group)} ranks"]
    return merged
