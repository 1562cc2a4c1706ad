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

What stops: its backward (the cut moved above it), its gradient
communication (no gradient arrives, so nothing of it is reduced) and, when
ZeRO steps its partitions with torch's Adam or AdamW (the Trainer's default
optimizer), the optimizer's arithmetic over its fragment: for the length of
each step the partition is handed to the optimizer as views of its unpinned
ranges, with views of their moments (Adam is elementwise, so every other
element gets the update it would have had: bitwise with the single-tensor
and foreach implementations; the fused CPU kernel rounds a range's edge
elements as it rounds its own thread chunks' edges, ~1e-7). A partition
pinned whole is stepped as an empty range, so its step count still advances
with the others (checkpoints compare them). With any other optimizer
(DeepSpeed's FusedAdam or CPU Adam, from the config's ``optimizer``
section) the fragment is stepped and then written back. Refused: ZeRO-3
with the optimizer offloaded from an accelerator (DeepSpeed hands out
copies of its masters), partial offload and ZenFlow (partitions stepped
outside the hooked optimizer), NVMe offload. What
does not stop: ZeRO's bookkeeping over the whole partition (flattening the
gradients with zeros for the frozen ones, the norm, copying the partition
into the model and, ZeRO-1/2, all-gathering it) and the memory of the fp32
copy and moments, which stay in ZeRO's partitions until the engine is
rebuilt; the pinned copy costs this rank's share of the frozen parameters in
fp32 once more. A boundary decided before the engine is built
(``FreezeKernCallback()`` at Trainer init) costs none of this.

Interface: ``check(optimizer, model)`` raises ``EngineRefusal`` (before
anything changes) when pinning cannot work here; ``pin(params, optimizer,
model)`` pins; ``pinned_count(optimizer, model)`` says how many tensors are
pinned on this rank, ``left_out_of_last_step(optimizer, model)`` how many of
their fp32 elements the last optimizer step did not compute.
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


_ELEMENTWISE = (torch.optim.Adam, torch.optim.AdamW)  # per element: a range of a tensor steps as it would whole
_MOMENTS = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq"})  # their per-element state; "step" is a count


class _Pins:
    """The pinned fragments of one ZeRO optimizer (``inner``: the torch optimizer stepping its partitions) and
    the hooks that keep them out of each step (Adam, AdamW) and write them back after it (any optimizer)."""

    def __init__(self, inner: torch.optim.Optimizer):
        self.fragments: list[tuple[torch.Tensor, torch.Tensor]] = []  # (view into the fp32 partition, copy)
        self.ids: set[int] = set()
        self.narrows = type(inner) in _ELEMENTWISE
        self._swapped: list[tuple[dict, list, list]] = []  # (param group, its params before, those installed)
        self._views: list[tuple[torch.Tensor, torch.Tensor]] = []  # (partition, view of one unpinned range)
        self.left_out: dict[int, int] = {}  # id(partition) -> pinned elements its latest step did not compute
        self.hooks = [inner.register_step_pre_hook(self._narrow), inner.register_step_post_hook(self._widen)]

    def unpinned_ranges(self, flat: torch.Tensor) -> list[tuple[int, int]] | None:
        """The [start, end) element ranges of the 1-D partition ``flat`` that no pinned fragment covers, or
        None when no fragment lies in it."""
        if flat.dim() != 1:
            return None
        storage, start, n = flat.untyped_storage().data_ptr(), flat.storage_offset(), flat.numel()
        covered = []
        for view, _ in self.fragments:
            if view.dtype == flat.dtype and view.untyped_storage().data_ptr() == storage:
                a = view.storage_offset() - start
                if 0 <= a and a + view.numel() <= n:
                    covered.append((a, a + view.numel()))
        if not covered:
            return None
        kept, pos = [], 0
        for a, b in sorted(covered):
            if a > pos:
                kept.append((pos, a))
            pos = max(pos, b)
        if pos < n:
            kept.append((pos, n))
        return kept

    @torch.no_grad()
    def _narrow(self, optimizer, args, kwargs) -> None:
        self._unswap(optimizer)  # a step that raised between the hooks left its views behind
        if not self.narrows:
            return
        for group in optimizer.param_groups:
            stepped, changed = [], False
            for flat in group["params"]:
                state = optimizer.state.get(flat)
                kept = self.unpinned_ranges(flat) if flat.grad is not None and state else None
                self.left_out[id(flat)] = 0
                if kept is None or not set(state) <= _MOMENTS | {"step"}:
                    stepped.append(flat)  # first step (no moments yet) or unknown state: stepped, written back
                    continue
                changed = True
                self.left_out[id(flat)] = flat.numel() - sum(b - a for a, b in kept)
                grad = flat.grad.view(-1)
                for a, b in kept or [(0, 0)]:  # all pinned: an empty range, so the step count still advances
                    view = flat.detach()[a:b]
                    view.grad = grad[a:b]
                    optimizer.state[view] = {k: (v[a:b] if k in _MOMENTS else
                                                 v.clone() if isinstance(v, torch.Tensor) else v)
                                             for k, v in state.items()}
                    self._views.append((flat, view))
                    stepped.append(view)
            if changed:
                self._swapped.append((group, group["params"], stepped))
                group["params"] = stepped

    @torch.no_grad()
    def _widen(self, optimizer, args, kwargs) -> None:
        self._unswap(optimizer)
        for view, copy in self.fragments:
            view.copy_(copy)

    def _unswap(self, optimizer) -> None:
        for group, params, installed in self._swapped:
            if group["params"] is installed:  # after a step that raised, the engine may have moved on
                group["params"] = params
        counted = set()
        for flat, view in self._views:
            state = optimizer.state.pop(view)
            view.grad = None
            if id(flat) not in counted:  # every range of a partition counted the same step
                counted.add(id(flat))
                for k, v in state.items():
                    if k not in _MOMENTS:
                        optimizer.state[flat][k] = v
        self._swapped.clear()
        self._views.clear()


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
    holds none of it. Raises EngineRefusal when DeepSpeed hands out something else (a copy)."""
    if hasattr(param, "ds_id"):
        fragment = _stage3_fragment(param)
    else:
        mapping = getattr(param, "_hp_mapping", "absent")
        if mapping == "absent":
            raise EngineRefusal(f"{type(zero).__name__}: a parameter of shape {tuple(param.shape)} has no fp32 "
                                "master mapping; it was not given to the ZeRO optimizer, or this DeepSpeed version "
                                "lays its partitions out differently. Fix the boundary before the engine is built "
                                "(FreezeKernCallback() at Trainer init, or plan=...)")
        fragment = None if mapping is None else mapping.hp_fragment
    if fragment is not None and fragment.numel() > 0 and not _inside(fragment, _partitions(zero)):
        raise EngineRefusal(f"{type(zero).__name__}: DeepSpeed gave a copy of a parameter's fp32 master, not a view "
                            "into the partitions its optimizer steps (as ZeRO-3 does with the optimizer offloaded "
                            "to the CPU on an accelerator), so a parameter frozen during training cannot be held "
                            "exactly. Fix the boundary before the engine is built (FreezeKernCallback() at Trainer "
                            "init, or plan=...), or train without offloading the optimizer")
    return fragment


def _partitions(zero) -> list[torch.Tensor]:
    """The fp32 tensors ZeRO's optimizer steps: its flat partitions (ZeRO-1/2, ZeRO-3), else whatever its
    inner optimizer holds."""
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        found = getattr(zero, name, None)
        if found:
            return [t for t in found if isinstance(t, torch.Tensor)]
    inner = zero.optimizer
    return [p for group in inner.param_groups for p in group["params"]] + \
        [k for k in inner.state if isinstance(k, torch.Tensor)]


def _inside(fragment: torch.Tensor, partitions: list[torch.Tensor]) -> bool:
    storage = fragment.untyped_storage().data_ptr()
    return any(p.untyped_storage().data_ptr() == storage for p in partitions)


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
            "engine is built (FreezeKernCallback() at Trainer init, or plan=...), or offload to the CPU instead "
            "(ZeRO-1/2; under ZeRO-3 on an accelerator DeepSpeed hands out copies of offloaded masters)")
    if getattr(zero, "backup_optimizer", None) is not None or getattr(zero, "zenflow", False):
        raise EngineRefusal(
            f"{engine} with {'ZenFlow' if getattr(zero, 'zenflow', False) else 'the optimizer partly offloaded'}: "
            "some partitions are stepped outside its optimizer, so parameters frozen during training cannot be "
            "held exactly. Fix the boundary before the engine is built (FreezeKernCallback() at Trainer init, or "
            "plan=...), or offload the whole optimizer (ratio 1) or none of it")
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
                "communication stop, %s; ZeRO keeps their fp32 masters and moments and still flattens, norms and "
                "(ZeRO-1/2) all-gathers them every step; in one CPU benchmark a step cost about 2x one with the "
                "same boundary decided at init (docs/benchmarks.md, bench_zero_pins). Where the boundary is known "
                "before training, decide it before the engine is built (FreezeKernCallback() at Trainer init, or "
                "plan=...)", engine,
                "Adam leaves them out of its steps" if pins.narrows else
                f"{type(zero.optimizer).__name__} still steps them and they are written back after each step")
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


def left_out_of_last_step(optimizer=None, model=None) -> int:
    """How many fp32 elements of pinned fragments this rank's last optimizer step left out, over all of ZeRO's
    partitions (each stepped on its own); 0 where ZeRO's optimizer is not Adam/AdamW, or nothing is pinned."""
    zero = zero_optimizer(optimizer, model)
    pins = _PINS.get(zero) if zero is not None else None
    return 0 if pins is None else sum(pins.left_out.values())
