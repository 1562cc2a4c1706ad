"""Prefix cache: keep the boundary hidden state of each sample and skip the frozen prefix later.

Off by default. When the frozen prefix is deterministic (every prefix module
is in eval mode or has no dropout) and the same samples come back (epochs),
the hidden state entering block k+1 is a pure function of the sample and the
frozen weights. ``PrefixCache`` stores it per sample on the first pass and,
on a later training forward whose samples are all cached, serves it: the
embedding and blocks 1..k are skipped altogether.

    handle = freezekern.apply(model, plan)
    cache = freezekern.PrefixCache(max_bytes=4 << 30).attach(handle)   # or directory="/scratch/fk-cache"

It is a ``freezekern.cut.freeze.BoundarySource``: truncate decides which model
calls could observe the prefix (``output_hidden_states``, ``output_attentions``,
``inputs_embeds``, a KV cache, foreign hooks on prefix modules) and never asks
the cache about those. The cache itself takes part only in grad-enabled
forwards (training steps): evaluation, ``freezekern.analyze`` and anything
else under ``torch.no_grad()`` always runs the prefix, and stores nothing.

Keys: a BLAKE2 hash of one sample's ``input_ids`` row, its
``attention_mask`` row and ``position_ids`` row (when given), the sequence
length, the call's autocast state (enabled and dtype, for the model's device
type and the CPU), a digest of the model's config
(``freezekern.cut.prefix_state.config_digest``: attention implementation, rope
scaling, ...), and a salt: the plan's boundary, the model fingerprint and a
digest of every frozen tensor (parameters that do not require grad, and
buffers). A forward is served only when every sample of the batch is cached,
and counts as a hit only when the served state reached block k+1. Any change
of a frozen tensor clears the cache before the next consulted forward:
through the tensor or its storage exactly, through ``p.data`` by its content
(``freezekern.cut.prefix_state.FrozenWatch`` says what that check sees).

Storage: memory (on ``device``, default: where the hidden state lives) or a
directory with one sub-directory per salt and one file per sample; entries
of other salts (other weights or boundaries) are deleted when the cache is
attached, so they never count against ``max_bytes``. ``max_bytes`` caps what
is stored; further samples are computed normally and nothing current is
evicted, so every epoch gets the same hit rate.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import threading
from pathlib import Path

import torch
from torch import nn

from freezekern.cut.call_inputs import call_input_ids, unservable_argument
from freezekern.cut.prefix_state import FrozenWatch, autocast_state, config_digest
from freezekern.io import atomic_write_bytes

logger = logging.getLogger("freezekern.cut.prefix_cache")

_DROPOUT_ATTRS = ("p", "dropout", "attention_dropout", "attn_dropout", "dropout_rate", "hidden_dropout")


class PrefixCache:
    """Per-sample cache of the boundary hidden state; ``attach(handle)`` to use it."""

    def __init__(self, max_bytes: int = 1 << 30, directory=None, device=None):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.root = Path(directory) if directory is not None else None
        self.device = torch.device(device) if device is not None else None
        self._memory: dict[str, torch.Tensor] = {}
        self._disk: dict[str, int] = {}
        self._bytes = 0
        self._handle = None
        self._salt = ""
        self._watch: FrozenWatch | None = None
        self._calls: dict[int, list[str] | None] = {}  # the keys of the call in flight, per thread
        self._determinism: tuple | None = None
        self._counts = {"hits": 0, "misses": 0, "bypassed": 0, "stored": 0, "rejected": 0, "evicted": 0}

    @property
    def _pending(self) -> list[str] | None:
        return self._calls.get(threading.get_ident())

    @_pending.setter
    def _pending(self, keys: list[str] | None) -> None:
        if keys is None:
            self._calls.pop(threading.get_ident(), None)
        else:
            self._calls[threading.get_ident()] = keys

    # -- wiring -------------------------------------------------------------------------------
    def attach(self, handle) -> PrefixCache:
        """Serve ``handle``'s model from this cache (replaces any previous attachment).

        Refused when a prefix parameter requires grad (a tied head trained with
        ``train_head=True`` makes the embedding weight change every step: no
        entry would ever be reused). A memory cache starts empty; a disk cache
        keeps the entries made for the same frozen tensors and boundary and
        deletes every other salt's.
        """
        if not handle.active:
            raise RuntimeError("cannot attach a prefix cache to a removed FreezeHandle")
        trained = [p for p in handle.prefix_parameters() if p.requires_grad]
        if trained:
            raise ValueError(
                f"{len(trained)} parameter tensors of the frozen prefix require grad (e.g. an input embedding tied "
                "to a trained LM head, train_head=True): their boundary states change every step and cannot be "
                "cached; freeze the head (train_head=False) or train without the prefix cache"
            )
        if self._handle is not None and self._handle is not handle:
            self._handle.clear_boundary_source(self)
        handle.set_boundary_source(self)  # refuses plans without a boundary state
        self._handle = handle
        self._determinism = None
        self._salt = self._weights_salt(handle)
        self._watch = FrozenWatch(self._frozen_tensors)
        if self.root is None:
            self.clear()
        else:
            self._open_directory()
        return self

    def detach(self) -> None:
        """Stop serving; the stored entries stay until ``clear()``."""
        if self._handle is not None:
            self._handle.clear_boundary_source(self)
        self._handle = None
        self._pending = None

    def clear(self) -> None:
        """Drop every entry of the current salt (memory and disk)."""
        self._memory.clear()
        if self.root is not None and self._salt:
            shutil.rmtree(self.root / self._salt, ignore_errors=True)
        self._disk.clear()
        self._bytes = 0

    def stats(self) -> dict:
        return {**self._counts, "entries": len(self._memory) + len(self._disk), "bytes": self._bytes,
                "max_bytes": self.max_bytes}

    # -- BoundarySource -------------------------------------------------------------------------
    def detached(self) -> None:
        """The handle stopped using this cache (it was removed, or another source replaced it)."""
        self._handle = None
        self._pending = None

    def moved(self, handle) -> None:
        """The boundary moved (``move_boundary``): follow the new handle; its entries get a new salt."""
        self.attach(handle)

    def begin(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        self._pending = None
        if self._handle is None:
            return None
        if not torch.is_grad_enabled():
            return None  # evaluation, analyze, reference forwards: always computed, never stored
        input_ids = call_input_ids(args, kwargs)
        if unservable_argument(args, kwargs) is not None or not self._deterministic():
            self._counts["bypassed"] += 1
            return None
        if self._watch.changed():
            logger.info("frozen weights changed: prefix cache cleared")
            self.clear()
            self._salt = self._weights_salt(self._handle)
            if self.root is not None:
                self._open_directory()
        embedding = self._handle.embedding
        device = embedding.weight.device if hasattr(embedding, "weight") else input_ids.device
        context = f"{autocast_state(device)}|{config_digest(self._handle.model)}"
        keys = self._keys(input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids"), context)
        self._pending = keys
        if all(self._has(k) for k in keys):
            return torch.stack([self._get(k) for k in keys]).to(device)
        return None

    def served(self) -> None:
        """The state ``begin`` offered reached block k+1: a hit."""
        if self._pending is not None:
            self._counts["hits"] += 1
        self._pending = None

    def computed(self, hidden: torch.Tensor) -> None:
        keys, self._pending = self._pending, None
        if keys is None:
            return
        self._counts["misses"] += 1
        if hidden.dim() != 3 or hidden.shape[0] != len(keys):
            return
        detached = hidden.detach()
        for row, key in enumerate(keys):
            if not self._has(key):
                self._put(key, detached[row])

    # -- keys ---------------------------------------------------------------------------------
    def _frozen_tensors(self, handle=None) -> list[torch.Tensor]:
        model = (handle or self._handle).model
        tensors = [p for p in model.parameters() if not p.requires_grad]
        return tensors + list(model.buffers())

    def _weights_salt(self, handle) -> str:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{handle.parts.fingerprint()}|k={handle.boundary}|".encode())
        for t in self._frozen_tensors(handle):
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _keys(self, input_ids: torch.Tensor, mask, positions, context: str = "") -> list[str]:
        ids = input_ids.detach().to("cpu", torch.int64)
        mask = None if mask is None else mask.detach().to("cpu", torch.int64)
        positions = None if positions is None else positions.detach().to("cpu", torch.int64)
        if positions is not None and positions.shape[0] == 1 and ids.shape[0] > 1:
            positions = positions.expand(ids.shape[0], -1)
        keys = []
        for row in range(ids.shape[0]):
            digest = hashlib.blake2b(digest_size=20)
            digest.update(f"{self._salt}|{ids.shape[1]}|{context}|".encode())
            digest.update(ids[row].numpy().tobytes())
            digest.update(b"|m" + (mask[row].numpy().tobytes() if mask is not None else b"-"))
            digest.update(b"|p" + (positions[row].numpy().tobytes() if positions is not None else b"-"))
            keys.append(digest.hexdigest())
        return keys

    def _deterministic(self) -> bool:
        modules = self._handle.prefix_modules()
        modes = tuple(m.training for m in modules)
        if self._determinism is None or self._determinism[0] != modes:
            self._determinism = (modes, without_active_dropout(modules))
        return self._determinism[1]

    # -- storage ------------------------------------------------------------------------------
    def _open_directory(self) -> None:
        """Index the current salt's entries on disk and delete every other salt's."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._memory.clear()
        self._disk.clear()
        self._bytes = 0
        for child in self.root.iterdir():
            if child.name == self._salt:
                continue
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            self._counts["evicted"] += 1
        folder = self.root / self._salt
        folder.mkdir(exist_ok=True)
        for path in folder.glob("*.pt"):
            size = path.stat().st_size
            self._disk[path.stem] = size
            self._bytes += size
        for path in folder.glob(".*.tmp"):  # left by an interrupted write
            path.unlink(missing_ok=True)

    def _has(self, key: str) -> bool:
        return key in self._memory or key in self._disk

    def _get(self, key: str) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        return torch.load(self.root / self._salt / f"{key}.pt", map_location="cpu", weights_only=True)

    def _put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if self._bytes + size > self.max_bytes:
            self._counts["rejected"] += 1
            return
        if self.root is None:
            self._memory[key] = value.to(self.device or value.device, copy=True)
        else:
            path = self.root / self._salt / f"{key}.pt"
            buffer = io.BytesIO()
            torch.save(value.to("cpu").clone(), buffer)
            atomic_write_bytes(path, buffer.getvalue())
            size = path.stat().st_size
            self._disk[key] = size
        self._bytes += size
        self._counts["stored"] += 1


def without_active_dropout(modules: list[nn.Module]) -> bool:
    """True when no module (or submodule) in training mode has a positive dropout rate: the forward is deterministic."""
    for module in modules:
        for sub in module.modules():
            if not sub.training:
                continue
            for attr in _DROPOUT_ATTRS:
                value = getattr(sub, attr, None)
                if isinstance(value, float) and value > 0.0:
                    return False
    return True
