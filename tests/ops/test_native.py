"""Native (C++/OpenMP and CUDA) cosine kernels against an fp64 ground truth, and the extension's loader.

(The logit lens runs the native linear cross-entropy: tests/ops/test_logit_lens.py.)

Error rule (flash-attention's): the native kernel's error against an fp64
computation on the same (low-precision) inputs may not exceed twice the error
of the PyTorch reference at the same dtype, plus a small tolerance of about
1e-5 relative (both accumulate in fp32).
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

from freezekern import ops
from freezekern.ops import dispatch, native, reference, tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPS = ("cosine_deviation", "linear_cross_entropy")
IGNORE = -100


def _native_on(device: str) -> bool:
    return all(native.has_op(op, device) for op in OPS)


_CPU_SKIP = pytest.mark.skipif(
    not _native_on("cpu"), reason=f"native CPU kernels unavailable: {native.unavailable_reason('cpu')}"
)
_CUDA_READY = torch.cuda.is_available() and _native_on("cuda")
_CUDA_SKIP = pytest.mark.skipif(
    not _CUDA_READY,
    reason="needs a CUDA device and freezekern._C built with CUDA kernels"
    + ("" if not torch.cuda.is_available() else f" ({native.unavailable_reason('cuda')})"),
)
DEVICES = [
    pytest.param("cpu", marks=_CPU_SKIP, id="cpu"),
    pytest.param("cuda", marks=[pytest.mark.gpu, _CUDA_SKIP], id="cuda"),
]


# ---------------------------------------------------------------- fp64 ground truth


def _truth_norm(h, norm, norm_weight, norm_bias, eps):
    """The final norm in fp64: the reference's formula on fp64 inputs (as tests/ops/test_reference.py takes it)."""
    return reference.apply_norm(h.double(), norm, norm_weight, norm_bias, eps)


def truth_cosine(h, basis, target_row, *, norm, norm_weight=None, norm_bias=None, norm_eps=1e-6):
    x = _truth_norm(h, norm, norm_weight, norm_bias, norm_eps)
    rows = basis.double()[target_row.clamp(min=0)]
    cos = (x * rows).sum(-1) / (x.norm(dim=-1) * rows.norm(dim=-1)).clamp_min(1e-30)
    return torch.where(target_row >= 0, 1.0 - cos, torch.zeros_like(cos))


def assert_within_rule(native_out, ref_out, truth, *, rel=1e-5):
    assert native_out.dtype == torch.float32
    assert native_out.shape == truth.shape
    got = native_out.detach().cpu().double()
    ref = ref_out.detach().cpu().double()
    truth = truth.detach().cpu().double()
    assert torch.isfinite(got).all(), "native result is not finite"
    tolerance.assert_within_rule(got, ref, truth, rel=rel, floor=rel, what="native")


# ---------------------------------------------------------------- inputs


def _h(n, d, dtype, device, layout, gen, scale=3.0, shift=0.5):
    if layout == "contiguous":
        base = torch.randn(n, d, generator=gen) * scale + shift
        return base.to(dtype).to(device)
    if layout == "row_strided":  # rows 16 elements apart: still aligned for vector loads
        big = (torch.randn(n, d + 16, generator=gen) * scale + shift).to(dtype).to(device)
        return big[:, :d]
    if layout == "row_strided_odd":  # odd row stride: unaligned rows
        big = (torch.randn(n, d + 3, generator=gen) * scale + shift).to(dtype).to(device)
        return big[:, :d]
    if layout == "col_strided":  # inner stride 2: the kernel copies it to contiguous
        big = (torch.randn(n, 2 * d, generator=gen) * scale + shift).to(dtype).to(device)
        return big[:, ::2]
    raise ValueError(layout)


def _norm_params(d, affine, device, gen):
    w = (torch.rand(d, generator=gen) + 0.5).to(device) if affine in ("weight", "weight+bias") else None
    b = (torch.randn(d, generator=gen) * 0.1).to(device) if affine in ("bias", "weight+bias") else None
    return w, b


def _run_cosine(h, basis, target_row, **kw):
    got = ops.cosine_deviation(h, basis, target_row, impl="native", **kw)
    ref = ops.cosine_deviation(h, basis, target_row, impl="torch", **kw)
    return got, ref, truth_cosine(h.cpu(), basis.cpu(), target_row.cpu(), **{
        k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()
    })


# ---------------------------------------------------------------- cosine


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cosine_d4096(device, dtype, norm):
    gen = torch.Generator().manual_seed(4096)
    n, d, m = 37, 4096, 23
    h = _h(n, d, dtype, device, "row_strided_odd", gen)
    basis = torch.randn(m, d, generator=gen).to(device)
    target_row = torch.randint(-1, m, (n,), generator=gen).to(device)
    nw, nb = _norm_params(d, "weight+bias", device, gen)
    got, ref, truth = _run_cosine(h, basis, target_row, norm=norm, norm_weight=nw, norm_bias=nb)
    assert_within_rule(got, ref, truth)


LAYOUTS = ["contiguous", "row_strided", "row_strided_odd", "col_strided"]
AFFINES = ["none", "weight", "bias", "weight+bias"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 50])
@pytest.mark.parametrize("d", [59, 576])
@pytest.mark.parametrize("n", [0, 1, 59, 257])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cosine_shapes(device, dtype, n, d, m):
    gen = torch.Generator().manual_seed(n * 101 + d + m)
    h = _h(n, d, dtype, device, "contiguous", gen)
    basis = torch.randn(m, d, generator=gen).to(device)
    target_row = torch.randint(-1, m, (n,), generator=gen).to(device)
    nw, _ = _norm_params(d, "weight", device, gen)
    got, ref, truth = _run_cosine(h, basis, target_row, norm="rms", norm_weight=nw)
    assert_within_rule(got, ref, truth)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("basis_dtype", ["fp32", "same"])
@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("norm", ["rms", "layer", None], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cosine_variants(device, dtype, norm, affine, basis_dtype):
    key = DTYPES.index(dtype) + 3 * AFFINES.index(affine) + (basis_dtype == "same") + (norm is None)
    _check_cosine(device, dtype, norm, affine, basis_dtype, LAYOUTS[key % 4])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cosine_layouts(device, dtype, layout):
    _check_cosine(device, dtype, "layer", "weight+bias", "same", layout)


def _check_cosine(device, dtype, norm, affine, basis_dtype, layout):
    n, d, m = 59, 72, 23
    gen = torch.Generator().manual_seed(hash((str(dtype), norm, affine, basis_dtype, layout)) % 2**31)
    h = _h(n, d, dtype, device, layout, gen)
    basis = torch.randn(m, d, generator=gen).to(torch.float32 if basis_dtype == "fp32" else dtype).to(device)
    target_row = torch.randint(-1, m, (n,), generator=gen).to(device)
    nw, nb = _norm_params(d, affine, device, gen)
    got, ref, truth = _run_cosine(h, basis, target_row, norm=norm, norm_weight=nw, norm_bias=nb)
    assert_within_rule(got, ref, truth)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias_scale", [0.1, 10.0])
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("d", [59, 576])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cosine_norm_bias(device, dtype, d, norm, bias_scale):
    """A norm bias takes the expanded-sums path of the CPU kernel; a large bias dominates y."""
    gen = torch.Generator().manual_seed(d + int(bias_scale) + len(norm))
    h = _h(37, d, dtype, device, "contiguous", gen, shift=4.0)
    basis = torch.randn(11, d, generator=gen).to(device)
    target_row = torch.randint(-1, 11, (37,), generator=gen).to(device)
    nw = (torch.rand(d, generator=gen) + 0.5).to(device)
    nb = (torch.randn(d, generator=gen) * bias_scale).to(device)
    got, ref, truth = _run_cosine(h, basis, target_row, norm=norm, norm_weight=nw, norm_bias=nb)
    assert_within_rule(got, ref, truth)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [96, 4096])
# |y|^2 / (|n(h) w|^2 + |nb|^2) is about residual^2 / 2: 0.4, 0.1 and 0.01 sit
# on either side of where the CPU kernel stops trusting its expanded sums.
@pytest.mark.parametrize("residual", [0.9, 0.45, 0.15, 1e-2, 1e-4, 0.0])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_cosine_norm_bias_cancelling_the_row(device, norm, residual, d):
    """A bias that cancels much or all of n(h) * w: y is small, and the cosine must still be right."""
    gen = torch.Generator().manual_seed(11)
    row = torch.randn(d, generator=gen) * 2 + 1
    h = row + 1e-3 * torch.randn(9, d, generator=gen)
    nw = torch.rand(d, generator=gen) + 0.5
    x = row - row.mean() if norm == "layer" else row
    x = x * torch.rsqrt(x.pow(2).mean() + 1e-6)
    nb = -(x * nw) + residual * torch.randn(d, generator=gen)
    basis = torch.randn(4, d, generator=gen)
    target_row = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, -1])
    args = [t.to(device) for t in (h, basis, target_row, nw, nb)]
    got, ref, truth = _run_cosine(*args[:3], norm=norm, norm_weight=args[3], norm_bias=args[4])
    assert torch.isfinite(got).all() and got.abs().max() <= 2 + 1e-4
    assert_within_rule(got, ref, truth)
    if device == "cpu":
        # The CPU kernel's expanded sums must hand every row whose y.y they
        # cannot carry to the explicit pass: it stays as exact as the
        # reference, far inside the general rule's 1e-5.
        err, err_ref = ((out.double() - truth).abs().max().item() for out in (got, ref))
        assert err <= 3 * err_ref + 2e-7, f"native error {err:.3g} vs reference {err_ref:.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_cosine_extreme_and_ignored(device):
    gen = torch.Generator().manual_seed(3)
    h = (torch.randn(40, 64, generator=gen) * 1e3).to(torch.bfloat16).to(device)
    basis = (torch.randn(5, 64, generator=gen) * 100).to(device)
    target_row = torch.randint(0, 5, (40,), generator=gen).to(device)
    target_row[::4] = -1
    for norm in ("rms", "layer", None):
        got, ref, truth = _run_cosine(h, basis, target_row, norm=norm)
        assert_within_rule(got, ref, truth)
    none = torch.full((40,), -1, dtype=torch.long, device=device)
    assert torch.equal(ops.cosine_deviation(h, basis, none, impl="native").cpu(), torch.zeros(40))


@pytest.mark.parametrize("device", DEVICES)
def test_cosine_empty_basis_matches_reference(device):
    h = torch.randn(6, 8, device=device)
    basis = torch.empty(0, 8, device=device)
    target_row = torch.tensor([-1, -1, -1, -1, -1, -1], device=device)
    got = ops.cosine_deviation(h, basis, target_row, impl="native")
    ref = ops.cosine_deviation(h, basis, target_row, impl="torch")
    torch.testing.assert_close(got, ref)


# ---------------------------------------------------------------- torch.library / torch.compile


@_CPU_SKIP
def test_opcheck_cosine():
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(9, 24, generator=gen).bfloat16()
    basis = torch.randn(4, 24, generator=gen)
    target_row = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2, 3])
    w = torch.rand(24, generator=gen) + 0.5
    for args in [
        (h, basis, target_row, "rms", w, None, 1e-6),
        (h.float(), basis, target_row, "layer", w, torch.randn(24, generator=gen), 1e-5),
        (h, basis, target_row, "none", None, None, 1e-6),
    ]:
        torch.library.opcheck(torch.ops.freezekern.cosine_deviation.default, args)


@_CPU_SKIP
def test_torch_compile_fullgraph_cpu():
    gen = torch.Generator().manual_seed(6)
    h = torch.randn(16, 32, generator=gen).bfloat16()
    weight = torch.randn(100, 32, generator=gen)
    target = torch.randint(0, 100, (16,), generator=gen)
    target[3] = IGNORE
    nw = torch.rand(32, generator=gen) + 0.5

    def f(h, weight, target, nw):
        return ops.logit_lens_deviation(h, weight, target, norm="rms", norm_weight=nw, impl="native") * 2.0

    compiler = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler) is None:
        pytest.skip("torch.compile's C++ backend needs a C++ compiler; none is installed")
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    got = compiled(h, weight, target, nw)
    expected = f(h, weight, target, nw)
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- loader and fallback


def test_missing_extension_falls_back_and_native_raises(monkeypatch):
    missing = native._State(reason="the native extension freezekern._C is not built (test)")
    monkeypatch.setattr(native, "_STATE", missing)
    cpu = torch.device("cpu")
    assert not native.has_op("linear_cross_entropy", cpu)
    assert dispatch.resolve_impl("logit_lens_deviation", "auto", cpu) == "torch"
    assert dispatch.resolve_impl("cosine_deviation", "auto", cpu) == "torch"
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(5, 16, generator=gen)
    weight = torch.randn(30, 16, generator=gen)
    target = torch.randint(0, 30, (5,), generator=gen)
    auto = ops.logit_lens_deviation(h, weight, target, impl="auto")
    torch.testing.assert_close(auto, ops.logit_lens_deviation(h, weight, target, impl="torch"))
    with pytest.raises(RuntimeError, match="not built"):
        ops.logit_lens_deviation(h, weight, target, impl="native")
    with pytest.raises(RuntimeError, match="not built"):
        ops.cosine_deviation(h, weight, target, impl="native")
    info = native.info()
    assert info["loaded"] is False and info["cpu"] is False and "not built" in info["reason"]


def test_not_built_extension_is_silent(monkeypatch):
    monkeypatch.delenv("FREEZEKERN_DISABLE_NATIVE", raising=False)

    def importer(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = native._load_extension(importer)
    assert not state.loaded and not state.broken
    assert "not built" in state.reason


def test_broken_extension_warns_once_with_reason(monkeypatch):
    monkeypatch.delenv("FREEZEKERN_DISABLE_NATIVE", raising=False)

    def importer(name):
        raise ImportError("freezekern/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")

    with pytest.warns(RuntimeWarning, match="undefined symbol") as record:
        state = native._load_extension(importer)
    assert len(record) == 1
    assert state.broken and not state.loaded
    assert "rebuild" in state.reason and "undefined symbol" in state.reason
    assert not state.kernels and state.module is None  # nothing of a broken build is offered
    monkeypatch.setattr(native, "_STATE", state)
    assert not native.has_op("cosine_deviation", "cpu") and "undefined symbol" in native.unavailable_reason("cpu")
    from freezekern.ops import dispatch

    assert dispatch.resolve_impl("cosine_deviation", "auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="undefined symbol"):
        dispatch.resolve_impl("cosine_deviation", "native", torch.device("cpu"))


def test_info_describes_build():
    info = native.info()
    for key in ("loaded", "reason", "cpu", "cuda"):
        assert key in info
    if info["loaded"]:
        assert isinstance(info["openmp_threads"], int) and info["openmp_threads"] >= 1
        assert info["cuda"] == (native.has_op("cosine_deviation", "cuda"))
    else:
        assert native.unavailable_reason()
