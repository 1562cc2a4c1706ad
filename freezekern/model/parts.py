"""Architecture discovery: where a causal LM keeps its blocks, final norm and head.

A registry maps a ``config.model_type`` to the dotted paths of its parts; an
unknown model falls back to a structural search (the largest ModuleList of
identical blocks, the norm beside it, ``get_output_embeddings()``). Users can
override any path. Nothing here patches a model: it only finds modules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class ArchitectureSpec:
    """Dotted paths of a family's parts, relative to the *ForCausalLM model."""

    layers: str
    final_norm: str | None
    lm_head: str
    gemma_norm: bool = False  # RMSNorm that multiplies by (1 + weight)


_LLAMA_LIKE = ArchitectureSpec(layers="model.layers", final_norm="model.norm", lm_head="lm_head")
_GEMMA_LIKE = ArchitectureSpec(layers="model.layers", final_norm="model.norm", lm_head="lm_head", gemma_norm=True)

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma": _GEMMA_LIKE,
    "gemma2": _GEMMA_LIKE,
    "gemma3_text": _GEMMA_LIKE,
    "gemma3": _GEMMA_LIKE,
    "gpt2": ArchitectureSpec(layers="transformer.h", final_norm="transformer.ln_f", lm_head="lm_head"),
    "gpt_neox": ArchitectureSpec(
        layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm", lm_head="lm_head"
    ),
    "opt": ArchitectureSpec(
        layers="model.decoder.layers", final_norm="model.decoder.final_layer_norm", lm_head="lm_head"
    ),
}


@dataclass(frozen=True)
class HeadSpec:
    """How a family's *ForCausalLM forward turns its decoder output into logits.

    ``logits = softcap(logit_scale * lm_head(backbone(...).last_hidden_state))``
    and then Hugging Face's ``ForCausalLMLoss``: checked against each family's
    forward (the fused loss's tests compare every family with Hugging Face).
    ``causal_lm`` is the class whose forward this describes, ``backbone`` the
    attribute holding the decoder (its forward takes the same arguments),
    ``logit_scale`` reads the factor logits are multiplied by (None: none),
    ``softcap`` whether the forward applies ``config.final_logit_softcapping``,
    ``output`` the ModelOutput class the forward returns.
    """

    causal_lm: str
    backbone: str
    logit_scale: Callable[[nn.Module], float] | None = None
    softcap: bool = False
    output: str = "CausalLMOutputWithPast"


def _llama_like_head(name: str) -> HeadSpec:
    return HeadSpec(causal_lm=name, backbone="model")


HEADS: dict[str, HeadSpec] = {
    "llama": _llama_like_head("LlamaForCausalLM"),
    "mistral": _llama_like_head("MistralForCausalLM"),
    "qwen2": _llama_like_head("Qwen2ForCausalLM"),
    "qwen3": _llama_like_head("Qwen3ForCausalLM"),
    "phi3": _llama_like_head("Phi3ForCausalLM"),
    "gemma": _llama_like_head("GemmaForCausalLM"),
    "gemma2": HeadSpec(causal_lm="Gemma2ForCausalLM", backbone="model", softcap=True),
    "gemma3_text": HeadSpec(causal_lm="Gemma3ForCausalLM", backbone="model", softcap=True),
    "opt": _llama_like_head("OPTForCausalLM"),
    "gpt2": HeadSpec(causal_lm="GPT2LMHeadModel", backbone="transformer", output="CausalLMOutputWithCrossAttentions"),
    "gpt_neox": HeadSpec(causal_lm="GPTNeoXForCausalLM", backbone="gpt_neox"),
    "cohere": HeadSpec(causal_lm="CohereForCausalLM", backbone="model", logit_scale=lambda m: float(m.logit_scale)),
    "granite": HeadSpec(causal_lm="GraniteForCausalLM", backbone="model",
                        logit_scale=lambda m: 1.0 / float(m.config.logits_scaling)),
}


@dataclass
class ModelParts:
    """The pieces of a causal LM that freezekern reads and cuts.

    ``blocks`` is the ordered list of L decoder blocks; h_0 is the input of
    ``blocks[0]`` and h_k the output of ``blocks[k-1]``. Everything that is not
    a block, the final norm or the head (token and position embeddings,
    rotary tables) belongs to the frozen-always "embedding" side.
    """

    model: nn.Module
    model_type: str
    blocks: nn.ModuleList
    blocks_path: str
    final_norm: nn.Module | None
    final_norm_path: str | None
    norm_kind: str | None
    lm_head: nn.Module
    lm_head_path: str
    tied: bool
    gemma_norm: bool = False
    logit_softcap: float | None = None
    notes: list[str] = field(default_factory=list)
    logit_scale: float | None = None  # logits = logit_scale * lm_head(h) before the softcap (Cohere, Granite)
    head_spec: HeadSpec | None = None  # how the forward builds its logits, for the families in HEADS

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def head_weight(self) -> torch.Tensor:
        """LM head weight U, [V, D]."""
        return self.lm_head.weight

    @property
    def head_bias(self) -> torch.Tensor | None:
        return getattr(self.lm_head, "bias", None)

    def norm_kwargs(self) -> dict:
        """Keyword arguments describing n(.) for the deviation ops (detached tensors)."""
        if self.final_norm is None:
            return {"norm": None, "norm_weight": None, "norm_bias": None, "norm_eps": 1e-6}
        weight = getattr(self.final_norm, "weight", None)
        bias = getattr(self.final_norm, "bias", None)
        if weight is not None:
            weight = weight.detach()
            if self.gemma_norm:
                weight = 1.0 + weight.float()
        return {
            "norm": self.norm_kind,
            "norm_weight": weight,
            "norm_bias": bias.detach() if bias is not None else None,
            "norm_eps": _norm_eps(self.final_norm),
        }

    def parameter_counts(self) -> dict:
        """Parameter counts per part (shared tensors counted once)."""
        seen: set[int] = set()

        def count(module: nn.Module | None) -> int:
            total = 0
            if module is None:
                return 0
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += full_numel(p)
            return total

        embed = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        embed_params = count(embed)
        block_params = [count(b) for b in self.blocks]
        norm_params = count(self.final_norm)
        head_params = count(self.lm_head)  # 0 when tied to the input embedding
        embed_params += count(self.model)  # whatever remains: position tables and the like
        head_trainable = sum(full_numel(p) for p in self.lm_head.parameters())
        return {
            "lm_head_trainable": head_trainable,
            "blocks": block_params,
            "final_norm": norm_params,
            "lm_head": head_params,
            "embeddings": embed_params,
            "total": sum(block_params) + norm_params + head_params + embed_params,
        }

    def summary(self, model_id: str | None = None) -> dict:
        """Plain description for the policy: num_layers, parameter_counts, fingerprint, tied, model_id."""
        config = getattr(self.model, "config", None)
        name = model_id or getattr(config, "_name_or_path", "") or type(self.model).__name__
        return {
            "num_layers": self.num_layers,
            "parameter_counts": self.parameter_counts(),
            "fingerprint": self.fingerprint(),
            "tied": self.tied,
            "model_id": str(name),
        }

    def fingerprint(self) -> str:
        """Stable id of the architecture's shape (type, L, D, V, parameter names and shapes)."""
        digest = hashlib.sha256()
        digest.update(f"{self.model_type}|{self.num_layers}|".encode())
        for name, p in self.model.named_parameters():
            digest.update(f"{name}:{tuple(full_shape(p))};".encode())
        return digest.hexdigest()[:16]


def full_shape(p: torch.Tensor) -> torch.Size:
    """The shape of ``p`` as the model defines it (a DeepSpeed ZeRO-3 partitioned parameter keeps it in
    ``ds_shape``; an FSDP2 DTensor reports its global shape itself)."""
    return getattr(p, "ds_shape", None) or p.shape


def full_numel(p: torch.Tensor) -> int:
    """The element count of ``p`` as the model defines it (``ds_numel`` under ZeRO-3)."""
    return int(getattr(p, "ds_numel", None) or p.numel())


def _norm_eps(module: nn.Module) -> float:
    for attr in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 1e-6


def _norm_kind(module: nn.Module | None) -> str | None:
    if module is None:
        return None
    if isinstance(module, nn.LayerNorm) or "LayerNorm" in type(module).__name__:
        return "layer"
    if "RMSNorm" in type(module).__name__ or isinstance(module, getattr(nn, "RMSNorm", ())):
        return "rms"
    raise ValueError(
        f"final norm {type(module).__name__} is neither an RMSNorm nor a LayerNorm; "
        "pass final_norm=None to read latent spaces without it, or a path to a supported norm"
    )


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise ValueError(f"no module at '{path}' in {type(model).__name__}: {exc}") from None


def _largest_block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    return best


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__ or isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm)))


def _norm_after(model: nn.Module, blocks_path: str) -> str | None:
    """The final norm: the first norm module that runs after the last block (None if none does).

    Found by a forward probe on two tokens (hooks record the call order), so
    neither registration order (OPT registers ``final_layer_norm`` before its
    layers) nor a norm before the blocks (BLOOM's ``word_embeddings_layernorm``)
    can mislead it. If the probe cannot run, the first norm registered after
    the block list beside it.
    """
    blocks = model.get_submodule(blocks_path)
    norms = {id(m): name for name, m in model.named_modules() if _is_norm(m) and not name.startswith(blocks_path + ".")}
    order: list[str] = []
    done = {"blocks": False}

    def after_block(module, args, output):
        done["blocks"] = True

    def after_norm(module, args, output):
        if done["blocks"]:
            order.append(norms[id(module)])

    handles = [blocks[-1].register_forward_hook(after_block)]
    handles += [m.register_forward_hook(after_norm) for m in model.modules() if id(m) in norms]
    was_training = model.training
    try:
        device = next(model.parameters()).device
        model.eval()
        with torch.no_grad():
            model(input_ids=torch.ones(1, 2, dtype=torch.long, device=device))
        if done["blocks"]:
            return order[0] if order else None
    except Exception:  # noqa: BLE001 - any failure falls back to registration order
        pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    parent_path, _, blocks_name = blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    seen_blocks = False
    for name, child in parent.named_children():
        if name == blocks_name:
            seen_blocks = True
        elif seen_blocks and _is_norm(child):
            return f"{parent_path}.{name}" if parent_path else name
    return None


def _module_path(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError("module not found in model")


_UNSET = object()


def discover(
    model: nn.Module,
    *,
    layers: str | None = None,
    final_norm: str | None | object = _UNSET,
    lm_head: str | None = None,
) -> ModelParts:
    """Find blocks, final norm and LM head of ``model``.

    Overrides are dotted paths relative to ``model`` (e.g. ``layers="transformer.h"``);
    ``final_norm=None`` reads latent spaces without a norm.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} (model_type={model_type!r}) is an encoder-decoder model; freezekern traces and "
            "cuts decoder-only causal LMs (AutoModelForCausalLM) and does not support encoder-decoder models yet"
        )
    spec = ARCHITECTURES.get(model_type)
    notes: list[str] = []

    if spec is not None and not _has_path(model, spec.layers):
        spec = None  # e.g. a base model without the *ForCausalLM wrapper
    blocks_path = layers or (spec.layers if spec else None)
    if blocks_path is None:
        found = _largest_block_list(model)
        if found is None:
            raise ValueError(
                f"no decoder block list found on {type(model).__name__} (model_type={model_type!r}); "
                "pass layers='path.to.blocks' (e.g. layers='transformer.h')"
            )
        blocks_path = found[0]
        notes.append(f"blocks found structurally at '{blocks_path}'")
    blocks = get_submodule(model, blocks_path)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"'{blocks_path}' on {type(model).__name__} is not a non-empty ModuleList of blocks")

    if lm_head is None and spec is not None and _has_path(model, spec.lm_head):
        lm_head = spec.lm_head
    if lm_head is None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise ValueError(
                f"{type(model).__name__} has no LM head (get_output_embeddings() is None); "
                "freezekern needs a causal LM: load it with AutoModelForCausalLM, or pass lm_head='path'"
            )
        lm_head = _module_path(model, head)
    head_module = get_submodule(model, lm_head)
    if not isinstance(getattr(head_module, "weight", None), torch.Tensor) or len(full_shape(head_module.weight)) != 2:
        raise ValueError(f"LM head '{lm_head}' has no [V, D] weight")

    if final_norm is _UNSET:
        final_norm = spec.final_norm if spec is not None else _norm_after(model, blocks_path)
        if final_norm is None:
            notes.append(f"no norm follows '{blocks_path}': latent spaces are read without a final norm "
                         "(pass final_norm='path' if the model has one elsewhere)")
        elif spec is None:
            notes.append(f"final norm found structurally at '{final_norm}'")
    norm_module = get_submodule(model, final_norm) if final_norm else None
    if final_norm and norm_module is None:
        notes.append(f"'{final_norm}' is None on this model: latent spaces are read without a final norm")
        final_norm = None

    if model_type == "opt" and getattr(get_submodule(model, "model.decoder"), "project_out", None) is not None:
        raise ValueError(
            "this OPT variant projects hidden states (project_out) before the head; "
            "its latent spaces cannot be read by the LM head directly"
        )
    input_embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = input_embeddings is not None and input_embeddings.weight is head_module.weight
    softcap = getattr(config, "final_logit_softcapping", None) if config is not None else None
    if softcap:
        notes.append("final logit softcapping is not applied by the logit-lens metric")
    gemma_norm = spec.gemma_norm if spec is not None else "Gemma" in type(norm_module).__name__
    head_spec = HEADS.get(model_type)
    logit_scale = head_spec.logit_scale(model) if head_spec is not None and head_spec.logit_scale else None
    if logit_scale is not None:
        notes.append("logits are scaled by the model (logit_scale); the logit-lens metric does not apply it")
    return ModelParts(
        model=model,
        model_type=model_type,
        blocks=blocks,
        blocks_path=blocks_path,
        final_norm=norm_module,
        final_norm_path=final_norm,
        norm_kind=_norm_kind(norm_module),
        lm_head=head_module,
        lm_head_path=lm_head,
        tied=tied,
        gemma_norm=gemma_norm,
        logit_softcap=softcap,
        notes=notes,
        logit_scale=logit_scale,
        head_spec=head_spec,
    )


def _has_path(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def block_output_hidden(output) -> torch.Tensor:
    """The hidden state [B, T, D] in a block's return value (tensor or tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping) and "hidden_states" in output:
        return output["hidden_states"]
    raise TypeError(f"cannot find the hidden state in a block output of type {type(output).__name__}")


def block_hidden_input(args: tuple, kwargs: Mapping) -> tuple[torch.Tensor | None, bool]:
    """A block call's hidden-state input [B, T, D] and whether it came positionally.

    The hidden state is the first positional argument when that is a tensor,
    else ``hidden_states=``; ``(None, False)`` when the call has neither.
    """
    if args and isinstance(args[0], torch.Tensor):
        return args[0], True
    value = kwargs.get("hidden_states")
    return (value, False) if isinstance(value, torch.Tensor) else (None, False)


def with_block_hidden_input(args: tuple, kwargs: dict, hidden: torch.Tensor, positional: bool) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a block call with its hidden-state input replaced by ``hidden``."""
    if positional:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
