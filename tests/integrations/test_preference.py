"""Preference trainers (TRL DPO and KTO) with the cut, and the frozen prefix shared with the reference model."""

import copy

import pytest
import torch

import freezekern as fk
from freezekern.cut import active_handle, apply
from freezekern.cut.shared_prefix import SharedPrefix

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]
trl = pytest.importorskip("trl")

L = 6
K = 3



@pytest.fixture(scope="module")
def tokenizer(char_tokenizer):
    return char_tokenizer()


def _model(tokenizer, seed=0):
    return fk.tiny_model("llama", num_layers=L, hidden=32, vocab=len(tokenizer), tie=True, seed=seed)


def _plan(model):
    return fk.plan(fk.discover(model).summary(), "fixed", boundary=K)


def _pairs():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"q{i}:" for i in range(8)], "chosen": [f" yes {i}" for i in range(8)],
                              "rejected": [f" no {i}!" for i in range(8)]})


def _unpaired():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"q{i}:" for i in range(8)], "completion": [f" a {i}" for i in range(8)],
                              "label": [i % 2 == 0 for i in range(8)]})


def _watch_backward(model):
    """0-based indices of the policy's blocks whose backward ran."""
    reached = set()
    for i, block in enumerate(fk.discover(model).blocks):
        block.register_full_backward_pre_hook(lambda module, grad, i=i: reached.add(i))
    return reached


def _train(kind, tokenizer, tmp_path, *, reference, share=False, steps=3):
    """Train a tiny policy with TRL's DPO or KTO trainer and FreezeKernCallback; ``reference``: "copy" or "peft"."""
    from freezekern.integrations import FreezeKernCallback
    from freezekern.integrations.preference import SharedPrefixCallback

    model = _model(tokenizer)
    plan = _plan(model)
    ref = copy.deepcopy(model) if reference == "copy" else None
    extra = {}
    if reference == "peft":
        extra["peft_config"] = plan.to_peft_config(model=model, r=4, target_modules=["q_proj", "v_proj"])
    shared = SharedPrefixCallback(reference_model=ref)
    callbacks = [FreezeKernCallback(plan=plan)] + ([shared] if share else [])
    common = dict(output_dir=str(tmp_path / f"{kind}-{reference}-{share}"), max_steps=steps, learning_rate=1e-2,
                  use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                  max_length=32)
    if kind == "dpo":
        args, trainer_cls, data = trl.DPOConfig(per_device_train_batch_size=2, **common), trl.DPOTrainer, _pairs()
    else:
        args, trainer_cls, data = trl.KTOConfig(per_device_train_batch_size=4, **common), trl.KTOTrainer, _unpaired()
    trainer = trainer_cls(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer,
                          callbacks=callbacks, **extra)
    reached = _watch_backward(trainer.model)
    ref_before = {n: p.detach().clone() for n, p in ref.named_parameters()} if ref is not None else None
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return trainer, shared, reached, before, ref, ref_before


@pytest.mark.parametrize("kind", ["dpo", "kto"])
@pytest.mark.parametrize("reference", ["copy", "peft"])
def test_the_cut_holds_for_the_policy(tokenizer, tmp_path, kind, reference):
    trainer, _, reached, before, ref, ref_before = _train(kind, tokenizer, tmp_path, reference=reference)
    assert reached == set(range(K, L))  # backward hooks fire only above the boundary
    handle = active_handle(trainer.model)
    assert handle is not None and handle.boundary == K and handle.stats["cuts"] > 0
    after = dict(trainer.model.named_parameters())
    changed = {n for n, t in before.items() if not torch.equal(t, after[n])}
    assert changed and all(any(f"layers.{i}." in n for i in range(K, L)) or "norm" in n for n in changed)
    if reference == "peft":
        assert all("lora_" in n for n in changed)
    if ref is not None:  # the separate reference is never trained
        assert all(torch.equal(t, dict(ref.named_parameters())[n]) for n, t in ref_before.items())


@pytest.mark.parametrize("kind", ["dpo", "kto"])
@pytest.mark.parametrize("reference", ["copy", "peft"])
def test_shared_prefix_is_exact_and_serves_every_reference_forward(tokenizer, tmp_path, kind, reference):
    shared_run, callback, _, _, _, _ = _train(kind, tokenizer, tmp_path, reference=reference, share=True)
    plain_run, _, _, _, _, _ = _train(kind, tokenizer, tmp_path, reference=reference, share=False)
    forwards_per_step = 2 if kind == "kto" else 1  # KTO: the completion batch and the KL batch
    assert callback.stats["served"] == 3 * forwards_per_step and callback.stats["computed"] == 3 * forwards_per_step
    metrics = [k for k in plain_run.state.log_history[0] if k.startswith(("logps/", "rewards/")) or k == "loss"]
    assert metrics
    for ours, theirs in zip(shared_run.state.log_history, plain_run.state.log_history):
        assert {k: ours.get(k) for k in metrics} == {k: theirs.get(k) for k in metrics}
    for (name, a), (_, b) in zip(shared_run.model.named_parameters(), plain_run.model.named_parameters()):
        assert torch.equal(a, b), name
    assert callback.shared is not None and not callback.shared.active  # detached at the end of training
    if reference == "copy":
        assert active_handle(callback.reference_model) is None  # the handle it applied is gone


# -- SharedPrefix directly ----------------------------------------------------------------------

def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (4, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _policy_and_reference(tokenizer):
    policy = _model(tokenizer)
    policy.train()
    reference = copy.deepcopy(policy).eval()
    return policy, apply(policy, K), reference


def test_policy_and_reference_log_probs_equal_without_sharing(tokenizer):
    policy, handle, reference = _policy_and_reference(tokenizer)
    expected_policy = policy(**_batch(), use_cache=False)
    expected_policy.loss.backward()
    expected_grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    with torch.no_grad():
        expected_ref = reference(**_batch(), use_cache=False).logits
    shared = SharedPrefix(handle, reference=reference)
    for step in range(2):  # a second batch replaces nothing the first needs
        out = policy(**_batch(step), use_cache=False)
        with torch.no_grad():
            ref_logits = reference(**_batch(step), use_cache=False).logits
        if step == 0:
            assert torch.equal(out.logits, expected_policy.logits) and torch.equal(ref_logits, expected_ref)
            out.loss.backward()
            for name, p in policy.named_parameters():
                assert (p.grad is None) == (name not in expected_grads), name
                if p.grad is not None:
                    assert torch.equal(p.grad, expected_grads[name]), name
    assert shared.stats == {"computed": 2, "served": 2, "not_shareable": 0}
    with torch.no_grad():  # a state feeds one other forward only: the same batch again is computed again
        reference(**_batch(1), use_cache=False)
    assert shared.stats == {"computed": 3, "served": 2, "not_shareable": 0}
    owned = active_handle(reference)
    shared.detach()
    assert owned is not None and not owned.active and active_handle(reference) is None
    assert handle.boundary_source is None


def test_the_same_model_serves_itself_with_adapters_disabled(tokenizer):
    peft = pytest.importorskip("peft")
    model = _model(tokenizer)
    plan = _plan(model)
    model = peft.get_peft_model(model, plan.to_peft_config(model=model, r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # trained adapters: the reference (adapters off) differs above the boundary
            torch.nn.init.normal_(p, std=0.5)
    handle = apply(model, plan)
    with torch.no_grad(), model.disable_adapter():
        expected_ref = model(**_batch(), use_cache=False).logits
    expected_policy = model(**_batch(), use_cache=False).logits
    shared = SharedPrefix(handle)
    policy_logits = model(**_batch(), use_cache=False).logits
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(**_batch(), use_cache=False).logits
    assert torch.equal(policy_logits, expected_policy) and torch.equal(ref_logits, expected_ref)
    assert not torch.equal(ref_logits, policy_logits)
    assert shared.stats["served"] == 1
    shared.detach()


def test_refused_when_the_prefixes_differ(tokenizer):
    policy, handle, reference = _policy_and_reference(tokenizer)
    with torch.no_grad():
        reference.model.layers[1].mlp.up_proj.weight.add_(1e-3)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight differs"):
        SharedPrefix(handle, reference=reference)
    assert active_handle(reference) is None and handle.boundary_source is None  # nothing left behind
    with pytest.raises(ValueError, match="blocks"):
        SharedPrefix(handle, reference=fk.tiny_model("llama", num_layers=4, hidden=32, vocab=len(tokenizer)))
    handle.remove()
    other_handle = apply(copy.deepcopy(policy), K + 1)
    with pytest.raises(ValueError, match="apply the same boundary"):
        SharedPrefix(apply(policy, K), reference=other_handle)
    with pytest.raises(ValueError, match="no frozen prefix to share"):
        SharedPrefix(apply(fk.tiny_model("llama", num_layers=L, hidden=32, vocab=len(tokenizer)), 0))


def test_refused_with_adapters_in_the_prefix(tokenizer):
    peft = pytest.importorskip("peft")
    model = _model(tokenizer)
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")  # adapters everywhere
    model = peft.get_peft_model(model, config)
    handle = apply(model, K, frozen_adapters="freeze")
    with pytest.raises(ValueError, match="prefix holds PEFT adapters"):
        SharedPrefix(handle)


def test_changed_reference_weights_switch_sharing_off_and_dropout_is_never_shared(tokenizer):
    policy, handle, reference = _policy_and_reference(tokenizer)
    twin = copy.deepcopy(reference)
    shared = SharedPrefix(handle, reference=reference)
    policy(**_batch(), use_cache=False)
    with torch.no_grad():
        for model in (reference, twin):
            model.model.embed_tokens.weight.mul_(2.0)  # an in-place change after attaching
        ref_logits = reference(**_batch(), use_cache=False).logits
        assert torch.equal(ref_logits, twin(**_batch(), use_cache=False).logits)
    assert shared.stats["served"] == 0 and not shared.active
    shared.detach()

    policy, handle, reference = _policy_and_reference(tokenizer)
    policy.model.layers[0].self_attn.attention_dropout = 0.5  # a prefix that is not deterministic in training
    shared = SharedPrefix(handle, reference=reference)
    policy(**_batch(), use_cache=False)
    with torch.no_grad():
        reference(**_batch(), use_cache=False)
    assert shared.stats["served"] == 0 and shared.stats["not_shareable"] >= 1
    shared.detach()


def test_a_moved_boundary_stops_sharing(tokenizer):
    from freezekern.cut import move_boundary

    policy, handle, reference = _policy_and_reference(tokenizer)
    shared = SharedPrefix(handle, reference=reference)
    moved = move_boundary(handle, K + 1)
    assert not shared.active and moved.boundary_source is None and active_handle(reference) is None
    with torch.no_grad():
        expected = copy.deepcopy(reference)(**_batch(), use_cache=False).logits
        assert torch.equal(reference(**_batch(), use_cache=False).logits, expected)


def test_shared_prefix_callback_needs_a_plan(tokenizer, tmp_path):
    from freezekern.integrations.preference import SharedPrefixCallback

    callback = SharedPrefixCallback()
    with pytest.raises(RuntimeError, match="FreezeKernCallback"):
        callback.on_step_begin(None, None, None, model=_model(tokenizer))
