"""Which arguments of a model call the frozen prefix's output depends on: the one list the cut and its
boundary sources (prefix cache, shared prefix) use.

A stored boundary state may stand in for the prefix only when the call's
other arguments cannot reach the prefix. ``PREFIX_INPUTS`` are what the
prefix reads (they key a stored state); ``BLIND_KWARGS`` are read only above
the prefix (the loss, the head, the output format). ``READS_PREFIX`` return
the prefix's own hidden states or attentions: the cut refuses to serve a
call that sets them (in its arguments or the model's config) before any
source is asked. Any argument outside the first two lists set to a value
other than None or False makes the call unservable.
"""

from __future__ import annotations

PREFIX_INPUTS = ("input_ids", "attention_mask", "position_ids")
READS_PREFIX = ("output_hidden_states", "output_attentions")
BLIND_KWARGS = frozenset({"labels", "use_cache", "return_dict", "logits_to_keep", "num_items_in_batch",
                          "shift_labels", "fused_lm_head"})


def unservable_argument(args: tuple, kwargs: dict) -> str | None:
    """The first argument of a model call that could reach the prefix (None: a stored state may serve it)."""
    if len(args) > 1:
        return f"{len(args)} positional arguments"
    for name, value in kwargs.items():
        if name not in PREFIX_INPUTS and name not in BLIND_KWARGS and value is not None and value is not False:
            return name
    return None


def call_input_ids(args: tuple, kwargs: dict):
    """The call's ``input_ids`` (keyword or first positional argument), or None."""
    return kwargs.get("input_ids", args[0] if args else None)
