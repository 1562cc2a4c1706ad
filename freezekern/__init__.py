"""freezekern: where to fine-tune a language model, and a backward pass that stops there."""

from freezekern.adapters import ModelParts, discover
from freezekern.data import make_batches
from freezekern.fused_loss import FusedLossHandle, fused_loss
from freezekern.models import load_default_model, load_model, tiny_model
from freezekern.policy import FreezePlan, plan
from freezekern.trace import DeviationTrace, analyze
from freezekern.truncate import FreezeHandle, apply, trainable_parameters

__version__ = "0.1.0"

__all__ = [
    "DeviationTrace",
    "FreezeHandle",
    "FreezePlan",
    "FusedLossHandle",
    "ModelParts",
    "analyze",
    "apply",
    "discover",
    "fused_loss",
    "load_default_model",
    "load_model",
    "make_batches",
    "plan",
    "tiny_model",
    "trainable_parameters",
]
