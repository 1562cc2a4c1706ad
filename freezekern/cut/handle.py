"""The handle of an applied plan: what it froze and wrapped, its boundary source, and ``remove()``."""

from __future__ import annotations

import types

from torch import nn

from freezekern.cut.hooks import _INNER_ATTR, _STATE_ATTR, _CutState, _graph_free_forward
from freezekern.cut.source import BoundarySource
from freezekern.model.parts import ModelParts, discover
from freezekern.model.peft import unwrap_peft
from freezekern.policy.rules import FreezePlan

_HANDLE_ATTR = "_freezekern_handle"


class FreezeHandle:
    """An applied plan. ``remove()`` restores the model exactly; also a context manager.

    Attributes: ``boundary`` (k, the number of frozen blocks), ``num_layers``,
    ``plan`` (the FreezePlan or None for a bare k), ``parts``, ``train_head``,
    ``train_final_norm``, ``cut`` (False for a full-fine-tuning plan, which
    changes nothing), ``active``.
    """

    def __init__(self, model: nn.Module, parts: ModelParts, boundary: int, plan: FreezePlan | None,
                 train_head: bool, train_final_norm: bool, state: _CutState, cut: bool = True):
        self.model = model
        self.parts = parts
        self.boundary = boundary
        self.num_layers = parts.num_layers
        self.plan = plan
        self.train_head = train_head
        self.train_final_norm = train_final_norm
        self.cut = cut
        self.active = True
        self._state = state
        self._changed_flags: list[nn.Parameter] = []
        self._changed_names: list[str | None] = []  # the same parameters by name (sharding replaces the objects)
        self._undo: list = []  # callables undoing engine settings made at forward time (FSDP2 prefetch)
        self._wrapped: list[tuple[nn.Module, bool]] = []  # (module, had its own instance forward)
        self._hooks: list = []
        self._frozen_adapters: list[str] = []
        self._freeze_outside = False
        self.fused_loss = None  # a freezekern.cut.fused_loss.FusedLossHandle when apply(..., fused_loss=True)

    # -- what it did -------------------------------------------------------------------------
    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters this handle switched to requires_grad=False (the model's current objects: after
        FSDP2's ``fully_shard`` the sharded parameters of the same names)."""
        return [now for _, now in self._resolved_flags()]

    def _resolved_flags(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(parameter frozen at apply, the model's parameter of that name now) pairs."""
        current = dict(self.model.named_parameters(remove_duplicate=False))
        return [(p, current.get(name, p) if name is not None else p)
                for p, name in zip(self._changed_flags, self._changed_names)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return trainable_parameters(self.model)

    @property
    def frozen_adapter_names(self) -> list[str]:
        """Names of PEFT adapter parameters frozen because they lie below the boundary."""
        return list(self._frozen_adapters)

    @property
    def embedding(self) -> nn.Module:
        """The input embedding module whose forward runs graph-free."""
        return self._state.embedding

    def prefix_modules(self) -> list[nn.Module]:
        """The modules of the frozen prefix, in forward order: the embedding, then blocks 1..k."""
        if not self.cut:
            return []
        return [self._state.embedding, *self._state.recorded_blocks[: self.boundary]]

    def prefix_parameters(self) -> list[nn.Parameter]:
        """The parameters of the frozen prefix, each once."""
        seen: dict[int, nn.Parameter] = {}
        for module in self.prefix_modules():
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    @property
    def stats(self) -> dict:
        """Counters: ``cuts`` (training forwards cut at the boundary), ``leaf_cuts`` (cuts that made a
        grad leaf), ``served`` (forwards whose boundary state came from the boundary source),
        ``unservable`` (forwards the source was not asked about: they could observe the prefix)."""
        return dict(self._state.stats)

    # -- boundary source ------------------------------------------------------------------------
    @property
    def boundary_source(self) -> BoundarySource | None:
        return self._state.source

    def set_boundary_source(self, source: BoundarySource) -> None:
        """Let ``source`` serve boundary states (replaces and detaches any previous source)."""
        if not self.active:
            raise RuntimeError("this FreezeHandle was already removed")
        if not self.cut or self.boundary >= self.num_layers:
            raise ValueError("this plan has no boundary state to serve "
                             f"({'nothing is frozen' if not self.cut else 'every block is frozen'})")
        previous = self._state.source
        self._state.source = source
        self._state.reset_call()
        if previous is not None and previous is not source:
            previous.detached()

    def clear_boundary_source(self, source: BoundarySource | None = None) -> None:
        """Stop using the boundary source (only if it is ``source``, when given)."""
        current = self._state.source
        if current is None or (source is not None and current is not source):
            return
        self._state.source = None
        self._state.reset_call()
        current.detached()

    def summary(self) -> dict:
        trainable = trainable_parameters(self.model)
        return {
            "boundary": self.boundary,
            "num_layers": self.num_layers,
            "cut": self.cut,
            "trained_blocks": list(range(self.boundary + 1, self.num_layers + 1)),
            "train_head": self.train_head,
            "train_final_norm": self.train_final_norm,
            "tied": self.parts.tied,
            "trainable_params": sum(p.numel() for p in trainable),
            "frozen_by_handle": sum(p.numel() for p in self._changed_flags),
            "frozen_adapters": len(self._frozen_adapters),
            "boundary_source": type(self._state.source).__name__ if self._state.source is not None else None,
            "active": self.active,
        }

    def __repr__(self) -> str:
        status = "active" if self.active else "removed"
        cut = "" if self.cut else ", no cut"
        return f"FreezeHandle(boundary={self.boundary}, num_layers={self.num_layers}{cut}, {status})"

    def __enter__(self) -> FreezeHandle:
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.remove()

    # -- undo ---------------------------------------------------------------------------------
    def remove(self) -> None:
        """Undo everything ``apply`` did: forwards, hooks, requires_grad flags, the model's marker.

        Raises RuntimeError when called twice, or (changing nothing) when
        another tool has since wrapped one of the forwards freezekern replaced.
        """
        if not self.active:
            raise RuntimeError("this FreezeHandle was already removed; the model is in its original state")
        for module, _ in self._wrapped:
            current = module.__dict__.get("forward")
            if not (isinstance(current, types.MethodType) and current.__func__ is _graph_free_forward):
                raise RuntimeError(
                    f"cannot restore {type(module).__name__}.forward: something replaced freezekern's per-instance "
                    f"forward after apply() (found {current!r}); undo that wrapper first, then remove()"
                )
        if self.fused_loss is not None and self.fused_loss.active:
            self.fused_loss.remove()
        self.clear_boundary_source()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for module, had_own in self._wrapped:
            inner = module.__dict__.pop(_INNER_ATTR, None)
            module.__dict__.pop(_STATE_ATTR, None)
            if had_own:
                module.forward = inner
            else:
                del module.__dict__["forward"]
        self._wrapped.clear()
        for undo in self._undo:
            undo()
        self._undo.clear()
        for then, now in self._resolved_flags():
            then.requires_grad_(True)
            now.requires_grad_(True)
        self._changed_flags.clear()
        self._changed_names.clear()
        for owner in (self.parts.blocks, self.model):
            if owner.__dict__.get(_HANDLE_ATTR) is self:
                del owner.__dict__[_HANDLE_ATTR]
        self.active = False


def active_handle(model: nn.Module) -> FreezeHandle | None:
    """The FreezeHandle applied to ``model`` (or to its block list), if any."""
    handle = model.__dict__.get(_HANDLE_ATTR)
    if handle is not None:
        return handle
    try:
        parts = discover(unwrap_peft(model)[0])
    except (ValueError, TypeError):
        return None
    return parts.blocks.__dict__.get(_HANDLE_ATTR)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad, each once: build the optimizer from these.

        optimizer = torch.optim.AdamW(freezekern.trainable_parameters(model), lr=1e-4)
    """
    return [p for p in model.parameters() if p.requires_grad]


def named_trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
