"""Pure-PyTorch reference implementations of the deviation ops.

These are the ground truth every fast path (Triton, native C++/CUDA) is tested
against. They accumulate in fp32, return fp32, and never allocate an [N, V]
tensor: the logit lens walks the vocabulary in chunks with an online
logsumexp.

Shapes and dtypes (shared by every backend):
    h            [N, D]  fp32 | bf16 | fp16, any strides
    norm_weight  [D]     effective multiplicative weight (Gemma's (1 + w) is
                         folded in by the adapters), or None
    norm_bias    [D]     LayerNorm bias, or None
    basis        [M, D]  semantic-basis rows (cosine metric)
    target_row   [N]     int64 row of ``basis`` per token; < 0 means ignored
    weight       [V, D]  LM head weight (logit lens)
    bias         [V]     LM head bias, or None
    target       [N]     int64 token id per row; ``ignore_index`` means ignored
    returns      [N]     fp32 deviation; ignored rows are 0 (fp64 inputs compute
                         and return fp64: the ground truth for kernel tests)
"""

from __future__ import annotations

import torch

NORM_KINDS = ("rms", "layer", None)
DEFAULT_VOCAB_CHUNK = 8192


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


def logit_lens_deviation_reference(
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
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> torch.Tensor:
    """Cross-entropy of reading h through the LM head, chunked over V.

    d(t) = logsumexp_v(W n(h_t) + b) - (W[y_t] . n(h_t) + b[y_t]); 0 where
    y_t == ignore_index. h [N, D], weight [V, D], target [N] -> [N] fp32.
    Peak extra memory is [N, vocab_chunk] fp32, never [N, V].
    """
    x = apply_norm(h, norm, norm_weight, norm_bias, norm_eps)
    n_rows, vocab = x.shape[0], weight.shape[0]
    running_max = x.new_full((n_rows,), float("-inf"))
    running_sum = x.new_zeros(n_rows)
    for start in range(0, vocab, vocab_chunk):
        stop = min(start + vocab_chunk, vocab)
        logits = x @ weight[start:stop].to(x.dtype).t()
        if bias is not None:
            logits = logits + bias[start:stop].to(x.dtype)
        chunk_max = logits.max(dim=-1).values
        new_max = torch.maximum(running_max, chunk_max)
        running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(
            logits - new_max[:, None]
        ).sum(-1)
        running_max = new_max
    lse = running_max + torch.log(running_sum)
    counted = target != ignore_index
    safe_target = torch.where(counted, target, torch.zeros_like(target))
    target_logit = (x * weight[safe_target].to(x.dtype)).sum(-1) if vocab else x.new_zeros(n_rows)
    if bias is not None:
        target_logit = target_logit + bias[safe_target].to(x.dtype)
    return torch.where(counted, lse - target_logit, torch.zeros_like(lse))
