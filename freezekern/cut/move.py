"""Moving an applied boundary deeper during training, exactly."""

from __future__ import annotations

import logging

from freezekern.cut.freeze import _as_plan, _check_boundary, _check_plan_fits, apply
from freezekern.cut.handle import FreezeHandle, trainable_parameters
from freezekern.model.engines import check_can_stop_updating, stop_updating

logger = logging.getLogger("freezekern.cut")


def move_boundary(handle: FreezeHandle, plan_or_k, *, optimizer=None, model=None) -> FreezeHandle:
    """Move an applied boundary deeper (never shallower); returns the new handle.

    Everything is checked before anything changes: a bad k, a shallower k, a
    plan for another model or an engine that cannot stop updating parameters
    mid-run (DeepSpeed ZeRO without its optimizer at hand, or offloading it to
    NVMe) raises and leaves the old boundary applied. If
    applying the new boundary fails anyway, the old one is applied again
    before the error propagates. Parameters that become frozen go through
    ``freezekern.model.engines.stop_updating(params, optimizer, model)``:
    they lose their ``.grad`` and, when ``optimizer`` is given (a torch
    optimizer, or a wrapper with ``.optimizer``), their optimizer state (Adam
    moments); they stay in its parameter groups, where a parameter without a
    gradient is skipped, so saved optimizer states keep their layout. ``model``:
    the model as the engine wrapped it when that is not ``handle.model`` (a
    ``DistributedDataParallel``, whose reducer is then rebuilt over the
    parameters still trained; a DeepSpeedEngine, whose ZeRO optimizer then
    holds the newly frozen parameters: ``freezekern.model.zero_pins``). Adapters inside newly
    frozen blocks are frozen too. A boundary source with a ``moved(new_handle)``
    method is told about the new handle.
    """
    if not handle.active:
        raise RuntimeError("this FreezeHandle was already removed; apply() a plan instead")
    plan, k = _as_plan(plan_or_k)
    engine_model = model if model is not None else handle.model
    model, parts, train_head, train_norm = handle.model, handle.parts, handle.train_head, handle.train_final_norm
    if plan is not None:
        _check_plan_fits(model, parts, plan)
        if not plan.cut:
            raise ValueError("move_boundary cannot move to a full-fine-tuning plan (policy 'none'): it would "
                             "unfreeze every block; remove() the handle instead")
    _check_boundary(k, parts.num_layers)
    if handle.cut and k < handle.boundary:
        raise ValueError(f"the boundary only moves deeper: {handle.boundary} -> {k} would unfreeze blocks")
    if handle.cut and k == handle.boundary and plan is None:
        return handle
    check_can_stop_updating(optimizer, engine_model)
    grads = {p: p.grad for p in trainable_parameters(model)}  # apply drops frozen gradients: kept for a rollback
    before = {id(p) for p in grads}
    source = handle.boundary_source
    old_plan = handle.plan if handle.plan is not None else handle.boundary
    # the fused loss does not depend on the boundary: it stays installed and moves to the new handle
    fused, handle.fused_loss = handle.fused_loss, None
    fused = fused if fused is not None and fused.active else None
    try:
        handle.remove()
    except BaseException:
        handle.fused_loss = fused
        raise
    new = None
    try:
        new = apply(model, plan_or_k, train_head=train_head, train_final_norm=train_norm, parts=parts,
                    frozen_adapters="freeze", freeze_outside=handle._freeze_outside)
        new.fused_loss = fused
        newly_frozen = [p for p in model.parameters() if id(p) in before and not p.requires_grad]
        stop_updating(newly_frozen, optimizer, engine_model)  # raises before changing anything of the engine
    except BaseException:
        if new is not None and new.active:
            new.fused_loss = None
            new.remove()
        for p in model.parameters():  # restore the old flags, then the old cut
            if id(p) in before:
                p.requires_grad_(True)
        restored = apply(model, old_plan, train_head=train_head, train_final_norm=train_norm, parts=parts,
                         frozen_adapters="freeze", freeze_outside=handle._freeze_outside)
        restored.fused_loss = fused
        for p, grad in grads.items():
            if p.requires_grad:
                p.grad = grad
        if source is not None and hasattr(source, "moved"):
            source.moved(restored)
        raise
    if source is not None and hasattr(source, "moved"):
        source.moved(new)
    logger.info("boundary moved %d -> %d: %d parameter tensors newly frozen", handle.boundary, new.boundary,
                len(newly_frozen))
    return new
