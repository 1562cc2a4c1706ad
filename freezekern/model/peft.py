"""PEFT-wrapped models: the base model, which parameters are adapters, the linear layers LoRA can target.

The one home of these questions; ``freezekern.cut`` (what to freeze, what may be
shared), the profiler and the trials ask them here. PEFT itself is optional:
without it no module is an adapter layer.
"""

from __future__ import annotations

from torch import nn


def unwrap_peft(model: nn.Module) -> tuple[nn.Module, bool]:
    """The model a PEFT PeftModel wraps (its *ForCausalLM), and whether it was wrapped."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.startswith("peft"):
        return get_base(), True
    return model, False


def _tuner_layer_type():
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    return BaseTunerLayer


def adapter_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every PEFT adapter layer (LoRA, DoRA, ...) inside ``module``."""
    tuner = _tuner_layer_type()
    if tuner is None:
        return []
    return [(name, sub) for name, sub in module.named_modules() if isinstance(sub, tuner)]


def adapter_parameter_ids(model: nn.Module) -> dict[int, str]:
    """id -> name of the PEFT adapter parameters (LoRA A/B, magnitudes, ...) in ``model``."""
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[int, str] = {}
    for _, layer in adapter_layers(model):
        for attr in getattr(layer, "adapter_layer_names", ()):
            sub = getattr(layer, attr, None)
            if isinstance(sub, (nn.Module, nn.ParameterDict)):
                for p in sub.parameters():
                    found[id(p)] = names.get(id(p), attr)
    return found


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds any PEFT adapter layer."""
    return bool(adapter_layers(model))


def base_parameter_name(name: str) -> str:
    """A parameter's name as the model had it before PEFT wrapped its layer (``.base_layer.`` dropped)."""
    return name.replace(".base_layer.", ".")


def block_linear_names(model) -> list[str]:
    """Names (last attribute) of the linear layers inside a decoder block: LoRA targets for every linear.

    ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's linear layers) both count; PEFT adapts either.
    """
    from transformers.pytorch_utils import Conv1D

    from freezekern.model.parts import discover

    block = discover(model).blocks[0]
    names = {name.rsplit(".", 1)[-1] for name, module in block.named_modules()
             if isinstance(module, (nn.Linear, Conv1D))}
    if not names:
        raise ValueError(f"{type(block).__name__} holds no linear layer to put LoRA adapters on")
    return sorted(names)
