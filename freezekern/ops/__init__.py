"""Deviation ops: reference, Triton and native backends behind one dispatch."""

from freezekern.ops.dispatch import IMPLS, cosine_deviation, kernel_for, logit_lens_deviation, resolve_impl

__all__ = ["IMPLS", "cosine_deviation", "kernel_for", "logit_lens_deviation", "resolve_impl"]
