"""PEFT: put LoRA adapters above the freeze boundary only.

Adapters inside the frozen prefix would be dead weight (their gradients
never arrive), and ``freezekern.truncate.apply`` refuses them by default. Build
the adapter config from the plan instead:

    from peft import get_peft_model
    from freezekern.integrations.peft import lora_config_for_plan

    model = get_peft_model(model, lora_config_for_plan(plan, model=model, r=16, target_modules=[...]))
    handle = freezekern.truncate.apply(model, plan)   # after get_peft_model, before DDP/optimizer
"""

from __future__ import annotations

from freezekern.policy import FreezePlan


def layers_to_transform(plan_or_k, num_layers: int | None = None) -> list[int]:
    """0-based indices of the trained blocks (k..L-1): PEFT's ``layers_to_transform``.

    ``plan_or_k``: a FreezePlan, or an int k together with ``num_layers``.
    """
    if isinstance(plan_or_k, FreezePlan):
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


def block_linear_names(model) -> list[str]:
    """Names (last attribute) of the linear layers inside a decoder block: LoRA targets for every linear.

    ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's linear layers) both count; PEFT adapts either.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from freezekern.adapters import discover

    block = discover(model).blocks[0]
    names = {name.rsplit(".", 1)[-1] for name, module in block.named_modules()
             if isinstance(module, (nn.Linear, Conv1D))}
    if not names:
        raise ValueError(f"{type(block).__name__} holds no linear layer to put LoRA adapters on")
    return sorted(names)


def _layers_pattern(model) -> str | None:
    from freezekern.adapters import discover

    parts = discover(model)
    return parts.blocks_path.rsplit(".", 1)[-1]


def lora_config_for_plan(plan: FreezePlan, *, model=None, layers_pattern: str | None = None, **lora_kwargs):
    """A ``peft.LoraConfig`` whose adapters live only in blocks k+1..L of ``plan``.

    ``lora_kwargs`` go to LoraConfig (r, lora_alpha, target_modules, lora_dropout, ...);
    ``task_type`` defaults to CAUSAL_LM. ``layers_pattern`` (the name of the
    block list, e.g. "layers" or "h") is read from ``model`` when given;
    otherwise PEFT matches its common patterns.
    """
    try:
        from peft import LoraConfig
    except ImportError as exc:  # pragma: no cover - peft is a test dependency
        raise ImportError("lora_config_for_plan needs peft: pip install 'freezekern[peft]'") from exc
    if "layers_to_transform" in lora_kwargs:
        raise ValueError("layers_to_transform comes from the plan; do not pass it")
    if layers_pattern is None and model is not None:
        layers_pattern = _layers_pattern(model)
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    if layers_pattern is not None:
        lora_kwargs["layers_pattern"] = layers_pattern
    return LoraConfig(layers_to_transform=layers_to_transform(plan), **lora_kwargs)
