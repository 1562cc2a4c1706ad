"""What a training setup trains (read from the model), and the setups the command line builds by hand."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from freezekern.cut import apply
from freezekern.model.parts import ModelParts, discover
from freezekern.model.peft import has_adapters
from freezekern.model.training import checkpoint_kind
from freezekern.profiler.part_costs import trainable_of
from freezekern.profiler.step_timing import (
    input_embedding,
)

# -- what a setup trains ------------------------------------------------------------------------

@dataclass
class SetupFacts:
    """What a model's current setup trains and switches on (read from its flags and modules)."""

    num_layers: int
    embedding_trains: bool
    blocks_trained: list[int]  # 1-based
    final_norm_trains: bool
    head_trains: bool
    tied: bool
    checkpointing: str | None  # None | "reentrant" | "non-reentrant"
    input_grads_forced: bool  # enable_input_require_grads' hook on the embedding
    lora: bool
    trainable_params: int

    @property
    def lowest_trainable(self) -> int | None:
        """0: the embedding; 1..L: that block; L + 1: only the norm or head train; None: nothing trains."""
        if self.embedding_trains:
            return 0
        if self.blocks_trained:
            return self.blocks_trained[0]
        if self.final_norm_trains or self.head_trains:
            return self.num_layers + 1
        return None

    @property
    def frozen_prefix(self) -> int:
        """k: the number of leading blocks with nothing to train (the cut's boundary for this setup)."""
        return self.blocks_trained[0] - 1 if self.blocks_trained else self.num_layers




def describe_setup(model: nn.Module, parts: ModelParts | None = None) -> SetupFacts:
    """Read what ``model`` trains now: embeddings, blocks, norm, head, checkpointing, adapters."""
    parts = parts or discover(model)
    embedding = input_embedding(model)
    forced = embedding is not None and any(
        getattr(hook, "__name__", "") == "make_inputs_require_grads" for hook in embedding._forward_hooks.values())
    lora = has_adapters(model)
    return SetupFacts(
        num_layers=parts.num_layers,
        embedding_trains=embedding is not None and bool(trainable_of(embedding)),
        blocks_trained=[i + 1 for i, b in enumerate(parts.blocks) if trainable_of(b)],
        final_norm_trains=parts.final_norm is not None and bool(trainable_of(parts.final_norm)),
        head_trains=bool(trainable_of(parts.lm_head)),
        tied=parts.tied,
        checkpointing=checkpoint_kind(parts.blocks[0]),
        input_grads_forced=forced,
        lora=lora,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )


# -- reports ------------------------------------------------------------------------------------


# -- the setups users build by hand (for the command line) ----------------------------------------

def prepare_setup(model: nn.Module, *, boundary: int | None = None, plan=None, lora: bool = False, lora_r: int = 16,
                  gradient_checkpointing: bool = False, reentrant: bool = False,
                  parts: ModelParts | None = None) -> nn.Module:
    """Set ``model`` up the way users do without freezekern; returns the model to train (a PeftModel with LoRA).

    ``boundary`` k or ``plan``: plain ``requires_grad_(False)`` on what the
    plan (or freezekern.apply(model, k)) would freeze, without any cut;
    ``lora``: PEFT LoRA (rank ``lora_r``, every linear of the block) on the
    blocks above k, which freezes every base weight; ``gradient_checkpointing``:
    Hugging Face activation checkpointing with ``enable_input_require_grads``,
    as the Trainer and PEFT switch it on (``reentrant`` picks the reentrant
    implementation; the default is transformers' non-reentrant one).
    """
    from freezekern.cut import trainable_parameters
    from freezekern.model.training import enable_checkpointing

    parts = parts or discover(model)
    k = 0
    if plan is not None or boundary is not None:
        handle = apply(model, plan if plan is not None else int(boundary), parts=parts)
        trainable = {id(p) for p in trainable_parameters(model)}
        k = handle.boundary
        handle.remove()
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
    if lora:
        from peft import get_peft_model

        from freezekern.policy.lora import lora_config

        model = get_peft_model(model, lora_config(k, model, r=lora_r, lora_alpha=2 * lora_r))
    if gradient_checkpointing:
        enable_checkpointing(model, use_reentrant=True if reentrant else None)
    return model
