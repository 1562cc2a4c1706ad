"""A freeze plan in the formats the ecosystem reads: PEFT, axolotl, a TRL/transformers snippet, JSON.

    config = plan.to_peft_config(model=model, r=16, target_modules=["q_proj", "v_proj"])  # adapters above k
    text = export_plan(plan, "axolotl", model=model)                     # unfrozen_parameters YAML
    text = export_plan(plan, "trl", plan_path="plan.json")               # SFTTrainer + FreezeKernCallback

What trains is what ``freezekern.apply(model, plan)`` leaves trainable,
read on the model itself or, without one, on a weightless copy built on
the meta device from the model's ``config.json`` (``model_skeleton``). Each
format is checked against that set before it is returned:

* ``peft``: a ``LoraConfig`` whose ``layers_to_transform`` are the trained
  blocks k+1..L (0-based k..L-1) and whose ``layers_pattern`` is the name of
  the model's block list. LoRA trains adapters only: PEFT freezes every base
  weight, the final norm and the LM head included, so only the plan's blocks
  get adapters (add ``modules_to_save`` yourself to train the head or the
  norm as well; ``freezekern.apply`` does not accept a model wrapped that
  way). A full-fine-tuning plan (``cut=False``) puts adapters in every block.
* ``axolotl``: ``unfrozen_parameters`` regexes, axolotl's dialect (a pattern
  is matched at the start of a parameter name, every ``.`` is a literal dot,
  so none is escaped): one pattern for the trained blocks and one exact
  name for each other trained tensor (final norm, head; a tied head is
  named after the input embedding, as ``named_parameters()`` lists it). A
  full-fine-tuning plan sets none, which trains everything. Axolotl freezes
  with ``requires_grad`` only: under gradient checkpointing its backward
  still runs through the frozen blocks (the YAML says so).
* ``trl``: Python that builds TRL's ``SFTTrainer`` with
  ``FreezeKernCallback(plan=...)`` (the same for transformers' Trainer).
* ``json``: the plan itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from freezekern.model.parts import discover
from freezekern.policy.lora import to_peft_config
from freezekern.policy.rules import FreezePlan

FORMATS = ("peft", "axolotl", "trl", "json")


# -- the plan's model ---------------------------------------------------------------------------

def model_skeleton(model_dir=None, config=None) -> nn.Module:
    """A causal LM with the parameter names and shapes of ``model_dir`` (or ``config``), on the meta device.

    Nothing is allocated and no weight is read: only ``config.json``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if config is None:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def skeleton_for_plan(plan: FreezePlan, model_dir=None) -> nn.Module:
    """The meta-device model of ``model_dir``, of the plan's model id when that is a model folder, or of the
    built-in default model; refused when none of these is known (naming the fix)."""
    if model_dir is not None:
        return model_skeleton(model_dir)
    if plan.model_id and (Path(plan.model_id) / "config.json").is_file():
        return model_skeleton(plan.model_id)
    from freezekern.model.loading import DEFAULT_MODEL_NAME, SMOLLM2_135M_SHAPE, default_model_dir

    if plan.model_id == DEFAULT_MODEL_NAME:
        if (default_model_dir() / "config.json").is_file():
            return model_skeleton(default_model_dir())
        from transformers import LlamaConfig

        return model_skeleton(config=LlamaConfig(**SMOLLM2_135M_SHAPE))
    raise ValueError(f"the plan's model {plan.model_id!r} is not a local model folder: pass the model "
                     "(model=..., or --model DIR on the command line; its config.json is enough)")


def planned_trainable_names(plan: FreezePlan, model: nn.Module) -> list[str]:
    """Names (``named_parameters()`` order, each tensor once) of what ``freezekern.apply(model, plan)`` trains.

    The model's own flags are left as they were.
    """
    from freezekern.cut import apply, trainable_parameters

    before = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        handle = apply(model, plan)
        trained = {id(p) for p in trainable_parameters(model)}
        handle.remove()
    finally:
        for p, flag in zip(model.parameters(), before):
            p.requires_grad_(flag)
    return [name for name, p in model.named_parameters() if id(p) in trained]


# -- axolotl ----------------------------------------------------------------------------------

def axolotl_matches(pattern: str, name: str) -> bool:
    """Whether axolotl's ``unfrozen_parameters`` entry ``pattern`` unfreezes parameter ``name``.

    Axolotl makes every ``.`` not followed by ``+`` a literal dot and matches
    at the start of the name (``re.match``); a trailing ``[start:end]`` is
    an index range, which freezekern never writes.
    """
    return re.match(re.sub(r"\.(?!\+)", r"\\.", pattern), name) is not None


def _index_alternation(indices: list[int]) -> str:
    return "(" + "|".join(str(i) for i in indices) + ")"


def axolotl_patterns(plan: FreezePlan, model: nn.Module) -> list[str] | None:
    """The ``unfrozen_parameters`` list for ``plan`` on ``model`` (None: full fine-tuning, set nothing).

    Checked: exactly the planned parameters match, every other one does not.
    """
    if not plan.cut:
        return None
    names = [name for name, _ in model.named_parameters()]
    trained = planned_trainable_names(plan, model)
    parts = discover(model)
    prefix = parts.blocks_path + "."
    blocks = sorted({int(n[len(prefix):].split(".", 1)[0]) for n in trained if n.startswith(prefix)})
    patterns = []
    if blocks:
        patterns.append(f"^{parts.blocks_path}.{_index_alternation(blocks)}.")
    patterns += [f"^{n}$" for n in trained if not n.startswith(prefix)]
    unfrozen = [n for n in names if any(axolotl_matches(p, n) for p in patterns)]
    if unfrozen != trained:
        extra = sorted(set(unfrozen) - set(trained))
        missing = sorted(set(trained) - set(unfrozen))
        raise RuntimeError(f"axolotl patterns do not reproduce the plan (extra {extra[:3]}, missing {missing[:3]}): "
                           "the block list's parameters are not all trained; report this model")
    return patterns


def axolotl_yaml(plan: FreezePlan, model: nn.Module) -> str:
    """A YAML fragment to merge into an axolotl config (see the module docstring)."""
    import yaml

    patterns = axolotl_patterns(plan, model)
    header = [f"# freezekern plan [{plan.policy}] for {plan.model_id}: {_summary(plan)}"]
    if patterns is None:
        header.append("# full fine-tuning: axolotl trains every parameter when unfrozen_parameters is not set")
        return "\n".join(header) + "\n"
    header += [
        "# axolotl freezes with requires_grad only; under gradient_checkpointing its backward still runs",
        "# through the frozen blocks. For the truncated backward, train with freezekern.apply or its",
        "# Trainer callback (freezekern export --format trl).",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump({"unfrozen_parameters": patterns}, sort_keys=False,
                                                     default_flow_style=False)


# -- TRL / transformers -----------------------------------------------------------------------

def _summary(plan: FreezePlan) -> str:
    if not plan.cut:
        return "full fine-tuning (nothing frozen)"
    head = "trained" if plan.train_head else ("frozen (tied to the input embedding)" if plan.tied else "frozen")
    trained = f"blocks {plan.boundary + 1}..{plan.num_layers} trained" if plan.boundary < plan.num_layers \
        else "no block trained"
    return (f"embeddings and blocks 1..{plan.boundary} of {plan.num_layers} frozen, {trained}, final norm "
            f"{'trained' if plan.train_final_norm else 'frozen'}, LM head {head}")


def trl_snippet(plan: FreezePlan, plan_path: str = "plan.json") -> str:
    """Python that trains ``plan`` with TRL's SFTTrainer and freezekern's callback (transformers' Trainer alike).

    It expects ``model`` (the model the plan was made for), ``tokenizer``,
    ``train_dataset`` and ``training_args`` (an ``SFTConfig``) to exist.
    """
    stop = (f"cuts the backward at block {plan.boundary + 1}" if plan.cut and plan.boundary < plan.num_layers
            else "changes nothing for a full-fine-tuning plan" if not plan.cut else "cuts the backward at the head")
    return "\n".join([
        f"# freezekern plan [{plan.policy}] for {plan.model_id}:",
        f"#   {_summary(plan)}",
        "# Needs: model (the model the plan was made for), tokenizer, train_dataset, training_args (an SFTConfig).",
        "from trl import SFTTrainer",
        "",
        "from freezekern import FreezePlan",
        "from freezekern.integrations import FreezeKernCallback",
        "",
        f"plan = FreezePlan.load({plan_path!r})",
        "trainer = SFTTrainer(",
        "    model=model,",
        "    args=training_args,",
        "    train_dataset=train_dataset,",
        "    processing_class=tokenizer,",
        f"    callbacks=[FreezeKernCallback(plan=plan)],  # freezes as planned and {stop}",
        ")",
        "# trainer.train()",
        "#",
        "# transformers' Trainer takes the same callback: Trainer(model=model, args=TrainingArguments(...),",
        "#     train_dataset=train_dataset, callbacks=[FreezeKernCallback(plan=plan)]).",
        "# LoRA on the trained blocks only (PEFT needs a list of module names with layers_to_transform):",
        "#     from freezekern.model.peft import block_linear_names",
        "#     SFTTrainer(..., peft_config=plan.to_peft_config(model=model, r=16,",
        "#                target_modules=block_linear_names(model)), callbacks=[FreezeKernCallback(plan=plan)])",
        "",
    ])


# -- one entry point ----------------------------------------------------------------------------

def export_plan(plan: FreezePlan, fmt: str, *, model: nn.Module | None = None, model_dir=None,
                plan_path: str = "plan.json", **lora_kwargs) -> str:
    """``plan`` as text in format ``fmt`` (one of FORMATS); ``peft`` gives the LoraConfig's JSON."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "json":
        return plan.to_json(indent=2) + "\n"
    if fmt == "trl":
        return trl_snippet(plan, plan_path)
    if fmt == "axolotl":
        return axolotl_yaml(plan, model if model is not None else skeleton_for_plan(plan, model_dir))
    config = to_peft_config(plan, model=model if model is not None else peft_skeleton(plan, model_dir),
                            **lora_kwargs)
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=jsonable) + "\n"


def peft_skeleton(plan: FreezePlan, model_dir) -> nn.Module | None:
    """The model's skeleton for the block list's name; PEFT's common names serve when it is unknown."""
    if model_dir is not None:
        return model_skeleton(model_dir)
    try:
        return skeleton_for_plan(plan)
    except ValueError:
        return None


def jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)
