"""Whole-model traces through every available backend equal the reference trace."""

import pytest
import torch

import freezekern as fk
from freezekern.ops import native, triton_common


def available_impls(device):
    impls = []
    if native.has_op("cosine_deviation", device):
        impls.append("native")
    if triton_common.available(device):
        impls.append("triton")
    return impls


@pytest.mark.parametrize("metric", ["cosine", "logit_lens"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_model_trace_per_impl(metric, family):
    device = torch.device("cpu")
    impls = available_impls(device)
    if not impls:
        pytest.skip("no fast backend available on cpu (extension not built, triton not interpretable)")
    model = fk.tiny_model(family, num_layers=3, hidden=32, vocab=97)
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 97, (2, 9), generator=gen)} for _ in range(2)]
    batches[0]["labels"] = batches[0]["input_ids"].clone()
    batches[0]["labels"][0, 2:5] = -100
    want = fk.analyze(model, batches, metric=metric, impl="torch", progress=False)
    for impl in impls:
        got = fk.analyze(model, batches, metric=metric, impl=impl, progress=False)
        assert got.token_count == want.token_count
        torch.testing.assert_close(torch.tensor(got.deviations), torch.tensor(want.deviations),
                                   rtol=1e-5, atol=1e-5, msg=lambda m, impl=impl: f"impl={impl}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["cosine", "logit_lens"])
def test_default_model_trace_per_impl(default_model, metric):
    model, tokenizer = default_model
    device = torch.device("cpu")
    impls = [i for i in available_impls(device) if i == "native"]  # the interpreter is too slow at V=49152
    if not impls:
        pytest.skip("native extension not built")
    batches = fk.make_batches(tokenizer, seq_len=64, num_tokens=256, batch_size=2)
    want = fk.analyze(model, batches, metric=metric, impl="torch", progress=False)
    for impl in impls:
        got = fk.analyze(model, batches, metric=metric, impl=impl, progress=False)
        torch.testing.assert_close(torch.tensor(got.deviations), torch.tensor(want.deviations), rtol=1e-4, atol=1e-4)
        assert fk.plan(got).boundary == fk.plan(want).boundary
