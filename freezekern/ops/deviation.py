"""The deviation ops: one entry point each, ``impl`` picks the backend (``dispatch.resolve_impl``).

    cosine_deviation      1 - cos(n(h), basis[target_row]) per row: its own kernels
                          (``reference``, ``triton_deviation``, ``native``)
    logit_lens_deviation  the cross-entropy of reading h through the LM head: the
                          linear cross-entropy's per-row forward, no gradient, on the
                          normed state x = n(h) cast to h's dtype, as the model forms
                          it before its LM head; it runs the linear cross-entropy's
                          kernels of the chosen backend

Shapes and dtypes: ``reference`` (cosine) and ``linear_cross_entropy`` (logit lens).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from freezekern.ops import reference
from freezekern.ops.dispatch import resolve_impl
from freezekern.ops.linear_cross_entropy import linear_cross_entropy

OPS = ("cosine_deviation", "logit_lens_deviation")


def cosine_deviation(
    h: torch.Tensor,
    basis: torch.Tensor,
    target_row: torch.Tensor,
    *,
    norm: str | None = "rms",
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    impl: str = "auto",
) -> torch.Tensor:
    """1 - cos(n(h), basis[target_row]) per row; see ``reference`` for shapes.

    h [N, D] fp32|bf16|fp16, basis [M, D], target_row [N] int64 (< 0 ignored)
    -> [N] fp32, 0 on ignored rows.
    """
    _check_rows("cosine_deviation", h, target_row, "target_row")
    if basis.dim() != 2 or basis.shape[1] != h.shape[1]:
        raise ValueError(f"basis must be [M, {h.shape[1]}], got {tuple(basis.shape)}")
    reference.check_norm_kind(norm)
    kwargs = dict(norm=norm, norm_weight=norm_weight, norm_bias=norm_bias, norm_eps=norm_eps)
    return kernel_for("cosine_deviation", impl, h.device, h.dtype)(h, basis, target_row, **kwargs)


def logit_lens_deviation(
    h: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    norm: str | None = "rms",
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    ignore_index: int = -100,
    impl: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of reading h through the LM head, per row, never forming [N, V].

    d_t = logsumexp(W x_t + b) - (W[y_t] . x_t + b[y_t]) with x = n(h) in h's
    dtype; 0 where y_t == ignore_index. h [N, D] fp32|bf16|fp16 (fp64: computed
    in fp64 by the torch backend), weight [V, D], bias [V] or None, target [N]
    int -> [N] fp32. A target outside [0, V) raises on the CPU and gives NaN
    elsewhere, as the linear cross-entropy does.
    """
    _check_rows("logit_lens_deviation", h, target, "target")
    if weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"weight must be [V, {h.shape[1]}], got {tuple(weight.shape)}")
    reference.check_norm_kind(norm)
    kwargs = dict(
        bias=bias, norm=norm, norm_weight=norm_weight, norm_bias=norm_bias,
        norm_eps=norm_eps, ignore_index=ignore_index,
    )
    return kernel_for("logit_lens_deviation", impl, h.device, h.dtype)(h, weight, target, **kwargs)


def kernel_for(op: str, impl: str, device: torch.device, dtype: torch.dtype | None = None) -> Callable:
    """The backend function that ``impl`` resolves to for ``op`` on ``device``/``dtype``.

    It takes the same arguments as the public op but skips the argument
    checks; callers that run one op many times on inputs of one kind (the
    tracer, 31 latent spaces per batch) resolve it once.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    backend = resolve_impl(op, impl, device, dtype)
    if op == "logit_lens_deviation":
        return functools.partial(_logit_lens, impl=backend)
    if backend == "triton":
        from freezekern.ops import triton_deviation

        return triton_deviation.cosine_deviation
    if backend == "native":
        from freezekern.ops import native

        return native.cosine_deviation
    return reference.cosine_deviation_reference


def _logit_lens(h, weight, target, *, bias=None, norm="rms", norm_weight=None, norm_bias=None, norm_eps=1e-6,
                ignore_index=-100, impl):
    """The logit lens on backend ``impl`` ("torch" | "triton" | "native"), arguments unchecked."""
    with torch.no_grad():
        # n = None is the identity: h is the head's input as it is (apply_norm would widen it and back)
        x = h if norm is None else reference.apply_norm(h, norm, norm_weight, norm_bias, norm_eps).to(h.dtype)
        return linear_cross_entropy(x, weight, target, bias=bias, ignore_index=ignore_index, reduction="none",
                                    impl=impl)


def _check_rows(op: str, h: torch.Tensor, index: torch.Tensor, name: str) -> None:
    if h.dim() != 2:
        raise ValueError(f"{op}: h must be [N, D], got shape {tuple(h.shape)}")
    if not h.is_floating_point():
        raise TypeError(f"{op}: h must be a floating tensor, got {h.dtype}")
    if index.shape != (h.shape[0],):
        raise ValueError(f"{op}: {name} must be [{h.shape[0]}], got {tuple(index.shape)}")
