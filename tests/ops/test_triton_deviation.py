"""The Triton cosine kernel against the reference and an fp64 ground truth; Triton dispatch.

(The logit lens runs the Triton linear cross-entropy: tests/ops/test_logit_lens.py.)

Without CUDA the kernels run on CPU under the Triton interpreter
(TRITON_INTERPRET=1, set here when the environment has not set it); shapes
stay small because the interpreter is slow. With CUDA the same small cases
run compiled on the GPU, and the ``gpu``-marked cases add realistic shapes.

Accuracy rule for bf16/fp16 (as in flash-attention's tests): the kernel's max
error against an fp64 ground truth computed from the same inputs must not
exceed twice the error of a plain PyTorch computation done entirely in the
input dtype, plus a small atol. fp32 inputs must match the fp32 reference to
rtol = atol = 1e-5.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import freezekern.ops as ops  # noqa: E402
from freezekern.ops import reference, triton_common, triton_deviation  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if not triton_common.available(DEVICE):
    pytest.skip(
        f"Triton kernels not usable on {DEVICE.type} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r})",
        allow_module_level=True,
    )

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NORMS = ["rms", "layer", None]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _make_h(n: int, d: int, dtype: torch.dtype, layout: str, g: torch.Generator, scale: float = 1.0):
    """[n, d] hidden states: 'contig', 'strided' (every other column) or 'transposed'."""
    if layout == "contig":
        base = torch.randn(n, d, generator=g) * scale
        h = base.to(dtype).to(DEVICE)
    elif layout == "strided":
        base = torch.randn(n, 2 * d, generator=g) * scale
        h = base.to(dtype).to(DEVICE)[:, ::2]
    elif layout == "transposed":
        base = torch.randn(d, n, generator=g) * scale
        h = base.to(dtype).to(DEVICE).t()
    else:
        raise ValueError(layout)
    assert h.shape == (n, d)
    if layout != "contig" and n > 1 and d > 1:
        assert not h.is_contiguous()
    return h


def _norm_params(d: int, norm, dtype, g, with_weight=True, with_bias=True):
    w = (torch.rand(d, generator=g) + 0.5).to(dtype).to(DEVICE) if with_weight else None
    b = (0.1 * torch.randn(d, generator=g)).to(dtype).to(DEVICE) if with_bias else None
    return w, b


def _naive_norm(h, norm, w, b, eps, dtype):
    """The final norm computed entirely in ``dtype`` (fp64: ground truth)."""
    x = h.to(dtype)
    if norm == "rms":
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    elif norm == "layer":
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + eps)
    if norm is not None:
        if w is not None:
            x = x * w.to(dtype)
        if b is not None:
            x = x + b.to(dtype)
    return x


def _naive_cosine(h, basis, target_row, norm, w, b, eps, dtype):
    x = _naive_norm(h, norm, w, b, eps, dtype)
    rows = basis.to(dtype)[target_row.clamp(min=0)]
    cos = (x * rows).sum(-1) / (x.norm(dim=-1) * rows.norm(dim=-1)).clamp_min(1e-30)
    out = torch.where(target_row >= 0, 1 - cos, torch.zeros_like(cos))
    return out.double()


def _assert_cosine(out, gt, ref32):
    """The kernel upcasts every input to fp32 like the reference: both within 1e-5 of fp64."""
    assert out.dtype == torch.float32 and out.shape == gt.shape
    assert torch.isfinite(out).all()
    if out.numel() == 0:
        return
    torch.testing.assert_close(out.double(), gt, rtol=0, atol=1e-5)
    if ref32 is not None:
        torch.testing.assert_close(out, ref32, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# cosine
# --------------------------------------------------------------------------
# (N, D, layout, ignored rows present, norm weight, norm bias)
COS_CASES = [
    (0, 64, "contig", False, True, True),
    (1, 59, "strided", False, True, False),
    (37, 59, "transposed", True, True, True),
    (130, 64, "contig", True, False, False),
    (37, 576, "strided", True, True, True),
]


def _check_cosine(dtype, norm, n, d, layout, ignore, with_w, with_b, seed=0, **kw):
    g = _gen(seed)
    m = 11
    h = _make_h(n, d, dtype, layout, g)
    w, b = _norm_params(d, norm, dtype, g, with_w, with_b)
    basis = torch.randn(m, d, generator=g).to(dtype).to(DEVICE)
    lo = -1 if ignore else 0
    target_row = torch.randint(lo, m, (n,), generator=g).to(DEVICE)
    eps = 1e-6
    out = triton_deviation.cosine_deviation(
        h, basis, target_row, norm=norm, norm_weight=w, norm_bias=b, norm_eps=eps, **kw
    )
    ref32 = reference.cosine_deviation_reference(
        h, basis, target_row, norm=norm, norm_weight=w, norm_bias=b, norm_eps=eps
    )
    gt = _naive_cosine(h, basis, target_row, norm, w, b, eps, torch.float64)
    _assert_cosine(out, gt, ref32)
    if ignore and n:
        assert (out[target_row < 0] == 0).all()


@pytest.mark.parametrize("case", COS_CASES, ids=lambda c: f"N{c[0]}-D{c[1]}-{c[2]}")
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cosine_matches_reference(dtype, norm, case):
    _check_cosine(dtype, norm, *case)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cosine_looped_over_d(dtype, norm):
    """D larger than the D block: statistics pass(es), then the dot pass."""
    _check_cosine(dtype, norm, 37, 59, "strided", True, True, True, seed=1, _max_block_d=16)
    _check_cosine(dtype, norm, 5, 576, "transposed", False, True, True, seed=2, _max_block_d=128)


def test_cosine_zero_rows_and_all_ignored():
    g = _gen(3)
    h = _make_h(9, 59, torch.float32, "contig", g)
    h[0] = 0  # zero row: cos clamps its denominator, deviation 1
    basis = torch.randn(4, 59, generator=g).to(DEVICE)
    tr = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0], device=DEVICE)
    out = triton_deviation.cosine_deviation(h, basis, tr, norm=None)
    ref = reference.cosine_deviation_reference(h, basis, tr, norm=None)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out[0].item() == 1.0
    out = triton_deviation.cosine_deviation(h, basis, torch.full((9,), -1, device=DEVICE))
    assert (out == 0).all()


def test_cosine_index_out_of_range_is_nan():
    g = _gen(4)
    h = _make_h(3, 16, torch.float32, "contig", g)
    basis = torch.randn(2, 16, generator=g).to(DEVICE)
    out = triton_deviation.cosine_deviation(h, basis, torch.tensor([0, 2, -1], device=DEVICE))
    assert torch.isfinite(out[0]) and torch.isnan(out[1]) and out[2] == 0


def test_dot_precision_per_gpu(monkeypatch):
    """fp32: 3xTF32 on NVIDIA sm_80+, IEEE before and on ROCm; bf16/fp16 never ask ROCm for TF32."""
    cached = triton_common._cuda_dot_precision
    monkeypatch.setattr(triton_common, "_cuda_dot_precision", cached.__wrapped__)
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, fp32 in (((9, 0), "tf32x3"), ((8, 0), "tf32x3"), ((7, 5), "ieee")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, c=capability: c)
        assert triton_common.dot_precision(torch.device("cuda", 0), torch.float32) == fp32
        assert triton_common.dot_precision(torch.device("cuda", 0), torch.bfloat16) == "tf32"
    monkeypatch.setattr(torch.version, "hip", "6.4")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert triton_common.dot_precision(torch.device("cuda", 0), dtype) == "ieee"


# --------------------------------------------------------------------------
# availability and dispatch
# --------------------------------------------------------------------------
def test_available(monkeypatch):
    assert triton_common.available(DEVICE)
    assert not triton_common.available(torch.device("meta"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_common.available("cpu")
    if DEVICE.type == "cpu":  # triton was imported in interpreter mode
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert triton_common.available("cpu")


def test_dispatch_uses_triton():
    g = _gen(12)
    h = _make_h(37, 59, torch.bfloat16, "strided", g)
    basis = torch.randn(7, 59, generator=g).to(DEVICE)
    tr = torch.randint(-1, 7, (37,), generator=g).to(DEVICE)
    torch.testing.assert_close(
        ops.cosine_deviation(h, basis, tr, impl="triton"),
        ops.cosine_deviation(h, basis, tr, impl="torch"),
        rtol=1e-5, atol=1e-5,
    )
    weight = torch.randn(127, 59, generator=g).to(DEVICE)
    target = torch.randint(0, 127, (37,), generator=g).to(DEVICE)
    assert ops.resolve_impl("logit_lens_deviation", "triton", DEVICE) == "triton"
    torch.testing.assert_close(
        ops.logit_lens_deviation(h, weight, target, impl="triton"),
        ops.logit_lens_deviation(h, weight, target, impl="torch"),
        rtol=1e-5, atol=1e-5,
    )


# --------------------------------------------------------------------------
# GPU: realistic shapes (compiled kernels, autotuned)
# --------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [576, 2048, 4096])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_gpu_cosine_realistic(d, norm):
    g = _gen(20)
    n, m = 4096, 2000
    h = _make_h(n, d, torch.bfloat16, "contig", g)
    w, b = _norm_params(d, norm, torch.bfloat16, g, with_bias=norm == "layer")
    basis = torch.randn(m, d, generator=g).to(DEVICE)
    tr = torch.randint(-1, m, (n,), generator=g).to(DEVICE)
    out = triton_deviation.cosine_deviation(h, basis, tr, norm=norm, norm_weight=w, norm_bias=b)
    gt = _naive_cosine(h, basis, tr, norm, w, b, 1e-6, torch.float64)
    _assert_cosine(out, gt, None)


def test_auto_chooses_per_op_device_and_dtype(monkeypatch):
    """On CUDA the 16-bit logit lens takes Triton's tensor cores, fp32 the native kernel; fp64 the reference."""
    from freezekern.ops import dispatch

    monkeypatch.setattr(dispatch, "_native_usable", lambda op, device: True)
    monkeypatch.setattr(dispatch, "_triton_usable", lambda device: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    lens, cos = "logit_lens_deviation", "cosine_deviation"
    assert dispatch.resolve_impl(lens, "auto", cuda, torch.bfloat16) == "triton"
    assert dispatch.resolve_impl(lens, "auto", cuda, torch.float16) == "triton"
    assert dispatch.resolve_impl(lens, "auto", cuda, torch.float32) == "native"
    assert dispatch.resolve_impl(cos, "auto", cuda, torch.bfloat16) == "native"
    assert dispatch.resolve_impl(lens, "auto", cuda, torch.float64) == "torch"
    assert dispatch.resolve_impl(lens, "auto", cpu, torch.bfloat16) == "native"
    monkeypatch.setattr(dispatch, "_triton_usable", lambda device: False)
    assert dispatch.resolve_impl(lens, "auto", cuda, torch.bfloat16) == "native"
    monkeypatch.setattr(dispatch, "_native_usable", lambda op, device: False)
    assert dispatch.resolve_impl(lens, "auto", cuda, torch.float32) == "torch"
    assert dispatch.resolve_impl(cos, "auto", cpu, torch.float32) == "torch"
