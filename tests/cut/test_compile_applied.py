"""torch.compile: the fake kernels refuse what the real ones refuse; a model with the cut, the fused loss and the
prefix cache compiles to the same loss and gradients as eager."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import freezekern as fk
from freezekern.ops import native

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread")]

_NATIVE = pytest.mark.skipif(not native.has_op("linear_cross_entropy", "cpu"),
                             reason="the native extension is not built")


def _args():
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(5, 8, generator=gen), torch.randn(11, 8, generator=gen)
    t, f = torch.tensor([0, 1, 2, 3, 4]), torch.randn(5, generator=gen)
    return h, w, t, f


def _bad_calls():
    h, w, t, f = _args()
    ops = torch.ops.freezekern
    cos = ops.cosine_deviation.default
    lce, lce_back = ops.linear_cross_entropy.default, ops.linear_cross_entropy_backward.default
    return {
        "cosine basis D": (cos, (h, w[:, :7], t, "none", None, None, 1e-6), "basis must be"),
        "cosine target length": (cos, (h, w, t[:4], "none", None, None, 1e-6), "target_row must be"),
        "cosine float target": (cos, (h, w, t.float(), "none", None, None, 1e-6), "integer tensor"),
        "cosine 1-D h": (cos, (h[0], w, t[:1], "none", None, None, 1e-6), "h must be 2-D"),
        "cosine norm kind": (cos, (h, w, t, "batch", None, None, 1e-6), "norm must be"),
        "cosine norm weight": (cos, (h, w, t, "rms", torch.ones(7), None, 1e-6), "norm_weight must be"),
        "lce weight D": (lce, (h, w[:, :7], t, None, None, -100, True, False, False, False), "weight must be"),
        "lce target length": (lce, (h, w, t[:3], None, None, -100, True, False, False, False), "target must be"),
        "lce bias length": (lce, (h, w, t, torch.zeros(3), None, -100, True, False, False, False), "bias must be"),
        "lce softcap": (lce, (h, w, t, None, -1.0, -100, True, False, False, False), "softcap must be positive"),
        "lce rows with dW": (lce, (h, w, t, None, None, -100, False, False, True, False), "reduce_sum=True"),
        "lce backward lse": (lce_back, (h, w, t, None, f[:4], f, None, -100, True, False, False), "lse must be"),
        "lce backward rows": (lce_back, (h, w, t, None, f, f[:2], None, -100, True, False, False),
                              "grad_rows must be"),
    }


@_NATIVE
@pytest.mark.parametrize("case", list(_bad_calls()))
def test_fake_kernels_refuse_what_the_real_kernels_refuse(case):
    op, args, message = _bad_calls()[case]
    with pytest.raises(RuntimeError, match=message):
        op(*args)
    mode = FakeTensorMode()
    fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode, pytest.raises(RuntimeError, match=message):
        op(*fake)


@_NATIVE
def test_fake_kernels_accept_good_calls():
    h, w, t, f = _args()
    ops = torch.ops.freezekern
    mode = FakeTensorMode()
    with mode:
        fh, fw, ft, ff = (mode.from_tensor(a) for a in (h, w, t, f))
        assert ops.cosine_deviation.default(fh, fw, ft, "rms", None, None, 1e-6).shape == (5,)
        loss, lse, gh, gw, gb = ops.linear_cross_entropy.default(fh, fw, ft, None, 2.0, -100, True, True, True, False)
        assert loss.shape == () and lse.shape == (5,) and gh.shape == (5, 8) and gw.shape == (11, 8)


def _applied():
    model = fk.tiny_model("llama", num_layers=4, hidden=32, vocab=257, tie=False, seed=0)
    model.train()
    handle = fk.apply(model, 2, fused_loss=True)
    cache = fk.PrefixCache().attach(handle)
    return model, handle, cache


def _steps(model, call, batch, n=2):
    results = []
    for _ in range(n):
        model.zero_grad(set_to_none=True)
        loss = call(**batch, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    return results


@pytest.mark.slow  # about a minute of tracing on two CPU cores
def test_compiled_model_with_the_cut_the_fused_loss_and_the_prefix_cache_matches_eager():
    torch._dynamo.reset()
    ids = torch.randint(3, 257, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    eager_model, _, _ = _applied()
    eager = _steps(eager_model, eager_model, batch)
    model, handle, cache = _applied()
    compiled = _steps(model, torch.compile(model, backend="aot_eager"), batch)
    assert handle.fused_loss.stats["fused"] == 2 and cache.stats()["hits"] == 1  # all three took part
    for (loss, grads), (ref_loss, ref_grads) in zip(compiled, eager):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        assert grads.keys() == ref_grads.keys() and len(grads) > 0
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
