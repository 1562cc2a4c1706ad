"""Integrations with training stacks: Hugging Face Trainer, PEFT, torch.distributed.

``from freezekern.integrations import FreezeKernCallback`` imports the Trainer
callback lazily (transformers is only imported when it is used).
"""

from __future__ import annotations

__all__ = ["BackwardProfileCallback", "FreezeKernCallback", "agree_on_boundary", "export_plan", "layers_to_transform",
           "lora_config_for_plan", "merge_traces", "to_peft_config"]

_LAZY = {
    "BackwardProfileCallback": "freezekern.integrations.profile_callback",
    "export_plan": "freezekern.integrations.export",
    "to_peft_config": "freezekern.integrations.export",
    "FreezeKernCallback": "freezekern.integrations.hf_trainer",
    "agree_on_boundary": "freezekern.integrations.distributed",
    "merge_traces": "freezekern.integrations.distributed",
    "layers_to_transform": "freezekern.integrations.peft",
    "lora_config_for_plan": "freezekern.integrations.peft",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'freezekern.integrations' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
