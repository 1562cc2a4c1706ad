"""The logit lens on every backend against an fp64 naive computation.

The logit lens is the linear cross-entropy's per-row forward on the normed
state: x = n(h) computed in fp32 and cast to h's dtype (what the model feeds
its LM head), then d_t = logsumexp(W x_t + b) - (W[y_t] . x_t + b[y_t]). The
ground truth takes the op's x (checked against an fp64 norm first) and forms
the [N, V] logits in fp64; every backend accumulates in fp32, so its error is
bounded by a few fp32 roundings of sum_j |x_j W_vj| + |b_v|, far below what a
wrong norm, a missing bias, a wrongly rounded x or a wrong target gives.

Without CUDA the Triton backend runs under the interpreter (slow: small shapes).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from freezekern import ops  # noqa: E402
from freezekern.ops import native, reference  # noqa: E402
from freezekern.ops.triton_common import available as triton_available  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100
REL = 2e-6  # of sum_j |x_j W_vj| + |b_v|: fp32 accumulation stays far below (measured: < 1e-7 at D = 576)


def _backend(impl: str, device: str):
    if impl == "native":
        ready = native.has_op("linear_cross_entropy", device)
        reason = f"native linear cross-entropy unavailable: {native.unavailable_reason(device, 'linear_cross_entropy')}"
    elif impl == "triton":
        ready = triton_available(device)
        reason = "Triton not usable (install triton; on CPU TRITON_INTERPRET=1 before it is imported)"
    else:
        ready, reason = True, ""
    marks = [pytest.mark.skipif(not ready, reason=reason)]
    if device == "cuda":
        marks = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"), *marks]
    return pytest.param(impl, device, marks=marks, id=f"{impl}-{device}")


BACKENDS = [_backend("torch", "cpu"), _backend("native", "cpu"), _backend("native", "cuda"),
            _backend("triton", "cuda")]
if not torch.cuda.is_available():
    BACKENDS.append(_backend("triton", "cpu"))  # the interpreter
FAST_BACKENDS = [b for b in BACKENDS if b.values[:2] != ("triton", "cpu")]


# ---------------------------------------------------------------- fp64 ground truth


def _norm64(h, norm, norm_weight, norm_bias, eps):
    """The final norm in fp64: the reference's formula on fp64 inputs (as tests/ops/test_reference.py takes it)."""
    return reference.apply_norm(h.double(), norm, norm_weight, norm_bias, eps)


def truth(h, weight, target, *, bias=None, norm, norm_weight=None, norm_bias=None, norm_eps=1e-6,
          ignore_index=IGNORE):
    """(d [N] fp64, bound [N]): the lens from the [N, V] fp64 logits of the op's x, and the allowed error."""
    h, weight, target = h.cpu(), weight.cpu(), target.cpu()
    norm_weight, norm_bias, bias = (None if t is None else t.cpu() for t in (norm_weight, norm_bias, bias))
    x = h if norm is None else reference.apply_norm(h, norm, norm_weight, norm_bias, norm_eps).to(h.dtype)
    if norm is not None and h.shape[0]:  # the x the truth starts from is the fp64 norm, rounded to h's dtype
        x64 = _norm64(h, norm, norm_weight, norm_bias, norm_eps)
        step = torch.finfo(h.dtype).eps if h.dtype != torch.float32 else 1e-5
        assert ((x.double() - x64).abs() <= step * x64.abs() + 1e-6).all()
    xd, wd = x.double(), weight.double()
    logits = xd @ wd.t()
    size = xd.abs() @ wd.abs().t()
    if bias is not None:
        logits = logits + bias.double()
        size = size + bias.double().abs()
    counted = target != ignore_index
    safe = torch.where(counted, target, torch.zeros_like(target)).long()
    dev = torch.logsumexp(logits, dim=-1) - logits.gather(1, safe[:, None])[:, 0]
    bound = 1e-6 + REL * size.amax(-1) if logits.shape[0] else torch.zeros(0, dtype=torch.float64)
    return torch.where(counted, dev, torch.zeros_like(dev)), bound


def assert_lens(got, h, weight, target, **kw):
    want, bound = truth(h, weight, target, **kw)
    assert got.dtype == torch.float32 and got.shape == want.shape
    got = got.cpu().double()
    assert torch.isfinite(got).all()
    err = (got - want).abs()
    if err.numel():
        worst = int((err - bound).argmax())
        assert (err <= bound).all(), f"row {worst}: error {err[worst]:.3g} > bound {bound[worst]:.3g}"
    ignore_index = kw.get("ignore_index", IGNORE)
    assert (got[target.cpu() == ignore_index] == 0).all()


# ---------------------------------------------------------------- inputs


def _h(n, d, dtype, device, layout, gen, scale=3.0, shift=0.5):
    """[n, d] hidden states: contiguous, odd row stride (unaligned rows), inner stride 2, or transposed."""
    if layout == "transposed":
        return (torch.randn(d, n, generator=gen) * scale + shift).to(dtype).to(device).t()
    cols = {"contiguous": d, "row_strided_odd": d + 3, "col_strided": 2 * d}[layout]
    big = (torch.randn(n, cols, generator=gen) * scale + shift).to(dtype).to(device)
    return big[:, ::2] if layout == "col_strided" else big[:, :d]


def _norm_params(d, affine, device, gen):
    w = (torch.rand(d, generator=gen) + 0.5).to(device) if affine in ("weight", "weight+bias") else None
    b = (torch.randn(d, generator=gen) * 0.1).to(device) if affine in ("bias", "weight+bias") else None
    return w, b


def _targets(n, v, ignored, gen, device):
    t = torch.randint(0, v, (n,), generator=gen)
    ignore_index = IGNORE
    if ignored == "some" and n:
        t[::5] = IGNORE
    elif ignored == "custom" and n:
        ignore_index = 0 if v > 1 else IGNORE
        t[::3] = ignore_index
    return t.to(device), ignore_index


def _lens(impl, h, weight, target, **kw):
    return ops.logit_lens_deviation(h, weight, target, impl=impl, **kw)


# ---------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize(("impl", "device"), FAST_BACKENDS)
@pytest.mark.parametrize("v", [1, 127, 4099])
@pytest.mark.parametrize("d", [59, 576])
@pytest.mark.parametrize("n", [0, 1, 59, 257])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shapes(impl, device, dtype, n, d, v):
    gen = torch.Generator().manual_seed(n * 7919 + d * 31 + v)
    h = _h(n, d, dtype, device, "contiguous", gen)
    weight = (torch.randn(v, d, generator=gen) / d**0.5 * 2).to(dtype).to(device)
    bias = (torch.randn(v, generator=gen) * 0.5).to(device)
    nw, nb = _norm_params(d, "weight", device, gen)
    target, ignore_index = _targets(n, v, "some", gen, device)
    kw = dict(bias=bias, norm="rms", norm_weight=nw, norm_bias=nb, ignore_index=ignore_index)
    assert_lens(_lens(impl, h, weight, target, **kw), h, weight, target, **kw)


# (N, D, V, layout): what the Triton interpreter can afford, odd sizes and ragged tiles included
SMALL_SHAPES = [(0, 64, 127, "contiguous"), (1, 59, 1, "col_strided"), (37, 59, 127, "transposed"),
                (130, 64, 1000, "contiguous"), (37, 576, 300, "row_strided_odd"), (37, 59, 65, "col_strided")]


@pytest.mark.parametrize(("impl", "device"), BACKENDS)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "N{}-D{}-V{}-{}".format(*s))
@pytest.mark.parametrize("norm", ["rms", "layer", None], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_shapes(impl, device, dtype, norm, shape):
    n, d, v, layout = shape
    gen = torch.Generator().manual_seed(n + d + v)
    h = _h(n, d, dtype, device, layout, gen)
    weight = (torch.randn(v, d, generator=gen) / d**0.5 * 2).to(dtype).to(device)
    bias = torch.randn(v, generator=gen).to(device)
    nw, nb = _norm_params(d, "weight+bias", device, gen)
    target, ignore_index = _targets(n, v, "some", gen, device)
    kw = dict(bias=bias, norm=norm, norm_weight=nw, norm_bias=nb, norm_eps=1e-5, ignore_index=ignore_index)
    assert_lens(_lens(impl, h, weight, target, **kw), h, weight, target, **kw)


# The large sizes of real models one at a time: D = 4096 (llama-7B), V = 50257 (gpt2, not a multiple of
# any vocabulary chunk) and V = 262144 (gemma3).
@pytest.mark.parametrize(("impl", "device"), FAST_BACKENDS)
@pytest.mark.parametrize(("d", "v"), [(4096, 4099), (576, 50257), (59, 262144)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_sizes(impl, device, dtype, d, v):
    gen = torch.Generator().manual_seed(d + v)
    n = 19
    h = _h(n, d, dtype, device, "row_strided_odd", gen)
    weight = (torch.randn(v, d, generator=gen) / d**0.5 * 3).to(dtype).to(device)
    nw, nb = _norm_params(d, "weight+bias", device, gen)
    target, ignore_index = _targets(n, v, "some", gen, device)
    kw = dict(norm="layer", norm_weight=nw, norm_bias=nb, ignore_index=ignore_index)
    assert_lens(_lens(impl, h, weight, target, **kw), h, weight, target, **kw)


AFFINES = ["none", "weight", "bias", "weight+bias"]
LAYOUTS = ["contiguous", "row_strided_odd", "col_strided", "transposed"]


@pytest.mark.parametrize(("impl", "device"), BACKENDS)
@pytest.mark.parametrize("head_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("norm", ["rms", "layer", None], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variants(impl, device, dtype, norm, affine, head_bias):
    # Every combination once; the layout and the ignored rows cycle through theirs.
    key = DTYPES.index(dtype) + 3 * AFFINES.index(affine) + int(head_bias) + (norm is None)
    n, d, v = 59, 72, 1000
    gen = torch.Generator().manual_seed(key * 101 + len(str(norm)))
    h = _h(n, d, dtype, device, LAYOUTS[key % 4], gen)
    weight = (torch.randn(v, d, generator=gen) / d**0.5 * 2).to(dtype).to(device)
    bias = torch.randn(v, generator=gen).to(device) if head_bias else None
    nw, nb = _norm_params(d, affine, device, gen)
    target, ignore_index = _targets(n, v, ("none", "some", "custom")[key % 3], gen, device)
    kw = dict(bias=bias, norm=norm, norm_weight=nw, norm_bias=nb, ignore_index=ignore_index)
    assert_lens(_lens(impl, h, weight, target, **kw), h, weight, target, **kw)


@pytest.mark.parametrize(("impl", "device"), BACKENDS)
@pytest.mark.parametrize(("h_dtype", "w_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=str)
def test_mixed_dtypes(impl, device, h_dtype, w_dtype):
    gen = torch.Generator().manual_seed(10)
    h = _h(37, 59, h_dtype, device, "contiguous", gen)
    weight = torch.randn(127, 59, generator=gen).to(w_dtype).to(device)
    target, _ = _targets(37, 127, "some", gen, device)
    assert_lens(_lens(impl, h, weight, target, norm="rms"), h, weight, target, norm="rms")


@pytest.mark.parametrize(("impl", "device"), BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_values(impl, device, dtype):
    """Weights scaled 100x: logits in the thousands, the logsumexp must not overflow."""
    n, d, v = 33, 64, 300
    gen = torch.Generator().manual_seed(5)
    h = _h(n, d, dtype, device, "contiguous", gen)
    weight = (torch.randn(v, d, generator=gen) * 100.0).to(dtype).to(device)
    bias = (torch.randn(v, generator=gen) * 100.0).to(device)
    target, _ = _targets(n, v, "some", gen, device)
    kw = dict(bias=bias, norm="rms")
    assert truth(h, weight, target, **kw)[0].abs().max() > 1e3
    assert_lens(_lens(impl, h, weight, target, **kw), h, weight, target, **kw)


@pytest.mark.parametrize(("impl", "device"), BACKENDS)
def test_all_ignored(impl, device):
    gen = torch.Generator().manual_seed(1)
    h = _h(17, 40, torch.bfloat16, device, "contiguous", gen)
    weight = torch.randn(300, 40, generator=gen).to(device)
    target = torch.full((17,), IGNORE, dtype=torch.long, device=device)
    out = _lens(impl, h, weight, target)
    assert out.dtype == torch.float32 and torch.equal(out.cpu(), torch.zeros(17))


@pytest.mark.parametrize(("impl", "device"), BACKENDS)
def test_int32_target(impl, device):
    gen = torch.Generator().manual_seed(2)
    h = _h(20, 48, torch.float32, device, "contiguous", gen)
    weight = torch.randn(130, 48, generator=gen).to(device)
    target = torch.randint(0, 130, (20,), generator=gen).to(device)
    assert_lens(_lens(impl, h, weight, target.int(), norm="layer"), h, weight, target, norm="layer")


def test_fp64_stays_fp64_on_the_torch_backend():
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(9, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(21, 16, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 21, (9,), generator=gen)
    got = ops.logit_lens_deviation(h, weight, target)  # auto keeps fp64 on torch
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, truth(h, weight, target, norm="rms")[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("impl", "device"), [b for b in BACKENDS if b.values[1] == "cpu"])
def test_target_outside_the_vocabulary_raises_on_the_cpu(impl, device):
    h, weight = torch.randn(4, 16), torch.randn(10, 16)
    if impl == "triton":  # no host sync in the kernels: NaN, as on CUDA
        out = _lens(impl, h, weight, torch.tensor([1, 2, 10, IGNORE]))
        assert torch.isnan(out[2]) and torch.isfinite(out[:2]).all() and out[3] == 0
        return
    with pytest.raises((ValueError, RuntimeError), match="out(side| of range)"):
        _lens(impl, h, weight, torch.tensor([1, 2, 10, 3]))


@pytest.mark.parametrize(("impl", "device"), BACKENDS)
def test_is_the_per_row_linear_cross_entropy_of_the_normed_state(impl, device):
    """With norm=None the lens is exactly the per-row loss, whatever grad mode, and builds no graph."""
    gen = torch.Generator().manual_seed(4)
    h = _h(23, 32, torch.bfloat16, device, "contiguous", gen).requires_grad_()
    weight = torch.randn(50, 32, generator=gen).bfloat16().to(device).requires_grad_()
    target, _ = _targets(23, 50, "some", gen, device)
    got = _lens(impl, h, weight, target, norm=None)
    assert not got.requires_grad
    with torch.no_grad():
        want = ops.linear_cross_entropy(h, weight, target, reduction="none", impl=impl)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_kernel_for_resolves_the_backend_once():
    kernel = ops.kernel_for("logit_lens_deviation", "torch", torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(6)
    h, weight = torch.randn(5, 8, generator=gen), torch.randn(11, 8, generator=gen)
    target = torch.randint(0, 11, (5,), generator=gen)
    torch.testing.assert_close(kernel(h, weight, target, norm="rms"), ops.logit_lens_deviation(h, weight, target))
    with pytest.raises(ValueError, match="op must be one of"):
        ops.kernel_for("linear_cross_entropy", "torch", torch.device("cpu"))


def test_dispatch_follows_the_linear_cross_entropy_kernels(monkeypatch):
    """The lens is native where the native linear cross-entropy is; it has no op of its own."""
    from freezekern.ops import dispatch

    seen = []
    monkeypatch.setattr(native, "has_op", lambda op, device: seen.append(op) or True)
    assert dispatch.resolve_impl("logit_lens_deviation", "native", torch.device("cpu")) == "native"
    assert seen == ["linear_cross_entropy"]


@pytest.mark.skipif(not native.registered("linear_cross_entropy"), reason="native extension not loaded")
def test_the_extension_has_no_logit_lens_op():
    with pytest.raises(RuntimeError):
        torch._C._dispatch_has_kernel_for_dispatch_key("freezekern::logit_lens_deviation", "CPU")
