"""DeepSpeed ZeRO: parameters frozen during training, held exactly where they are.

ZeRO keeps an fp32 master copy of every parameter it was given, flattened
into one partition per rank, and steps its optimizer (Adam moments,
decoupled weight decay) over the whole partition, gradient or not; a
parameter cannot leave those partitions once the engine is built. So a
parameter frozen mid-run (a boundary moved deeper) is *pinned*: this rank's
fp32 fragment of it is copied once, and a post-step hook on the optimizer
that steps the partitions writes the copy back right after every step,
before ZeRO copies the partitions into the model's parameters (and
all-gathers them, ZeRO-1/2) or into its parameter shards (ZeRO-3). The
parameter therefore never changes again, bitwise, on every rank.

What stops: its backward (the cut moved above it) and its gradient
communication (no gradient arrives, so nothing of it is reduced). What does
not: the optimizer's arithmetic over its fragment (done, then undone) and
the memory of its fp32 copy and moments, which stay in ZeRO's partitions
until the engine is rebuilt; the copy costs this rank's share of the frozen
parameters in fp32 once more. A boundary decided before the engine is built
(``FreezeKernCallback()`` at Trainer init) costs none of this.

Interface: ``check(optimizer, model)`` raises ``EngineRefusal`` (before
anything changes) when pinning cannot work here; ``pin(params, optimizer,
model)`` pins; ``pinned_count(optimizer, model)`` says how many tensors are
pinned on this rank.
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch
from torch import nn

from freezekern.model.engine_refusal import EngineRefusal, is_deepspeed_object

logger = logging.getLogger("freezekern.engines")


def zero_optimizer(optimizer=None, model=None):
    """The ZeRO optimizer (DeepSpeed's stage 1/2 or stage 3 wrapper) behind ``optimizer`` (accelerate's
    wrapper, or itself) or ``model`` (a DeepSpeedEngine), or None."""
    for candidate in (getattr(model, "optimizer", None), getattr(optimizer, "optimizer", None), optimizer):
        if is_deepspeed_object(candidate) and hasattr(candidate, "optimizer"):
            return candidate
    return None


class _Pins:
    """The pinned fragments of one ZeRO optimizer and the hook that writes them back."""

    def __init__(self, inner: torch.optim.Optimizer):
        self.fragments: list[tuple[torch.Tensor, torch.Tensor]] = []  # (view into the fp32 partition, copy)
        self.ids: set[int] = set()
        self.hook = inner.register_step_post_hook(self._restore)

    @torch.no_grad()
    def _restore(self, optimizer, args, kwargs) -> None:
        for view, copy in self.fragments:
            view.copy_(copy)


_PINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stage3_fragment(param: nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_local_fp32_param

    with _requiring_grad(param):  # DeepSpeed answers only for parameters that require grad
        fragment = safe_get_local_fp32_param(param)
    return fragment.view(-1)


@contextlib.contextmanager
def _requiring_grad(param: nn.Parameter):
    before = param.requires_grad
    param.requires_grad_(True)
    try:
        yield
    finally:
        param.requires_grad_(before)


def _fragment(param: nn.Parameter, zero) -> torch.Tensor | None:
    """This rank's fp32 master fragment of ``param`` (a view into ZeRO's partition), or None when the rank
    holds none of it."""
    if hasattr(param, "ds_id"):
        return _stage3_fragment(param)
    mapping = getattr(param, "_hp_mapping", "absent")
    if mapping == "absent":
        raise EngineRefusal(f"{type(zero).__name__}: a parameter of shape {tuple(param.shape)} has no fp32 master "
                            "mapping; it was not given to the ZeRO optimizer, or this DeepSpeed version lays its "
                            "partitions out differently. Fix the boundary before the engine is built "
                            "(FreezeKernCallback() at Trainer init, or plan=...)")
    return None if mapping is None else mapping.hp_fragment


def check(optimizer=None, model=None, engine: str = "DeepSpeed ZeRO") -> None:
    """Raise EngineRefusal when parameters frozen now cannot be pinned under this ZeRO engine (``engine``
    names it in the message)."""
    zero = zero_optimizer(optimizer, model)
    if zero is None and is_deepspeed_object(model) and getattr(model, "optimizer", None) is not None:
        raise EngineRefusal(
            f"{engine}: this DeepSpeed engine steps a plain optimizer without ZeRO partitions (stage 0), and "
            "DeepSpeed gives parameters without a gradient zero gradients, so weight decay would keep moving "
            "newly frozen ones. Decide the boundary before the engine is built (FreezeKernCallback() at "
            "Trainer init, or plan=...), or train with ZeRO-1/2/3 or DDP to move it")
    if zero is None:
        raise EngineRefusal(
            f"{engine}: freezing more parameters during training (a moved boundary, reselect_every) needs the "
            "ZeRO optimizer, to hold them exactly: pass optimizer= (the Trainer's optimizer) or model= (the "
            "DeepSpeedEngine whose .optimizer it is)")
    if getattr(zero, "swap_optimizer", False) or getattr(zero, "optimizer_swapper", None) is not None:
        raise EngineRefusal(
            f"{engine} with the optimizer offloaded to NVMe: its fp32 partitions are swapped out between "
            "steps, so parameters frozen during training cannot be held exactly. Fix the boundary before the "
            "engine is built (FreezeKernCallback() at Trainer init, or plan=...), or offload to the CPU instead")
    inner = getattr(zero, "optimizer", None)
    if not isinstance(inner, torch.optim.Optimizer):
        raise EngineRefusal(f"{engine} ({type(zero).__name__}) steps its partitions with {type(inner).__name__}, "
                            "not a torch optimizer, so parameters frozen during training cannot be held exactly. "
                            "Fix the boundary before the engine is built (FreezeKernCallback() at Trainer init)")


@torch.no_grad()
def pin(params, optimizer=None, model=None, engine: str = "DeepSpeed ZeRO") -> int:
    """Pin ``params`` (frozen now, after the engine was built) where they are; returns the number of fragments
    this rank holds of them. Call on every rank between optimizer steps (ZeRO-3 reads its partition map)."""
    check(optimizer, model, engine)
    zero = zero_optimizer(optimizer, model)
    pins = _PINS.get(zero)
    seen = set(pins.ids) if pins is not None else set()
    found = []  # every fragment first: a parameter that cannot be pinned raises before anything is pinned
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            found.append((p, _fragment(p, zero)))
    if not found:
        return 0
    if pins is None:
        pins = _PINS[zero] = _Pins(zero.optimizer)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            logger.warning(
                "%s: parameters frozen after the engine was built are pinned: their backward and gradient "
                "communication stop, but ZeRO's optimizer still steps them and keeps their fp32 masters and "
                "moments (ZeRO-1/2 also all-gather them after every step); in one CPU benchmark that made a step "
                "about 1.5x one with the same boundary decided at init (docs/benchmarks.md, bench_zero_pins). "
                "Where the boundary is known before training, decide it before the engine is built "
                "(FreezeKernCallback() at Trainer init, or plan=...)", engine)
    added = 0
    for p, fragment in found:
        pins.ids.add(id(p))
        if fragment is not None and fragment.numel() > 0:
            pins.fragments.append((fragment, fragment.detach().clone()))
            added += 1
    return added


def pinned_count(optimizer=None, model=None) -> int:
    """How many fp32 fragments are pinned on this rank for this engine's ZeRO optimizer."""
    zero = zero_optimizer(optimizer, model)
    pins = _PINS.get(zero) if zero is not None else None
    return 0 if pins is None else len(pins.fragments)
