"""Training engines (DDP, DeepSpeed ZeRO, FSDP2): what freezing needs from each.

Two jobs, and the FSDP2 details of the cut:

* ``stop_updating(params, optimizer, model)``: parameters that have just
  become frozen during training (a boundary moved deeper) stop costing
  gradient communication and optimizer work, and stop changing. Called by
  ``freezekern.cut.freeze.move_boundary`` every time blocks freeze mid-run.
  Per engine:

  - a torch optimizer (plain, accelerate's wrapper, FSDP2's DTensor
    parameters): ``.grad`` dropped and the optimizer state (Adam moments)
    removed; the parameter stays in its group, where a parameter without a
    gradient is skipped (no weight decay either);
  - DDP: the reducer is rebuilt over the parameters that still require grad
    (as DDP does when unpickled), so buckets and the "every parameter gets a
    gradient" check match the new boundary (no find_unused_parameters needed);
  - DeepSpeed ZeRO (any stage): pinned (``freezekern.model.zero_pins``).
    ZeRO steps its flat fp32 partitions whether a gradient arrived or not, and
    a parameter cannot leave them mid-run; this rank's fp32 fragment of each
    newly frozen parameter is kept out of torch Adam/AdamW's steps and written
    back after every step (any optimizer), before ZeRO copies the partitions
    into the model, so it never changes again. Backward, gradient
    communication and Adam's arithmetic stop; ZeRO's bookkeeping over the
    whole partition and the fragment's memory do not (a boundary decided
    before the engine is built costs none of this). Refused with NVMe offload.

* ``full_head(parts)``: a context giving the trace the LM head weight (and
  final norm) whole when an engine holds them sharded (ZeRO-3 partitions are
  gathered with ``deepspeed.zero.GatheredParameters``, FSDP2 DTensors with
  ``full_tensor()``), released on exit. ``gathered_blocks(model)`` gathers each
  ZeRO-3 module's parameters around its own forward when no DeepSpeed engine
  does it (a model built under ``deepspeed.zero.Init`` before the engine).

* FSDP2: ``stop_backward_prefetch_below(block)`` keeps the cut block from
  prefetching the frozen block below it in backward (set by the cut at its
  first forward, undone by ``remove()``); ``reshard_fsdp2(model)`` after a
  forward outside training (the trace).

``engine_name(model, optimizer)`` names the engine for error messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable

import torch
from torch import nn

from freezekern.model import zero_pins
from freezekern.model.engine_refusal import EngineRefusal as EngineRefusal  # public here
from freezekern.model.engine_refusal import is_deepspeed_object

logger = logging.getLogger("freezekern.engines")


def zero_stage(model=None, optimizer=None) -> int | None:
    """The DeepSpeed ZeRO stage of ``model`` (a DeepSpeedEngine) or ``optimizer`` (a ZeRO optimizer or
    accelerate's wrapper of one); 3 when ``model`` holds ZeRO-3 partitioned parameters; else None."""
    stage = getattr(model, "zero_optimization_stage", None)
    if is_deepspeed_object(model) and callable(stage):
        return int(stage())
    inner = zero_pins.zero_optimizer(optimizer)  # accelerate's wrapper of a DeepSpeed optimizer, or one itself
    if inner is not None:
        name = type(inner).__name__
        if "Stage3" in name:
            return 3
        if "Zero" in name:
            return int(getattr(inner, "zero_stage", 0) or (2 if getattr(inner, "partition_gradients", False) else 1))
        return 0
    if model is not None and is_zero3_partitioned(model):
        return 3
    return None


def is_zero3_partitioned(model: nn.Module) -> bool:
    """True when ``model`` has DeepSpeed ZeRO-3 parameters (``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def is_fsdp2(model: nn.Module) -> bool:
    """True when ``model`` or a submodule was sharded with ``fully_shard`` (FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _ddp(model):
    from torch.nn.parallel import DistributedDataParallel

    return model if isinstance(model, DistributedDataParallel) else None


def engine_name(model=None, optimizer=None) -> str | None:
    """"DeepSpeed ZeRO-<n>", "FSDP2", "DDP" or None (one process, or a plain module)."""
    stage = zero_stage(model, optimizer)
    if stage is not None:
        return f"DeepSpeed ZeRO-{stage}"
    if _ddp(model) is not None:
        return "DDP"
    if isinstance(model, nn.Module) and is_fsdp2(model):
        return "FSDP2"
    return None


def check_can_stop_updating(optimizer=None, model=None) -> int | None:
    """Raise EngineRefusal when ``stop_updating`` cannot work with this engine (changes nothing); returns the
    ZeRO stage, None without ZeRO."""
    stage = zero_stage(model, optimizer)
    if stage is not None:
        zero_pins.check(optimizer, model, f"DeepSpeed ZeRO-{stage}")
    return stage


def stop_updating(params: Iterable[nn.Parameter], optimizer=None, model=None) -> None:
    """Make ``params`` (already ``requires_grad=False``) stop costing and stop changing.

    ``optimizer``: the optimizer stepping them (torch, accelerate's wrapper,
    or DeepSpeed's); ``model``: the model as the engine wrapped it (a
    ``DistributedDataParallel``, a DeepSpeedEngine) or the bare model. Call on
    every rank, between optimizer steps. Raises EngineRefusal, before any
    change, where the engine cannot (see the module docstring).
    """
    params = list(params)
    stage = check_can_stop_updating(optimizer, model)
    for p in params:
        if p.requires_grad:
            raise ValueError("stop_updating got a parameter that still requires grad: freeze it first")
    if stage is not None:
        zero_pins.pin(params, optimizer, model, f"DeepSpeed ZeRO-{stage}")  # raises before pinning anything
        for p in params:
            p.grad = None
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    state = getattr(inner, "state", None)
    for p in params:
        p.grad = None
        if state is not None:
            state.pop(p, None)
    ddp = _ddp(model)
    if ddp is not None and params:
        _rebuild_reducer(ddp)


def _rebuild_reducer(ddp) -> None:
    """Rebuild DDP's reducer over the parameters that require grad now (what DDP does when unpickled).

    The old reducer (and its autograd hooks) goes away with its last
    reference; communication hooks registered with ``register_comm_hook`` are
    registered again on the new one.
    """
    import torch.distributed as dist

    for p in ddp.module.parameters():
        if p.requires_grad:
            p.grad = None  # gradient_as_bucket_view grads point into the old buckets
    parameters, expect_sparse_gradient = ddp._build_params_for_reducer()
    mapping = ddp._build_debug_param_to_name_mapping(parameters)
    ddp._ddp_init_helper(parameters, expect_sparse_gradient, mapping, ddp.static_graph)
    if ddp.static_graph:
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()
    for hook, hook_state in getattr(ddp, "_comm_hooks", []):
        dist._register_comm_hook(ddp.reducer, hook_state, hook)
    logger.info("DDP reducer rebuilt over %d parameter tensors", len(parameters))


def stop_backward_prefetch_below(block: nn.Module):
    """FSDP2: keep the cut block ``block`` (k+1) from prefetching block k's all-gather in backward.

    FSDP2 prefetches, by default, the module that ran its forward just before
    (block k, frozen: it needs no backward). Prefetching the block itself, a
    no-op, replaces that default. Returns a callable undoing it, or None when
    ``block`` is not sharded with ``fully_shard`` or has explicit prefetch targets
    of the user's (kept as they are).
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    if not isinstance(block, FSDPModule):
        return None
    fsdp_state = block._get_fsdp_state()
    if fsdp_state._states_to_backward_prefetch:
        return None
    block.set_modules_to_backward_prefetch([block])

    def undo() -> None:
        fsdp_state._states_to_backward_prefetch = []

    return undo


# -- whole tensors for the trace ------------------------------------------------------------------

class _Holder(nn.Module):
    """Stand-in for the LM head or final norm holding whole (gathered) tensors; never trained."""

    def __init__(self, source: nn.Module, tensors: dict[str, torch.Tensor | None]):
        super().__init__()
        for name, value in tensors.items():
            setattr(self, name, value)
        for attr in ("eps", "variance_epsilon", "epsilon"):
            if hasattr(source, attr):
                setattr(self, attr, getattr(source, attr))


def _whole(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    full = getattr(t, "full_tensor", None)
    return (full() if callable(full) else t).detach().clone()


@contextlib.contextmanager
def full_head(parts):
    """``parts`` whose LM head and final norm hold whole tensors, for the trace; ``parts`` itself when they
    are whole already. ZeRO-3: gathered (collective: enter on every rank) and copied, then released; FSDP2:
    ``full_tensor()`` (collective). The copies live while the context is open."""
    modules = [m for m in (parts.lm_head, parts.final_norm) if m is not None]
    tensors = [t for m in modules for t in m.parameters(recurse=False)]
    zero = [t for t in tensors if hasattr(t, "ds_id")]
    sharded = [t for t in tensors if callable(getattr(t, "full_tensor", None))]
    if not zero and not sharded:
        yield parts
        return
    gather = contextlib.nullcontext()
    if zero:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(zero, modifier_rank=None)
    with gather:
        replaced = {}
        for field, module in (("lm_head", parts.lm_head), ("final_norm", parts.final_norm)):
            if module is None:
                continue
            own = {name: _whole(t) for name, t in module.named_parameters(recurse=False)}
            if field == "lm_head" and "bias" not in own:
                own["bias"] = None
            replaced[field] = _Holder(module, own)
    yield dataclasses.replace(parts, **replaced)


def reshard_fsdp2(model: nn.Module) -> None:
    """Reshard every FSDP2 unit of ``model`` (the root keeps its parameters unsharded after a forward).

    After a forward outside training (the trace) the module attributes would
    otherwise still hold the unsharded parameters, and freezing or an
    optimizer built then would see those instead of the sharded DTensors.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def gathered_blocks(model: nn.Module):
    """Gather each ZeRO-3 module's own parameters around its forward, where nothing else does.

    For a model whose parameters were partitioned by ``deepspeed.zero.Init``
    before a DeepSpeed engine exists (Trainer init under ZeRO-3): each module
    gathers only its parameters that are not available, so under an engine
    (whose hooks gather first) this does nothing. At most one module's
    parameters are gathered at a time besides the engine's. Collective: every
    rank must run the same forwards.
    """
    if not is_zero3_partitioned(model):
        yield
        return
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    held: dict[int, contextlib.AbstractContextManager] = {}

    def before(module, args):
        missing = [p for p in module.parameters(recurse=False)
                   if hasattr(p, "ds_id") and p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if missing:
            context = deepspeed.zero.GatheredParameters(missing, modifier_rank=None)
            context.__enter__()
            held[id(module)] = context

    def after(module, args, output):
        context = held.pop(id(module), None)
        if context is not None:
            context.__exit__(None, None, None)

    hooks = []
    for module in model.modules():
        if any(hasattr(p, "ds_id") for p in module.parameters(recurse=False)):
            hooks.append(module.register_forward_pre_hook(before))
            hooks.append(module.register_forward_hook(after))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        while held:  # a forward stopped early (the trace stops after the last block)
            held.popitem()[1].__exit__(None, None, None)
