"""The deviation trace: how far each latent space is from the target tokens (streaming tracer, semantic basis).

Public face: ``analyze(model, batches, metric=...)`` -> ``DeviationTrace``; ``basis_for`` (the semantic basis).
"""

from freezekern.analysis.semantic import SemanticBasis, basis_for
from freezekern.analysis.trace import METRICS, DeviationTrace, analyze

__all__ = ["METRICS", "DeviationTrace", "SemanticBasis", "analyze", "basis_for"]
