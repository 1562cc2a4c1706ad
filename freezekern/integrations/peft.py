"""PEFT: LoRA adapters above the freeze boundary only (the public face of ``freezekern.policy.lora``).

    from peft import get_peft_model
    from freezekern.integrations.peft import lora_config_for_plan

    model = get_peft_model(model, lora_config_for_plan(plan, model=model, r=16, target_modules=[...]))
    handle = freezekern.apply(model, plan)   # after get_peft_model, before DDP/optimizer
"""

from freezekern.model.peft import block_linear_names
from freezekern.policy.lora import DEFAULT_LORA, layers_to_transform, lora_config, lora_config_for_plan

__all__ = ["DEFAULT_LORA", "block_linear_names", "layers_to_transform", "lora_config", "lora_config_for_plan"]
