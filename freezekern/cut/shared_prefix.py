"""One forward of the frozen prefix per batch for a policy and its reference model (DPO, KTO, ...).

In preference training the reference model reads the same batch as the
policy. When its frozen prefix (the embedding and blocks 1..k, and whatever
else reaches block k+1: position tables, rotary buffers, the config) equals
the policy's, the state entering block k+1 is the same tensor for both:

* PEFT with the adapters above the boundary only, and the reference being
  the same model with its adapters disabled (TRL's default for PEFT): the
  prefix is the very same modules;
* a frozen copy of the base model as the reference: its prefix weights are
  checked equal to the policy's when attached, and again whenever a
  frozen tensor of either changes (``freezekern.cut.prefix_state.FrozenWatch``).

``SharedPrefix`` is a ``freezekern.cut.freeze.BoundarySource`` on the handle of
each model: the first forward on a batch computes the boundary state as
usual, the next forward of either model on the same inputs is served it and
skips the embedding and blocks 1..k. Its rule differs from the prefix
cache's: it serves forwards with or without gradients (the reference runs
under ``torch.no_grad()``), hands each computed state to one later forward
only (sharing within a step, never caching across steps: that is
``PrefixCache``'s job), keeps at most the last ``slots`` states (KTO's KL
batch and completion batch make two), and serves only inputs it has just
seen (the same ``input_ids``, ``attention_mask`` and ``position_ids``, no
other argument that could reach the prefix). truncate itself never asks it
about forwards that could observe the prefix. A prefix that is not
deterministic (dropout active in training mode) is never stored or served.

    handle = freezekern.apply(policy, plan)                   # FreezeKernCallback(plan=...) alike
    shared = SharedPrefix(handle, reference=ref_model)        # reference=None: the policy with adapters disabled
    ...
    shared.detach()

With TRL: ``freezekern.integrations.preference.SharedPrefixCallback``.
Exactness: the served tensor is the one the other forward computed from the
same inputs with equal weights, so log-probabilities and gradients are those
of two full forwards (the tests compare them bit for bit).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import torch

from freezekern.cut.call_inputs import PREFIX_INPUTS, call_input_ids, unservable_argument
from freezekern.cut.freeze import apply
from freezekern.cut.handle import FreezeHandle, active_handle
from freezekern.cut.prefix_cache import without_active_dropout
from freezekern.cut.prefix_state import FrozenWatch, autocast_state, prefix_config
from freezekern.model.peft import adapter_layers, adapter_parameter_ids, base_parameter_name, unwrap_peft

logger = logging.getLogger("freezekern.cut.shared_prefix")



def _frozen_side(handle: FreezeHandle) -> dict[str, torch.Tensor]:
    """Every parameter and buffer outside the trained part (blocks k+1..L, final norm, head) or used by the prefix
    (a head tied to the input embedding is both), by base-model name."""
    parts = handle.parts
    trained: set[int] = set()
    for module in [*parts.blocks[handle.boundary:], parts.final_norm, parts.lm_head]:
        if module is not None:
            trained.update(id(t) for t in module.parameters())
            trained.update(id(t) for t in module.buffers())
    for module in handle.prefix_modules():
        trained.difference_update(id(t) for t in [*module.parameters(), *module.buffers()])
    base = unwrap_peft(handle.model)[0]
    adapters = adapter_parameter_ids(base)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in [*base.named_parameters(), *base.named_buffers()]:
        if id(tensor) in trained or id(tensor) in adapters:
            continue
        tensors[base_parameter_name(name)] = tensor
    return tensors


def _call_key(port) -> tuple[int, int]:
    """The call in flight on a port, per thread (DataParallel replicas call from several threads)."""
    return id(port), threading.get_ident()


class _Port:
    """The BoundarySource one handle talks to; the SharedPrefix behind it holds the states."""

    def __init__(self, hub: SharedPrefix, handle: FreezeHandle):
        self.hub, self.handle = hub, handle

    def begin(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return self.hub._begin(self, args, kwargs)

    def computed(self, hidden: torch.Tensor) -> None:
        self.hub._computed(self, hidden)

    def served(self) -> None:
        self.hub._served(self)

    def detached(self) -> None:
        self.hub._port_detached(self)

    def moved(self, handle: FreezeHandle) -> None:
        """The policy's boundary moved (``move_boundary``): the reference's prefix no longer matches; stop."""
        self.hub._boundary_moved(handle)


class SharedPrefix:
    """Serve one model's boundary state to the other model's (or its own) next forward on the same inputs.

    ``policy``: the FreezeHandle of the trained model. ``reference``: a
    separate reference model (its own handle is applied at the same boundary
    when it has none, and removed by ``detach``) or its FreezeHandle; None
    when the reference forward runs through the policy itself (PEFT adapters
    disabled). Refused when the two frozen sides differ (naming the first
    tensor or config key that does), or when the prefix holds PEFT adapters.
    """

    def __init__(self, policy: FreezeHandle, reference=None, *, slots: int = 2):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        if not isinstance(policy, FreezeHandle) or not policy.active:
            raise TypeError("SharedPrefix needs the active FreezeHandle of the policy (freezekern.apply(model, plan))")
        if not policy.cut or policy.boundary >= policy.num_layers or policy.boundary == 0:
            raise ValueError(f"no frozen prefix to share (boundary {policy.boundary} of {policy.num_layers}"
                             f"{', no cut' if not policy.cut else ''})")
        self._refuse_adapters(policy)
        self.slots = slots
        self.policy = policy
        self._owned: FreezeHandle | None = None
        self.reference = self._reference_handle(reference) if reference is not None else None
        handles = [policy] + ([self.reference] if self.reference is not None else [])
        self._ports = [_Port(self, h) for h in handles]
        self._states: OrderedDict = OrderedDict()  # slot id -> (key tensors, state, versions)
        self._pending: dict[int, tuple] = {}
        self._watch = FrozenWatch(self._frozen_tensors)
        self._disabled: str | None = None
        self.stats = {"computed": 0, "served": 0, "not_shareable": 0}
        try:
            for port in self._ports:
                port.handle.set_boundary_source(port)
        except BaseException:
            self.detach()
            raise

    # -- set-up checks -------------------------------------------------------------------------
    @staticmethod
    def _refuse_adapters(handle: FreezeHandle) -> None:
        adapters = [n for m in handle.prefix_modules() for n, _ in adapter_layers(m)]
        if adapters:
            raise ValueError(f"the frozen prefix holds PEFT adapters ({adapters[0]} ...): disabling them for the "
                             "reference would change the prefix; build LoRA above the boundary only "
                             "(plan.to_peft_config)")

    def _reference_handle(self, reference) -> FreezeHandle:
        if isinstance(reference, FreezeHandle):
            handle = reference
        else:
            handle = active_handle(reference)
            if handle is None or not handle.active:
                handle = apply(reference, self.policy.boundary, train_head=False, frozen_adapters="freeze")
                self._owned = handle
        try:
            if handle.boundary != self.policy.boundary or not handle.cut:
                raise ValueError(f"the reference is cut at block {handle.boundary + 1}, the policy at "
                                 f"{self.policy.boundary + 1}: apply the same boundary to both")
            self._refuse_adapters(handle)
            self._check_equal(self.policy, handle)
        except BaseException:
            if self._owned is not None:
                self._owned.remove()
                self._owned = None
            raise
        return handle

    @staticmethod
    def _check_equal(policy: FreezeHandle, reference: FreezeHandle) -> None:
        if policy.parts.num_layers != reference.parts.num_layers:
            raise ValueError(f"the reference model has {reference.parts.num_layers} blocks, the policy "
                             f"{policy.parts.num_layers}: no prefix to share")
        a, b = prefix_config(policy.model), prefix_config(reference.model)
        differing = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if differing:
            raise ValueError(f"the reference model's config differs from the policy's ({', '.join(differing[:4])}): "
                             "its prefix may compute something else; no prefix to share")
        ours, theirs = _frozen_side(policy), _frozen_side(reference)
        if set(ours) != set(theirs):
            missing = sorted(set(ours) ^ set(theirs))
            raise ValueError(f"the reference's frozen tensors are not the policy's ({missing[0]} ...): "
                             "no prefix to share")
        for name, tensor in ours.items():
            other = theirs[name]
            if tensor.dtype != other.dtype or tensor.shape != other.shape or not torch.equal(
                    tensor.detach(), other.detach().to(tensor.device)):
                raise ValueError(f"the reference's {name} differs from the policy's: the frozen prefixes are not the "
                                 "same model, so their boundary states differ; no prefix to share")

    def _frozen_tensors(self) -> list[torch.Tensor]:
        tensors = list(_frozen_side(self.policy).values())
        if self.reference is not None:
            tensors += list(_frozen_side(self.reference).values())
        return tensors

    # -- BoundarySource (through the ports) -------------------------------------------------------
    def _key(self, args: tuple, kwargs: dict) -> tuple | None:
        if unservable_argument(args, kwargs) is not None:
            return None
        ids = call_input_ids(args, kwargs)
        values = [ids] + [kwargs.get(name) for name in PREFIX_INPUTS[1:]]
        if not isinstance(ids, torch.Tensor) or any(v is not None and not isinstance(v, torch.Tensor) for v in values):
            return None
        return (autocast_state(ids.device), *(None if v is None else v.detach() for v in values))

    @staticmethod
    def _same(a: tuple, b: tuple) -> bool:
        if a[0] != b[0]:  # the autocast state
            return False
        for x, y in zip(a[1:], b[1:]):
            if (x is None) != (y is None):
                return False
            if x is not None and (x.shape != y.shape or x.device != y.device or not torch.equal(x, y)):
                return False
        return True

    def _shareable(self, port: _Port) -> bool:
        if self._disabled is not None:
            return False
        if self._watch.changed():
            self._states.clear()
            if self.reference is not None:
                try:
                    self._check_equal(self.policy, self.reference)
                except ValueError as exc:
                    self._disabled = str(exc)
                    logger.warning("shared prefix switched off: %s", exc)
                    return False
        return without_active_dropout(port.handle.prefix_modules())

    def _begin(self, port: _Port, args: tuple, kwargs: dict) -> torch.Tensor | None:
        self._pending.pop(_call_key(port), None)
        key = self._key(args, kwargs)
        if key is None or not self._shareable(port):
            self.stats["not_shareable"] += 1
            return None
        for slot, (stored_key, state) in self._states.items():
            if self._same(stored_key, key):
                self._pending[_call_key(port)] = (key, slot)  # a hit once served(): the state reached block k+1
                device = port.handle.embedding.weight.device if hasattr(port.handle.embedding, "weight") \
                    else state.device
                return state.to(device)
        self._pending[_call_key(port)] = (key, None)
        return None

    def _served(self, port: _Port) -> None:
        key, slot = self._pending.pop(_call_key(port), (None, None))
        if slot is not None:
            self._states.pop(slot, None)  # each state feeds one other forward: sharing, not caching
            self.stats["served"] += 1

    def _computed(self, port: _Port, hidden: torch.Tensor) -> None:
        key, slot = self._pending.pop(_call_key(port), (None, None))
        if slot is not None:
            self._states.pop(slot, None)  # offered but not used: the fresh state replaces it
        if key is None or hidden.dim() != 3:
            return
        self.stats["computed"] += 1
        # a private copy: the tensor block k+1 receives may be changed in place by the model before it is served
        self._states[object()] = (tuple(k if not isinstance(k, torch.Tensor) else k.clone() for k in key),
                                  hidden.detach().clone())
        while len(self._states) > self.slots:
            self._states.popitem(last=False)

    def _port_detached(self, port: _Port) -> None:
        for call in [c for c in self._pending if c[0] == id(port)]:
            del self._pending[call]
        if port in self._ports:
            self._ports.remove(port)
        if not self._ports:
            self._states.clear()

    def _boundary_moved(self, handle: FreezeHandle) -> None:
        self._disabled = f"the boundary moved to {handle.boundary}"
        logger.warning("shared prefix stopped: the boundary moved to %d (attach a new SharedPrefix to share again)",
                       handle.boundary)
        self.detach()

    # -- lifetime ---------------------------------------------------------------------------------
    def detach(self) -> None:
        """Stop serving; remove the reference's handle when this object applied it. Idempotent."""
        for port in list(self._ports):
            if port.handle.active:
                port.handle.clear_boundary_source(port)
        self._ports = []
        self._states.clear()
        self._pending.clear()
        if self._owned is not None and self._owned.active:
            self._owned.remove()
        self._owned = None

    @property
    def active(self) -> bool:
        return bool(self._ports) and self._disabled is None
