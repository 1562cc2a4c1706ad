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
``freezekern.cut.prefix_cache``, or a forward shared between a policy and its
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
trainable tensors outside the embeddings, the blocks, the final norm and the
head, which the cut could not train (``freeze_outside=True`` freezes them),
parameters shared between the prefix and the trained part, a model already
wrapped in DistributedDataParallel or FSDP1, and at forward time a model whose blocks
are not called through their module call or whose block k+1 receives no
hidden-state tensor.

Order with other tools: apply the plan after ``get_peft_model`` and before
wrapping in DDP/FSDP or building the optimizer; ``apply`` only ever freezes
parameters, it never makes one trainable.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Mapping

from torch import nn

from freezekern.cut.handle import _HANDLE_ATTR, FreezeHandle, active_handle
from freezekern.cut.hooks import (
    _INNER_ATTR,
    _STATE_ATTR,
    FSDP1_REFUSAL,
    _CutState,
    _graph_free_forward,
    _make_call_hook,
    _make_check,
    _make_cut_hook,
    _make_start_hook,
)
from freezekern.model.parts import ModelParts, discover
from freezekern.model.peft import adapter_parameter_ids, base_parameter_name, unwrap_peft
from freezekern.policy.rules import FreezePlan

logger = logging.getLogger("freezekern.cut")

FROZEN_ADAPTER_POLICIES = ("refuse", "freeze")


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
            yield base_parameter_name(name), p


def _fingerprints(model: nn.Module, parts: ModelParts) -> set[str]:
    """The model's fingerprint, and the one it had before PEFT adapters were injected."""
    prints = {parts.fingerprint()}
    base, _ = unwrap_peft(model)
    adapters = adapter_parameter_ids(base)
    if adapters or base is not model:
        proxy = types.SimpleNamespace(model_type=parts.model_type, num_layers=parts.num_layers,
                                      model=_RenamedParameters(base, set(adapters)))
        prints.add(ModelParts.fingerprint(proxy))
    return prints


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
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise ValueError(FSDP1_REFUSAL)


def apply(
    model: nn.Module,
    plan_or_k,
    *,
    train_head: bool | None = None,
    train_final_norm: bool | None = None,
    parts: ModelParts | None = None,
    frozen_adapters: str = "refuse",
    fused_loss: bool = False,
    freeze_outside: bool = False,
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
    ``"freeze"``. ``freeze_outside``: what to do with trainable parameters
    that are neither the embeddings (the input embedding and the
    ``nn.Embedding`` modules beside the blocks, e.g. GPT-2's ``wpe``), nor a block,
    the final norm or the head (a VLM projector, OPT's ``project_in``): the
    cut cannot train them, so they are refused by name unless
    ``freeze_outside=True`` freezes them. ``fused_loss=True`` also computes the loss of forwards with labels
    by the fused LM-head op (``freezekern.cut.fused_loss``: no [B, T, V] logits, no
    weight gradient for a frozen head; ``logits`` is then None). Returns a
    FreezeHandle; ``handle.remove()`` undoes it all.
    """
    if frozen_adapters not in FROZEN_ADAPTER_POLICIES:
        raise ValueError(f"frozen_adapters must be one of {FROZEN_ADAPTER_POLICIES}, got {frozen_adapters!r}")
    _check_not_wrapped(model)
    plan, k = _as_plan(plan_or_k)
    if plan is not None and plan.moving:
        k = int(plan.moving["start"])  # a moving plan starts shallow (freezekern.cut.moving moves it)
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

    base, _ = unwrap_peft(model)
    embedding = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if embedding is None:
        raise ValueError(
            f"{type(base).__name__} exposes no input embedding (get_input_embeddings() is None): "
            "freezekern cannot run the frozen prefix graph-free"
        )

    region = _trained_region(parts, k, bool(train_head), bool(train_final_norm))
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

    adapters = adapter_parameter_ids(base)
    to_freeze = [p for p in model.parameters() if p.requires_grad and id(p) not in region]
    outside = _outside_parameters(base, parts, embedding, to_freeze, adapters, names)
    if outside and not freeze_outside:
        shown = ", ".join(outside[:5]) + (" ..." if len(outside) > 5 else "")
        raise ValueError(
            f"{len(outside)} trainable parameter tensors of {type(base).__name__} are neither an embedding, a block, "
            f"the final norm nor the head ({shown}); the cut at block {k + 1} cannot train them. Freeze them first "
            "(p.requires_grad_(False)) or pass freeze_outside=True to let apply() freeze them"
        )
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
    handle._freeze_outside = bool(freeze_outside)
    try:
        for p in to_freeze:
            p.requires_grad_(False)
            p.grad = None
            handle._changed_flags.append(p)
            handle._changed_names.append(names.get(id(p)))
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
                cut_block.register_forward_pre_hook(_make_cut_hook(state, k, handle), with_kwargs=True)
            )
            check = _make_check(state, parts, model)
            handle._hooks.append(parts.blocks[-1].register_forward_hook(lambda module, args, out: check()))
            handle._hooks.append(parts.lm_head.register_forward_pre_hook(lambda module, args: check()))
        if fused_loss:
            from freezekern.cut.fused_loss import fused_loss as apply_fused_loss

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


def _trained_region(parts: ModelParts, k: int, train_head: bool, train_final_norm: bool) -> dict[int, nn.Parameter]:
    """The parameters a cut at k may leave trainable (never more than before): blocks k+1..L, final norm, head."""
    region: dict[int, nn.Parameter] = {}
    for block in parts.blocks[k:]:
        region.update((id(p), p) for p in block.parameters())
    if train_final_norm and parts.final_norm is not None:
        region.update((id(p), p) for p in parts.final_norm.parameters())
    if train_head:
        region.update((id(p), p) for p in parts.lm_head.parameters())
    return region


def cut_would_freeze(model: nn.Module, k: int, *, train_head: bool, train_final_norm: bool = True,
                     parts: ModelParts | None = None) -> list[str]:
    """Names of ``model``'s trainable parameters that ``apply(model, k, ...)`` would freeze (empty: none)."""
    parts = parts or discover(model)
    region = _trained_region(parts, k, train_head, train_final_norm)
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in region]


def _outside_parameters(base: nn.Module, parts: ModelParts, embedding: nn.Module, params: list[nn.Parameter],
                        adapters: Mapping[int, str], names: Mapping[int, str]) -> list[str]:
    """Names of ``params`` outside the embeddings (and their norms, which run below the blocks), the blocks, the
    final norm and the head (adapters aside)."""
    known: set[int] = {id(p) for p in embedding.parameters()}
    for backbone in base.modules():  # the module holding the blocks: its embeddings (token, position) run below
        if any(child is parts.blocks for child in backbone.children()):
            for module in backbone.children():  # embeddings, and norms of the embeddings (BLOOM's)
                if isinstance(module, (nn.Embedding, nn.LayerNorm)) or "Norm" in type(module).__name__:
                    known.update(id(p) for p in module.parameters())
    for module in (parts.blocks, parts.final_norm, parts.lm_head):
        if module is not None:
            known.update(id(p) for p in module.parameters())
    return [names.get(id(p), "?") for p in params if id(p) not in known and id(p) not in adapters]


def _apply_no_cut(model: nn.Module, parts: ModelParts, plan: FreezePlan, *, fused_loss: bool) -> FreezeHandle:
    """A full-fine-tuning plan: nothing frozen, no block forward changed; the handle marks the model.

    ``fused_loss``: the loss still comes from the fused LM-head op (``freezekern.cut.fused_loss``).
    """
    state = _CutState(boundary=0, blocks=parts.blocks, recorded_blocks=list(parts.blocks))
    handle = FreezeHandle(model, parts, 0, plan, True, True, state, cut=False)
    if fused_loss:
        from freezekern.cut.fused_loss import fused_loss as apply_fused_loss

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


# transformers' enable_input_require_grads (sets a flag on the output) and its output recorder (inert
# unless output_hidden_states/output_attentions are asked for, which are refused separately)
