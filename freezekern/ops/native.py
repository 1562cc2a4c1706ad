"""Python face of the compiled extension ``freezekern._C``.

The extension registers ``torch.ops.freezekern.cosine_deviation`` and the
fused loss ``torch.ops.freezekern.linear_cross_entropy`` with its recompute
backward ``linear_cross_entropy_backward`` (the loss's per-row forward is
also the logit lens, see ``deviation.py``; schemas in ``csrc/ops.cpp``), each
with a CPU kernel (OpenMP + BLAS) and, when built against a CUDA torch, a
CUDA kernel. This module loads it inside try/except and records why it is
unavailable: not built (the package still works through the PyTorch
reference) or broken (built against another torch, undefined symbol, ...),
which is reported once with ``warnings.warn``. Set FREEZEKERN_DISABLE_NATIVE=1
to ignore a built extension.

It also registers the fake (meta) kernels so ``torch.compile`` can trace the
ops (the cosine returns an fp32 [N] tensor on h's device). The autograd
formula of ``linear_cross_entropy`` is registered beside its Python face, in
``linear_cross_entropy.py``; this module imports nothing else of the package but ``fake_checks``
(the kernels' argument checks, a leaf).

Shapes and dtypes are those of ``reference.py`` and ``linear_cross_entropy.py``:
h [N, D] fp32|bf16|fp16 (any row stride; an inner stride != 1 is copied to
contiguous by the kernel), basis [M, D], target_row [N] int64 -> [N] fp32, 0
on ignored rows; weight [V, D], bias [V], target [N] int64.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

OPS = ("cosine_deviation", "linear_cross_entropy", "linear_cross_entropy_backward")
_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` while torch is importable"


@dataclasses.dataclass
class _State:
    loaded: bool = False
    broken: bool = False
    reason: str = "the native extension freezekern._C is not built"
    module: ModuleType | None = None
    # op name -> device types ("cpu", "cuda") that have a kernel
    kernels: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)


def _registered_kernels() -> dict[str, frozenset[str]]:
    kernels = {}
    for op in OPS:
        name = f"freezekern::{op}"
        try:
            kernels[op] = frozenset(
                device
                for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
            )
        except RuntimeError:  # an extension built before this op existed: the others still work
            kernels[op] = frozenset()
    if not any(kernels.values()):
        raise RuntimeError("freezekern._C registered none of the freezekern ops")
    return kernels


def _load_extension(importer: Callable[[str], ModuleType] = importlib.import_module) -> _State:
    """Import freezekern._C and describe the outcome (warns once when broken)."""
    if os.environ.get("FREEZEKERN_DISABLE_NATIVE") == "1":
        return _State(reason="the native extension is disabled by FREEZEKERN_DISABLE_NATIVE=1")
    try:
        module = importer("freezekern._C")
    except ModuleNotFoundError as exc:
        if exc.name in ("freezekern._C", "freezekern"):
            return _State(reason=f"the native extension freezekern._C is not built ({_BUILD_HINT})")
        return _broken(exc)
    except (ImportError, OSError) as exc:
        return _broken(exc)
    try:
        kernels = _registered_kernels()
    except RuntimeError as exc:  # the library did not register its schemas
        return _broken(exc)
    if not any(kernels.values()):
        return _broken(RuntimeError("it registered no kernels for torch.ops.freezekern"))
    return _State(loaded=True, reason="", module=module, kernels=kernels)


def _broken(exc: BaseException) -> _State:
    reason = (
        f"the native extension freezekern._C is present but failed to load ({type(exc).__name__}: {exc}); "
        f"it was probably built against another torch than this one ({torch.__version__}): rebuild it, "
        f"{_BUILD_HINT}"
    )
    warnings.warn(f"freezekern: {reason}. Falling back to the PyTorch/Triton paths.", RuntimeWarning, stacklevel=3)
    return _State(broken=True, reason=reason)


def _register_fakes() -> None:
    # the real kernels' argument checks, so a bad call is refused while tracing
    from freezekern.ops import fake_checks as checks

    @torch.library.register_fake("freezekern::cosine_deviation")
    def _cosine_fake(h, basis, target_row, norm, norm_weight, norm_bias, norm_eps):
        checks.cosine(h, basis, target_row, norm, norm_weight, norm_bias)
        return h.new_empty((h.shape[0],), dtype=torch.float32)

    if not _STATE.kernels.get("linear_cross_entropy"):
        return

    @torch.library.register_fake("freezekern::linear_cross_entropy")
    def _lce_fake(h, weight, target, bias, softcap, ignore_index, reduce_sum, grad_h, grad_weight, grad_bias):
        checks.linear_cross_entropy(h, weight, target, bias, softcap, reduce_sum, grad_weight, grad_bias)
        n, d = h.shape
        vocab = weight.shape[0]

        def f32(*shape):
            return h.new_empty(shape, dtype=torch.float32)

        return (f32() if reduce_sum else f32(n), f32(n), f32(n, d) if grad_h else f32(0),
                f32(vocab, d) if grad_weight else f32(0), f32(vocab) if grad_bias else f32(0))

    @torch.library.register_fake("freezekern::linear_cross_entropy_backward")
    def _lce_backward_fake(h, weight, target, bias, lse, grad_rows, softcap, ignore_index, need_h, need_weight,
                           need_bias):
        checks.linear_cross_entropy_backward(h, weight, target, bias, lse, grad_rows, softcap)
        n, d = h.shape
        vocab = weight.shape[0]

        def f32(*shape):
            return h.new_empty(shape, dtype=torch.float32)

        return (f32(n, d) if need_h else f32(0), f32(vocab, d) if need_weight else f32(0),
                f32(vocab) if need_bias else f32(0))


_STATE = _load_extension()
if _STATE.loaded:
    _register_fakes()


def _device_type(device: torch.device | str | None) -> str:
    if device is None:
        return "cpu"
    if isinstance(device, torch.device):
        return device.type
    return torch.device(device).type


def registered(op: str) -> bool:
    """Whether the extension is loaded and registered a kernel of ``op`` for some device."""
    return _STATE.loaded and bool(_STATE.kernels.get(op))


def has_op(op: str, device: torch.device | str) -> bool:
    """Whether the extension is loaded and has a kernel of ``op`` for ``device``'s type."""
    return _STATE.loaded and _device_type(device) in _STATE.kernels.get(op, frozenset())


def unavailable_reason(device: torch.device | str | None = None, op: str | None = None) -> str:
    """Why the native kernels (of ``op``, or all of them) cannot run on ``device`` ('' when they can)."""
    if not _STATE.loaded:
        return _STATE.reason
    dtype = _device_type(device)
    if op is not None and not _STATE.kernels.get(op):
        return f"freezekern._C was built before {op} existed: rebuild it, {_BUILD_HINT}"
    if op is not None and dtype in _STATE.kernels[op]:
        return ""
    if all(dtype in devices for devices in _STATE.kernels.values()):
        return ""
    if dtype == "cuda":
        return (
            "freezekern._C was built without CUDA kernels: rebuild it with a CUDA build of torch "
            "and the CUDA toolkit (nvcc, CUDA_HOME) present, e.g. `pip install --no-build-isolation -e .`"
        )
    return f"freezekern._C has no kernel for device type {dtype!r}"


def info() -> dict[str, object]:
    """Build and load status for ``freezekern env``."""
    out: dict[str, object] = {
        "loaded": _STATE.loaded,
        "broken": _STATE.broken,
        "reason": _STATE.reason or None,
        "cpu": has_op("cosine_deviation", "cpu") and has_op("linear_cross_entropy", "cpu"),
        "cuda": has_op("cosine_deviation", "cuda") and has_op("linear_cross_entropy", "cuda"),
    }
    module = _STATE.module
    if module is not None:
        out["path"] = getattr(module, "__file__", None)
        out["built_with_cuda"] = bool(module.built_with_cuda())
        out["openmp"] = bool(module.built_with_openmp())
        out["openmp_threads"] = int(module.openmp_max_threads())
        out["torch_threads"] = torch.get_num_threads()
    return out


def _require(op: str, device: torch.device) -> None:
    if not has_op(op, device):
        raise RuntimeError(
            f"freezekern native {op} is unavailable on {_device_type(device)}: {unavailable_reason(device, op)}")


def _norm_name(norm: str | None) -> str:
    return "none" if norm is None else norm


def cosine_deviation(
    h: torch.Tensor,
    basis: torch.Tensor,
    target_row: torch.Tensor,
    *,
    norm: str | None = "rms",
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """1 - cos(n(h), basis[target_row]): h [N, D], basis [M, D], target_row [N] int64 -> [N] fp32."""
    _require("cosine_deviation", h.device)
    return torch.ops.freezekern.cosine_deviation.default(
        h, basis, target_row, _norm_name(norm), norm_weight, norm_bias, float(norm_eps)
    )


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    ignore_index: int,
    reduce_sum: bool,
    grad_h: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> torch.Tensor:
    """Summed (or per-row, [N]) fp32 loss of the fused head, differentiable; see ``linear_cross_entropy.py``.

    The ``grad_*`` flags ask the forward for those gradients (the eager
    strategy); the others are recomputed by the backward op if needed.
    """
    _require("linear_cross_entropy", h.device)
    return torch.ops.freezekern.linear_cross_entropy.default(
        h, weight, target, bias, softcap, int(ignore_index), bool(reduce_sum), bool(grad_h), bool(grad_weight),
        bool(grad_bias))[0]
