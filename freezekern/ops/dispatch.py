"""One entry point per op; ``impl`` picks the backend.

impl="auto" picks per op, device and dtype, from ``AUTO_ORDER`` (the order
measured fastest on an H100 and on the CPU, docs/benchmarks.md): on CUDA the
16-bit logit lens goes to Triton's tensor-core kernel and the fp32 one to the
native kernel (Triton's fp32 dot was slower than cuBLAS), the cosine to the
native kernel, then Triton; on the CPU the native C++ kernel; the PyTorch
reference when nothing else is available, and always for fp64. "torch",
"triton" and "native" force a backend; a forced backend that is unavailable
raises, while "auto" falls back (with one warning for a broken extension,
see ``native.py``). ``freezekern env`` prints the choice for each case.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from freezekern.ops import reference

logger = logging.getLogger("freezekern.ops")

IMPLS = ("auto", "torch", "triton", "native")
_16BIT = (torch.bfloat16, torch.float16)
# (op, device type, dtype class) -> backends to try, in order; "torch" always works
AUTO_ORDER = {
    ("logit_lens_deviation", "cuda", "16bit"): ("triton", "native", "torch"),
    ("logit_lens_deviation", "cuda", "fp32"): ("native", "torch"),
    ("cosine_deviation", "cuda", "16bit"): ("native", "triton", "torch"),
    ("cosine_deviation", "cuda", "fp32"): ("native", "triton", "torch"),
    # Triton's fp32 path (3xTF32 on sm_80+) is not yet timed against cuBLAS: fp32 stays off it
    ("linear_cross_entropy", "cuda", "16bit"): ("native", "triton", "torch"),
    ("linear_cross_entropy", "cuda", "fp32"): ("native", "torch"),
}
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
    chosen = "torch"  # fp64 is the ground-truth path (the kernels compute in fp32); also the last resort
    if dtype != torch.float64:
        for backend in auto_order(op, device, dtype):
            if backend == "torch" or (backend == "native" and _native_usable(op, device)) or \
                    (backend == "triton" and _triton_usable(device)):
                chosen = backend
                break
    key = (op, device.type, dtype, chosen)
    if key not in _logged_choice:
        _logged_choice.add(key)
        logger.debug("impl='auto' for %s on %s (%s) -> %s", op, device.type, dtype or "any dtype", chosen)
    return chosen


def auto_order(op: str, device: torch.device, dtype: torch.dtype | None) -> tuple[str, ...]:
    """The backends ``impl="auto"`` tries for ``op`` on ``device`` with inputs of ``dtype``, in order.

    A dtype of None (not known yet) counts as 16-bit on CUDA only for the cosine, whose order is the
    same either way; for the logit lens it counts as fp32 (the order that never needs tensor cores).
    """
    if device.type != "cuda":
        return ("native", "torch")
    kind = "16bit" if dtype in _16BIT else "fp32"
    return AUTO_ORDER.get((op, "cuda", kind), ("native", "triton", "torch"))


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
