"""Fused LM-head loss for a Hugging Face causal LM: the training step never builds the [B, T, V] logits.

    handle = freezekern.cut.fused_loss(model)            # or freezekern.apply(model, plan, fused_loss=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()                              # out.logits is None
    handle.remove()                                  # the model is as it was

What it changes, on this instance only: ``model.forward`` (of the *ForCausalLM;
a PEFT ``PeftModel`` is unwrapped to it). A **training** forward (``model.training``) **with** ``labels`` runs
the decoder backbone, then ``freezekern.ops.linear_cross_entropy`` on its last
hidden state with the LM head's weight (and bias), the family's logit scale
and final-logit soft-capping (``freezekern.model.parts.HEADS``), and returns the
model's usual ModelOutput with ``loss`` set and ``logits=None``: they are never
built. The loss is Hugging Face's ``ForCausalLMLoss`` exactly: labels shifted
inside (or ``shift_labels=`` taken as given), ``ignore_index`` (-100 unless
passed), the mean over counted tokens, or the sum divided by
``num_items_in_batch`` when the Trainer passes it (gradient accumulation),
fp32 accumulation. A forward **without** labels, or in evaluation mode
(``model.eval()``, as ``Trainer.evaluate`` sets it), is the original one:
``generate``, ``compute_metrics`` and predictions get their logits.

Gradients: the head's weight gradient is computed only when the weight
requires grad; a frozen head (freezekern's default for tied embeddings) costs
its input gradient only. Gradient checkpointing, PEFT adapters on the blocks,
tied embeddings, DDP (apply before wrapping), the Trainer's gradient
accumulation, autocast and bf16 work as with the original forward. Under
DeepSpeed ZeRO-3 and FSDP2 (``fully_shard`` on the head) the loss runs as the
head module's forward for that call, so the engine gathers the head exactly
while the loss and its backward need it (see ``_through_sharded_head``).

Refused, with the reason: a family not in ``HEADS`` or a *ForCausalLM of
another class than the one its entry describes (its logits could be built
differently), an LM head that is not a plain ``nn.Linear`` (a PEFT adapter or
``modules_to_save`` wrapper on it would be skipped), a custom
``loss_function``, ``logits_to_keep`` with labels, ``return_dict=False`` with
labels (the tuple would lose its logits slot), an instance whose forward was
already replaced, applying twice.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import types

import torch
from torch import nn

from freezekern.model.parts import HEADS, ModelParts, discover, full_shape
from freezekern.model.peft import unwrap_peft
from freezekern.ops import linear_cross_entropy

logger = logging.getLogger("freezekern.cut.fused_loss")

_STATE_ATTR = "_freezekern_fused_loss"
_IGNORE_INDEX = -100


@dataclasses.dataclass
class _State:
    causal_lm: nn.Module
    backbone: nn.Module
    parts: ModelParts
    output_type: type
    signature: inspect.Signature
    impl: str
    softcap: float | None
    stats: dict = dataclasses.field(default_factory=lambda: {"fused": 0, "plain": 0})


class FusedLossHandle:
    """An applied fused loss. ``remove()`` restores the model's forward; also a context manager.

    Attributes: ``model`` (what was passed), ``causal_lm`` (the *ForCausalLM
    whose forward is replaced), ``parts``, ``active``; ``stats`` counts the
    forwards that took the fused loss and those that ran the original forward.
    """

    def __init__(self, model: nn.Module, state: _State):
        self.model = model
        self.causal_lm = state.causal_lm
        self.parts = state.parts
        self.active = True
        self._state = state

    @property
    def stats(self) -> dict:
        return dict(self._state.stats)

    def __repr__(self) -> str:
        status = "active" if self.active else "removed"
        return f"FusedLossHandle({type(self.causal_lm).__name__}, {status})"

    def __enter__(self) -> FusedLossHandle:
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.remove()

    def remove(self) -> None:
        """Restore the original forward. Raises when called twice or when the forward was replaced since."""
        if not self.active:
            raise RuntimeError("this FusedLossHandle was already removed; the model has its original forward")
        module = self.causal_lm
        current = module.__dict__.get("forward")
        if not (isinstance(current, types.MethodType) and getattr(current.__func__, "_freezekern_fused_loss", False)):
            raise RuntimeError(
                f"cannot restore {type(module).__name__}.forward: something replaced freezekern's fused-loss forward "
                f"after fused_loss() (found {current!r}); undo that wrapper first, then remove()"
            )
        del module.__dict__["forward"]
        del module.__dict__[_STATE_ATTR]
        self.active = False


def active_fused_loss(model: nn.Module) -> bool:
    """Whether a fused loss is applied to ``model`` (or to the *ForCausalLM a PeftModel wraps)."""
    base, _ = unwrap_peft(model)
    return _STATE_ATTR in base.__dict__


def fused_loss(model: nn.Module, *, parts: ModelParts | None = None, impl: str = "auto") -> FusedLossHandle:
    """Make ``model``'s loss come from the fused LM-head op whenever it is called with labels.

    ``model``: a Hugging Face *ForCausalLM of a family in
    ``freezekern.model.parts.HEADS``, or a PEFT PeftModel around one, not yet
    wrapped in DDP. ``parts``: its ``discover()`` result, when already known.
    ``impl``: the op's backend (see ``freezekern.ops.linear_cross_entropy``).
    Returns a handle whose ``remove()`` restores the model.
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, (DistributedDataParallel, DataParallel)):
        raise ValueError(
            f"fused_loss() got a {type(model).__name__}: apply it to the bare model before wrapping it "
            "(the wrapper calls the model's forward, which fused_loss replaces)"
        )
    from freezekern.ops import IMPLS

    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    base, _ = unwrap_peft(model)
    if _STATE_ATTR in base.__dict__:
        raise RuntimeError(f"a fused loss is already applied to this {type(base).__name__}; remove its handle first")
    parts = parts or discover(base)
    spec = HEADS.get(parts.model_type)
    if spec is None:
        raise ValueError(
            f"fused_loss does not know how {type(base).__name__} (model_type {parts.model_type!r}) builds its logits, "
            f"so it cannot reproduce its loss exactly; the families it knows: {', '.join(sorted(HEADS))}. "
            "Train this model without fused_loss"
        )
    if type(base).__name__ != spec.causal_lm:
        raise ValueError(
            f"fused_loss reproduces {spec.causal_lm}'s forward for model_type {parts.model_type!r}, but the model "
            f"is a {type(base).__name__}; load it with AutoModelForCausalLM or train it without fused_loss"
        )
    head = parts.lm_head
    if type(head) is not nn.Linear:
        raise ValueError(
            f"the LM head '{parts.lm_head_path}' is a {type(head).__module__}.{type(head).__name__}, not a plain "
            "nn.Linear (a PEFT adapter or modules_to_save wrapper on it?); the fused loss reads its weight and bias "
            "directly and would skip the wrapper. Leave lm_head out of the adapter's target_modules and "
            "modules_to_save, or train without fused_loss"
        )
    _check_loss_function(base)
    backbone = getattr(base, spec.backbone, None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"{type(base).__name__} has no decoder backbone at '{spec.backbone}'")
    if "forward" in base.__dict__:
        raise RuntimeError(
            f"{type(base).__name__}.forward was already replaced on this instance ({base.__dict__['forward']!r}); "
            "apply fused_loss before the tool that wraps it (accelerate's prepare, torch.compile)"
        )
    import transformers.modeling_outputs as outputs

    softcap, scale = _head_settings(base, parts)
    if scale != parts.logit_scale:
        raise ValueError(f"parts.logit_scale is {parts.logit_scale} but {type(base).__name__} scales its logits by "
                         f"{scale}: pass parts from discover() on this model")
    state = _State(causal_lm=base, backbone=backbone, parts=parts, output_type=getattr(outputs, spec.output),
                   signature=inspect.signature(type(base).forward), impl=impl, softcap=softcap)
    base.__dict__[_STATE_ATTR] = state
    base.forward = types.MethodType(_with_signature(type(base).forward), base)
    vocab, dim = full_shape(head.weight)
    logger.info("fused LM-head loss on %s (V=%d, D=%d, softcap=%s, logit scale=%s)", type(base).__name__,
                vocab, dim, softcap, parts.logit_scale)
    return FusedLossHandle(model, state)


def _with_signature(original):
    """A fresh function running _fused_forward with ``original``'s signature (generate and the Trainer inspect it)."""
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        return _fused_forward(self, *args, **kwargs)

    forward._freezekern_fused_loss = True
    return forward


def _check_loss_function(model: nn.Module) -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        raise ValueError(
            f"{type(model).__name__}'s loss_function is {getattr(model, 'loss_function', None)!r}, not Hugging Face's "
            "ForCausalLMLoss, which is what the fused loss computes; train without fused_loss"
        )


def _head_settings(model: nn.Module, parts: ModelParts) -> tuple[float | None, float | None]:
    """(softcap, logit scale) the model's forward applies now, read as discover() reads them."""
    spec = HEADS[parts.model_type]
    softcap = getattr(model.config, "final_logit_softcapping", None) if spec.softcap else None
    return (float(softcap) if softcap else None), (spec.logit_scale(model) if spec.logit_scale else None)


def _check_head_unchanged(model: nn.Module, state: _State) -> None:
    now = _head_settings(model, state.parts)
    if now != (state.softcap, state.parts.logit_scale):
        raise RuntimeError(
            f"{type(model).__name__}'s final-logit soft-capping / logit scale changed from "
            f"{(state.softcap, state.parts.logit_scale)} to {now} after fused_loss(); remove() the handle and apply "
            "it again"
        )


def _fused_forward(self, *args, **kwargs):
    """The per-instance forward: the original one without labels, the fused loss with them."""
    state: _State = self.__dict__[_STATE_ATTR]
    bound = state.signature.bind(self, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(state.signature.parameters)))  # self
    extra = {}
    for name, param in state.signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            extra = dict(arguments.pop(name, {}))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and arguments.pop(name, ()):
            raise TypeError(f"{type(self).__name__}.forward got extra positional arguments")
    labels = arguments.pop("labels", None)
    if labels is None or not self.training:  # evaluation keeps its logits (metrics, predictions), as Liger-Kernel
        state.stats["plain"] += 1
        return type(self).forward(self, *args, **kwargs)
    _check_loss_function(self)
    _check_head_unchanged(self, state)
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError("fused_loss computes the loss over every position: pass logits_to_keep=0 with labels")
    return_dict = extra.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    if return_dict is False:
        raise ValueError(
            "fused_loss returns a ModelOutput whose logits are None; with return_dict=False its tuple would lose "
            "the logits slot. Call the model with return_dict=True (the default)"
        )
    outputs = state.backbone(**arguments, **extra)
    hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state

    def loss_of(h):
        return causal_lm_loss(h, labels, state.parts, softcap=state.softcap, shift_labels=extra.get("shift_labels"),
                              ignore_index=extra.get("ignore_index", _IGNORE_INDEX),
                              num_items_in_batch=extra.get("num_items_in_batch"), impl=state.impl)

    loss = _through_sharded_head(state.parts.lm_head, hidden, loss_of)
    state.stats["fused"] += 1
    fields = {}
    for f in dataclasses.fields(state.output_type):
        if f.name not in ("loss", "logits"):
            value = outputs[f.name] if isinstance(outputs, dict) and f.name in outputs else None
            fields[f.name] = value
    return state.output_type(loss=loss, logits=None, **fields)


def _through_sharded_head(head: nn.Module, hidden: torch.Tensor, loss_of):
    """``loss_of(hidden)``, run as the LM head module's forward when an engine holds the head sharded.

    DeepSpeed ZeRO-3 (partitioned parameters) and FSDP2 (``fully_shard`` on the
    head) gather a module's parameters in its forward hooks and again for its
    backward: calling the head module, with its forward standing in for the
    fused loss for this one call, makes them gather the head exactly while the
    loss and its gradients need it. An unsharded head is read directly.
    """
    params = list(head.parameters(recurse=False))
    zero3 = any(hasattr(p, "ds_id") for p in params)
    fsdp2 = type(head).__name__.startswith("FSDP") and hasattr(head, "unshard")
    if not zero3 and not fsdp2:
        if any(callable(getattr(p, "full_tensor", None)) for p in params):
            raise RuntimeError(
                "fused_loss: the LM head weight is a sharded DTensor outside any FSDP2 unit that gathers it "
                "(FSDP2 with the head sharded by a parent unit that is not unsharded now); fully_shard the head "
                "with the root or on its own (fully_shard(model.lm_head)), or train without fused_loss"
            )
        return loss_of(hidden)
    had_own = "forward" in head.__dict__
    previous = head.__dict__.get("forward")
    head.forward = loss_of
    try:
        return head(hidden)
    finally:
        if had_own:
            head.forward = previous
        else:
            del head.__dict__["forward"]


def causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, parts: ModelParts, *, softcap: float | None = None,
                   shift_labels=None, ignore_index: int = _IGNORE_INDEX, num_items_in_batch=None,
                   impl: str = "auto") -> torch.Tensor:
    """Hugging Face's ForCausalLMLoss of ``lm_head(hidden)``, fused: hidden [B, T, D], labels [B, T] -> fp32 scalar.

    The logits are those of ``parts``: the LM head's weight and bias and its
    logit scale, then ``softcap`` (the family's final-logit soft-capping, when
    its forward applies one); under autocast the head's operands take the
    autocast dtype, as the nn.Linear would.
    """
    head = parts.lm_head
    weight, bias = head.weight, head.bias
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1]).to(weight.device)
    target = shift_labels.reshape(-1).to(weight.device)
    if target.shape[0] != h.shape[0]:
        raise ValueError(f"labels give {target.shape[0]} targets for {h.shape[0]} positions of the hidden state")
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        h, weight = h.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if parts.logit_scale is not None:
        h = h.float() * parts.logit_scale
        bias = None if bias is None else bias.float() * parts.logit_scale
    return linear_cross_entropy(h, weight, target, bias=bias, ignore_index=ignore_index, reduction="mean",
                                softcap=softcap, num_items=num_items_in_batch, impl=impl)


__all__ = ["FusedLossHandle", "active_fused_loss", "causal_lm_loss", "fused_loss"]
