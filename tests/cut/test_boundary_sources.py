"""Prefix cache and shared prefix: never a state the user's configuration would not compute, on every family."""


import pytest
import torch

from freezekern import tiny_model
from freezekern.cut.freeze import apply
from freezekern.cut.prefix_cache import PrefixCache
from freezekern.cut.shared_prefix import SharedPrefix

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread")]

L, K, V = 4, 2, 257


def _model(kind="llama", seed=0):
    model = tiny_model(kind, num_layers=L, hidden=32, vocab=V, tie=False, seed=seed)
    model.config.attn_pdrop = model.config.embd_pdrop = model.config.resid_pdrop = 0.0
    for module in model.modules():  # a deterministic prefix in training mode
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.set_attn_implementation("eager")
    model.train()
    return model


def _batch(seed=0):
    ids = torch.randint(3, V, (2, 10), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _loss(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _embedding_calls(handle):
    calls = []
    embedding = handle.embedding
    inner = embedding.forward
    embedding.forward = lambda *a, **k: (calls.append(1), inner(*a, **k))[1]
    return calls


def _cached(kind="llama"):
    model = _model(kind)
    handle = apply(model, K)
    cache = PrefixCache().attach(handle)
    return model, handle, cache


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama"])
def test_prefix_cache_serves_every_family_and_counts_only_what_it_served(kind):
    model, handle, cache = _cached(kind)
    plain = _model(kind)
    apply(plain, K)
    batch = _batch()
    first = _loss(model, batch)
    calls = _embedding_calls(handle)
    second = _loss(model, batch)
    expected = _loss(plain, batch)
    assert cache.stats()["hits"] == 1 and handle._state.stats["served"] == 1
    assert calls == [1]  # the embedding runs once (it returns the stand-in); no frozen block computes
    for got in (first, second):
        assert torch.equal(got[0], expected[0])
        assert all(torch.equal(got[1][n], g) for n, g in expected[1].items())


def test_prefix_cache_keys_the_autocast_state():
    model, handle, cache = _cached()
    plain = _model()
    apply(plain, K)
    batch = _batch(1)
    _loss(model, batch)  # fills the cache in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = _loss(model, batch), _loss(plain, batch)
    assert cache.stats()["hits"] == 0
    assert torch.equal(got[0], expected[0])


def test_prefix_cache_keys_the_config():
    model, handle, cache = _cached()
    plain = _model()
    apply(plain, K)
    batch = _batch(2)
    _loss(model, batch)
    for m in (model, plain):
        m.set_attn_implementation("sdpa")
    got, expected = _loss(model, batch), _loss(plain, batch)
    assert cache.stats()["hits"] == 0
    assert torch.equal(got[0], expected[0])


@pytest.mark.parametrize("write", ["in_place", "assigned"])
def test_prefix_cache_sees_weights_changed_through_data(write):
    model, handle, cache = _cached()
    plain = _model()
    apply(plain, K)
    batch = _batch(3)
    _loss(model, batch)
    for m in (model, plain):
        weight = m.model.layers[0].mlp.down_proj.weight
        if write == "in_place":
            weight.data.mul_(1.5)  # moves no version counter
        else:
            weight.data = weight.data * 1.5
    got, expected = _loss(model, batch), _loss(plain, batch)
    assert cache.stats()["hits"] == 0
    assert torch.equal(got[0], expected[0])


def _shared(kind="llama"):
    policy, reference = _model(kind), _model(kind)
    handle = apply(policy, K)
    return policy, reference, handle, SharedPrefix(handle, reference=reference)


def _log_probs(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama"])
def test_shared_prefix_serves_every_family_and_counts_only_what_it_served(kind):
    policy, reference, handle, shared = _shared(kind)
    expected_reference = _log_probs(_model(kind), _batch(4))
    calls = _embedding_calls(shared.reference)
    _loss(policy, _batch(4))
    with torch.no_grad():
        got = _log_probs(reference, _batch(4))
    assert shared.stats["served"] == 1 and shared.reference._state.stats["served"] == 1 and calls == [1]
    assert torch.equal(got, expected_reference.detach())


def test_shared_prefix_hands_a_state_no_in_place_op_of_the_model_reaches():
    policy, reference, handle, shared = _shared()
    received = []
    handle.parts.blocks[K].register_forward_pre_hook(lambda module, args: received.append(args[0]))
    batch = _batch(5)
    _loss(policy, batch)
    with torch.no_grad():
        received[0].mul_(3.0)  # block k+1 of the policy changes its input in place
        got = _log_probs(reference, batch)
        expected = _log_probs(_model(), batch)
    assert shared.stats["served"] == 1
    assert torch.equal(got, expected)


def test_shared_prefix_keys_the_autocast_state():
    policy, reference, handle, shared = _shared()
    batch = _batch(6)
    _loss(policy, batch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = _log_probs(reference, batch)
        expected = _log_probs(_model(), batch)
    assert shared.stats["served"] == 0
    assert torch.equal(got, expected)


def test_frozen_watch_sees_writes_that_move_no_version_counter():
    from freezekern.cut.prefix_state import FrozenWatch

    big, small = torch.randn(64, 96), torch.randn(5)
    watch = FrozenWatch(lambda: [big, small])
    assert not watch.changed()
    big.data[3, 7] = torch.nextafter(big[3, 7], torch.tensor(9.0))  # one ulp
    assert watch.changed() and not watch.changed()
    row = big.data[10]
    row[[2, 5]] = row[[5, 2]].clone()  # an exchange within a row
    assert watch.changed()
    big.data[[1, 40], 0] = big.data[[40, 1], 0].clone()  # an exchange within a column
    assert watch.changed()
    small.data.add_(1.0)
    assert watch.changed() and not watch.changed()
