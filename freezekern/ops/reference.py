"""Pure-PyTorch reference of the cosine deviation, and the final norm n(.) of both deviation ops.

The reference is the ground truth every fast path of the cosine (Triton,
native C++/CUDA) is tested against; it accumulates in fp32 and returns fp32.
The logit lens has no reference of its own: it is the linear cross-entropy
of ``apply_norm(h)`` (``deviation.py``), whose torch backend is the ground
truth of its kernels.

Shapes and dtypes (shared by every backend):
    h            [N, D]  fp32 | bf16 | fp16, any strides
    norm_weight  [D]     effective multiplicative weight (Gemma's (1 + w) is
                         folded in by the adapters), or None
    norm_bias    [D]     LayerNorm bias, or None
    basis        [M, D]  semantic-basis rows (cosine metric)
    target_row   [N]     int64 row of ``basis`` per token; < 0 means ignored
    returns      [N]     fp32 deviation; ignored rows are 0 (fp64 inputs compute
                         and return fp64: the ground truth for kernel tests)
"""

from __future__ import annotations

import torch

NORM_KINDS = ("rms", "layer", None)


def check_norm_kind(norm: str | None) -> None:
    if norm not in NORM_KINDS:
        raise ValueError(f"norm must be one of 'rms', 'layer' or None, got {norm!r}")


def apply_norm(
    h: torch.Tensor,
    norm: str | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    norm_eps: float,
) -> torch.Tensor:
    """Final norm of the model: [N, D] any float -> [N, D] fp32 (fp64 stays fp64)."""
    check_norm_kind(norm)
    x = h if h.dtype == torch.float64 else h.float()
    if norm == "rms":
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + norm_eps)
    elif norm == "layer":
        mean = x.mean(dim=-1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + norm_eps)
    if norm is not None:
        if norm_weight is not None:
            x = x * norm_weight.to(x.dtype)
        if norm_bias is not None:
            x = x + norm_bias.to(x.dtype)
    return x


def cosine_deviation_reference(
    h: torch.Tensor,
    basis: torch.Tensor,
    target_row: torch.Tensor,
    *,
    norm: str | None = "rms",
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """d(t) = 1 - cos(n(h_t), basis[target_row_t]); 0 where target_row_t < 0.

    h [N, D], basis [M, D], target_row [N] int64 -> [N] fp32.
    """
    x = apply_norm(h, norm, norm_weight, norm_bias, norm_eps)
    counted = target_row >= 0
    rows = basis[target_row.clamp(min=0)].to(x.dtype) if basis.shape[0] else x.new_zeros(x.shape)
    dot = (x * rows).sum(-1)
    denom = x.norm(dim=-1) * rows.norm(dim=-1)
    cos = dot / denom.clamp_min(1e-30)
    return torch.where(counted, 1.0 - cos, torch.zeros_like(cos))
