"""Small pieces every training loop here shares: held-out loss, checkpointing switches, seeding, batches.

``finetune``, ``compare``, ``profile`` and the benchmarks use these, so each
exists once.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch

from freezekern.model.data import IGNORE_INDEX
from freezekern.model.peft import unwrap_peft

BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict, device) -> dict:
    """The model inputs of ``batch`` ([B, T] LongTensors) on ``device``."""
    return {k: v.to(device) for k, v in batch.items() if k in BATCH_KEYS}


def counted_tokens(batch: dict) -> int:
    """Tokens that carry a target after the causal shift (labels != -100 from position 1 on)."""
    labels = batch.get("labels", batch["input_ids"])
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def evaluate(model, batches) -> float:
    """Token-weighted mean next-token loss over ``batches`` (no gradients, eval mode, mode restored)."""
    device = device_of(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                batch = to_device(batch, device)
                if "labels" not in batch:
                    batch["labels"] = batch["input_ids"]
                n = counted_tokens(batch)
                if n == 0:
                    continue
                total += float(model(**batch, use_cache=False).loss) * n
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the held-out batches hold no counted token")
    return total / count


def enable_checkpointing(model, use_reentrant: bool | None = None) -> None:
    """Hugging Face activation checkpointing as the Trainer and PEFT switch it on (input grads included).

    ``use_reentrant``: None keeps transformers' default (non-reentrant).
    """
    target = unwrap_peft(model)[0]
    kwargs = None if use_reentrant is None else {"use_reentrant": use_reentrant}
    if hasattr(target, "activation_checkpointing_enable"):
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(target, "gradient_checkpointing_enable"):
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(target).__name__} does not support activation checkpointing")
    # transformers may have installed it already; a second one would replace the handle and leak the first hook
    if hasattr(model, "enable_input_require_grads") and getattr(target, "_require_grads_hook", None) is None:
        model.enable_input_require_grads()


def disable_checkpointing(model) -> None:
    target = unwrap_peft(model)[0]
    if hasattr(target, "activation_checkpointing_disable"):
        target.activation_checkpointing_disable()
    elif hasattr(target, "gradient_checkpointing_disable"):
        target.gradient_checkpointing_disable()
    if hasattr(target, "disable_input_require_grads"):
        try:
            target.disable_input_require_grads()
        except AttributeError:
            pass


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): LoRA initialisation and data order follow it."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_kind(block) -> str | None:
    """How ``block`` is set up to be checkpointed: "reentrant", "non-reentrant" or None (not at all).

    Reads torch.distributed's ``CheckpointWrapper`` (``checkpoint_impl``) and
    Hugging Face's ``gradient_checkpointing`` flag with its checkpoint function;
    a function whose ``use_reentrant`` is not known counts as reentrant, as
    ``torch.utils.checkpoint.checkpoint`` defaults to it (the safe reading for
    the cut: its input then requires grad).
    """
    impl = getattr(block, "checkpoint_impl", None)
    if impl is not None:
        return "reentrant" if getattr(impl, "name", "") == "REENTRANT" else "non-reentrant"
    if not getattr(block, "gradient_checkpointing", False):
        return None
    func = getattr(block, "_gradient_checkpointing_func", None)
    keywords: dict = {}
    while isinstance(func, functools.partial):
        for key, value in func.keywords.items():
            keywords.setdefault(key, value)
        func = func.func
    return "non-reentrant" if keywords.get("use_reentrant", True) is False else "reentrant"
