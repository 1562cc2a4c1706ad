"""Prefix cache: keep the boundary hidden state of each sample and skip the frozen prefix later.

Off by default. When the frozen prefix is deterministic (every prefix module
is in eval mode or has no dropout) and the same samples come back (epochs),
the hidden state entering block k+1 is a pure function of the sample and the
frozen weights. ``PrefixCache`` stores it per sample on the first pass and,
on a later forward whose samples are all cached, skips the embedding and
blocks 1..k altogether: the embedding returns a placeholder, the frozen
blocks pass it through, and the cut hands block k+1 the cached state.

    handle = freezekern.truncate.apply(model, plan)
    cache = PrefixCache(max_bytes=4 << 30).attach(handle)        # or directory="/scratch/fk-cache"

Keys: a BLAKE2 hash of one sample's ``input_ids`` row, its
``attention_mask`` row and ``position_ids`` row (when given), the sequence
length, the plan's boundary, the model fingerprint and a digest of the frozen
weights (so a disk cache is never reused for other weights). A forward is
served from the cache only when every sample of the batch is cached; any
forward with ``inputs_embeds``, a KV cache or other inputs the prefix might
read is passed through untouched. In-place changes to frozen weights
(``load_state_dict`` and the like bump their version counters) clear the cache.

Storage: memory (on ``device``, default: where the hidden state lives) or a
directory of one file per sample; ``max_bytes`` caps what is stored (further
samples are computed normally, nothing is evicted, so every epoch gets the
same hit rate). Requires decoder blocks that return a tensor (transformers 5
families do); others are detected on the first forward and bypassed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("freezekern.prefix_cache")

_DROPOUT_ATTRS = ("p", "dropout", "attention_dropout", "attn_dropout", "dropout_rate", "hidden_dropout")
_PREFIX_KWARGS = {"input_ids", "attention_mask", "position_ids", "labels", "use_cache", "return_dict",
                  "output_attentions", "output_hidden_states", "logits_to_keep", "num_items_in_batch"}


class PrefixCache:
    """Per-sample cache of the boundary hidden state; ``attach(handle)`` to use it."""

    def __init__(self, max_bytes: int = 1 << 30, directory=None, device=None):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.directory = Path(directory) if directory is not None else None
        self.device = torch.device(device) if device is not None else None
        self._memory: dict[str, torch.Tensor] = {}
        self._disk: dict[str, int] = {}
        self._bytes = 0
        self._handle = None
        self._hook = None
        self._salt = ""
        self._versions: list[int] = []
        self._pending: tuple | None = None
        self._unsupported: str | None = None
        self._determinism: tuple | None = None
        self._counts = {"hits": 0, "misses": 0, "bypassed": 0, "stored": 0, "rejected": 0}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for path in self.directory.glob("*.pt"):
                self._disk[path.stem] = path.stat().st_size
                self._bytes += path.stat().st_size

    # -- wiring -------------------------------------------------------------------------------
    def attach(self, handle) -> PrefixCache:
        """Serve ``handle``'s model from this cache (replaces any previous attachment).

        A memory cache starts empty; a disk cache keeps the entries made for the
        same frozen weights and boundary (their keys include both).
        """
        if not handle.active:
            raise RuntimeError("cannot attach a prefix cache to a removed FreezeHandle")
        if handle.boundary >= handle.num_layers:
            raise ValueError("the plan freezes every block: there is no boundary state to cache")
        current = handle._state.prefix_cache
        if current is not None and current is not self:
            current.detach()
        if self._handle is not None:
            self.detach()
        self._handle = handle
        self._determinism = None
        handle._state.prefix_cache = self
        self._salt = self._weights_salt(handle)
        self._versions = self._prefix_versions()
        if self.directory is None:
            self.clear()
        self._hook = handle.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True)
        return self

    def detach(self) -> None:
        """Stop serving; the stored entries stay until ``clear()``."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._handle is not None:
            state = self._handle._state
            if state.prefix_cache is self:
                state.prefix_cache = None
            state.skip_prefix, state.cached_hidden = False, None
        self._handle = None
        self._pending = None

    def clear(self) -> None:
        """Drop every entry (memory and disk)."""
        self._memory.clear()
        if self.directory is not None:
            for key in list(self._disk):
                (self.directory / f"{key}.pt").unlink(missing_ok=True)
            self._disk.clear()
        self._bytes = 0

    def stats(self) -> dict:
        return {**self._counts, "entries": len(self._memory) + len(self._disk), "bytes": self._bytes,
                "max_bytes": self.max_bytes, "unsupported": self._unsupported}

    # -- keys ---------------------------------------------------------------------------------
    def _prefix_modules(self) -> list[nn.Module]:
        state = self._handle._state
        return [state.embedding, *state.recorded_blocks[: state.boundary]]

    def _prefix_parameters(self):
        seen: set[int] = set()
        for module in self._prefix_modules():
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def _prefix_versions(self) -> list[int]:
        return [p._version for p in self._prefix_parameters()]

    def _weights_salt(self, handle) -> str:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{handle.parts.fingerprint()}|k={handle.boundary}|".encode())
        for p in self._prefix_parameters():
            digest.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _keys(self, input_ids: torch.Tensor, mask, positions) -> list[str]:
        ids = input_ids.detach().to("cpu", torch.int64)
        mask = None if mask is None else mask.detach().to("cpu", torch.int64)
        positions = None if positions is None else positions.detach().to("cpu", torch.int64)
        if positions is not None and positions.shape[0] == 1 and ids.shape[0] > 1:
            positions = positions.expand(ids.shape[0], -1)
        keys = []
        for row in range(ids.shape[0]):
            digest = hashlib.blake2b(digest_size=20)
            digest.update(f"{self._salt}|{ids.shape[1]}|".encode())
            digest.update(ids[row].numpy().tobytes())
            digest.update(b"|m" + (mask[row].numpy().tobytes() if mask is not None else b"-"))
            digest.update(b"|p" + (positions[row].numpy().tobytes() if positions is not None else b"-"))
            keys.append(digest.hexdigest())
        return keys

    def _deterministic(self) -> bool:
        modes = tuple(m.training for m in self._prefix_modules())
        if self._determinism is None or self._determinism[0] != modes:
            self._determinism = (modes, self._check_determinism())
        return self._determinism[1]

    def _check_determinism(self) -> bool:
        for module in self._prefix_modules():
            for sub in module.modules():
                if not sub.training:
                    continue
                for attr in _DROPOUT_ATTRS:
                    value = getattr(sub, attr, None)
                    if isinstance(value, float) and value > 0.0:
                        return False
        return True

    # -- the forward --------------------------------------------------------------------------
    def _has(self, key: str) -> bool:
        return key in self._memory or key in self._disk

    def _get(self, key: str) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        return torch.load(self.directory / f"{key}.pt", map_location="cpu", weights_only=True)

    def _put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if self._bytes + size > self.max_bytes:
            self._counts["rejected"] += 1
            return
        if self.directory is None:
            self._memory[key] = value.to(self.device or value.device, copy=True)
        else:
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            os.close(fd)
            try:
                torch.save(value.to("cpu").clone(), tmp)
                os.replace(tmp, self.directory / f"{key}.pt")
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self._disk[key] = size
        self._bytes += size
        self._counts["stored"] += 1

    def _on_model_call(self, module, args, kwargs):
        self._pending = None
        if self._unsupported is not None:
            self._counts["bypassed"] += 1
            return None
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        unknown = [k for k, v in kwargs.items() if k not in _PREFIX_KWARGS and v is not None]
        if input_ids is None or unknown or len(args) > 1 or kwargs.get("inputs_embeds") is not None \
                or not self._deterministic():
            self._counts["bypassed"] += 1
            return None
        versions = self._prefix_versions()
        if versions != self._versions:
            logger.info("frozen prefix weights changed in place: prefix cache cleared")
            self._salt = self._weights_salt(self._handle)
            self._versions = versions
            self.clear()
        keys = self._keys(input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        self._pending = (input_ids, keys, all(self._has(k) for k in keys))
        return None

    def arm(self, args, kwargs) -> None:
        """Called by the embedding's forward: skip the prefix if this forward's samples are all cached."""
        state = self._handle._state
        state.skip_prefix, state.cached_hidden = False, None
        pending = self._pending
        if pending is None:
            return
        ids = args[0] if args else kwargs.get("input")
        if ids is not pending[0]:  # not the forward the model hook saw: compute normally
            self._pending = None
            return
        if pending[2]:
            rows = [self._get(k) for k in pending[1]]
            hidden = torch.stack(rows).to(state.embedding.weight.device if hasattr(state.embedding, "weight")
                                          else rows[0].device)
            state.cached_hidden, state.skip_prefix = hidden, True

    def note_output(self, module: nn.Module, out) -> None:
        """Called after a frozen module ran: only tensor-returning blocks can be skipped."""
        if module is not self._handle._state.embedding and not isinstance(out, torch.Tensor):
            self._unsupported = f"{type(module).__name__} returns {type(out).__name__}, not a tensor"
            logger.warning("prefix cache disabled: %s", self._unsupported)
            self._pending = None

    def on_boundary(self, hidden: torch.Tensor) -> torch.Tensor:
        """Called at the cut: serve a hit, or store this forward's boundary states."""
        state = self._handle._state
        pending, self._pending = self._pending, None
        try:
            if state.skip_prefix and state.cached_hidden is not None:
                self._counts["hits"] += 1
                return state.cached_hidden
            if pending is None or self._unsupported is not None:
                return hidden
            self._counts["misses"] += 1
            if hidden.dim() != 3 or hidden.shape[0] != len(pending[1]) or hidden.shape[1] != pending[0].shape[-1]:
                return hidden
            detached = hidden.detach()
            for row, key in enumerate(pending[1]):
                if not self._has(key):
                    self._put(key, detached[row])
            return hidden
        finally:
            state.skip_prefix, state.cached_hidden = False, None
