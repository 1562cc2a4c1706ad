"""Where a causal LM keeps its parts, loading models (the built-in one included), and the data they train on.

Public face: ``discover`` / ``ModelParts`` (embeddings, block list, final
norm, LM head, tied weights; explicit overrides), ``load_model``,
``load_default_model``, ``tiny_model``, ``make_batches``.
"""

from freezekern.model.data import IGNORE_INDEX, Example, make_batches
from freezekern.model.loading import load_default_model, load_model, prepare_default_model, tiny_model
from freezekern.model.parts import HEADS, ModelParts, discover

__all__ = ["HEADS", "IGNORE_INDEX", "Example", "ModelParts", "discover", "load_default_model", "load_model",
           "make_batches", "prepare_default_model", "tiny_model"]
