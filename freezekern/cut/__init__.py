"""Applying a plan: the freeze, the graph-free prefix, the cut at the boundary, and what builds on the cut.

Public face: ``apply`` / ``FreezeHandle`` / ``move_boundary`` / ``active_handle``
/ ``trainable_parameters`` (the cut), ``MovingBoundary`` (moves it along a
``MovingSchedule``), ``PrefixCache`` and ``SharedPrefix`` (boundary sources,
``BoundarySource`` their interface), ``fused_loss`` / ``FusedLossHandle``
(the LM-head loss without logits).
"""

from freezekern.cut.freeze import apply
from freezekern.cut.fused_loss import FusedLossHandle, fused_loss
from freezekern.cut.handle import (
           FreezeHandle,
           active_handle,
           named_trainable_parameters,
           trainable_parameters,
)
from freezekern.cut.move import move_boundary
from freezekern.cut.moving import MovingBoundary
from freezekern.cut.prefix_cache import PrefixCache
from freezekern.cut.source import BoundarySource

__all__ = ["BoundarySource", "FreezeHandle", "FusedLossHandle", "MovingBoundary", "PrefixCache", "active_handle",
           "apply", "fused_loss", "move_boundary", "named_trainable_parameters", "trainable_parameters"]
