"""Deviation ops and the fused linear cross-entropy: reference, Triton and native backends behind one dispatch."""

from freezekern.ops.deviation import cosine_deviation, kernel_for, logit_lens_deviation
from freezekern.ops.dispatch import IMPLS, resolve_impl
from freezekern.ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["IMPLS", "cosine_deviation", "kernel_for", "linear_cross_entropy", "logit_lens_deviation", "resolve_impl"]
