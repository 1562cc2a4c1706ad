"""What every Triton kernel module of the package shares: the optional import, where Triton can run,
the launchers' argument check, the ``tl.dot`` precision per GPU, and the autotuners' row-count bins.

Triton runs on CUDA tensors, and on CPU tensors under the interpreter
(TRITON_INTERPRET=1 in the environment before triton is first imported).
Importing this module without triton installed works: ``triton`` and ``tl``
are then None, ``available`` is False and dispatch falls back.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # triton is optional: the package imports and falls back without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

# The autotuners time their configs only from this many (rows x vocabulary) logits up.
AUTOTUNE_MIN_LOGITS = 1 << 22


@functools.cache
def interpreting() -> bool:
    """True when triton was imported in interpreter mode.

    Triton reads TRITON_INTERPRET when it is imported (its own library
    functions such as ``tl.sum`` are wrapped then), so the mode is fixed for
    the process from that moment.
    """
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.sum, InterpretedFunction)


def available(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on ``device``.

    CUDA: triton imports and CUDA is available. CPU: triton imports,
    TRITON_INTERPRET=1 is set and was set when triton was first imported (the
    Triton interpreter: slow, for tests).
    """
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1" and interpreting()
    return False


def check_launch(h: torch.Tensor, *others: torch.Tensor | None) -> None:
    """Refuse a launch Triton cannot run (``h``'s device) or whose tensors sit on several devices."""
    if triton is None or (h.device.type != "cuda" and not available(h.device)):
        raise RuntimeError(
            f"Triton kernels are not usable on {h.device.type} "
            "(install triton; on CPU set TRITON_INTERPRET=1 before triton is first imported)"
        )
    for t in others:
        if t is not None and t.device != h.device:
            raise ValueError(f"all tensors must be on {h.device}, got one on {t.device}")


def dot_precision(device: torch.device, mm_dtype: torch.dtype) -> str:
    """tl.dot input precision for a matmul of ``mm_dtype`` operands on ``device``.

    fp32 on NVIDIA Ampere and newer: "tf32x3", three TF32 tensor-core
    products (the operands split into high and low TF32 parts), accurate to
    about fp32; on older GPUs and ROCm (whose Triton has no tf32x3): "ieee",
    on the FMA units. bf16/fp16 operands enter the tensor cores as they are
    whatever the flag says: "tf32" on NVIDIA, "ieee" on ROCm, whose Triton
    accepts "tf32" only on some GPUs. The interpreter accepts any of them and
    computes in fp32.
    """
    fp32 = mm_dtype == torch.float32
    if device.type != "cuda":
        return "tf32x3" if fp32 else "tf32"
    return _cuda_dot_precision(device.index if device.index is not None else torch.cuda.current_device(), fp32)


@functools.cache
def _cuda_dot_precision(index: int, fp32: bool) -> str:
    if torch.version.hip is not None:
        return "ieee"
    if not fp32:
        return "tf32"
    return "tf32x3" if torch.cuda.get_device_capability(index)[0] >= 8 else "ieee"


def row_bin(n_rows: int) -> int:
    """The autotune bin of a row count: powers of two up to 2^16 (the best tile depends on N).

    A kernel autotuned on it (as a key argument) does not let a small first
    call pin the config of large ones.
    """
    return min(triton.next_power_of_2(max(int(n_rows), 1)), 1 << 16)


def prune_small(configs, named_args, **kwargs):
    """``early_config_prune`` of the autotuners: small problems (tests, tiny batches) take the first config
    untimed; reads the launch's ``N`` and ``V``."""
    if named_args["N"] * named_args["V"] < AUTOTUNE_MIN_LOGITS:
        return configs[:1]
    return configs


__all__ = ["AUTOTUNE_MIN_LOGITS", "available", "check_launch", "dot_precision", "interpreting", "prune_small",
           "row_bin", "tl", "triton"]
