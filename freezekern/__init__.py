"""freezekern: where to fine-tune a language model, and a backward pass that stops there."""

from freezekern.analysis import DeviationTrace, analyze
from freezekern.cut import (
    FreezeHandle,
    FusedLossHandle,
    MovingBoundary,
    PrefixCache,
    active_handle,
    apply,
    fused_loss,
    move_boundary,
    trainable_parameters,
)
from freezekern.model import ModelParts, discover, load_default_model, load_model, make_batches, tiny_model
from freezekern.ops.verification import verify
from freezekern.policy import FreezePlan, MovingSchedule, plan
from freezekern.profiler import profile
from freezekern.trials import Arm, Schedule, compare, probe_plan
from freezekern.version import __version__  # noqa: F401 (the package version, freezekern.__version__)

__all__ = [
    "Arm",
    "DeviationTrace",
    "FreezeHandle",
    "FreezePlan",
    "FusedLossHandle",
    "ModelParts",
    "MovingBoundary",
    "MovingSchedule",
    "PrefixCache",
    "Schedule",
    "active_handle",
    "analyze",
    "apply",
    "compare",
    "discover",
    "fused_loss",
    "load_default_model",
    "load_model",
    "make_batches",
    "move_boundary",
    "plan",
    "probe_plan",
    "profile",
    "tiny_model",
    "trainable_parameters",
    "verify",
]
