"""freezekern: where to fine-tune a language model, and a backward pass that stops there."""

from freezekern.adapters import ModelParts, discover
from freezekern.backward_profile import profile
from freezekern.data import make_batches
from freezekern.fused_loss import FusedLossHandle, fused_loss
from freezekern.models import load_default_model, load_model, tiny_model
from freezekern.policy import FreezePlan, plan
from freezekern.prefix_cache import PrefixCache
from freezekern.trace import DeviationTrace, analyze
from freezekern.trials import Arm, compare, probe_plan
from freezekern.truncate import FreezeHandle, active_handle, apply, move_boundary, trainable_parameters

__version__ = "0.1.0"

__all__ = [
    "Arm",
    "DeviationTrace",
    "FreezeHandle",
    "FreezePlan",
    "FusedLossHandle",
    "ModelParts",
    "PrefixCache",
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
]
