"""freezekern: where to fine-tune a language model, and a backward pass that stops there."""

from freezekern.adapters import ModelParts, discover
from freezekern.data import make_batches
from freezekern.models import load_default_model, load_model, tiny_model
from freezekern.policy import FreezePlan, plan
from freezekern.trace import DeviationTrace, analyze

__version__ = "0.1.0"

__all__ = [
    "DeviationTrace",
    "FreezePlan",
    "ModelParts",
    "analyze",
    "discover",
    "load_default_model",
    "load_model",
    "make_batches",
    "plan",
    "tiny_model",
]
