"""Which backend runs an op: ``impl`` ("auto" | "torch" | "triton" | "native") made concrete.

impl="auto" picks per op, device and dtype, from ``AUTO_ORDER`` (the order
measured fastest on an H100 and on the CPU, docs/benchmarks.md): on CUDA the
16-bit logit lens goes to Triton's tensor-core kernel and the fp32 one to the
native kernel (Triton's fp32 dot was slower than cuBLAS), the cosine to the
native kernel, then Triton; on the CPU the native C++ kernel; the PyTorch
reference when nothing else is available, and always for fp64. "torch",
"triton" and "native" force a backend; a forced backend that is unavailable
raises, while "auto" falls back (with one warning for a broken extension,
see ``native.py``). ``freezekern env`` prints the choice for each case.

The logit lens has no kernels of its own: it runs the linear cross-entropy's
kernels of the chosen backend (``deviation.py``), so its native availability
is that of ``linear_cross_entropy``. The ops themselves are in
``deviation.py`` and ``linear_cross_entropy.py``.
"""

from __future__ import annotations

import logging

import torch

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
# op -> the op whose kernels run it, where they differ
_KERNELS_OF = {"logit_lens_deviation": "linear_cross_entropy"}
_logged_choice: set[tuple] = set()


def _triton_usable(device: torch.device) -> bool:
    from freezekern.ops import triton_common

    return triton_common.available(device)  # the same condition holds for every Triton op


def _native_usable(op: str, device: torch.device) -> bool:
    from freezekern.ops import native

    return native.has_op(_KERNELS_OF.get(op, op), device)


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

            reason = native.unavailable_reason(device, _KERNELS_OF.get(op, op))
            raise RuntimeError(f"impl='native' requested for {op} on {device.type}, but {reason}")
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
