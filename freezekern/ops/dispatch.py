"""One entry point per op; ``impl`` picks the backend.

impl="auto" picks, in order: native CUDA or Triton for CUDA tensors, the
native C++ CPU kernel for CPU tensors when the extension is built, else the
PyTorch reference. "torch", "triton" and "native" force a backend; a forced
backend that is unavailable raises, while "auto" falls back (with one warning
for a broken extension, see ``native.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from freezekern.ops import reference

logger = logging.getLogger("freezekern.ops")

IMPLS = ("auto", "torch", "triton", "native")
# Ops whose Triton fp32 path (3xTF32 on sm_80+) is not yet timed against cuBLAS: "auto" keeps fp32 off it.
_TRITON_FP32_UNMEASURED = ("logit_lens_deviation", "linear_cross_entropy")
_logged_choice: set[tuple] = set()


def _triton_usable(device: torch.device) -> bool:
    from freezekern.ops import triton_deviation

    return triton_deviation.available(device)  # the same condition holds for every Triton op


def _native_usable(op: str, device: torch.device) -> bool:
    from freezekern.ops import native

    return native.has_op(op, device)


def resolve_impl(op: str, impl: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Return the concrete backend ("torch" | "triton" | "native") for ``op``.

    ``auto`` keeps fp64 inputs on the PyTorch reference (the fast paths are fp32 inside).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    if impl == "native":
        if not _native_usable(op, device):
            from freezekern.ops import native

            raise RuntimeError(
                f"impl='native' requested for {op} on {device.type}, but {native.unavailable_reason(device, op)}"
            )
        return "native"
    if impl == "triton":
        if not _triton_usable(device):
            raise RuntimeError(
                f"impl='triton' requested for {op} on {device.type}: Triton is not usable there "
                "(install triton; on CPU set TRITON_INTERPRET=1 before importing triton)"
            )
        return "triton"
    if dtype == torch.float64:
        return "torch"  # fp64 is the ground-truth path; the kernels compute in fp32
    if device.type == "cuda":
        # Measured on an H100 with an IEEE fp32 dot, Triton's fp32 logit lens was slower than cuBLAS
        # through the chunked reference; its 3xTF32 dot is not yet measured, so fp32 takes the
        # native kernel or the reference.
        triton_ok = _triton_usable(device) and not (op in _TRITON_FP32_UNMEASURED and dtype == torch.float32)
        chosen = "native" if _native_usable(op, device) else ("triton" if triton_ok else "torch")
    else:
        chosen = "native" if _native_usable(op, device) else "torch"
    key = (op, device.type, dtype, chosen)
    if key not in _logged_choice:
        _logged_choice.add(key)
        logger.debug("impl='auto' for %s on %s (%s) -> %s", op, device.type, dtype or "any dtype", chosen)
    return chosen


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
    """Cross-entropy of reading h through the LM head; see ``reference``.

    h [N, D] fp32|bf16|fp16, weight [V, D], target [N] int64 -> [N] fp32,
    0 where target == ignore_index. Never allocates [N, V].
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
    backend = resolve_impl(op, impl, device, dtype)
    if backend == "triton":
        from freezekern.ops import triton_deviation

        return getattr(triton_deviation, op)
    if backend == "native":
        from freezekern.ops import native

        return getattr(native, op)
    return getattr(reference, f"{op}_reference")


def _check_rows(op: str, h: torch.Tensor, index: torch.Tensor, name: str) -> None:
    if h.dim() != 2:
        raise ValueError(f"{op}: h must be [N, D], got shape {tuple(h.shape)}")
    if not h.is_floating_point():
        raise TypeError(f"{op}: h must be a floating tensor, got {h.dtype}")
    if index.shape != (h.shape[0],):
        raise ValueError(f"{op}: {name} must be [{h.shape[0]}], got {tuple(index.shape)}")
