"""Triton kernel of the cosine deviation, with its launcher.

Shapes and dtypes (as in ``reference``):
    h            [N, D]  fp32 | bf16 | fp16, any strides (never copied)
    norm_weight  [D]     or None;  norm_bias [D] or None
    basis        [M, D]  semantic-basis rows
    target_row   [N]     int64, < 0 means ignored
    returns      [N]     fp32; ignored rows are 0; a row outside the basis
                         gives NaN (the reference raises)

``_row_kernel`` (one program per block of BLOCK_N rows): loads rows of h with
their own strides, applies the final norm in fp32 (rms:
x * rsqrt(mean(x^2) + eps) * w [+ b]; layer: (x - mean) * rsqrt(var + eps) * w
+ b; None: identity), gathers row ``target_row[t]`` of the basis and reduces
the dot product and both squared norms: out = 1 - dot / max(|x| |b|, 1e-30).
When D fits one block (``_MAX_BLOCK_D``) h is read once; otherwise it loops
over D in blocks: one pass for the statistics (two for LayerNorm: mean, then
centred variance), one for the dot product. No [N, D] intermediate is
allocated.

The logit lens has no Triton kernel of its own: it runs the linear
cross-entropy's (``triton_linear_cross_entropy``, through ``deviation.py``).

Where Triton runs, and what happens without it: ``triton_common``.
"""

from __future__ import annotations

import functools

import torch

from freezekern.ops import reference
from freezekern.ops.triton_common import check_launch, tl, triton

_NORM_CODES = {None: 0, "rms": 1, "layer": 2}
# Largest D block held in registers by the row kernel; larger D loops.
_MAX_BLOCK_D = 8192
# Elements of h one row-kernel program holds at once (BLOCK_N * BLOCK_D).
_ROW_TILE_ELEMS = 4096


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------
def _row_kernel(
    h_ptr, stride_hn, stride_hd,
    nw_ptr, nb_ptr,
    g_ptr, stride_gm, stride_gd, M,
    idx_ptr, out_ptr,
    N, D, eps,
    NORM: tl.constexpr, HAS_NW: tl.constexpr, HAS_NB: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Norm + gather + dot per row: out = 1 - cos(n(h), g[idx]), idx < 0 ignored. NORM: 0 none, 1 rms, 2 layer."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    idx = tl.load(idx_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    counted = idx >= 0
    valid = counted & (idx < M) & row_mask
    safe = tl.where(valid, idx, 0)
    h_rows = h_ptr + rows64[:, None] * stride_hn
    g_rows = g_ptr + safe[:, None] * stride_gm
    offs = tl.arange(0, BLOCK_D)

    if SINGLE:
        dmask = offs < D
        m2 = row_mask[:, None] & dmask[None, :]
        x = tl.load(h_rows + offs[None, :] * stride_hd, mask=m2, other=0.0).to(tl.float32)
        if NORM == 1:
            ms = tl.sum(x * x, axis=1) / D
            x = x * tl.rsqrt(ms + eps)[:, None]
        if NORM == 2:
            mean = tl.sum(x, axis=1) / D
            xc = tl.where(m2, x - mean[:, None], 0.0)
            var = tl.sum(xc * xc, axis=1) / D
            x = xc * tl.rsqrt(var + eps)[:, None]
        if NORM != 0:
            if HAS_NW:
                x = x * tl.load(nw_ptr + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
            if HAS_NB:
                x = x + tl.load(nb_ptr + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
        g = tl.load(
            g_rows + offs[None, :] * stride_gd, mask=valid[:, None] & dmask[None, :], other=0.0
        ).to(tl.float32)
        dot = tl.sum(x * g, axis=1)
        xx = tl.sum(x * x, axis=1)
        gg = tl.sum(g * g, axis=1)
    else:
        mean = tl.zeros([BLOCK_N], dtype=tl.float32)
        rstd = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
        if NORM == 1:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + offs
                m2 = row_mask[:, None] & (cols < D)[None, :]
                x = tl.load(h_rows + cols[None, :] * stride_hd, mask=m2, other=0.0).to(tl.float32)
                acc += tl.sum(x * x, axis=1)
            rstd = tl.rsqrt(acc / D + eps)
        if NORM == 2:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + offs
                m2 = row_mask[:, None] & (cols < D)[None, :]
                x = tl.load(h_rows + cols[None, :] * stride_hd, mask=m2, other=0.0).to(tl.float32)
                acc += tl.sum(x, axis=1)
            mean = acc / D
            acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + offs
                m2 = row_mask[:, None] & (cols < D)[None, :]
                x = tl.load(h_rows + cols[None, :] * stride_hd, mask=m2, other=0.0).to(tl.float32)
                xc = tl.where(m2, x - mean[:, None], 0.0)
                acc2 += tl.sum(xc * xc, axis=1)
            rstd = tl.rsqrt(acc2 / D + eps)
        dot = tl.zeros([BLOCK_N], dtype=tl.float32)
        xx = tl.zeros([BLOCK_N], dtype=tl.float32)
        gg = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs
            dmask = cols < D
            m2 = row_mask[:, None] & dmask[None, :]
            x = tl.load(h_rows + cols[None, :] * stride_hd, mask=m2, other=0.0).to(tl.float32)
            if NORM != 0:
                x = tl.where(m2, (x - mean[:, None]) * rstd[:, None], 0.0)
                if HAS_NW:
                    x = x * tl.load(nw_ptr + cols, mask=dmask, other=0.0).to(tl.float32)[None, :]
                if HAS_NB:
                    x = x + tl.load(nb_ptr + cols, mask=dmask, other=0.0).to(tl.float32)[None, :]
            g = tl.load(
                g_rows + cols[None, :] * stride_gd, mask=valid[:, None] & dmask[None, :], other=0.0
            ).to(tl.float32)
            dot += tl.sum(x * g, axis=1)
            xx += tl.sum(x * x, axis=1)
            gg += tl.sum(g * g, axis=1)

    denom = tl.maximum(tl.sqrt(xx) * tl.sqrt(gg), 1e-30)
    res = 1.0 - dot / denom
    res = tl.where(valid, res, float("nan"))
    res = tl.where(counted, res, 0.0)
    tl.store(out_ptr + rows, res, mask=row_mask)


@functools.cache
def _kernels():
    """The jitted row kernel, wrapped on first use."""
    return triton.jit(_row_kernel, do_not_specialize=["N", "M"])


# --------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _row_blocks(n_rows: int, dim: int, max_block_d: int) -> tuple[int, int, bool, int]:
    block_d = min(triton.next_power_of_2(dim), max_block_d)
    block_n = max(1, min(triton.next_power_of_2(max(n_rows, 1)), _ROW_TILE_ELEMS // block_d))
    num_warps = 4 if block_n * block_d <= 2048 else 8
    return block_n, block_d, dim <= block_d, num_warps


def _vec(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def cosine_deviation(
    h: torch.Tensor,
    basis: torch.Tensor,
    target_row: torch.Tensor,
    *,
    norm: str | None = "rms",
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    _max_block_d: int = _MAX_BLOCK_D,
) -> torch.Tensor:
    """1 - cos(n(h), basis[target_row]) per row, one fused kernel.

    h [N, D] fp32|bf16|fp16 (any strides), basis [M, D], target_row [N] int
    -> [N] fp32; 0 where target_row < 0, NaN where target_row >= M.
    ``_max_block_d`` (power of two) caps the D block; tests use it to exercise
    the looped path at small D.
    """
    reference.check_norm_kind(norm)
    check_launch(h, target_row, basis, norm_weight, norm_bias)
    n_rows, dim = h.shape
    if n_rows == 0:
        return torch.zeros(0, dtype=torch.float32, device=h.device)
    if dim == 0 or basis.shape[0] == 0:  # degenerate: no row to gather or no features
        return reference.cosine_deviation_reference(
            h, basis, target_row, norm=norm, norm_weight=norm_weight, norm_bias=norm_bias, norm_eps=norm_eps
        )
    nw, nb = _vec(norm_weight), _vec(norm_bias)
    target_row = target_row.contiguous()
    out = torch.empty(n_rows, dtype=torch.float32, device=h.device)
    block_n, block_d, single, num_warps = _row_blocks(n_rows, dim, _max_block_d)
    _kernels()[(triton.cdiv(n_rows, block_n),)](
        h, h.stride(0), h.stride(1),
        nw if nw is not None else h, nb if nb is not None else h,
        basis, basis.stride(0), basis.stride(1), basis.shape[0],
        target_row, out,
        n_rows, dim, float(norm_eps),
        NORM=_NORM_CODES[norm], HAS_NW=nw is not None, HAS_NB=nb is not None, SINGLE=single,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


__all__ = ["cosine_deviation"]
