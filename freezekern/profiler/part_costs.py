"""Per-part seconds of one training step with each part timed alone, as ``freezekern.policy.cost.PartCosts``.

``measure_part_costs(model, batch)`` runs one graph-free forward to record
the inputs of the embedding, every block, the final norm and the LM head,
then times each part by itself (best of ``repeats``): its forward, the
backward that computes its input gradient and its own trainable
parameters' gradients, and the one for the parameters only; the loss's
forward and backward on the head's logits. ``benchmarks/bench_step.py``
prices its ideal column with these; ``freezekern.profile`` uses them for
parts its steps did not run.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch import nn

from freezekern.cut import active_handle
from freezekern.model.parts import ModelParts, block_hidden_input, discover, with_block_hidden_input
from freezekern.model.training import BATCH_KEYS, device_of
from freezekern.policy.cost import PartCosts
from freezekern.profiler.step_timing import Clock, input_embedding, output_tensor


def as_batch(batch, device) -> dict:
    """``batch`` (a [B, T] LongTensor or a dict) as model inputs on ``device``; labels default to the inputs."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    out = {k: v.to(device) for k, v in batch.items() if k in BATCH_KEYS and isinstance(v, torch.Tensor)}
    if "input_ids" not in out:
        raise ValueError("each batch needs input_ids (a [B, T] LongTensor, or a dict with input_ids)")
    out.setdefault("labels", out["input_ids"])
    return out


@contextmanager
def _uncheckpointed(block: nn.Module):
    """The block without activation checkpointing (for isolated timing), restored afterwards."""
    inner = getattr(block, "_checkpoint_wrapped_module", None)  # torch.distributed CheckpointWrapper
    if inner is not None:
        yield inner
        return
    if not getattr(block, "gradient_checkpointing", False):
        yield block
        return
    had_own = "gradient_checkpointing" in block.__dict__
    previous = block.__dict__.get("gradient_checkpointing")
    block.gradient_checkpointing = False
    try:
        yield block
    finally:
        if had_own:
            block.gradient_checkpointing = previous
        else:
            del block.__dict__["gradient_checkpointing"]


class _Captured:
    """The call arguments of one part with its hidden-state input taken out (to be filled in later)."""

    def __init__(self, args: tuple, kwargs: dict):
        self.hidden, self.in_args = block_hidden_input(args, kwargs)
        self.args, self.kwargs = args, kwargs

    def call(self, module: nn.Module, hidden: torch.Tensor):
        args, kwargs = with_block_hidden_input(self.args, self.kwargs, hidden, self.in_args)
        return module(*args, **kwargs)


def _capture(model: nn.Module, parts: ModelParts, batch: dict) -> dict:
    """One graph-free forward that records the inputs of the embedding, each block, the norm and the head."""
    captured: dict = {}
    hooks = []
    embedding = input_embedding(model)

    def keep(name, keep_hidden):
        def hook(module, args, kwargs):
            if name not in captured:
                entry = _Captured(args, kwargs)
                if not keep_hidden:
                    entry.hidden = None
                captured[name] = entry

        return hook

    try:
        if embedding is not None:
            hooks.append(embedding.register_forward_pre_hook(keep("embedding", True), with_kwargs=True))
        for i, block in enumerate(parts.blocks):
            hooks.append(block.register_forward_pre_hook(keep(i, i == 0), with_kwargs=True))
        if parts.final_norm is not None:
            hooks.append(parts.final_norm.register_forward_pre_hook(keep("norm", False), with_kwargs=True))
        hooks.append(parts.lm_head.register_forward_pre_hook(keep("head", False), with_kwargs=True))
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    missing = [i + 1 for i in range(parts.num_layers) if i not in captured]
    if missing or "head" not in captured or captured[0].hidden is None:
        raise RuntimeError(
            f"the forward of {type(model).__name__} did not call {'block(s) ' + str(missing) if missing else 'its LM head'}"
            " through their module call with the hidden state as input; per-part costs cannot be measured"
        )
    return captured


def _loss_function(model: nn.Module):
    hf_loss = getattr(model, "loss_function", None)

    def loss(logits, labels):
        if callable(hf_loss):
            return hf_loss(logits=logits, labels=labels, vocab_size=logits.shape[-1])
        shift = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        return nn.functional.cross_entropy(shift, labels[:, 1:].reshape(-1), ignore_index=-100)

    return loss


def trainable_of(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _grad_costs(clock: Clock, output: torch.Tensor, hidden: torch.Tensor | None, params: list) -> tuple[float, float]:
    """(backward with the input and the module's own parameter gradients, with the parameter gradients only)."""
    seed = torch.full_like(output, 1e-3)
    wanted = ([hidden] if hidden is not None else []) + params
    both = weights = 0.0
    if wanted:
        start = clock.now()
        torch.autograd.grad(output, wanted, seed, retain_graph=True, allow_unused=True)
        both = clock.now() - start
    if params:
        start = clock.now()
        torch.autograd.grad(output, params, seed, retain_graph=True, allow_unused=True)
        weights = clock.now() - start
    return both, weights


def measure_part_costs(model: nn.Module, batch: Mapping, *, parts: ModelParts | None = None,
                       repeats: int = 3) -> PartCosts:
    """Seconds per part of one step on ``batch``, each part timed alone (best of ``repeats``).

    For every block: its forward (the faster of with and without autograd),
    the backward that computes the gradient of its input and of its trainable
    parameters (``both``) and the one for its trainable parameters only
    (``weights``): ``block_weight_grad = weights`` and ``block_input_grad =
    both - weights`` (a block without trainable parameters: ``both``), so that
    ``freezekern.policy.cost.step_cost`` prices a frozen block the backward passes
    through, a trained one, and the lowest trained block under a cut each by
    its own measurement. The same for the LM head (on the final norm's
    output); the embedding's forward and, when it trains, its weight gradient;
    the loss's forward and backward. Gradients are taken with
    ``torch.autograd.grad`` (nothing is accumulated into ``.grad``), blocks run
    without activation checkpointing, and the parameters' flags are the
    model's own: a frozen part has no weight gradient to price.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    handle = active_handle(model)
    if handle is not None and handle.active and handle.cut:
        raise ValueError("a freeze plan is applied to this model: its frozen prefix runs graph-free and cannot be "
                         "priced; measure the part costs before freezekern.apply (or after handle.remove())")
    parts = parts or discover(model)
    device = device_of(model)
    clock = Clock(device)
    batch = as_batch(batch, device)
    captured = _capture(model, parts, batch)
    best = min

    embedding = input_embedding(model)
    embedding_forward = embedding_grad = 0.0
    if embedding is not None and "embedding" in captured:
        entry = captured["embedding"]
        args, kwargs = with_block_hidden_input(entry.args, entry.kwargs, entry.hidden, entry.in_args)
        times, grads = [], []
        params = trainable_of(embedding)
        for _ in range(repeats):
            start = clock.now()
            with torch.no_grad():
                embedding(*args, **kwargs)
            times.append(clock.now() - start)
            if params:
                out = embedding(*args, **kwargs)
                start = clock.now()
                torch.autograd.grad(out, params, torch.full_like(out, 1e-3), allow_unused=True)
                grads.append(clock.now() - start)
        embedding_forward = best(times)
        embedding_grad = best(grads) if grads else 0.0

    block_forward, block_input, block_weight = [], [], []
    hidden = captured[0].hidden.detach()
    for i, block in enumerate(parts.blocks):
        entry = captured[i]
        params = trainable_of(block)
        forwards, boths, weights = [], [], []
        with _uncheckpointed(block) as runnable:
            for _ in range(repeats):
                start = clock.now()
                with torch.no_grad():
                    entry.call(runnable, hidden)
                forwards.append(clock.now() - start)
                x = hidden.detach().requires_grad_(True)
                start = clock.now()
                out = output_tensor(entry.call(runnable, x))
                forwards.append(clock.now() - start)
                if out is None or out.grad_fn is None:
                    raise RuntimeError(f"block {i + 1} ({type(block).__name__}) built no autograd graph in isolation; "
                                       "its backward cannot be priced")
                both, weight = _grad_costs(clock, out, x, params)
                boths.append(both)
                weights.append(weight)
        block_forward.append(best(forwards))
        weight = best(weights) if params else 0.0
        block_weight.append(weight)
        block_input.append(max(0.0, best(boths) - weight))
        hidden = out.detach()
        del out, x

    if parts.final_norm is not None:
        with torch.no_grad():
            normed = captured["norm"].call(parts.final_norm, hidden) if "norm" in captured \
                else parts.final_norm(hidden)
    else:
        normed = hidden
    head_entry = captured["head"]
    head_params = trainable_of(parts.lm_head)
    loss_fn = _loss_function(model)
    labels = batch.get("labels", batch["input_ids"])
    head_times, head_both, head_weight, loss_times, loss_grads = [], [], [], [], []
    for _ in range(repeats):
        start = clock.now()
        with torch.no_grad():
            head_entry.call(parts.lm_head, normed)
        head_times.append(clock.now() - start)
        x = normed.detach().requires_grad_(True)
        start = clock.now()
        logits = head_entry.call(parts.lm_head, x)
        head_times.append(clock.now() - start)
        both, weight = _grad_costs(clock, logits, x, head_params)
        head_both.append(both)
        head_weight.append(weight)
        z = logits.detach().requires_grad_(True)
        del logits, x
        start = clock.now()
        loss = loss_fn(z, labels)
        loss_times.append(clock.now() - start)
        start = clock.now()
        torch.autograd.grad(loss, [z])
        loss_grads.append(clock.now() - start)
        del z, loss
    weight = best(head_weight) if head_params else 0.0
    return PartCosts(
        block_forward=tuple(block_forward),
        block_input_grad=tuple(block_input),
        block_weight_grad=tuple(block_weight),
        head_forward=best(head_times),
        head_input_grad=max(0.0, best(head_both) - weight),
        head_weight_grad=weight,
        embedding_forward=embedding_forward,
        embedding_grad=embedding_grad,
        loss=best(loss_times),
        loss_backward=best(loss_grads),
    )
