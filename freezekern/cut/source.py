"""The interface between the cut and a provider of ready boundary states (the prefix cache, the shared prefix).

See ``freezekern.cut.freeze`` for when the cut asks a source; a source is
attached with ``FreezeHandle.set_boundary_source``.
"""

from __future__ import annotations

from typing import Protocol

import torch


class BoundarySource(Protocol):
    """What a provider of boundary states implements (see the module docstring).

    ``begin(args, kwargs)``: called at the start of a model call that may skip
    the prefix, with the model's call arguments; return the boundary state
    [B, T, D] (dtype and device of the hidden states) to serve, or None to let
    the prefix compute it. ``computed(hidden)``: the state the prefix computed
    for that call (when ``begin`` returned None, or when the state it offered
    could not be used because the embedding got other ids). ``served()``
    (optional): the state ``begin`` offered reached block k+1; only then is
    it a hit. ``detached()``: the handle no longer uses this source.
    """

    def begin(self, args: tuple, kwargs: dict) -> torch.Tensor | None: ...

    def computed(self, hidden: torch.Tensor) -> None: ...

    def detached(self) -> None: ...
