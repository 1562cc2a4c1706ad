"""LoRA placement: adapters in the plan's trained blocks only, and the one set of LoRA defaults.

Adapters inside the frozen prefix would be dead weight (their gradients
never arrive), and ``freezekern.apply`` refuses them by default. Build the
adapter config from the plan instead:

    from peft import get_peft_model
    model = get_peft_model(model, plan.to_peft_config(model=model, r=16, target_modules=[...]))
    handle = freezekern.apply(model, plan)   # after get_peft_model, before DDP/optimizer

``lora_config(k, model)`` is what ``finetune --lora``, ``compare --lora`` and
``profile --lora`` build: ``DEFAULT_LORA`` on every linear layer of blocks
k+1..L.
"""

from __future__ import annotations

from freezekern.model.parts import discover
from freezekern.model.peft import block_linear_names

DEFAULT_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}


def layers_to_transform(plan_or_k, num_layers: int | None = None) -> list[int]:
    """0-based indices of the trained blocks (k..L-1): PEFT's ``layers_to_transform``.

    ``plan_or_k``: a FreezePlan (anything with ``boundary`` and ``num_layers``), or an int k together with
    ``num_layers``.
    """
    if hasattr(plan_or_k, "boundary") and hasattr(plan_or_k, "num_layers"):
        k, total = plan_or_k.boundary, plan_or_k.num_layers
        if num_layers is not None and num_layers != total:
            raise ValueError(f"the plan has {total} blocks, num_layers={num_layers} was given")
    else:
        if isinstance(plan_or_k, bool) or not isinstance(plan_or_k, int):
            raise TypeError(f"plan_or_k must be a FreezePlan or an int, got {type(plan_or_k).__name__}")
        if num_layers is None:
            raise ValueError("with an int boundary, pass num_layers (the model's number of blocks)")
        k, total = plan_or_k, num_layers
    if not 0 <= k <= total:
        raise ValueError(f"boundary k={k} is outside [0, {total}]")
    if k == total:
        raise ValueError(f"the boundary freezes all {total} blocks: there is no block left for LoRA adapters")
    return list(range(k, total))


def _peft_lora_config():
    try:
        from peft import LoraConfig
    except ImportError as exc:  # pragma: no cover - peft is a test dependency
        raise ImportError("LoRA needs peft: pip install 'freezekern[peft]'") from exc
    return LoraConfig


def lora_config_for_plan(plan, *, model=None, layers_pattern: str | None = None, **lora_kwargs):
    """A ``peft.LoraConfig`` whose adapters live only in blocks k+1..L of ``plan``.

    ``lora_kwargs`` go to LoraConfig (r, lora_alpha, target_modules, lora_dropout, ...);
    ``task_type`` defaults to CAUSAL_LM. ``layers_pattern`` (the name of the
    block list, e.g. "layers" or "h") is read from ``model`` when given;
    otherwise PEFT matches its common patterns. A full-fine-tuning plan
    (boundary 0, no cut) gives every block adapters.
    """
    LoraConfig = _peft_lora_config()
    if "layers_to_transform" in lora_kwargs:
        raise ValueError("layers_to_transform comes from the plan; do not pass it")
    if "layers_pattern" in lora_kwargs:
        raise ValueError("pass layers_pattern= as its own keyword, or a model to read it from")
    if model is not None:
        parts = discover(model)
        if parts.num_layers != plan.num_layers:
            raise ValueError(f"the plan has {plan.num_layers} blocks, the model {parts.num_layers}")
        if layers_pattern is None:
            layers_pattern = parts.blocks_path.rsplit(".", 1)[-1]
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    if layers_pattern is not None:
        lora_kwargs["layers_pattern"] = layers_pattern
    return LoraConfig(layers_to_transform=layers_to_transform(plan), **lora_kwargs)


def to_peft_config(plan, *, model=None, layers_pattern: str | None = None, **lora_kwargs):
    """``lora_config_for_plan`` under the name ``FreezePlan.to_peft_config`` and the export use."""
    return lora_config_for_plan(plan, model=model, layers_pattern=layers_pattern, **lora_kwargs)


def lora_config(boundary: int, model, **overrides):
    """``DEFAULT_LORA`` (updated with ``overrides``) on every linear layer of blocks k+1..L of ``model``."""
    LoraConfig = _peft_lora_config()
    parts = discover(model)
    kwargs = {**DEFAULT_LORA, "target_modules": block_linear_names(model), "task_type": "CAUSAL_LM", **overrides}
    return LoraConfig(layers_to_transform=layers_to_transform(boundary, parts.num_layers),
                      layers_pattern=parts.blocks_path.rsplit(".", 1)[-1], **kwargs)
