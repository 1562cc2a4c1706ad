"""Truncated backward: apply a FreezePlan so that the backward pass stops at the boundary.

``apply(model, plan_or_k)`` freezes the embeddings and blocks 1..k, runs that
frozen prefix without building an autograd graph, and cuts the hidden state
that enters block k+1 from everything below it. The model is then called the
ordinary way (``model(input_ids=..., labels=...)``), so any training loop,
the Hugging Face Trainer, TRL and accelerate keep working unchanged.

How the cut is made (all per instance, all undone by ``FreezeHandle.remove()``):

* the forward of the input embedding and of blocks 1..k is replaced, on the
  instance only, by a wrapper that calls the original forward under
  ``torch.no_grad()``. No activation is saved, nothing below the cut gets a
  ``grad_fn``, and a checkpointed layer (Hugging Face's
  ``GradientCheckpointingLayer`` checks ``torch.is_grad_enabled()``) runs as a
  plain forward instead of being checkpointed and recomputed. Module hooks
  (``enable_input_require_grads``, tracers, FSDP) still run around it.
* a forward pre-hook on block k+1 replaces its hidden-state input (the first
  positional argument, or ``hidden_states=``) by ``h.detach()``. When a block
  at or above the boundary is checkpointed with the reentrant implementation
  (which only produces gradients for its parameters when an input requires
  grad), the detached tensor is made a fresh leaf with ``requires_grad=True``:
  the backward then ends right there, at one small ``AccumulateGrad``.
  Checkpointing wraps the layer's ``forward``, not its ``__call__``, so the
  pre-hook runs outside the checkpoint.
* with tied input/output embeddings the shared matrix is frozen by default;
  ``train_head=True`` trains it through its output use only (the embedding
  lookup runs graph-free), which keeps the cut.

Exactness: the values reaching block k+1 are the same tensors the plain model
computes, and every parameter above the cut receives the gradient of a plain
backward with the same parameters frozen (no frozen parameter lies on a path
between the loss and a trainable parameter except through h_k, whose gradient
is never needed). The tests compare gradients under every setup.

A plan with ``cut=False`` (policy "none": full fine-tuning) freezes nothing and
changes no forward; ``apply(model, 0)`` (a bare k = 0) freezes the embeddings
(and a tied head) and stops the backward at block 1, which is not the same.

Boundary sources: a provider of ready boundary states (the prefix cache in
``freezekern.prefix_cache``, or a forward shared between a policy and its
reference model) implements ``BoundarySource`` and is attached with
``handle.set_boundary_source(source)``. truncate asks it for a state only on
forwards that cannot observe the prefix (no ``output_hidden_states`` or
``output_attentions``, ``input_ids`` rather than ``inputs_embeds``, no KV
cache, no foreign hooks on the prefix modules, blocks that return a tensor);
when it answers, the embedding returns the state as a stand-in, the frozen
blocks pass it through and the cut hands block k+1 the state. Neither side
touches the other's private state.

Bad input is refused: k outside [0, L], a plan made for another model,
applying twice, removing twice, trainable PEFT adapters inside the frozen
prefix (``frozen_adapters="refuse"``, the default; ``"freeze"`` freezes them),
parameters shared between the prefix and the trained part, a model already
wrapped in DistributedDataParallel, and at forward time a model whose blocks
are not called through their module call or whose block k+1 receives no
hidden-state tensor.

Order with other tools: apply the plan after ``get_peft_model`` and before
wrapping in DDP/FSDP or building the optimizer; ``apply`` only ever freezes
parameters, it never makes one trainable.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from freezekern.adapters import ModelParts, discover
from freezekern.policy import FreezePlan

logger = logging.getLogger("freezekern.truncate")

FROZEN_ADAPTER_POLICIES = ("refuse", "freeze")
_HANDLE_ATTR = "_freezekern_handle"
_STATE_ATTR = "_freezekern_state"
_INNER_ATTR = "_freezekern_inner_forward"


class BoundarySource(Protocol):
    """What a provider of boundary states implements (see the module docstring).

    ``begin(args, kwargs)``: called at the start of a model call that may skip
    the prefix, with the model's call arguments; return the boundary state
    [B, T, D] (dtype and device of the hidden states) to serve, or None to let
    the prefix compute it. ``computed(hidden)``: the state the prefix computed
    for that call (only when ``begin`` returned None). ``detached()``: the
    handle no longer uses this source.
    """

    def begin(self, args: tuple, kwargs: dict) -> torch.Tensor | None: ...

    def computed(self, hidden: torch.Tensor) -> None: ...

    def detached(self) -> None: ...


@dataclass
class _CutState:
    """Per-forward bookkeeping shared by the wrappers and hooks of one handle."""

    boundary: int
    blocks: nn.ModuleList
    recorded_blocks: list[nn.Module]
    embedding: nn.Module | None = None
    cut_seen: bool = False
    source: BoundarySource | None = None
    consulted: bool = False  # this model call asked the source (so it sees the computed state)
    served: torch.Tensor | None = None  # the state the source gave for this call
    served_ids: torch.Tensor | None = None  # ... for the forward whose embedding gets exactly these ids
    skipping: bool = False  # the embedding returned the served state: frozen blocks pass it through
    skip_unsupported: str | None = None
    stats: dict = field(default_factory=lambda: {"cuts": 0, "leaf_cuts": 0, "served": 0, "unservable": 0})
    refusals_logged: set = field(default_factory=set)

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
            state.skipping = ids is state.served_ids
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


def _skipped_output(module: nn.Module, state: _CutState, args, kwargs):
    """Stand-in output of a frozen module while the boundary state is served.

    The embedding returns the served state (right shape, dtype and device; the
    cut replaces the value anyway); a block passes its hidden-state input through.
    """
    if module is state.embedding:
        return state.served
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs["hidden_states"]


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


def _checkpoint_is_reentrant(func) -> bool:
    """Whether a layer's checkpoint function is the reentrant one (unknown counts as reentrant)."""
    keywords: dict = {}
    while isinstance(func, functools.partial):
        for key, value in func.keywords.items():
            keywords.setdefault(key, value)
        func = func.func
    if "use_reentrant" in keywords:
        return keywords["use_reentrant"] is not False
    # torch.utils.checkpoint.checkpoint defaults to the reentrant variant when use_reentrant is not given;
    # an unknown checkpoint function is treated the same way (the safe choice: the cut then requires grad).
    return True


def _needs_input_grad(block: nn.Module) -> bool:
    """True if ``block`` will run a reentrant checkpoint, which needs an input that requires grad."""
    impl = getattr(block, "checkpoint_impl", None)  # torch.distributed CheckpointWrapper
    if impl is not None:
        return getattr(impl, "name", "") == "REENTRANT"
    if _would_checkpoint(block):
        return _checkpoint_is_reentrant(getattr(block, "_gradient_checkpointing_func", None))
    return False


class FreezeHandle:
    """An applied plan. ``remove()`` restores the model exactly; also a context manager.

    Attributes: ``boundary`` (k, the number of frozen blocks), ``num_layers``,
    ``plan`` (the FreezePlan or None for a bare k), ``parts``, ``train_head``,
    ``train_final_norm``, ``cut`` (False for a full-fine-tuning plan, which
    changes nothing), ``active``.
    """

    def __init__(self, model: nn.Module, parts: ModelParts, boundary: int, plan: FreezePlan | None,
                 train_head: bool, train_final_norm: bool, state: _CutState, cut: bool = True):
        self.model = model
        self.parts = parts
        self.boundary = boundary
        self.num_layers = parts.num_layers
        self.plan = plan
        self.train_head = train_head
        self.train_final_norm = train_final_norm
        self.cut = cut
        self.active = True
        self._state = state
        self._changed_flags: list[nn.Parameter] = []
        self._wrapped: list[tuple[nn.Module, bool]] = []  # (module, had its own instance forward)
        self._hooks: list = []
        self._frozen_adapters: list[str] = []
        self.fused_loss = None  # a freezekern.fused_loss.FusedLossHandle when apply(..., fused_loss=True)

    # -- what it did -------------------------------------------------------------------------
    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters this handle switched to requires_grad=False."""
        return list(self._changed_flags)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return trainable_parameters(self.model)

    @property
    def frozen_adapter_names(self) -> list[str]:
        """Names of PEFT adapter parameters frozen because they lie below the boundary."""
        return list(self._frozen_adapters)

    @property
    def embedding(self) -> nn.Module:
        """The input embedding module whose forward runs graph-free."""
        return self._state.embedding

    def prefix_modules(self) -> list[nn.Module]:
        """The modules of the frozen prefix, in forward order: the embedding, then blocks 1..k."""
        if not self.cut:
            return []
        return [self._state.embedding, *self._state.recorded_blocks[: self.boundary]]

    def prefix_parameters(self) -> list[nn.Parameter]:
        """The parameters of the frozen prefix, each once."""
        seen: dict[int, nn.Parameter] = {}
        for module in self.prefix_modules():
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    @property
    def stats(self) -> dict:
        """Counters: ``cuts`` (training forwards cut at the boundary), ``leaf_cuts`` (cuts that made a
        grad leaf), ``served`` (forwards whose boundary state came from the boundary source),
        ``unservable`` (forwards the source was not asked about: they could observe the prefix)."""
        return dict(self._state.stats)

    # -- boundary source ------------------------------------------------------------------------
    @property
    def boundary_source(self) -> BoundarySource | None:
        return self._state.source

    def set_boundary_source(self, source: BoundarySource) -> None:
        """Let ``source`` serve boundary states (replaces and detaches any previous source)."""
        if not self.active:
            raise RuntimeError("this FreezeHandle was already removed")
        if not self.cut or self.boundary >= self.num_layers:
            raise ValueError("this plan has no boundary state to serve "
                             f"({'nothing is frozen' if not self.cut else 'every block is frozen'})")
        previous = self._state.source
        self._state.source = source
        self._state.reset_call()
        if previous is not None and previous is not source:
            previous.detached()

    def clear_boundary_source(self, source: BoundarySource | None = None) -> None:
        """Stop using the boundary source (only if it is ``source``, when given)."""
        current = self._state.source
        if current is None or (source is not None and current is not source):
            return
        self._state.source = None
        self._state.reset_call()
        current.detached()

    def summary(self) -> dict:
        trainable = trainable_parameters(self.model)
        return {
            "boundary": self.boundary,
            "num_layers": self.num_layers,
            "cut": self.cut,
            "trained_blocks": list(range(self.boundary + 1, self.num_layers + 1)),
            "train_head": self.train_head,
            "train_final_norm": self.train_final_norm,
            "tied": self.parts.tied,
            "trainable_params": sum(p.numel() for p in trainable),
            "frozen_by_handle": sum(p.numel() for p in self._changed_flags),
            "frozen_adapters": len(self._frozen_adapters),
            "boundary_source": type(self._state.source).__name__ if self._state.source is not None else None,
            "active": self.active,
        }

    def __repr__(self) -> str:
        status = "active" if self.active else "removed"
        cut = "" if self.cut else ", no cut"
        return f"FreezeHandle(boundary={self.boundary}, num_layers={self.num_layers}{cut}, {status})"

    def __enter__(self) -> FreezeHandle:
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.remove()

    # -- undo ---------------------------------------------------------------------------------
    def remove(self) -> None:
        """Undo everything ``apply`` did: forwards, hooks, requires_grad flags, the model's marker.

        Raises RuntimeError when called twice, or (changing nothing) when
        another tool has since wrapped one of the forwards freezekern replaced.
        """
        if not self.active:
            raise RuntimeError("this FreezeHandle was already removed; the model is in its original state")
        for module, _ in self._wrapped:
            current = module.__dict__.get("forward")
            if not (isinstance(current, types.MethodType) and current.__func__ is _graph_free_forward):
                raise RuntimeError(
                    f"cannot restore {type(module).__name__}.forward: something replaced freezekern's per-instance "
                    f"forward after apply() (found {current!r}); undo that wrapper first, then remove()"
                )
        if self.fused_loss is not None and self.fused_loss.active:
            self.fused_loss.remove()
        self.clear_boundary_source()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for module, had_own in self._wrapped:
            inner = module.__dict__.pop(_INNER_ATTR, None)
            module.__dict__.pop(_STATE_ATTR, None)
            if had_own:
                module.forward = inner
            else:
                del module.__dict__["forward"]
        self._wrapped.clear()
        for p in self._changed_flags:
            p.requires_grad_(True)
        self._changed_flags.clear()
        for owner in (self.parts.blocks, self.model):
            if owner.__dict__.get(_HANDLE_ATTR) is self:
                del owner.__dict__[_HANDLE_ATTR]
        self.active = False


def active_handle(model: nn.Module) -> FreezeHandle | None:
    """The FreezeHandle applied to ``model`` (or to its block list), if any."""
    handle = model.__dict__.get(_HANDLE_ATTR)
    if handle is not None:
        return handle
    try:
        parts = discover(_unwrap_peft(model)[0])
    except (ValueError, TypeError):
        return None
    return parts.blocks.__dict__.get(_HANDLE_ATTR)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad, each once: build the optimizer from these.

        optimizer = torch.optim.AdamW(freezekern.truncate.trainable_parameters(model), lr=1e-4)
    """
    return [p for p in model.parameters() if p.requires_grad]


def named_trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# -- apply ------------------------------------------------------------------------------------

def _unwrap_peft(model: nn.Module) -> tuple[nn.Module, bool]:
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.startswith("peft"):
        return get_base(), True
    return model, False


def _adapter_parameter_ids(model: nn.Module) -> dict[int, str]:
    """id -> name of PEFT adapter parameters (LoRA A/B, magnitudes, ...) in ``model``."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: fall back to names
        BaseTunerLayer = None
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[int, str] = {}
    for module in model.modules():
        if BaseTunerLayer is not None and isinstance(module, BaseTunerLayer):
            for attr in getattr(module, "adapter_layer_names", ()):
                sub = getattr(module, attr, None)
                if isinstance(sub, (nn.Module, nn.ParameterDict)):
                    for p in sub.parameters():
                        found[id(p)] = names.get(id(p), attr)
    if BaseTunerLayer is None:
        for n, p in model.named_parameters():
            if "lora_" in n:
                found[id(p)] = n
    return found


class _RenamedParameters(nn.Module):
    """named_parameters() of a PEFT-wrapped model as the base model had them (adapters left out)."""

    def __init__(self, base: nn.Module, skip: set[int]):
        super().__init__()
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_skip", skip)

    def named_parameters(self, *args, **kwargs):  # noqa: D401 - mirrors nn.Module
        for name, p in self._base.named_parameters():
            if id(p) in self._skip:
                continue
            yield name.replace(".base_layer.", "."), p


def _fingerprints(model: nn.Module, parts: ModelParts) -> set[str]:
    """The model's fingerprint, and the one it had before PEFT adapters were injected."""
    prints = {parts.fingerprint()}
    base, _ = _unwrap_peft(model)
    adapters = _adapter_parameter_ids(base)
    if adapters or base is not model:
        proxy = types.SimpleNamespace(model_type=parts.model_type, num_layers=parts.num_layers,
                                      model=_RenamedParameters(base, set(adapters)))
        prints.add(ModelParts.fingerprint(proxy))
    return prints


def move_boundary(handle: FreezeHandle, plan_or_k, *, optimizer=None) -> FreezeHandle:
    """Move an applied boundary deeper (never shallower); returns the new handle.

    Everything is checked before anything changes: a bad k, a shallower k or
    a plan for another model raises and leaves the old boundary applied. If
    applying the new boundary fails anyway, the old one is applied again
    before the error propagates. Parameters that become frozen lose their
    ``.grad`` and, when ``optimizer`` is given (a torch optimizer, or a wrapper
    with ``.optimizer``), their optimizer state (Adam moments); they stay in
    its parameter groups, where a parameter without a gradient is skipped, so
    saved optimizer states keep their layout. Adapters inside newly frozen
    blocks are frozen too. A boundary source with a ``moved(new_handle)``
    method is told about the new handle.
    """
    if not handle.active:
        raise RuntimeError("this FreezeHandle was already removed; apply() a plan instead")
    plan, k = _as_plan(plan_or_k)
    model, parts, train_head, train_norm = handle.model, handle.parts, handle.train_head, handle.train_final_norm
    if plan is not None:
        _check_plan_fits(model, parts, plan)
        if not plan.cut:
            raise ValueError("move_boundary cannot move to a full-fine-tuning plan (policy 'none'): it would "
                             "unfreeze every block; remove() the handle instead")
    _check_boundary(k, parts.num_layers)
    if handle.cut and k < handle.boundary:
        raise ValueError(f"the boundary only moves deeper: {handle.boundary} -> {k} would unfreeze blocks")
    if handle.cut and k == handle.boundary and plan is None:
        return handle
    before = {id(p) for p in trainable_parameters(model)}
    source = handle.boundary_source
    old_plan = handle.plan if handle.plan is not None else handle.boundary
    # the fused loss does not depend on the boundary: it stays installed and moves to the new handle
    fused, handle.fused_loss = handle.fused_loss, None
    fused = fused if fused is not None and fused.active else None
    try:
        handle.remove()
    except BaseException:
        handle.fused_loss = fused
        raise
    try:
        new = apply(model, plan_or_k, train_head=train_head, train_final_norm=train_norm, parts=parts,
                    frozen_adapters="freeze")
    except BaseException:
        for p in model.parameters():  # restore the old flags, then the old cut
            if id(p) in before:
                p.requires_grad_(True)
        restored = apply(model, old_plan, train_head=train_head, train_final_norm=train_norm, parts=parts,
                         frozen_adapters="freeze")
        restored.fused_loss = fused
        if source is not None and hasattr(source, "moved"):
            source.moved(restored)
        raise
    new.fused_loss = fused
    newly_frozen = [p for p in model.parameters() if id(p) in before and not p.requires_grad]
    inner = getattr(optimizer, "optimizer", optimizer)
    for p in newly_frozen:
        p.grad = None
        if inner is not None:
            inner.state.pop(p, None)
    if source is not None and hasattr(source, "moved"):
        source.moved(new)
    logger.info("boundary moved %d -> %d: %d parameter tensors newly frozen", handle.boundary, new.boundary,
                len(newly_frozen))
    return new


def _as_plan(plan_or_k) -> tuple[FreezePlan | None, int]:
    if isinstance(plan_or_k, FreezePlan):
        return plan_or_k, int(plan_or_k.boundary)
    if isinstance(plan_or_k, Mapping):
        plan = FreezePlan.from_dict(plan_or_k)
        return plan, int(plan.boundary)
    if isinstance(plan_or_k, bool) or not isinstance(plan_or_k, int):
        raise TypeError(f"plan_or_k must be a FreezePlan or an int boundary, got {type(plan_or_k).__name__}")
    return None, int(plan_or_k)


def _check_not_wrapped(model: nn.Module) -> None:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, (DistributedDataParallel, DataParallel)):
        raise ValueError(
            f"apply() got a {type(model).__name__}: apply the plan to the bare model before wrapping it "
            "(DDP records which parameters require grad when it is built)"
        )


def apply(
    model: nn.Module,
    plan_or_k,
    *,
    train_head: bool | None = None,
    train_final_norm: bool | None = None,
    parts: ModelParts | None = None,
    frozen_adapters: str = "refuse",
    fused_loss: bool = False,
) -> FreezeHandle:
    """Freeze the embeddings and blocks 1..k of ``model`` and cut its backward pass at block k+1.

    ``plan_or_k``: a FreezePlan (checked against the model: same number of
    blocks and fingerprint) or an int k in [0, L]. A plan with ``cut=False``
    (policy "none") freezes nothing and returns a handle that changes nothing.
    ``train_head`` defaults to the plan's choice (for a bare k: trained unless
    tied to the input embedding); ``train_final_norm`` to the plan's (True for
    a bare k). ``parts``: the model's parts when ``discover(model)`` cannot
    find them, e.g. ``apply(model, plan, parts=discover(model, layers="transformer.h"))``.
    ``frozen_adapters``: what to do with trainable PEFT adapter parameters
    inside the frozen prefix: ``"refuse"`` (raise; build LoRA above the
    boundary with ``freezekern.integrations.peft.lora_config_for_plan``) or
    ``"freeze"``. ``fused_loss=True`` also computes the loss of forwards with labels
    by the fused LM-head op (``freezekern.fused_loss``: no [B, T, V] logits, no
    weight gradient for a frozen head; ``logits`` is then None). Returns a
    FreezeHandle; ``handle.remove()`` undoes it all.
    """
    if frozen_adapters not in FROZEN_ADAPTER_POLICIES:
        raise ValueError(f"frozen_adapters must be one of {FROZEN_ADAPTER_POLICIES}, got {frozen_adapters!r}")
    _check_not_wrapped(model)
    plan, k = _as_plan(plan_or_k)
    parts = parts or discover(model)
    num_layers = parts.num_layers
    if plan is not None:
        _check_plan_fits(model, parts, plan)
    _check_boundary(k, num_layers)
    existing = active_handle(model) or parts.blocks.__dict__.get(_HANDLE_ATTR)
    if existing is not None and existing.active:
        raise RuntimeError(
            f"a freeze plan is already applied to this model ({existing!r}); call handle.remove() first"
        )
    if plan is not None and not plan.cut:
        return _apply_no_cut(model, parts, plan, fused_loss=fused_loss)
    if train_head is None:
        train_head = plan.train_head if plan is not None else not parts.tied
    if train_final_norm is None:
        train_final_norm = plan.train_final_norm if plan is not None else True

    base, _ = _unwrap_peft(model)
    embedding = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if embedding is None:
        raise ValueError(
            f"{type(base).__name__} exposes no input embedding (get_input_embeddings() is None): "
            "freezekern cannot run the frozen prefix graph-free"
        )

    # Which parameters train (never more than before): blocks k+1..L, final norm, head.
    region: dict[int, nn.Parameter] = {}
    for block in parts.blocks[k:]:
        region.update((id(p), p) for p in block.parameters())
    if train_final_norm and parts.final_norm is not None:
        region.update((id(p), p) for p in parts.final_norm.parameters())
    if train_head:
        region.update((id(p), p) for p in parts.lm_head.parameters())
    head_ids = {id(p) for p in parts.lm_head.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}

    prefix_ids: dict[int, nn.Parameter] = {}
    for module in [embedding, *parts.blocks[:k]]:
        prefix_ids.update((id(p), p) for p in module.parameters())
    shared = [names.get(i, "?") for i in prefix_ids if i in region and not (train_head and i in head_ids)]
    if shared:
        raise ValueError(
            f"cannot cut {type(base).__name__} at block {k}: parameters are shared between the frozen prefix and "
            f"the trained blocks ({', '.join(shared[:5])}); the cut would drop their gradient from the prefix use. "
            "Pick a boundary below the first shared block or train the model without freezekern"
        )

    adapters = _adapter_parameter_ids(base)
    to_freeze = [p for p in model.parameters() if p.requires_grad and id(p) not in region]
    frozen_adapter_names = [adapters[id(p)] for p in to_freeze if id(p) in adapters]
    if frozen_adapter_names and frozen_adapters == "refuse":
        shown = ", ".join(frozen_adapter_names[:4]) + (" ..." if len(frozen_adapter_names) > 4 else "")
        raise ValueError(
            f"{len(frozen_adapter_names)} trainable adapter parameters lie below the freeze boundary k={k} ({shown}). "
            "Build the adapters above the boundary only (freezekern.integrations.peft.lora_config_for_plan(plan) "
            "or layers_to_transform(plan)), or pass frozen_adapters='freeze' to freeze them"
        )

    state = _CutState(boundary=k, blocks=parts.blocks, recorded_blocks=list(parts.blocks), embedding=embedding)
    handle = FreezeHandle(model, parts, k, plan, bool(train_head), bool(train_final_norm), state)
    handle._frozen_adapters = frozen_adapter_names
    try:
        for p in to_freeze:
            p.requires_grad_(False)
            p.grad = None
            handle._changed_flags.append(p)
        for module in [embedding, *parts.blocks[:k]]:
            _wrap_forward(handle, module, state)
        own_hooks: set[int] = set()
        handle._hooks.append(model.register_forward_pre_hook(_make_call_hook(handle, state, own_hooks),
                                                             with_kwargs=True))
        start = parts.blocks[0].register_forward_pre_hook(_make_start_hook(state, parts))
        handle._hooks.append(start)
        own_hooks.add(start.id)
        if k < num_layers:
            cut_block = parts.blocks[k]
            handle._hooks.append(
                cut_block.register_forward_pre_hook(_make_cut_hook(state, k), with_kwargs=True)
            )
            check = _make_check(state, parts, model)
            handle._hooks.append(parts.blocks[-1].register_forward_hook(lambda module, args, out: check()))
            handle._hooks.append(parts.lm_head.register_forward_pre_hook(lambda module, args: check()))
        if fused_loss:
            from freezekern.fused_loss import fused_loss as apply_fused_loss

            handle.fused_loss = apply_fused_loss(model, parts=parts)
    except BaseException:
        handle.remove()
        raise
    model.__dict__[_HANDLE_ATTR] = handle
    parts.blocks.__dict__[_HANDLE_ATTR] = handle
    logger.info(
        "freeze plan applied: embeddings + blocks 1..%d of %d frozen (%d parameters frozen%s); backward stops at "
        "block %d", k, num_layers, sum(p.numel() for p in handle._changed_flags),
        f", {len(frozen_adapter_names)} adapter tensors among them" if frozen_adapter_names else "",
        k + 1,
    )
    return handle


def _apply_no_cut(model: nn.Module, parts: ModelParts, plan: FreezePlan, *, fused_loss: bool) -> FreezeHandle:
    """A full-fine-tuning plan: nothing frozen, no block forward changed; the handle marks the model.

    ``fused_loss``: the loss still comes from the fused LM-head op (``freezekern.fused_loss``).
    """
    state = _CutState(boundary=0, blocks=parts.blocks, recorded_blocks=list(parts.blocks))
    handle = FreezeHandle(model, parts, 0, plan, True, True, state, cut=False)
    if fused_loss:
        from freezekern.fused_loss import fused_loss as apply_fused_loss

        handle.fused_loss = apply_fused_loss(model, parts=parts)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        logger.info("full-fine-tuning plan applied; %d parameter tensors were already frozen before (e.g. %s) and "
                    "stay so", len(frozen), frozen[0])
    model.__dict__[_HANDLE_ATTR] = handle
    parts.blocks.__dict__[_HANDLE_ATTR] = handle
    return handle


def _check_boundary(k: int, num_layers: int) -> None:
    if not 0 <= k <= num_layers:
        raise ValueError(f"boundary k={k} is outside [0, {num_layers}] (the model has {num_layers} blocks)")


def _check_plan_fits(model: nn.Module, parts: ModelParts, plan: FreezePlan) -> None:
    """Refuse a plan made for another model (number of blocks, fingerprint)."""
    if plan.num_layers != parts.num_layers:
        raise ValueError(
            f"the plan was made for a model with {plan.num_layers} blocks, this {type(model).__name__} has "
            f"{parts.num_layers}: analyse this model and plan again"
        )
    if plan.fingerprint not in _fingerprints(model, parts):
        raise ValueError(
            f"the plan was made for another model (fingerprint {plan.fingerprint}, model id {plan.model_id!r}); "
            f"this model's fingerprint is {parts.fingerprint()}: analyse this model and plan again"
        )


def _wrap_forward(handle: FreezeHandle, module: nn.Module, state: _CutState) -> None:
    current = module.__dict__.get("forward")
    if isinstance(current, types.MethodType) and current.__func__ is _graph_free_forward:
        raise RuntimeError(f"{type(module).__name__} already runs graph-free: a plan is already applied")
    had_own = current is not None
    if had_own:
        module.__dict__[_INNER_ATTR] = current
    module.__dict__[_STATE_ATTR] = state
    module.forward = types.MethodType(_graph_free_forward, module)
    handle._wrapped.append((module, had_own))


_READS_PREFIX = ("output_hidden_states", "output_attentions")
# transformers' enable_input_require_grads (sets a flag on the output) and its output recorder (inert
# unless output_hidden_states/output_attentions are asked for, which are refused separately)
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


def _skip_refusal(handle: FreezeHandle, state: _CutState, args, kwargs, own: set[int]) -> str | None:
    """Why this model call must run its prefix (None: the boundary source may serve it)."""
    if state.skip_unsupported is not None:
        return state.skip_unsupported
    config = getattr(handle.model, "config", None)
    for name in _READS_PREFIX:
        value = kwargs.get(name)
        if value is None:
            value = getattr(config, name, None)
        if value is not None and value is not False:  # True, or (transformers 5) selected layer indices
            return f"{name}={value!r} reads the prefix"
    if kwargs.get("inputs_embeds") is not None:
        return "inputs_embeds skips the embedding"
    if kwargs.get("past_key_values") is not None:
        return "a KV cache is read"
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor):
        return "no input_ids"
    return _foreign_hooks(handle.prefix_modules(), own)


def _make_call_hook(handle: FreezeHandle, state: _CutState, own: set[int]):
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
            state.served_ids = kwargs.get("input_ids", args[0] if args else None)
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
            raise RuntimeError(
                f"the blocks of '{parts.blocks_path}' were replaced after the freeze plan was applied (found {found}); "
                "wrap the blocks first (activation checkpointing wrappers, FSDP), then apply the plan"
            )
        return None

    return start_of_forward


def _make_cut_hook(state: _CutState, k: int):
    def cut(module, args, kwargs):
        state.cut_seen = True
        if args and isinstance(args[0], torch.Tensor):
            hidden, in_args = args[0], True
        elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
            hidden, in_args = kwargs["hidden_states"], False
        else:
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
        if in_args:
            return (cut_hidden, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = cut_hidden
        return args, kwargs

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
