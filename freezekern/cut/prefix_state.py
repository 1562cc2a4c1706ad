"""What a frozen prefix's output depends on besides its inputs, for the prefix cache and the shared prefix.

The state entering block k+1 is a function of the sample and of three more
things, each of which a served state must match:

* the frozen tensors (every parameter that does not require grad, and every
  buffer). ``FrozenWatch`` notices a change of any of them:

  - exactly, when it goes through the tensor (in-place ops, ``copy_``,
    ``load_state_dict``: the version counter moves) or replaces its storage
    (``p.data = other``, ``model.to(dtype)``: data pointer, strides, dtype or
    device change);
  - by content, when it writes through ``p.data`` into the same storage (which
    moves no version counter): every check also compares the sums, modulo
    2**64, of the tensor's bits read as 64-bit words, per row and per column
    of its ``[shape[0], -1]`` matrix view (small, 1-D, non-contiguous tensors
    and rows of a size not a multiple of 8 bytes: a BLAKE2 hash of all
    bytes, exact). Any change of one element and any exchange of elements
    changes them; a write whose word changes cancel along every row and
    every column at once would not be seen.

* the autocast state of the call (enabled, dtype) for the device type of the
  model and for the CPU: ``autocast_state``;
* the model's configuration (attention implementation, rope scaling, ...):
  ``prefix_config`` (entries that cannot change the prefix's output left out)
  and ``config_digest``.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from freezekern.model.peft import unwrap_peft

# config entries that never change what the prefix computes (names, token ids, output switches)
IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "architectures", "_commit_hash", "bos_token_id",
                       "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "use_cache",
                       "return_dict", "output_hidden_states", "output_attentions", "torchscript", "dtype",
                       "torch_dtype", "id2label", "label2id", "problem_type", "tokenizer_class", "prefix",
                       "task_specific_params", "finetuning_task"}


def prefix_config(model: nn.Module) -> dict:
    """The model's config entries that can change what its prefix computes, with the attention implementation."""
    config = getattr(unwrap_peft(model)[0], "config", None)
    if config is None:
        return {}
    data = {k: v for k, v in config.to_dict().items() if k not in IGNORED_CONFIG_KEYS}
    data["_attn_implementation"] = getattr(config, "_attn_implementation", None)
    return data


def config_digest(model: nn.Module) -> str:
    """A stable digest of ``prefix_config(model)`` (the same across processes for the same config)."""
    text = json.dumps(prefix_config(model), sort_keys=True, default=repr)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def autocast_state(device: torch.device) -> tuple:
    """(enabled, dtype) of autocast for ``device``'s type and for the CPU, as a forward there would see them."""
    kinds = dict.fromkeys([torch.device(device).type, "cpu"])
    return tuple((kind, torch.is_autocast_enabled(kind),
                  str(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else None)
                 for kind in kinds)


def _content_hash(tensor: torch.Tensor) -> bytes:
    t = tensor.detach()
    row_bytes = t[0].numel() * t.element_size() if t.dim() >= 2 else 0
    if t.numel() <= 4096 or t.dim() < 2 or not t.is_contiguous() or row_bytes % 8:
        return hashlib.blake2b(t.to("cpu").contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).digest()
    words = t.reshape(t.shape[0], -1).view(torch.int64)  # the bits, 8 bytes at a time; sums wrap modulo 2**64
    digest = hashlib.blake2b(digest_size=16)
    digest.update(words.sum(1).cpu().numpy().tobytes())  # per row
    digest.update(words.sum(0).cpu().numpy().tobytes())  # per column
    return digest.digest()


class FrozenWatch:
    """Notices any change of the frozen tensors ``tensors()`` returns (see the module docstring).

    ``tensors``: a callable giving the current list (a tensor that starts or
    stops requiring grad changes the list, which counts as a change).
    """

    def __init__(self, tensors):
        self._tensors = tensors
        self._seen = self._look()

    def _look(self) -> list[tuple]:
        return [(id(t), t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version,
                 _content_hash(t)) for t in self._tensors()]

    @torch.compiler.disable  # host-side hashing: nothing for torch.compile to trace
    def changed(self) -> bool:
        """Whether anything changed since the watch was made or last reported a change (then it re-arms)."""
        now = self._look()
        if now == self._seen:
            return False
        self._seen = now
        return True
