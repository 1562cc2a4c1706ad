"""What the cut does at call time: the graph-free forward of the frozen prefix, the pre-hook that cuts the
hidden state entering block k+1, the model-call hook that asks a boundary source, and the checks that a
training forward went through the cut. ``freezekern.cut.freeze`` installs them; ``FreezeHandle.remove``
takes them away.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from freezekern.cut.call_inputs import READS_PREFIX, call_input_ids
from freezekern.cut.source import BoundarySource
from freezekern.model.engines import stop_backward_prefetch_below
from freezekern.model.parts import ModelParts, block_hidden_input, with_block_hidden_input
from freezekern.model.training import checkpoint_kind

logger = logging.getLogger("freezekern.cut")

FSDP1_REFUSAL = (
    "freezekern does not cut FSDP1 (FullyShardedDataParallel) models: its wrappers replace the blocks and their "
    "flat parameters mix frozen and trained tensors. Use FSDP2: apply(model, plan), then fully_shard(block) for "
    "each block and fully_shard(model) (accelerate: fsdp_version: 2)"
)

_STATE_ATTR = "_freezekern_state"
_INNER_ATTR = "_freezekern_inner_forward"


class _CallState:
    """The state of one model call."""

    def __init__(self):
        self.cut_seen = False
        self.consulted = False  # this model call asked the source (so it sees the computed state)
        self.served: torch.Tensor | None = None  # the state the source gave for this call
        self.served_ids: torch.Tensor | None = None  # ... for the forward whose embedding gets exactly these ids
        self.skipping = False  # the embedding returned the served state: frozen blocks pass it through


def _per_call(name: str) -> property:
    return property(lambda self: getattr(self.call, name), lambda self, value: setattr(self.call, name, value))


@dataclass
class _CutState:
    """Per-forward bookkeeping shared by the wrappers and hooks of one handle (the per-call part per thread)."""

    boundary: int
    blocks: nn.ModuleList
    recorded_blocks: list[nn.Module]
    embedding: nn.Module | None = None
    source: BoundarySource | None = None
    skip_unsupported: str | None = None
    stats: dict = field(default_factory=lambda: {"cuts": 0, "leaf_cuts": 0, "served": 0, "unservable": 0})
    refusals_logged: set = field(default_factory=set)
    # per thread (a plain dict: torch.compile traces it, unlike threading.local): calls from several threads
    # (DataParallel replicas) never mix
    calls: dict = field(default_factory=dict)

    @property
    def call(self) -> _CallState:
        thread = threading.get_ident()
        state = self.calls.get(thread)
        if state is None:
            if len(self.calls) > 64:  # threads that ended (DataParallel starts new ones)
                self.calls.clear()
            state = self.calls[thread] = _CallState()
        return state

    def __deepcopy__(self, memo):  # a copied model (copy.deepcopy) starts with no call in flight
        fields = {f.name: copy.deepcopy(getattr(self, f.name), memo) for f in dataclasses.fields(self)
                  if f.name != "calls"}
        return type(self)(**fields)

    cut_seen = _per_call("cut_seen")
    consulted = _per_call("consulted")
    served = _per_call("served")
    served_ids = _per_call("served_ids")
    skipping = _per_call("skipping")

    def reset_call(self) -> None:
        self.cut_seen = False
        self.consulted = False
        self.served = self.served_ids = None
        self.skipping = False


def _graph_free_forward(self, *args, **kwargs):
    """Per-instance forward of a frozen module: the original forward under ``torch.no_grad()``."""
    state: _CutState | None = self.__dict__.get(_STATE_ATTR)
    if state is not None and state.served is not None:
        if self is state.embedding:
            ids = args[0] if args else kwargs.get("input")
            state.skipping = _same_ids(ids, state.served_ids)
        if state.skipping:
            return _skipped_output(self, state, args, kwargs)
    if torch.is_grad_enabled() and _would_checkpoint(self):
        kwargs = _drop_cache_like_checkpointing(self, kwargs)
    inner = self.__dict__.get(_INNER_ATTR)
    with torch.no_grad():
        out = inner(*args, **kwargs) if inner is not None else type(self).forward(self, *args, **kwargs)
    if state is not None and self is not state.embedding and not isinstance(out, torch.Tensor) \
            and state.skip_unsupported is None:
        state.skip_unsupported = f"{type(self).__name__} returns {type(out).__name__}, not a tensor"
    return out


def _same_ids(ids, served_ids) -> bool:
    """Whether the embedding gets the ids the state was served for: the same tensor, or a view with equal values.

    GPT-2 and OPT hand their embedding ``input_ids.view(-1, T)``: another
    object with the same shape and values, whose embedding output is the same.
    """
    if ids is served_ids:
        return True
    return isinstance(ids, torch.Tensor) and isinstance(served_ids, torch.Tensor) and ids.shape == served_ids.shape \
        and ids.dtype == served_ids.dtype and ids.device == served_ids.device and torch.equal(ids, served_ids)


def _skipped_output(module: nn.Module, state: _CutState, args, kwargs):
    """Stand-in output of a frozen module while the boundary state is served.

    The embedding returns the served state (right shape, dtype and device; the
    cut replaces the value anyway); a block passes its hidden-state input through.
    """
    if module is state.embedding:
        return state.served
    return block_hidden_input(args, kwargs)[0]


def _would_checkpoint(module: nn.Module) -> bool:
    return bool(getattr(module, "gradient_checkpointing", False)) and module.training


def _drop_cache_like_checkpointing(module: nn.Module, kwargs: dict) -> dict:
    """What GradientCheckpointingLayer does to the cache arguments of a layer it checkpoints.

    A frozen layer runs graph-free instead of checkpointed; it gets the same
    arguments the checkpointed call would have had, so it never fills a KV
    cache during training either.
    """
    if getattr(module, "_can_checkpoint_with_cache", False):
        return kwargs
    changed = dict(kwargs)
    if changed.get("use_cache"):
        changed["use_cache"] = False
    for name in ("cache", "layer_past", "past_key_values", "past_key_value"):
        if changed.get(name) is not None:
            changed[name] = None
    return changed


def _needs_input_grad(block: nn.Module) -> bool:
    """True if ``block`` will run a reentrant checkpoint, which needs an input that requires grad
    (a ``CheckpointWrapper`` always checkpoints; Hugging Face's layers only in training mode)."""
    wrapped = getattr(block, "checkpoint_impl", None) is not None
    return checkpoint_kind(block) == "reentrant" and (wrapped or block.training)


_HARMLESS_HOOKS = {"make_inputs_require_grads", "output_capturing_hook"}


def _foreign_hooks(modules: list[nn.Module], own: set[int]) -> str | None:
    """The first forward hook on a prefix module that is not freezekern's (it would see stand-in values)."""
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return "a global forward hook"
    for top in modules:
        for sub in top.modules():
            for hooks in (sub._forward_hooks, sub._forward_pre_hooks):
                for hook_id, hook in hooks.items():
                    if hook_id not in own and getattr(hook, "__name__", "") not in _HARMLESS_HOOKS:
                        return f"a forward hook on {type(sub).__name__} ({getattr(hook, '__name__', hook)!r})"
    return None


def _skip_refusal(handle, state: _CutState, args, kwargs, own: set[int]) -> str | None:
    """Why this model call must run its prefix (None: the boundary source may serve it)."""
    if state.skip_unsupported is not None:
        return state.skip_unsupported
    config = getattr(handle.model, "config", None)
    for name in READS_PREFIX:
        value = kwargs.get(name)
        if value is None:
            value = getattr(config, name, None)
        if value is not None and value is not False:  # True, or (transformers 5) selected layer indices
            return f"{name}={value!r} reads the prefix"
    if kwargs.get("inputs_embeds") is not None:
        return "inputs_embeds skips the embedding"
    if kwargs.get("past_key_values") is not None:
        return "a KV cache is read"
    if not isinstance(call_input_ids(args, kwargs), torch.Tensor):
        return "no input_ids"
    return _foreign_hooks(handle.prefix_modules(), own)


def _make_call_hook(handle, state: _CutState, own: set[int]):
    """Forward pre-hook on the model: fresh per-call state, and the boundary source's chance to serve."""

    def start_of_call(module, args, kwargs):
        state.reset_call()
        source = state.source
        if source is None:
            return None
        refusal = _skip_refusal(handle, state, args, kwargs, own)
        if refusal is not None:
            state.stats["unservable"] += 1
            if refusal not in state.refusals_logged:
                state.refusals_logged.add(refusal)
                logger.info("boundary source not asked (the prefix runs): %s", refusal)
            return None
        state.consulted = True
        served = source.begin(args, kwargs)
        if served is not None:
            state.served = served
            state.served_ids = call_input_ids(args, kwargs)
        return None

    return start_of_call


def _make_start_hook(state: _CutState, parts: ModelParts):
    def start_of_forward(module, args):
        state.cut_seen = False
        blocks = state.blocks
        if len(blocks) != len(state.recorded_blocks) or any(
            a is not b for a, b in zip(blocks, state.recorded_blocks)
        ):
            found = ", ".join(type(b).__name__ for b in blocks[: state.boundary + 1])
            if "FullyShardedDataParallel" in found:
                raise RuntimeError(FSDP1_REFUSAL)
            raise RuntimeError(
                f"the blocks of '{parts.blocks_path}' were replaced after the freeze plan was applied (found {found}); "
                "wrap the blocks first (activation checkpointing wrappers, FSDP), then apply the plan"
            )
        return None

    return start_of_forward


def _make_cut_hook(state: _CutState, k: int, handle):
    configured: list[bool] = []

    def cut(module, args, kwargs):
        state.cut_seen = True
        if not configured:  # the block may have been sharded (FSDP2) after apply: look once, at its first call
            configured.append(True)
            undo = stop_backward_prefetch_below(module)
            if undo is not None:
                handle._undo.append(undo)
        hidden, in_args = block_hidden_input(args, kwargs)
        if hidden is None:
            state.reset_call()
            arg_types = [type(a).__name__ for a in args]
            raise TypeError(
                f"freezekern cannot cut the input of block {k + 1} ({type(module).__name__}): expected the hidden "
                f"state as its first positional argument or as hidden_states=, found positional arguments "
                f"{arg_types} and keyword arguments {sorted(kwargs)}"
            )
        try:
            if state.skipping:
                hidden = state.served
                state.stats["served"] += 1
                served = getattr(state.source, "served", None)
                if served is not None:
                    served()
            elif state.consulted and state.source is not None and state.skip_unsupported is None:
                state.source.computed(hidden)
        finally:
            state.consulted = False
            state.served = state.served_ids = None
            state.skipping = False
        cut_hidden = hidden.detach()
        if torch.is_grad_enabled():
            state.stats["cuts"] += 1
            if any(_needs_input_grad(b) for b in state.recorded_blocks[k:]):
                cut_hidden.requires_grad_(True)
                state.stats["leaf_cuts"] += 1
        return with_block_hidden_input(args, kwargs, cut_hidden, in_args)

    return cut


def _make_check(state: _CutState, parts: ModelParts, model: nn.Module):
    """Raise when a training forward got past the last block (or reached the head) without the cut."""

    def check():
        if torch.is_grad_enabled() and not state.cut_seen:
            raise RuntimeError(
                f"the forward of {type(model).__name__} went past its blocks without calling block "
                f"{state.boundary + 1} of '{parts.blocks_path}' ({type(parts.blocks[state.boundary]).__name__}) "
                "through its module call, so freezekern could not cut the backward there; this model's forward "
                "cannot be cut cleanly (if the block list is another one, pass "
                "parts=freezekern.discover(model, layers='path.to.blocks') to apply())"
            )

    return check
