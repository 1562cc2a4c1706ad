"""Prefix cache: exact, served only to forwards that cannot observe the prefix, evicts stale entries."""

import pytest
import torch

import freezekern as fk
from freezekern import tiny_model
from freezekern.cut import apply, trainable_parameters
from freezekern.cut.prefix_cache import PrefixCache

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

L = 6


def _model(tie=False, seed=0):
    model = tiny_model("llama", num_layers=L, hidden=64, vocab=257, tie=tie, seed=seed)
    model.set_attn_implementation("eager")  # output_attentions needs it
    model.train()
    return model


def _batch(seed=0, batch=2, seq=12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 257, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _step(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False, **kwargs)
    out.loss.backward()
    return out


def _count_calls(module):
    """Count a module's forward calls without a hook (a foreign hook keeps the prefix running)."""
    calls = []
    inner = module.forward
    module.forward = lambda *a, **k: (calls.append(1), inner(*a, **k))[1]
    return calls


def _epochs(model, batches, epochs, optimizer):
    grads = []
    for _ in range(epochs):
        for batch in batches:
            loss = _step(model, batch).loss.detach()
            grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
            optimizer.step()
    return grads


@pytest.mark.parametrize("setup", ["plain", "gc_reentrant"])
def test_prefix_cache_is_exact_and_skips_the_prefix(setup, tmp_path):
    batches = [_batch(10), _batch(11)]
    results = {}
    for use_cache in (False, True):
        model = _model(tie=True)
        if setup == "gc_reentrant":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        handle = apply(model, 4)
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
        cache = PrefixCache(directory=tmp_path / "disk" if setup == "plain" else None).attach(handle) \
            if use_cache else None
        calls = _count_calls(model.model.layers[1].mlp)
        results[use_cache] = (_epochs(model, batches, 3, optimizer), len(calls), cache, handle)
    (plain, plain_calls, _, _), (cached, cached_calls, cache, handle) = results[False], results[True]
    for (loss_a, grads_a), (loss_b, grads_b) in zip(plain, cached):
        assert torch.equal(loss_a, loss_b)
        assert grads_a.keys() == grads_b.keys()
        for name in grads_a:
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=0)
    stats = cache.stats()
    assert stats["misses"] == 2 and stats["hits"] == 4 and stats["entries"] == 4
    assert handle.stats["served"] == 4
    assert plain_calls == 6 and cached_calls == 2  # the MLP of frozen block 2 ran in epoch 1 only


def _cached_model(k=3):
    model = _model()
    handle = apply(model, k)
    cache = PrefixCache().attach(handle)
    batch = _batch(12)
    _step(model, batch)  # epoch 1 stores the boundary state of both samples
    return model, handle, cache, batch


def test_analyze_on_cached_samples_traces_every_space():
    model, handle, cache, batch = _cached_model()
    reference = fk.analyze(model, [batch], progress=False)  # no_grad: never served, nothing stored
    _step(model, batch)
    assert cache.stats()["hits"] == 1
    again = fk.analyze(model, [batch], progress=False)
    assert again.deviations == reference.deviations
    assert cache.stats()["hits"] == 1 and cache.stats()["stored"] == 2
    # a collapsed trace (h_1 = ... = h_k, what a served forward would give) differs from the real one
    assert len({round(d, 6) for d in reference.deviations[1:4]}) == 3


def test_forwards_that_read_the_prefix_are_never_served():
    model, handle, cache, batch = _cached_model()
    plain = _model()
    plain.load_state_dict(model.state_dict())
    expected = plain(**batch, use_cache=False, output_hidden_states=True)
    for kwargs in ({"output_hidden_states": True}, {"output_attentions": True}):
        out = _step(model, batch, **kwargs)
        key = "hidden_states" if "output_hidden_states" in kwargs else "attentions"
        assert all(torch.equal(a, b) for a, b in zip(getattr(out, key), getattr(expected, key) if key ==
                   "hidden_states" else plain(**batch, use_cache=False, output_attentions=True).attentions))
    assert cache.stats()["hits"] == 0 and handle.stats["unservable"] == 2
    model.config.output_hidden_states = True  # the config's default counts too
    out = _step(model, batch)
    assert torch.equal(out.hidden_states[2], expected.hidden_states[2]) and cache.stats()["hits"] == 0
    model.config.output_hidden_states = False
    hook = model.model.layers[0].register_forward_hook(lambda *a: None)  # a reader of h_1
    _step(model, batch)
    assert cache.stats()["hits"] == 0
    hook.remove()
    _step(model, batch)
    assert cache.stats()["hits"] == 1
    with torch.no_grad():  # evaluation: computed, never served
        model(**batch, use_cache=False)
    assert cache.stats()["hits"] == 1


def test_a_forward_that_raised_leaves_no_stale_skip():
    model, handle, cache, batch = _cached_model()
    rotary = model.model.rotary_emb
    inner = rotary.forward

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    rotary.forward = broken  # raises after the embedding served the cached state, before the cut
    with pytest.raises(RuntimeError, match="boom"):
        _step(model, batch)
    rotary.forward = inner
    reference = _model()
    reference.load_state_dict(model.state_dict())
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    kwargs = {"attention_mask": batch["attention_mask"], "labels": batch["labels"], "use_cache": False}
    got = model(inputs_embeds=embeds, **kwargs).loss
    with torch.no_grad():
        want = reference(inputs_embeds=embeds, **kwargs).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_partial_hits_budget_and_in_place_changes():
    model = _model()
    handle = apply(model, 3)
    cache = PrefixCache(max_bytes=12 * 64 * 4 + 1).attach(handle)  # room for one sample of 12 x 64 fp32
    batch = _batch(12)
    _step(model, batch)
    assert cache.stats()["stored"] == 1 and cache.stats()["rejected"] == 1
    _step(model, batch)
    assert cache.stats()["hits"] == 0  # a forward is served only when all its samples are cached
    cache.max_bytes = 1 << 20
    cache.clear()
    _step(model, batch)
    _step(model, batch)
    assert cache.stats()["hits"] == 1
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # frozen weights changed in place
    before = cache.stats()["hits"]
    _step(model, batch)
    assert cache.stats()["hits"] == before and cache.stats()["entries"] == 2
    embeds = model.get_input_embeddings()(batch["input_ids"])
    model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    assert handle.stats["unservable"] == 1
    model.model.layers[0].self_attn.attention_dropout = 0.1  # a non-deterministic prefix is never cached
    cache.attach(handle)  # (determinism is checked again whenever the prefix's train/eval modes change)
    _step(model, batch)
    assert cache.stats()["bypassed"] == 1
    model.model.layers[0].eval()  # in eval mode the dropout is off: cached again
    _step(model, batch)
    assert cache.stats()["bypassed"] == 1 and cache.stats()["stored"] > 0
    handle.remove()
    assert cache.stats()["entries"] == 2 and not model._forward_pre_hooks
    with pytest.raises(RuntimeError, match="removed"):
        cache.attach(handle)


def test_attach_refuses_a_prefix_that_trains():
    model = _model(tie=True)
    handle = apply(model, 3, train_head=True)  # the tied embedding weight requires grad
    with pytest.raises(ValueError, match="require grad"):
        PrefixCache().attach(handle)
    assert handle.boundary_source is None
    handle.remove()
    full = apply(model, fk.plan(fk.discover(model).summary(), "none"))
    with pytest.raises(ValueError, match="nothing is frozen"):
        PrefixCache().attach(full)


def test_disk_cache_evicts_other_weights_and_boundaries(tmp_path):
    model = _model()
    batch = _batch(12)
    handle = apply(model, 3)
    first = PrefixCache(directory=tmp_path).attach(handle)
    _step(model, batch)
    assert first.stats()["entries"] == 2
    handle.remove()
    handle = apply(model, 4)
    second = PrefixCache(directory=tmp_path).attach(handle)  # another boundary: the old entries are stale
    assert second.stats()["entries"] == 0 and second.stats()["bytes"] == 0 and second.stats()["evicted"] == 1
    assert len(list(tmp_path.iterdir())) == 1
    _step(model, batch)
    reopened = PrefixCache(directory=tmp_path).attach(handle)  # same weights and boundary: kept
    assert reopened.stats()["entries"] == 2 and reopened.stats()["bytes"] == second.stats()["bytes"]
    _step(model, batch)
    assert reopened.stats()["hits"] == 1


def test_the_cache_follows_a_moved_boundary():
    from freezekern.cut import move_boundary

    model, handle, cache, batch = _cached_model(k=2)
    moved = move_boundary(handle, 4)
    assert moved.boundary_source is cache and cache.stats()["entries"] == 0
    _step(model, batch)
    _step(model, batch)
    assert cache.stats()["hits"] == 1 and moved.stats["served"] == 1
