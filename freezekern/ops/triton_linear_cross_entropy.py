"""Triton kernels of the fused linear cross-entropy, with their launchers side by side.

Definition, shapes and dtypes: ``linear_cross_entropy.py``. Here
    h [N, D] fp32 | bf16 | fp16 (any strides), weight [V, D], target [N] int,
    bias [V] or None; the forward returns the summed loss (or the [N] per-row
    losses) and the per-row logsumexp, both fp32; the backward fp32 dh, dW,
    dbias where asked. A target outside [0, V) gives NaN (no host sync).

Kernels (the recompute strategy: the forward saves the logsumexp only)
-----------------------------------------------------------------------
``_forward_kernel`` (grid: row blocks x vocabulary splits): BLOCK_N rows walk
their split of V in BLOCK_V tiles; each tile's logits are accumulated over D
in BLOCK_D steps with ``tl.dot`` (fp32 accumulator), the bias added, soft-capped
(c tanh(z / c), tanh as 2 sigmoid(2x) - 1), the target logit picked out of the
tile that holds it, and the tile folded into a running (max, sum of exp). One
partial (max, sum, target logit) per row and split, [S, N] fp32 each, combined
by a few torch ops. Row blocks with no counted row skip the walk.

``_backward_kernel`` (grid: row blocks x vocabulary tiles): recomputes its
[BLOCK_N, BLOCK_V] tile of logits, turns it into G = g (softmax - onehot) dz/dy
with the saved logsumexp, and adds G W_tile to dh (atomically: every vocabulary
tile of a row block adds into the same rows), G^T x to dW and the column sums
of G to dbias, each only when asked (constexpr flags: a frozen head launches
no dW product at all). The accumulators are fp32.

Matmul dtype: h's 16-bit dtype when h and weight share it, else fp32; its
``tl.dot`` precision from ``triton_common.dot_precision`` ("tf32x3" for fp32
on NVIDIA sm_80+). The interpreter's dot cannot take bf16: there bf16 tiles
are upcast to fp32 first (exact products). In the backward, G enters the
products in the matmul dtype too, as Hugging Face's bf16 backward rounds its
logit gradient. Where Triton runs: ``triton_common``.

The forward is also the logit lens (``deviation.py``): its autotune key bins
the row count (``triton_common.row_bin``), since the tracer calls it with a
handful of rows and with thousands.
"""

from __future__ import annotations

import functools

import torch

from freezekern.ops.triton_common import (
    check_launch,
    dot_precision,
    interpreting,
    prune_small,
    row_bin,
    tl,
    triton,
)

# Every BLOCK_V in the autotune lists divides this; a vocabulary split is a
# multiple of it, so the split layout does not depend on the chosen config.
_VOCAB_SPLIT_QUANTUM = 256
_MIN_SPLIT = 1024


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------
def _forward_kernel(
    x_ptr, stride_xn, stride_xd,
    w_ptr, stride_wv, stride_wd,
    b_ptr, t_ptr,
    m_ptr, s_ptr, z_ptr,
    N, D, V, V_PER_SPLIT, ignore_index, softcap, N_BIN,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial logsumexp and target logit of cap(x W^T + b) over one vocabulary split.

    Writes m, s, z [S, N] fp32 at split program_id(1): max logit, sum of
    exp(logit - max), and the target logit if it lies in the split (else 0).
    N_BIN (``row_bin(N)``) is read by the autotuner only.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    n_counted = tl.sum((tgt != ignore_index).to(tl.int32), axis=0)

    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_t = tl.zeros([BLOCK_N], dtype=tl.float32)
    if n_counted > 0:
        offs_v = tl.arange(0, BLOCK_V)
        offs_d = tl.arange(0, BLOCK_D)
        x_rows = x_ptr + rows64[:, None] * stride_xn
        v_start = pid_s * V_PER_SPLIT
        v_stop = tl.minimum(v_start + V_PER_SPLIT, V)
        for v0 in range(v_start, v_stop, BLOCK_V):
            cols = v0 + offs_v
            col_mask = cols < v_stop
            w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
            acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                dmask = dd < D
                a = tl.load(x_rows + dd[None, :] * stride_xd, mask=row_mask[:, None] & dmask[None, :], other=0.0)
                b = tl.load(w_cols + dd[:, None] * stride_wd, mask=dmask[:, None] & col_mask[None, :], other=0.0)
                if DOT_FP32:  # interpreter only: its dot does not take bf16 (exact products in fp32)
                    acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_CAP:
                acc = softcap * (2.0 * tl.sigmoid(acc * (2.0 / softcap)) - 1.0)
            hit = (cols[None, :] == tgt[:, None]) & col_mask[None, :]
            z_t += tl.sum(tl.where(hit, acc, 0.0), axis=1)
            acc = tl.where(col_mask[None, :], acc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(acc, axis=1))
            s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(acc - m_new[:, None]), axis=1)
            m_i = m_new
    out = pid_s.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m_i, mask=row_mask)
    tl.store(s_ptr + out, s_i, mask=row_mask)
    tl.store(z_ptr + out, z_t, mask=row_mask)


def _backward_kernel(
    x_ptr, stride_xn, stride_xd,
    w_ptr, stride_wv, stride_wd,
    b_ptr, t_ptr, lse_ptr, g_ptr,
    dx_ptr, dw_ptr, db_ptr,
    N, D, V, ignore_index, softcap, N_BIN,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
    NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One tile of G = g (softmax - onehot) dz/dy, added into dx [N, D], dw [V, D], db [V] (fp32, row-major)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    counted = (tgt != ignore_index) & row_mask
    if tl.sum(counted.to(tl.int32), axis=0) > 0:
        offs_d = tl.arange(0, BLOCK_D)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        cols64 = cols.to(tl.int64)
        x_rows = x_ptr + rows64[:, None] * stride_xn
        w_rows = w_ptr + cols64[:, None] * stride_wv
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            dmask = dd < D
            a = tl.load(x_rows + dd[None, :] * stride_xd, mask=row_mask[:, None] & dmask[None, :], other=0.0)
            b = tl.load(w_rows + dd[None, :] * stride_wd, mask=col_mask[:, None] & dmask[None, :], other=0.0)
            if DOT_FP32:
                acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b.to(a.dtype)), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        lse = tl.load(lse_ptr + rows, mask=counted, other=0.0)
        g = tl.where(counted, tl.load(g_ptr + rows, mask=counted, other=0.0), 0.0)
        if HAS_CAP:
            t = 2.0 * tl.sigmoid(acc * (2.0 / softcap)) - 1.0
            grad = tl.exp(t * softcap - lse[:, None])
            grad = tl.where(cols[None, :] == tgt[:, None], grad - 1.0, grad) * ((1.0 - t) * (1.0 + t))
        else:
            grad = tl.exp(acc - lse[:, None])
            grad = tl.where(cols[None, :] == tgt[:, None], grad - 1.0, grad)
        grad = tl.where(col_mask[None, :], grad * g[:, None], 0.0)
        if DOT_FP32:
            gm = grad
        else:
            gm = grad.to(x_ptr.dtype.element_ty)
        if NEED_H:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                dmask = dd < D
                b = tl.load(w_rows + dd[None, :] * stride_wd, mask=col_mask[:, None] & dmask[None, :], other=0.0)
                if DOT_FP32:
                    part = tl.dot(gm, b.to(tl.float32), input_precision="ieee")
                else:
                    part = tl.dot(gm, b.to(gm.dtype), input_precision=DOT_PRECISION)
                tl.atomic_add(dx_ptr + rows64[:, None] * D + dd[None, :], part,
                              mask=row_mask[:, None] & dmask[None, :])
        if NEED_W:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                dmask = dd < D
                a = tl.load(x_rows + dd[None, :] * stride_xd, mask=row_mask[:, None] & dmask[None, :], other=0.0)
                if DOT_FP32:
                    part = tl.dot(tl.trans(gm), a.to(tl.float32), input_precision="ieee")
                else:
                    part = tl.dot(tl.trans(gm), a, input_precision=DOT_PRECISION)
                tl.atomic_add(dw_ptr + cols64[:, None] * D + dd[None, :], part,
                              mask=col_mask[:, None] & dmask[None, :])
        if NEED_B:
            tl.atomic_add(db_ptr + cols, tl.sum(grad, axis=0), mask=col_mask)


def _configs(interpret: bool, shapes) -> list:
    if interpret:
        # One small config: autotuning under the interpreter is very slow.
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bn, bv, bd, w, s in shapes]


# BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages (Hopper/Ampere). The forward's list was timed on an
# H100 for the logit lens (this loop without the target logit); the backward's is not yet tuned on a GPU.
_FORWARD_SHAPES = [
    (128, 128, 64, 8, 3),
    (256, 128, 64, 8, 3),  # best on H100, bf16, D=2048, V=49152
    (256, 128, 32, 8, 4),
    (128, 256, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 256, 32, 8, 4),  # best on H100, bf16, D=576, V=49152
    (128, 128, 128, 8, 3),
    (64, 256, 64, 4, 3),
    (64, 128, 128, 4, 3),
    (64, 64, 64, 4, 4),
]
_BACKWARD_SHAPES = [(64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 3), (128, 128, 32, 8, 3)]


@functools.cache
def _kernels(interpret: bool):
    """The jitted kernels, wrapped on first use (``interpret``: config list)."""
    prune = {"early_config_prune": prune_small}
    forward = triton.autotune(
        configs=_configs(interpret, _FORWARD_SHAPES),
        key=["D", "V", "V_PER_SPLIT", "N_BIN"],  # a small first call must not pin the config of large ones
        prune_configs_by=prune,
    )(triton.jit(_forward_kernel, do_not_specialize=["N", "V", "V_PER_SPLIT", "ignore_index", "softcap", "N_BIN"]))
    backward = triton.autotune(
        configs=_configs(interpret, _BACKWARD_SHAPES), key=["D", "V", "N_BIN"], prune_configs_by=prune,
        reset_to_zero=["dx_ptr", "dw_ptr", "db_ptr"],  # the accumulators, between timed runs
    )(triton.jit(_backward_kernel, do_not_specialize=["N", "V", "ignore_index", "softcap", "N_BIN"]))
    return forward, backward


# --------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------
def _operands(h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """h in the matmul dtype (a copy only when it must change dtype) and that dtype."""
    low = (torch.bfloat16, torch.float16)
    mm_dtype = h.dtype if (h.dtype in low and weight.dtype == h.dtype) else torch.float32
    return (h if h.dtype == mm_dtype else h.to(mm_dtype)), mm_dtype


def _num_splits(n_rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(splits, vocabulary entries per split): enough programs to fill the GPU a few times over."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(16 * sms, triton.cdiv(n_rows, 128))
    else:
        want = 2  # interpreter: exercise the combine without many programs
    splits = max(1, min(want, triton.cdiv(vocab, _MIN_SPLIT)))
    per_split = triton.cdiv(triton.cdiv(vocab, splits), _VOCAB_SPLIT_QUANTUM) * _VOCAB_SPLIT_QUANTUM
    return triton.cdiv(vocab, per_split), per_split


def forward(h, weight, target, bias, softcap, ignore_index, reduce_sum, eager_h=False, eager_w=False,
            eager_b=False):
    """(loss, lse [N], None, None, None): the summed loss (or per-row [N]) and logsumexp, fp32.

    The Triton backend always takes the recompute strategy: the ``eager_*``
    flags must be False.
    """
    if eager_h or eager_w or eager_b:
        raise ValueError("the Triton linear cross-entropy recomputes its gradients; it has no eager forward")
    check_launch(h, target, weight, bias)
    n_rows, dim = h.shape
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=h.device)
    if n_rows == 0:
        loss = torch.zeros((), **f32) if reduce_sum else torch.zeros(0, **f32)
        return loss, torch.zeros(0, **f32), None, None, None
    x, mm_dtype = _operands(h, weight)
    target = target.contiguous()
    bias_c = None if bias is None else bias.detach().contiguous()
    interpret = interpreting()
    forward_kernel, _ = _kernels(interpret)
    splits, per_split = _num_splits(n_rows, vocab, h.device)
    part = torch.empty((3, splits, n_rows), **f32)
    forward_kernel[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), splits)](
        x, x.stride(0), x.stride(1),
        weight, weight.stride(0), weight.stride(1),
        bias_c if bias_c is not None else x, target,
        part[0], part[1], part[2],
        n_rows, dim, vocab, per_split, int(ignore_index), float(softcap or 1.0), row_bin(n_rows),
        HAS_BIAS=bias_c is not None, HAS_CAP=softcap is not None,
        DOT_PRECISION=dot_precision(h.device, mm_dtype), DOT_FP32=interpret and mm_dtype == torch.bfloat16,
    )
    m = part[0].amax(dim=0)
    lse = m + torch.log((part[1] * torch.exp(part[0] - m)).sum(dim=0))
    counted = target != ignore_index
    valid = (target >= 0) & (target < vocab)
    loss_rows = torch.where(valid, lse - part[2].sum(dim=0), torch.full_like(lse, float("nan")))
    loss_rows = torch.where(counted, loss_rows, torch.zeros_like(lse))
    return (loss_rows.sum() if reduce_sum else loss_rows), lse, None, None, None


def backward(h, weight, target, bias, lse, grad_rows, softcap, ignore_index, need_h, need_w, need_b):
    """(dh [N, D], dW [V, D], dbias [V]) fp32 where asked (None otherwise), the logits recomputed."""
    check_launch(h, target, weight, bias, lse, grad_rows)
    n_rows, dim = h.shape
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=h.device)
    dx = torch.zeros((n_rows, dim), **f32) if need_h else None
    dw = torch.zeros((vocab, dim), **f32) if need_w else None
    db = torch.zeros(vocab, **f32) if need_b else None
    if n_rows == 0 or not (need_h or need_w or need_b):
        return dx, dw, db
    x, mm_dtype = _operands(h.detach(), weight)
    weight = weight.detach()
    bias_c = None if bias is None else bias.detach().contiguous()
    interpret = interpreting()
    _, backward_kernel = _kernels(interpret)
    dummy = torch.zeros(1, **f32)  # for pointers a variant never reads; autotuning zeroes the accumulators
    backward_kernel[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(vocab, meta["BLOCK_V"]))](
        x, x.stride(0), x.stride(1),
        weight, weight.stride(0), weight.stride(1),
        bias_c if bias_c is not None else dummy, target.contiguous(),
        lse.float().contiguous(), grad_rows.float().contiguous(),
        dx if dx is not None else dummy, dw if dw is not None else dummy, db if db is not None else dummy,
        n_rows, dim, vocab, int(ignore_index), float(softcap or 1.0), row_bin(n_rows),
        HAS_BIAS=bias_c is not None, HAS_CAP=softcap is not None,
        NEED_H=need_h, NEED_W=need_w, NEED_B=need_b,
        DOT_PRECISION=dot_precision(h.device, mm_dtype), DOT_FP32=interpret and mm_dtype == torch.bfloat16,
    )
    return dx, dw, db


__all__ = ["backward", "forward"]
