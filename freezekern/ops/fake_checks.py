"""The argument checks of the native kernels (csrc/deviation_checks.h, csrc/linear_cross_entropy.h), for the fakes.

The fake (meta) kernels that ``torch.compile`` traces with run these, so a
call the real kernel would refuse fails while tracing, with the real kernel's
message, instead of when the compiled graph runs. Shape conditions go through
``torch._check`` (they hold for symbolic sizes too); dtype and device
conditions are static.
"""

from __future__ import annotations

import torch

_NORMS = ("rms", "layer", "none", "")


def _fail(message: str):
    raise RuntimeError(f"freezekern: {message}")


def _matrix(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2:
        _fail(f"{name} must be 2-D, got shape {list(t.shape)}")
    if not t.dtype.is_floating_point:
        _fail(f"{name} must be floating, got {t.dtype}")


def _same_device(t: torch.Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        _fail(f"{name} is on {t.device} but h is on {device}")


def _vector(t: torch.Tensor | None, n, name: str, device: torch.device) -> None:
    if t is None:
        return
    if t.dim() != 1:
        _fail(f"{name} must be [{n}], got shape {list(t.shape)}")
    torch._check(t.shape[0] == n, lambda: f"freezekern: {name} must be [{n}], got shape {list(t.shape)}")
    _same_device(t, name, device)


def _index(t: torch.Tensor, n, name: str, device: torch.device) -> None:
    if t.dim() != 1:
        _fail(f"{name} must be [{n}], got shape {list(t.shape)}")
    torch._check(t.shape[0] == n, lambda: f"freezekern: {name} must be [{n}], got shape {list(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex:
        _fail(f"{name} must be an integer tensor, got {t.dtype}")
    _same_device(t, name, device)


def _norm(norm: str, norm_weight, norm_bias, dim, device) -> None:
    if norm not in _NORMS:
        _fail(f"norm must be 'rms', 'layer' or 'none', got '{norm}'")
    if norm in ("rms", "layer"):
        _vector(norm_weight, dim, "norm_weight", device)
        _vector(norm_bias, dim, "norm_bias", device)


def _head(h: torch.Tensor, weight: torch.Tensor, name: str) -> None:
    _matrix(h, "h")
    _same_device(weight, name, h.device)
    _matrix(weight, name)
    torch._check(weight.shape[1] == h.shape[1],
                 lambda: f"freezekern: {name} must be [V, {h.shape[1]}], got shape {list(weight.shape)}")


def cosine(h, basis, target_row, norm, norm_weight, norm_bias) -> None:
    """The checks of ``cosine_inputs``."""
    _head(h, basis, "basis")
    _index(target_row, h.shape[0], "target_row", h.device)
    _norm(norm, norm_weight, norm_bias, h.shape[1], h.device)


def linear_cross_entropy(h, weight, target, bias, softcap, reduce_sum=True, grad_weight=False,
                         grad_bias=False) -> None:
    """The checks of ``lce_inputs`` (and of the forward's per-row reduction, which has no weight gradient)."""
    if not reduce_sum and (grad_weight or grad_bias):
        _fail("linear_cross_entropy computes weight and bias gradients in the forward only for a summed loss "
              "(reduce_sum=True)")
    _head(h, weight, "weight")
    torch._check(weight.shape[0] > 0 and weight.shape[1] > 0,
                 lambda: f"freezekern: linear_cross_entropy needs V > 0 and D > 0, got weight {list(weight.shape)}")
    _index(target, h.shape[0], "target", h.device)
    _vector(bias, weight.shape[0], "bias", h.device)
    if softcap is not None and not softcap > 0:
        _fail(f"softcap must be positive, got {softcap}")


def linear_cross_entropy_backward(h, weight, target, bias, lse, grad_rows, softcap) -> None:
    """The checks of the backward: ``lce_inputs`` and the [N] row vectors."""
    linear_cross_entropy(h, weight, target, bias, softcap)
    _vector(lse, h.shape[0], "lse", h.device)
    _vector(grad_rows, h.shape[0], "grad_rows", h.device)
