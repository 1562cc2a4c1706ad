"""The PyTorch references (cosine, the logit lens on the torch backend) against naive formulas."""

import pytest
import torch
import torch.nn.functional as F

from freezekern import ops
from freezekern.ops.reference import apply_norm, cosine_deviation_reference


def naive_logit_lens(h, weight, target, bias=None, **norm):
    x = apply_norm(h.double(), **norm) if norm["norm"] else h.double()
    logits = x @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    counted = target != -100
    loss = F.cross_entropy(logits, torch.where(counted, target, 0), reduction="none")
    return torch.where(counted, loss, torch.zeros_like(loss))


def norm_args(kind, dim, gen):
    if kind is None:
        return {"norm": None, "norm_weight": None, "norm_bias": None, "norm_eps": 1e-6}
    return {
        "norm": kind,
        "norm_weight": torch.randn(dim, generator=gen) * 0.2 + 1,
        "norm_bias": torch.randn(dim, generator=gen) * 0.1 if kind == "layer" else None,
        "norm_eps": 1e-5,
    }


@pytest.mark.parametrize("n,dim,vocab", [(0, 8, 5), (1, 59, 1), (37, 59, 1000), (64, 16, 257)])
@pytest.mark.parametrize("kind", ["rms", "layer", None])
@pytest.mark.parametrize("with_bias", [False, True])
def test_logit_lens_equals_materialised(n, dim, vocab, kind, with_bias):
    gen = torch.Generator().manual_seed(n * 7 + dim)
    h = torch.randn(n, dim, generator=gen) * 3
    weight = torch.randn(vocab, dim, generator=gen)
    bias = torch.randn(vocab, generator=gen) if with_bias else None
    target = torch.randint(0, vocab, (n,), generator=gen)
    if n > 2:
        target[::3] = -100
    norm = norm_args(kind, dim, gen)
    got = ops.logit_lens_deviation(h, weight, target, bias=bias, impl="torch", **norm)
    want = naive_logit_lens(h, weight, target, bias, **norm)
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert torch.all(got[target == -100] == 0)


def test_logit_lens_large_logits_do_not_overflow():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(16, 32, generator=gen)
    weight = torch.randn(300, 32, generator=gen) * 1000
    target = torch.randint(0, 300, (16,), generator=gen)
    got = ops.logit_lens_deviation(h, weight, target, norm="rms", impl="torch")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), naive_logit_lens(h, weight, target, norm="rms", norm_weight=None,
                                                              norm_bias=None, norm_eps=1e-6), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["rms", "layer", None])
def test_cosine_matches_formula(dtype, kind):
    gen = torch.Generator().manual_seed(1)
    h = (torch.randn(41, 59, generator=gen) * 2).to(dtype)
    basis = torch.randn(7, 59, generator=gen)
    rows = torch.randint(0, 7, (41,), generator=gen)
    rows[5] = -1
    norm = norm_args(kind, 59, gen)
    got = cosine_deviation_reference(h, basis, rows, **norm)
    x = apply_norm(h.double(), **norm) if kind else h.double()
    want = 1 - F.cosine_similarity(x, basis.double()[rows.clamp(min=0)], dim=-1, eps=1e-30)
    want[5] = 0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_dispatch_torch_impl_and_errors():
    h = torch.randn(3, 8)
    with pytest.raises(ValueError, match="impl must be"):
        ops.cosine_deviation(h, torch.randn(2, 8), torch.zeros(3, dtype=torch.long), impl="cuda")
    with pytest.raises(ValueError, match="basis must be"):
        ops.cosine_deviation(h, torch.randn(2, 7), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="target must be"):
        ops.logit_lens_deviation(h, torch.randn(5, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="norm must be"):
        ops.logit_lens_deviation(h, torch.randn(5, 8), torch.zeros(3, dtype=torch.long), norm="batch")
    out = ops.logit_lens_deviation(h, torch.randn(5, 8), torch.zeros(3, dtype=torch.long), impl="torch")
    assert out.shape == (3,)


def test_auto_keeps_fp64_on_the_reference():
    assert ops.resolve_impl("cosine_deviation", "auto", torch.device("cpu"), torch.float64) == "torch"
    h = torch.randn(4, 8, dtype=torch.float64)
    out = ops.logit_lens_deviation(h, torch.randn(5, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    assert out.dtype == torch.float64
