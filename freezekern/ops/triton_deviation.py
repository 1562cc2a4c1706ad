"""Triton kernels for the deviation ops, with their launchers side by side.

Shapes and dtypes (as in ``reference``):
    h            [N, D]  fp32 | bf16 | fp16, any strides (never copied)
    norm_weight  [D]     or None;  norm_bias [D] or None
    basis        [M, D]  semantic-basis rows (cosine)
    target_row   [N]     int64, < 0 means ignored (cosine)
    weight       [V, D]  LM head weight;  bias [V] or None (logit lens)
    target       [N]     int64, ``ignore_index`` means ignored (logit lens)
    returns      [N]     fp32; ignored rows are 0; an index outside the
                         basis / vocabulary gives NaN (the reference raises)

Kernels
-------
``_row_kernel`` (one program per block of BLOCK_N rows): loads rows of h with
their own strides, applies the final norm in fp32 (rms:
x * rsqrt(mean(x^2) + eps) * w [+ b]; layer: (x - mean) * rsqrt(var + eps) * w
+ b; None: identity), gathers row ``index[t]`` of a [M, D] matrix and reduces
the dot product (and both squared norms). When D fits one block
(``_MAX_BLOCK_D``) h is read once; otherwise it loops over D in blocks: one
pass for the statistics (two for LayerNorm: mean, then centred variance), one
for the dot product. No [N, D] intermediate is allocated.
  - cosine: out = 1 - dot / max(|x| |b|, 1e-30), 0 where target_row < 0.
  - logit lens: out = x . W[y] + b[y] accumulated in fp32 (the target
    logit), with x rounded to the matmul dtype exactly as the vocabulary
    matmul sees it, so the two terms of lse - target are consistent (a
    confident row, or V = 1, gives ~0 rather than the rounding error of x).
    It also writes the normalised rows to a [N, D] buffer in the matmul dtype
    (the one hidden-state sized buffer the logit lens uses). With norm=None and h
    already in the matmul dtype the buffer is skipped and h is read in place.

``_lens_lse_kernel`` (grid: row blocks x vocabulary splits): each program
takes BLOCK_N normalised rows and walks its slice of V in BLOCK_V tiles; for
each tile it accumulates the [BLOCK_N, BLOCK_V] logits over D in BLOCK_D steps
with ``tl.dot`` (fp32 accumulator; fp32 inputs use input_precision="tf32x3"
on NVIDIA sm_80+: three TF32 tensor-core products, about fp32 accurate;
"ieee" elsewhere), adds the bias, masks
columns past V and folds the tile into a running (max, sum of exp) per row. It writes one partial (max, sum) per row and
split: [S, N] fp32 each; [N, V] is never formed. Row blocks whose targets are
all ``ignore_index`` skip the vocabulary walk. Autotuned (key: D, V) over a
short list of Hopper/Ampere tile configs; problems under 4M logits (N * V) and
the interpreter use one fixed config untimed.

The splits are combined by a few tiny torch ops on [S, N]
(lse = m + log(sum_s s_s exp(m_s - m))), and the target logit is subtracted.

Matmul dtype: h's dtype when h and weight share a 16-bit dtype (bf16/fp16:
the normalised rows are rounded to it, as the model's own LM head does);
otherwise fp32 (mixed inputs, or fp32), where the weight tile is upcast in the
kernel. (The interpreter's dot cannot take bf16, so there bf16 tiles are
upcast to fp32 before ``tl.dot``: exact products, same result up to order.)

Triton runs on CUDA tensors, and on CPU tensors under the interpreter
(TRITON_INTERPRET=1 in the environment before triton is first imported).
Importing this module without triton installed works; ``available`` is then
False and dispatch falls back.
"""

from __future__ import annotations

import functools
import os

import torch

from freezekern.ops import reference

try:  # triton is optional: the package imports and falls back without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

_NORM_CODES = {None: 0, "rms": 1, "layer": 2}
# Largest D block held in registers by the row kernel; larger D loops.
_MAX_BLOCK_D = 8192
# Elements of h one row-kernel program holds at once (BLOCK_N * BLOCK_D).
_ROW_TILE_ELEMS = 4096
# Every BLOCK_V in the autotune list divides this; a vocabulary split is a
# multiple of it, so the split layout does not depend on the chosen config.
_VOCAB_SPLIT_QUANTUM = 256
_MIN_SPLIT = 1024
# Below this many logits (N * V) the lens kernel is not autotuned.
_AUTOTUNE_MIN_LOGITS = 1 << 22


def _dot_precision(device: torch.device, mm_dtype: torch.dtype) -> str:
    """tl.dot input precision for the logit-lens matmul of ``mm_dtype`` operands on ``device``.

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


@functools.cache
def _interpret() -> bool:
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
        return os.environ.get("TRITON_INTERPRET") == "1" and _interpret()
    return False


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------
def _row_kernel(
    h_ptr, stride_hn, stride_hd,
    nw_ptr, nb_ptr,
    g_ptr, stride_gm, stride_gd, M,
    gb_ptr,
    idx_ptr, out_ptr,
    x_ptr, stride_xn,
    N, D, eps, ignore_index,
    NORM: tl.constexpr, HAS_NW: tl.constexpr, HAS_NB: tl.constexpr, HAS_GB: tl.constexpr,
    LENS: tl.constexpr, WRITE_X: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Norm + gather + dot per row. NORM: 0 none, 1 rms, 2 layer.

    LENS=False (cosine): out = 1 - cos(n(h), g[idx]), idx < 0 ignored.
    LENS=True (logit lens): out = n(h) . g[idx] + gb[idx], idx == ignore_index
    ignored; with WRITE_X the normalised rows go to x_ptr ([N, D], row stride
    stride_xn, unit column stride).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    if LENS:
        idx = tl.load(idx_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
        counted = idx != ignore_index
    else:
        idx = tl.load(idx_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
        counted = idx >= 0
    valid = counted & (idx >= 0) & (idx < M) & row_mask
    safe = tl.where(valid, idx, 0)
    h_rows = h_ptr + rows64[:, None] * stride_hn
    g_rows = g_ptr + safe[:, None] * stride_gm
    x_rows = x_ptr + rows64[:, None] * stride_xn
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
        if LENS:
            # The target logit uses the rows as the matmul sees them (rounded
            # to its dtype), so lse - target is consistent (exactly 0 for V=1).
            xm = x.to(x_ptr.dtype.element_ty)
            dot = tl.sum(xm.to(tl.float32) * g, axis=1)
            if WRITE_X:
                tl.store(x_rows + offs[None, :], xm, mask=m2)
        else:
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
            if LENS:
                xm = x.to(x_ptr.dtype.element_ty)
                dot += tl.sum(xm.to(tl.float32) * g, axis=1)
                if WRITE_X:
                    tl.store(x_rows + cols[None, :], xm, mask=m2)
            else:
                dot += tl.sum(x * g, axis=1)
                xx += tl.sum(x * x, axis=1)
                gg += tl.sum(g * g, axis=1)

    if LENS:
        res = dot
        if HAS_GB:
            res = res + tl.load(gb_ptr + safe, mask=valid, other=0.0).to(tl.float32)
    else:
        denom = tl.maximum(tl.sqrt(xx) * tl.sqrt(gg), 1e-30)
        res = 1.0 - dot / denom
    res = tl.where(valid, res, float("nan"))
    res = tl.where(counted, res, 0.0)
    tl.store(out_ptr + rows, res, mask=row_mask)


def _lens_lse_kernel(
    x_ptr, stride_xn, stride_xd,
    w_ptr, stride_wv, stride_wd,
    b_ptr, t_ptr,
    m_ptr, s_ptr,
    N, D, V, V_PER_SPLIT, ignore_index, N_BIN,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial logsumexp of x @ W^T + b over one vocabulary split.

    x [N, D] (matmul dtype), W [V, D], b [V] -> m, s [S, N] fp32 at split
    program_id(1): m = max logit of the split, s = sum exp(logit - m).
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index)
    n_counted = tl.sum((tgt != ignore_index).to(tl.int32), axis=0)

    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_N], dtype=tl.float32)
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
                a = tl.load(
                    x_rows + dd[None, :] * stride_xd, mask=row_mask[:, None] & dmask[None, :], other=0.0
                )
                b = tl.load(
                    w_cols + dd[:, None] * stride_wd, mask=dmask[:, None] & col_mask[None, :], other=0.0
                )
                if DOT_FP32:
                    # Interpreter only: its dot does not handle bf16. bf16
                    # products are exact in fp32, so this matches the GPU path
                    # up to summation order.
                    acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            acc = tl.where(col_mask[None, :], acc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(acc, axis=1))
            s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(acc - m_new[:, None]), axis=1)
            m_i = m_new
    out_offs = pid_s.to(tl.int64) * N + rows
    tl.store(m_ptr + out_offs, m_i, mask=row_mask)
    tl.store(s_ptr + out_offs, s_i, mask=row_mask)


def _lens_configs(interpret: bool) -> list:
    if interpret:
        # One small config: autotuning under the interpreter is very slow.
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=4, num_stages=1)]
    shapes = [
        # BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages (Hopper/Ampere)
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
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bn, bv, bd, w, s in shapes
    ]


@functools.cache
def _kernels(interpret: bool):
    """The jitted kernels, wrapped on first use (``interpret``: config list)."""
    row = triton.jit(_row_kernel, do_not_specialize=["N", "M", "ignore_index"])
    lens = triton.autotune(
        configs=_lens_configs(interpret),
        key=["D", "V", "V_PER_SPLIT", "N_BIN"],  # a small first call must not pin the config of large ones
        prune_configs_by={"early_config_prune": _prune_small},
    )(triton.jit(_lens_lse_kernel, do_not_specialize=["N", "V", "V_PER_SPLIT", "ignore_index", "N_BIN"]))
    return row, lens


def _n_bin(n_rows: int) -> int:
    """The autotune bin of a row count: powers of two up to 2^16 (the best tile depends on N)."""
    return min(triton.next_power_of_2(max(int(n_rows), 1)), 1 << 16)


def _prune_small(configs, named_args, **kwargs):
    """Small problems (tests, tiny batches) take the first config untimed."""
    if named_args["N"] * named_args["V"] < _AUTOTUNE_MIN_LOGITS:
        return configs[:1]
    return configs


# --------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------
def _check(h: torch.Tensor, index: torch.Tensor, *others: torch.Tensor | None) -> None:
    if triton is None or (h.device.type != "cuda" and not available(h.device)):
        raise RuntimeError(
            f"Triton kernels are not usable on {h.device.type} "
            "(install triton; on CPU set TRITON_INTERPRET=1 before triton is first imported)"
        )
    for t in (index, *others):
        if t is not None and t.device != h.device:
            raise ValueError(f"all tensors must be on {h.device}, got one on {t.device}")


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
    _check(h, target_row, basis, norm_weight, norm_bias)
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
    row_kernel, _ = _kernels(_interpret())
    row_kernel[(triton.cdiv(n_rows, block_n),)](
        h, h.stride(0), h.stride(1),
        nw if nw is not None else h, nb if nb is not None else h,
        basis, basis.stride(0), basis.stride(1), basis.shape[0],
        h,
        target_row, out,
        out, 0,
        n_rows, dim, float(norm_eps), 0,
        NORM=_NORM_CODES[norm], HAS_NW=nw is not None, HAS_NB=nb is not None, HAS_GB=False,
        LENS=False, WRITE_X=False, SINGLE=single,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def _num_splits(n_rows: int, vocab: int, device: torch.device) -> int:
    """Vocabulary splits so that row blocks x splits fills the GPU a few times over."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(16 * sms, triton.cdiv(n_rows, 128))
    else:
        want = 2  # interpreter: exercise the combine without many programs
    return max(1, min(want, triton.cdiv(vocab, _MIN_SPLIT)))


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
    _vocab_splits: int | None = None,
    _max_block_d: int = _MAX_BLOCK_D,
) -> torch.Tensor:
    """logsumexp_v(W n(h) + b) - (W[y] . n(h) + b[y]) per row, never forming [N, V].

    h [N, D] fp32|bf16|fp16 (any strides), weight [V, D], target [N] int,
    bias [V] or None -> [N] fp32; 0 where target == ignore_index, NaN where
    the target is outside [0, V). Extra memory: the normalised rows [N, D] in
    the matmul dtype (skipped for norm=None with h already in that dtype) and
    2 x [S, N] fp32 partials. ``_vocab_splits`` forces S (tests).
    """
    reference.check_norm_kind(norm)
    _check(h, target, weight, bias, norm_weight, norm_bias)
    n_rows, dim = h.shape
    vocab = weight.shape[0]
    if n_rows == 0:
        return torch.zeros(0, dtype=torch.float32, device=h.device)
    if dim == 0 or vocab == 0:  # degenerate; the reference defines the result
        return reference.logit_lens_deviation_reference(
            h, weight, target, bias=bias, norm=norm, norm_weight=norm_weight, norm_bias=norm_bias,
            norm_eps=norm_eps, ignore_index=ignore_index,
        )
    low = (torch.bfloat16, torch.float16)
    mm_dtype = h.dtype if (h.dtype in low and weight.dtype == h.dtype) else torch.float32
    nw, nb, bias_c = _vec(norm_weight), _vec(norm_bias), _vec(bias)
    target = target.contiguous()
    interpret = _interpret()
    row_kernel, lens_kernel = _kernels(interpret)

    # 1) normalised rows (matmul dtype) + fp32 target logit.
    write_x = norm is not None or h.dtype != mm_dtype
    x = torch.empty((n_rows, dim), dtype=mm_dtype, device=h.device) if write_x else h
    target_logit = torch.empty(n_rows, dtype=torch.float32, device=h.device)
    block_n, block_d, single, num_warps = _row_blocks(n_rows, dim, _max_block_d)
    row_kernel[(triton.cdiv(n_rows, block_n),)](
        h, h.stride(0), h.stride(1),
        nw if nw is not None else h, nb if nb is not None else h,
        weight, weight.stride(0), weight.stride(1), vocab,
        bias_c if bias_c is not None else h,
        target, target_logit,
        x, x.stride(0) if write_x else 0,
        n_rows, dim, float(norm_eps), int(ignore_index),
        NORM=_NORM_CODES[norm], HAS_NW=nw is not None, HAS_NB=nb is not None, HAS_GB=bias_c is not None,
        LENS=True, WRITE_X=write_x, SINGLE=single,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )

    # 2) partial logsumexp per (row block, vocabulary split).
    splits = _vocab_splits or _num_splits(n_rows, vocab, h.device)
    splits = max(1, min(splits, triton.cdiv(vocab, _VOCAB_SPLIT_QUANTUM)))
    per_split = triton.cdiv(triton.cdiv(vocab, splits), _VOCAB_SPLIT_QUANTUM) * _VOCAB_SPLIT_QUANTUM
    splits = triton.cdiv(vocab, per_split)
    part_max = torch.empty((splits, n_rows), dtype=torch.float32, device=h.device)
    part_sum = torch.empty((splits, n_rows), dtype=torch.float32, device=h.device)
    lens_kernel[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), splits)](
        x, x.stride(0), x.stride(1),
        weight, weight.stride(0), weight.stride(1),
        bias_c if bias_c is not None else x, target,
        part_max, part_sum,
        n_rows, dim, vocab, per_split, int(ignore_index), _n_bin(n_rows),
        HAS_BIAS=bias_c is not None, DOT_PRECISION=_dot_precision(h.device, mm_dtype),
        DOT_FP32=interpret and mm_dtype == torch.bfloat16,
    )

    # 3) combine the splits ([S, N], tiny) and subtract the target logit.
    if splits == 1:
        lse = part_max[0] + torch.log(part_sum[0])
    else:
        m = part_max.amax(dim=0)
        lse = m + torch.log((part_sum * torch.exp(part_max - m)).sum(dim=0))
    counted = target != ignore_index
    return torch.where(counted, lse - target_logit, torch.zeros_like(lse))


__all__ = ["available", "cosine_deviation", "logit_lens_deviation"]
