"""The timeline of one training step: per part forward, recomputation and backward, read with hooks.

``StepRecorder`` puts forward pre-/post-hooks on the parts of a causal LM
(the input embedding, every block, the final norm, the LM head) and on each
block's direct children, a hook on the model call, tensor hooks on the
parts' inputs and outputs and post-accumulate hooks on the trainable
parameters. Between ``begin_step()`` and ``end_step()`` they record marks
(wall time on the CPU, CUDA events on a GPU, resolved after one
synchronisation); ``analyse_timeline`` turns them into a ``StepTiming``:

* forward: each part's own call;
* recomputation under activation checkpointing: the calls of a block's
  direct children outside the block's own forward (checkpointing replays
  the block's ``forward``, which calls its children again in the backward);
* backward: from the gradient reaching a part's output to the next part's
  (the engine runs one part after another, top down) or the end of the
  backward, less the part's recomputation. A part is *reached* when a
  gradient arrived at its output; hooks on its input tell whether it passed
  one further down.

No hook changes a value or a gradient; ``remove()`` takes them all away.
``freezekern.profile`` builds on this.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from freezekern.model.parts import ModelParts, block_hidden_input, block_output_hidden, discover
from freezekern.model.training import device_of

# -- clocks -----------------------------------------------------------------------------------

class Clock:
    """Marks on a timeline: perf_counter floats on the CPU, CUDA events (in stream order) on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.kind = "cuda_events" if self.cuda else "wall"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def resolve(self, marks: list) -> list[float]:
        """Seconds of each mark after the first one (synchronises the GPU first)."""
        if not marks:
            return []
        if self.cuda:
            torch.cuda.synchronize()
            first = marks[0]
            return [first.elapsed_time(m) / 1000.0 for m in marks]
        first = marks[0]
        return [m - first for m in marks]

    def now(self) -> float:
        """Wall time after the device finished its queued work (for isolated measurements)."""
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


# -- the timeline of one step ------------------------------------------------------------------

@dataclass
class StepTiming:
    """One step's measured times in seconds; per-part lists are indexed like ``StepRecorder.names``."""

    step_s: float
    forward_s: float
    backward_s: float
    loss_forward_s: float | None
    loss_backward_s: float | None
    part_forward: list[float]
    part_recompute: list[float]
    part_backward: list[float]
    reached: list[bool]
    input_grad: list[bool]
    peak_memory_bytes: int | None = None


def analyse_timeline(events: list[tuple[str, int, float]], num_parts: int, head: int | None) -> StepTiming:
    """Turn the resolved events of one step into per-part forward, recompute and backward times.

    ``events``: (kind, part index, seconds) in the order they were recorded
    (see ``StepRecorder``); ``head``: the part index of the LM head (the loss
    forward is the model call's time after the head returned).
    """
    forward = [0.0] * num_parts
    recompute = [0.0] * num_parts
    backward = [0.0] * num_parts
    reached = [False] * num_parts
    input_grad = [False] * num_parts
    open_forward: list[list[float]] = [[] for _ in range(num_parts)]
    child_depth = [0] * num_parts
    child_start = [0.0] * num_parts
    calls: list[list] = []  # [start, last head end] per open model call
    forward_total = backward_total = 0.0
    loss_forward = loss_backward = 0.0
    loss_forward_seen = loss_backward_seen = False
    step_start = step_end = None
    segments: list[tuple[int, float]] | None = None  # (part or -1 for the loss, start) of the open pass
    pass_start = 0.0
    for kind, part, t in events:
        if kind == "step_start":
            step_start = t
        elif kind == "step_end":
            step_end = t
        elif kind == "model_start":
            calls.append([t, None])
        elif kind == "model_end":
            if calls:
                start, head_end = calls.pop()
                forward_total += t - start
                if head_end is not None:
                    loss_forward += t - head_end
                    loss_forward_seen = True
        elif kind == "fwd_start":
            open_forward[part].append(t)
        elif kind == "fwd_end":
            if open_forward[part]:
                forward[part] += t - open_forward[part].pop()
                if part == head and calls:
                    calls[-1][1] = t
        elif kind == "child_start":
            if not open_forward[part]:
                if child_depth[part] == 0:
                    child_start[part] = t
                child_depth[part] += 1
        elif kind == "child_end":
            if not open_forward[part] and child_depth[part] > 0:
                child_depth[part] -= 1
                if child_depth[part] == 0:
                    recompute[part] += t - child_start[part]
        elif kind == "bwd_begin":
            segments, pass_start = [(-1, t)], t
        elif kind == "loss_grad":
            loss_backward_seen = True
        elif kind == "grad_out":
            reached[part] = True
            if segments is not None:
                segments.append((part, t))
        elif kind == "grad_in":
            input_grad[part] = True
        elif kind == "bwd_end" and segments is not None:
            backward_total += t - pass_start
            ends = [start for _, start in segments[1:]] + [t]
            for (owner, start), end in zip(segments, ends):
                if owner < 0:
                    loss_backward += end - start
                else:
                    backward[owner] += end - start
            segments = None
    backward = [max(0.0, b - r) for b, r in zip(backward, recompute)]
    step = (step_end - step_start) if step_start is not None and step_end is not None else math.nan
    return StepTiming(step_s=step, forward_s=forward_total, backward_s=backward_total,
                      loss_forward_s=loss_forward if loss_forward_seen else None,
                      loss_backward_s=loss_backward if loss_backward_seen else None,
                      part_forward=forward, part_recompute=recompute, part_backward=backward,
                      reached=reached, input_grad=input_grad)


def hidden_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return block_hidden_input(args, kwargs)[0]


def output_tensor(out) -> torch.Tensor | None:
    if out is None:
        return None
    try:
        return block_output_hidden(out)
    except TypeError:
        return None


def output_loss(out) -> torch.Tensor | None:
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) \
            and out[0].dim() == 0:
        loss = out[0]
    return loss if isinstance(loss, torch.Tensor) else None


def input_embedding(model: nn.Module) -> nn.Module | None:
    """The model's input embedding module (through a PEFT wrapper), or None."""
    get = getattr(model, "get_input_embeddings", None)
    if get is None:
        return None
    try:
        return get()
    except (NotImplementedError, AttributeError):
        return None


class StepRecorder:
    """Hooks that time the parts of a model, one step at a time.

    Parts, in ``names`` order: the input embedding, blocks 1..L, the final
    norm and the LM head. ``install()`` registers the hooks (forward pre/post
    hooks on every part and on each block's direct children, a hook on the
    model call, post-accumulate hooks on the parameters that require grad now);
    ``begin_step()`` / ``end_step()`` bracket one optimizer step (any number
    of forwards and backwards in between, e.g. gradient accumulation or a
    reference-model forward) and return its ``StepTiming``; ``remove()``
    takes every hook away. Hooks record only between ``begin_step`` and
    ``end_step``; tensor hooks never change a gradient.
    """

    def __init__(self, model: nn.Module, parts: ModelParts | None = None, device=None):
        self.model = model
        self.parts = parts or discover(model)
        self.device = torch.device(device) if device is not None else device_of(model)
        self.clock = Clock(self.device)
        L = self.parts.num_layers
        self.names = ["embedding", *(f"block {i}" for i in range(1, L + 1)), "final norm", "lm_head"]
        self.head_index = L + 2
        self.norm_index = L + 1
        self._modules: list[nn.Module | None] = [input_embedding(model), *self.parts.blocks,
                                                  self.parts.final_norm, self.parts.lm_head]
        self._handles: list = []
        self._events: list[tuple[str, int, object]] = []
        self.recording = False
        self._pass_open = False
        self.installed = False

    @property
    def hooked(self) -> list[bool]:
        """Which parts exist and carry hooks."""
        return [m is not None for m in self._modules]

    # -- hooks ------------------------------------------------------------------------------
    def _mark(self, kind: str, part: int = -1) -> None:
        if self.recording:
            self._events.append((kind, part, self.clock.mark()))

    def _backward_mark(self, kind: str, part: int = -1) -> None:
        if not self.recording:
            return
        if not self._pass_open:
            self._pass_open = True
            self._events.append(("bwd_begin", -1, self.clock.mark()))
            torch.autograd.Variable._execution_engine.queue_callback(self._close_pass)
        self._events.append((kind, part, self.clock.mark()))

    def _close_pass(self) -> None:
        if self._pass_open:
            self._pass_open = False
            if self.recording:
                self._events.append(("bwd_end", -1, self.clock.mark()))

    def _tensor_hook(self, kind: str, part: int):
        def hook(grad):
            self._backward_mark(kind, part)

        return hook

    def _watch(self, tensor: torch.Tensor | None, kind: str, part: int) -> None:
        if self.recording and torch.is_grad_enabled() and isinstance(tensor, torch.Tensor) \
                and tensor.requires_grad:
            tensor.register_hook(self._tensor_hook(kind, part))

    def _part_hooks(self, index: int, module: nn.Module) -> None:
        def before(mod, args):
            self._mark("fwd_start", index)

        def after(mod, args, kwargs, out):
            self._mark("fwd_end", index)
            if not self.recording:
                return
            self._watch(output_tensor(out), "grad_out", index)
            if index != 0:  # the embedding's input is token ids
                self._watch(hidden_input(args, kwargs), "grad_in", index)

        self._handles.append(module.register_forward_pre_hook(before))
        self._handles.append(module.register_forward_hook(after, with_kwargs=True, always_call=True))

    def _child_hooks(self, index: int, block: nn.Module) -> None:
        def before(mod, args):
            self._mark("child_start", index)

        def after(mod, args, out):
            self._mark("child_end", index)

        for child in block.children():
            self._handles.append(child.register_forward_pre_hook(before))
            self._handles.append(child.register_forward_hook(after, always_call=True))

    def _param_hooks(self) -> None:
        owners: dict[int, set[int]] = {}
        for index, module in enumerate(self._modules):
            if module is None:
                continue
            for p in module.parameters():
                owners.setdefault(id(p), set()).add(index)
        for p in self.model.parameters():
            if not p.requires_grad:
                continue
            parts = owners.get(id(p), set())
            index = next(iter(parts)) if len(parts) == 1 else -1

            def hook(param, index=index):
                self._backward_mark("param", index)

            self._handles.append(p.register_post_accumulate_grad_hook(hook))

    def install(self) -> StepRecorder:
        if self.installed:
            return self
        for index, module in enumerate(self._modules):
            if module is not None:
                self._part_hooks(index, module)
        for i, block in enumerate(self.parts.blocks, start=1):
            self._child_hooks(i, block)

        def call_start(mod, args):
            self._mark("model_start")

        def call_end(mod, args, out):
            self._mark("model_end")
            if self.recording and torch.is_grad_enabled():
                loss = output_loss(out)
                if loss is not None and loss.requires_grad:
                    loss.register_hook(lambda grad: self._backward_mark("loss_grad"))

        self._handles.append(self.model.register_forward_pre_hook(call_start))
        self._handles.append(self.model.register_forward_hook(call_end, always_call=True))
        self._param_hooks()
        self.installed = True
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.recording = False
        self.installed = False

    # -- steps ------------------------------------------------------------------------------
    def begin_step(self) -> None:
        self._events = []
        self._pass_open = False
        self.recording = True
        self._mark("step_start")

    def end_step(self) -> StepTiming:
        self._mark("step_end")
        self.recording = False
        self._pass_open = False
        events, self._events = self._events, []
        seconds = self.clock.resolve([mark for _, _, mark in events])
        resolved = [(kind, part, t) for (kind, part, _), t in zip(events, seconds)]
        return analyse_timeline(resolved, len(self.names), self.head_index)
