"""freezekern.cut.fused_loss on Hugging Face models: the same loss and gradients as the model's own loss path.

Every family the fused loss knows (``adapters.HEADS``) is compared with its
own forward: loss and every trainable parameter's gradient to 1e-5 relative
in fp32, flash-attention's rule against an fp32 model in bf16 and under
autocast; with the cut, gradient checkpointing, PEFT, tied heads frozen or
trained, the Trainer with gradient accumulation and DDP on two processes.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import freezekern
from freezekern import discover, tiny_model
from freezekern.cut import apply, trainable_parameters
from freezekern.cut.fused_loss import active_fused_loss, fused_loss
from freezekern.model import parts as adapters
from freezekern.ops import tolerance

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

L = 4
V = 257


def _model(kind="llama", tie=True, seed=0, dtype=torch.float32, **config):
    model = tiny_model(kind, num_layers=L, hidden=64, vocab=V, tie=tie, seed=seed, dtype=dtype)
    for key, value in config.items():
        setattr(model.config, key, value)
    model.train()
    return model


def _batch(seed=0, batch=3, seq=11):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, ignored in the loss
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, 5] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _rel_err(a, b):
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / max(scale, 1e-30)


def _assert_same(fused_out, fused_grads, ref_out, ref_grads, rel=1e-5):
    """Loss and each gradient within ``rel`` of the reference's largest entry.

    A gradient that is zero in exact arithmetic (OPT's key bias: softmax
    ignores a constant shift) is rounding noise in both paths; it is held to
    1e-6 of the model's largest gradient entry instead.
    """
    assert fused_out.logits is None
    assert _rel_err(fused_out.loss.detach(), ref_out.loss.detach()) <= rel, (fused_out.loss, ref_out.loss)
    assert fused_grads.keys() == ref_grads.keys()
    assert fused_grads, "no parameter got a gradient"
    floor = 1e-6 * max(g.abs().max().item() for g in ref_grads.values())
    for name, g in fused_grads.items():
        err = (g - ref_grads[name]).abs().max().item()
        assert err <= max(rel * ref_grads[name].abs().max().item(), floor), f"{name}: error {err:.3g}"


# ---------------------------------------------------------------- every family


FAMILY_CONFIG = {  # settings that exercise a family's head: a strong soft-cap, a non-trivial logit scale
    "gemma2": {"final_logit_softcapping": 2.0, "sliding_window": 6},  # tiny_model leaves the window unset
    "gemma3_text": {"final_logit_softcapping": 3.0, "sliding_window": 6},
    "granite": {"logits_scaling": 4.0},
}


@pytest.mark.parametrize("family", sorted(adapters.HEADS))
def test_every_family_matches_its_own_loss(family):
    model = _model(family, tie=family not in ("opt",), **FAMILY_CONFIG.get(family, {}))
    if family == "cohere":
        model.logit_scale = 0.3
    reference = copy.deepcopy(model)
    batch = _batch()
    ref_out, ref_grads = _loss_and_grads(reference, batch)
    handle = fused_loss(model)
    parts = handle.parts
    if family in FAMILY_CONFIG or family == "cohere":
        assert (parts.logit_softcap or parts.logit_scale) not in (None, 1.0)
    out, grads = _loss_and_grads(model, batch)
    _assert_same(out, grads, ref_out, ref_grads)
    assert handle.stats == {"fused": 1, "plain": 0}
    with torch.no_grad():  # without labels: the original forward, logits and all
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(plain.logits, expected.logits, rtol=0, atol=0)
    handle.remove()
    assert "forward" not in model.__dict__ and not active_fused_loss(model)
    assert model(**batch).logits is not None


@pytest.mark.parametrize("impl", ["torch", "native"])
def test_head_bias_and_backends(impl):
    """An LM head with a bias (the op's bias path), on a named backend."""
    from freezekern.ops import native

    if impl == "native" and not native.has_op("linear_cross_entropy", "cpu"):
        pytest.skip(native.unavailable_reason("cpu", "linear_cross_entropy"))
    model = _model(tie=False)
    old = model.lm_head
    model.lm_head = torch.nn.Linear(64, V, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(old.weight)
        model.lm_head.bias.normal_(0, 0.5)
    reference = copy.deepcopy(model)
    batch = _batch(seed=1)
    ref = _loss_and_grads(reference, batch)
    fused_loss(model, impl=impl)
    _assert_same(*_loss_and_grads(model, batch), *ref)


def test_loss_kwargs_pass_through_like_hf():
    """num_items_in_batch (the Trainer's), shift_labels and ignore_index, as ForCausalLMLoss reads them."""
    model = _model()
    reference = copy.deepcopy(model)
    fused_loss(model)
    batch = _batch(seed=2)
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:].clone()
    shifted[0, ::2] = 7
    own_ignore = shifted.masked_fill(shifted == -100, 7)
    for kwargs in ({"num_items_in_batch": torch.tensor(23)}, {"num_items_in_batch": 9},
                   {"shift_labels": shifted}, {"shift_labels": own_ignore, "ignore_index": 7}):
        _assert_same(*_loss_and_grads(model, batch, **kwargs), *_loss_and_grads(reference, batch, **kwargs))


# ---------------------------------------------------------------- with the cut


@pytest.mark.parametrize("setup", ["plain", "gc_reentrant", "gc_nonreentrant"])
@pytest.mark.parametrize("train_head", [False, True], ids=["head_frozen", "head_trained"])
def test_cut_tied_head_and_checkpointing(setup, train_head):
    model = _model(tie=True)
    if setup != "plain":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": setup == "gc_reentrant"})
    reference = copy.deepcopy(model)
    apply(reference, 2, train_head=train_head)
    handle = apply(model, 2, train_head=train_head, fused_loss=True)
    assert handle.fused_loss is not None and active_fused_loss(model)
    batch = _batch(seed=3)
    out, grads = _loss_and_grads(model, batch)
    _assert_same(out, grads, *_loss_and_grads(reference, batch))
    weight = discover(model).head_weight
    assert (weight.grad is not None) == train_head
    assert handle.stats["cuts"] == 1
    handle.remove()
    assert not active_fused_loss(model) and model(**batch).logits is not None


def test_frozen_head_is_never_differentiated(monkeypatch):
    """The op receives the frozen head as a weight that needs no gradient (no dW: see test_linear_cross_entropy)."""
    import importlib

    module = importlib.import_module("freezekern.cut.fused_loss")  # the package attribute is the function

    seen = []
    real = module.linear_cross_entropy

    def spy(h, weight, target, **kwargs):
        seen.append((h.requires_grad, weight.requires_grad))
        return real(h, weight, target, **kwargs)

    monkeypatch.setattr(module, "linear_cross_entropy", spy)
    model = _model(tie=True)
    apply(model, 2, fused_loss=True)  # tied head: frozen by default
    _loss_and_grads(model, _batch())
    assert seen == [(True, False)]
    assert discover(model).head_weight.grad is None


def test_peft_lora_above_the_boundary():
    peft = pytest.importorskip("peft")
    from freezekern.integrations.peft import lora_config_for_plan
    from freezekern.policy.rules import plan as make_plan

    base = _model(tie=True)
    plan = make_plan(discover(base).summary(), "fixed", boundary=2)
    config = lora_config_for_plan(plan, model=base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                  lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    for p in model.parameters():  # LoRA starts as the identity; make its B non-zero
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    reference = copy.deepcopy(model)
    apply(reference, plan)
    handle = apply(model, plan, fused_loss=True)
    assert handle.fused_loss.causal_lm is model.get_base_model()
    batch = _batch(seed=4)
    out, grads = _loss_and_grads(model, batch)
    assert any("lora_" in n for n in grads)
    _assert_same(out, grads, *_loss_and_grads(reference, batch))


def test_peft_adapter_on_the_head_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model(tie=False), peft.LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        fused_loss(model)


def test_move_boundary_keeps_the_fused_loss():
    from freezekern.cut import move_boundary

    model = _model()
    handle = apply(model, 1, fused_loss=True)
    moved = move_boundary(handle, 3)
    assert moved.fused_loss is not None and active_fused_loss(model)
    out = model(**_batch())
    assert out.logits is None and torch.isfinite(out.loss)
    moved.remove()
    assert not active_fused_loss(model)


def test_move_boundary_carries_the_fused_loss_over_and_never_reinstalls_it():
    from freezekern.cut import move_boundary

    model = _model()
    handle = apply(model, 1, fused_loss=True)
    fused = handle.fused_loss
    moved = move_boundary(handle, 2)
    assert moved.fused_loss is fused and fused.active  # the same installation, not removed and re-made
    fused.remove()
    again = move_boundary(moved, 3)
    assert again.fused_loss is None and not active_fused_loss(model)  # the user's removal stands
    again.remove()


def test_a_full_finetuning_plan_keeps_the_fused_loss():
    from freezekern.policy.rules import plan as make_plan

    model = _model()
    handle = apply(model, make_plan(discover(model).summary(), "none"), fused_loss=True)
    assert not handle.cut and handle.fused_loss is not None and active_fused_loss(model)
    assert all(p.requires_grad for p in model.parameters())
    out = model(**_batch())
    assert out.logits is None and torch.isfinite(out.loss)
    handle.remove()
    assert not active_fused_loss(model) and model(**_batch()).logits is not None


def test_callback_installs_the_fused_loss_before_the_trainer_wraps_the_forward(tmp_path):
    from transformers import Trainer, TrainingArguments

    from freezekern.integrations import FreezeKernCallback

    model = _model()
    data = [{"input_ids": b["input_ids"][0], "labels": b["labels"][0]} for b in (_batch(seed=s) for s in range(4))]
    callback = FreezeKernCallback(fused_loss=True, calibration_batches=1)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, bf16=True,
                             use_cpu=True, report_to=[], save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()  # bf16 autocast replaces model.forward at prepare: installing the fused loss then would fail
    assert callback.fused_loss_handle is not None and callback.fused_loss_handle.stats["fused"] >= 2
    assert callback.state()["args"]["fused_loss"] is True  # a resumed callback keeps it
    assert callback.handle.fused_loss is None  # owned by the callback, untouched by boundary moves


def test_evaluation_mode_returns_the_logits_and_the_models_own_loss():
    model = _model()
    reference = copy.deepcopy(model).eval()
    batch = _batch(seed=8)
    with fused_loss(model) as handle:
        model.eval()
        with torch.no_grad():
            out, expected = model(**batch), reference(**batch)
        assert handle.stats == {"fused": 0, "plain": 1}
        torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
        assert out.loss.item() == expected.loss.item()
        model.train()
        assert model(**batch).logits is None and handle.stats["fused"] == 1


def test_trainer_evaluate_with_compute_metrics_gets_logits(tmp_path):
    from transformers import Trainer, TrainingArguments

    from freezekern.integrations import FreezeKernCallback

    def accuracy(prediction):
        logits, labels = prediction.predictions, prediction.label_ids
        assert logits is not None and logits.shape[-1] == V
        counted = labels[:, 1:] != -100
        return {"accuracy": float((logits[:, :-1].argmax(-1) == labels[:, 1:])[counted].mean())}

    data = [{"input_ids": b["input_ids"][0], "labels": b["labels"][0]} for b in (_batch(seed=s) for s in range(4))]
    metrics = []
    for fused in (True, False):
        args = TrainingArguments(output_dir=str(tmp_path / str(fused)), max_steps=2, per_device_train_batch_size=2,
                                 per_device_eval_batch_size=2, use_cpu=True, report_to=[], save_strategy="no")
        callback = FreezeKernCallback(plan=freezekern.plan(discover(_model()).summary(), "fixed", boundary=2),
                                      fused_loss=fused)
        trainer = Trainer(model=_model(), args=args, train_dataset=data, eval_dataset=data, callbacks=[callback],
                          compute_metrics=accuracy)
        trainer.train()
        metrics.append(trainer.evaluate())
        assert not fused or callback.fused_loss_handle.stats["fused"] == 2
    assert metrics[0]["eval_accuracy"] == metrics[1]["eval_accuracy"]  # a number, the same as without fused_loss
    assert metrics[0]["eval_loss"] == pytest.approx(metrics[1]["eval_loss"], rel=1e-5)

# ---------------------------------------------------------------- dtypes


def _fp32_copy(model):
    ref = copy.deepcopy(model).float()
    return ref


def _assert_flash_rule(low, ref_low, truth, what):
    tolerance.assert_within_rule(low, ref_low, truth, floor=0.0, what=what)


def _check_low_precision(model, reference, truth, batch, ctx):
    fused_loss(model)
    with ctx():
        out, grads = _loss_and_grads(model, batch)
        ref_out, ref_grads = _loss_and_grads(reference, batch)
    truth_out, truth_grads = _loss_and_grads(truth, batch)
    assert out.logits is None and out.loss.dtype == torch.float32
    _assert_flash_rule(out.loss, ref_out.loss, truth_out.loss, "loss")
    for name, g in grads.items():
        assert g.dtype == ref_grads[name].dtype
        _assert_flash_rule(g, ref_grads[name], truth_grads[name], name)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bf16_model(family):
    model = _model(family, dtype=torch.bfloat16, **FAMILY_CONFIG.get(family, {}))
    _check_low_precision(model, copy.deepcopy(model), _fp32_copy(model), _batch(seed=5),
                         ctx=torch.enable_grad)


def test_autocast_bf16():
    """An fp32 model under autocast (the Trainer's bf16=True on CPU): the head's operands take bf16, as nn.Linear."""
    model = _model()
    truth = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    _check_low_precision(model, reference, truth, _batch(seed=6),
                         ctx=lambda: torch.autocast("cpu", dtype=torch.bfloat16))


# ---------------------------------------------------------------- refusals and the rest of the API


def test_refusals_name_the_problem():
    model = _model()
    with pytest.raises(ValueError, match="before wrapping"):
        fused_loss(torch.nn.DataParallel(model))
    handle = fused_loss(model)
    with pytest.raises(RuntimeError, match="already applied"):
        fused_loss(model)
    batch = _batch()
    with pytest.raises(ValueError, match="logits_to_keep=0"):
        model(**batch, logits_to_keep=1)
    with pytest.raises(ValueError, match="return_dict=True"):
        model(**batch, return_dict=False)
    model.loss_function = lambda *a, **k: torch.zeros(())
    with pytest.raises(ValueError, match="not Hugging Face's ForCausalLMLoss"):
        model(**batch)
    del model._loss_function
    handle.remove()
    with pytest.raises(RuntimeError, match="already removed"):
        handle.remove()
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_loss(model, impl="fast")

    other = _model()
    parts = discover(other)
    parts.model_type = "mystery"
    with pytest.raises(ValueError, match="does not know how .* builds its logits"):
        fused_loss(other, parts=parts)
    wrapped = _model()
    wrapped.forward = wrapped.forward
    with pytest.raises(RuntimeError, match="already replaced on this instance"):
        fused_loss(wrapped)
    h = fused_loss(other)
    ours = other.__dict__["forward"]
    other.forward = lambda *a, **k: None
    with pytest.raises(RuntimeError, match="cannot restore"):
        h.remove()
    other.forward = ours
    h.remove()
    assert "forward" not in other.__dict__


def test_head_settings_changed_after_apply_are_refused():
    """HF reads the soft-cap from the config at every forward; a change after fused_loss() must not go unseen."""
    model = _model("gemma2", **FAMILY_CONFIG["gemma2"])
    fused_loss(model)
    model.config.final_logit_softcapping = 5.0
    with pytest.raises(RuntimeError, match="changed"):
        model(**_batch())
    llama = _model()
    llama.config.final_logit_softcapping = 3.0  # llama's forward ignores it, so must the fused loss
    reference = copy.deepcopy(llama)
    batch = _batch()
    ref = _loss_and_grads(reference, batch)
    fused_loss(llama)
    _assert_same(*_loss_and_grads(llama, batch), *ref)


def test_unsupported_class_is_refused():
    from transformers import LlamaForCausalLM

    class MyLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):  # builds its logits its own way
            return super().forward(*args, **kwargs)

    model = MyLlama(_model().config)
    with pytest.raises(ValueError, match="reproduces LlamaForCausalLM's forward"):
        fused_loss(model)


def test_generate_is_unchanged():
    model = _model().eval()
    ids = torch.randint(3, V, (1, 5), generator=torch.Generator().manual_seed(7))
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    with fused_loss(model) as handle:
        got = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert handle.stats["fused"] == 0 and handle.stats["plain"] > 0
    assert torch.equal(got, expected)


def test_public_api():
    assert freezekern.cut.fused_loss is fused_loss
    assert freezekern.FusedLossHandle.__name__ == "FusedLossHandle"


# ---------------------------------------------------------------- Trainer with gradient accumulation


class _Rows(torch.utils.data.Dataset):
    """Rows with different numbers of counted labels, so num_items_in_batch is not a mean of means."""

    def __init__(self, n=12, seq=14, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, V, (n, seq), generator=gen)
        self.keep = [4 + (i * 5) % (seq - 4) for i in range(n)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        labels = ids.clone()
        labels[self.keep[i]:] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _train(model, tmp_path, callbacks=(), steps=3):
    from transformers import Trainer, TrainingArguments, default_data_collator

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(), data_collator=default_data_collator,
                      callbacks=list(callbacks))
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_weights(a, b, before):
    changed = 0
    for name, w in a.items():
        torch.testing.assert_close(w, b[name], rtol=1e-5, atol=1e-7, msg=name)
        changed += int(not torch.equal(w, before[name]))
    assert changed > 0


def test_trainer_gradient_accumulation_full_fine_tuning(tmp_path):
    """Same weights with and without the fused loss, no cut: num_items_in_batch divides as in HF."""
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = copy.deepcopy(model)
    plain = _train(reference, tmp_path / "plain")
    fused_loss(model)
    _assert_same_weights(_train(model, tmp_path / "fused"), plain, before)


def test_trainer_callback_with_cut(tmp_path):
    from freezekern.integrations import FreezeKernCallback
    from freezekern.policy.rules import plan as make_plan

    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = make_plan(discover(model).summary(), "fixed", boundary=2)
    reference = copy.deepcopy(model)
    plain = _train(reference, tmp_path / "plain", [FreezeKernCallback(plan=plan)])
    callback = FreezeKernCallback(plan=plan, fused_loss=True)
    fused = _train(model, tmp_path / "fused", [callback])
    assert callback.fused_loss_handle is not None and callback.fused_loss_handle.stats["fused"] == 6
    _assert_same_weights(fused, plain, before)


# ---------------------------------------------------------------- DDP, two CPU processes


def _ddp_worker(rank, world, init_file):
    from torch.nn.parallel import DistributedDataParallel

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for cut, checkpointing in ((2, False), (2, True), (None, False)):
            model = _model()
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            reference = copy.deepcopy(model)
            if cut is None:
                handle = fused_loss(model)
            else:
                handle = apply(model, cut, fused_loss=True)
                apply(reference, cut)
            ddp = DistributedDataParallel(model)
            ddp(**_batch(seed=10 + rank), use_cache=False).loss.backward()
            reference.zero_grad(set_to_none=True)
            for r in range(world):  # what DDP averages to: the mean of both ranks' gradients
                (reference(**_batch(seed=10 + r), use_cache=False).loss / world).backward()
            expected = dict(reference.named_parameters())
            for name, p in model.named_parameters():
                if p.requires_grad:
                    torch.testing.assert_close(p.grad, expected[name].grad, rtol=1e-5, atol=1e-7, msg=name)
                else:
                    assert p.grad is None
            assert len(trainable_parameters(model)) > 0
            handle.remove()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_ranks(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


# ---------------------------------------------------------------- finetune and the command line


def test_finetune_with_fused_loss_in_both_runs(tmp_path):
    from freezekern.policy.rules import plan as make_plan
    from freezekern.trials.finetune import finetune

    batches = [_batch(seed=s) for s in range(3)]
    reports = {}
    for fused in (False, True):
        model = _model()
        plan = make_plan(discover(model).summary(), "fixed", boundary=2)
        reports[fused] = finetune(model, None, batches, batches[:1], plan, steps=3, lr=3e-3, progress=False,
                                  compare="full", fused_loss=fused)
    report = reports[True]
    assert report["setup"]["fused_loss"] is True
    for run in ("freezekern", "full"):
        assert report[run]["eval_loss_after"] < report[run]["eval_loss_before"]
        assert report[run]["eval_loss_after"] == pytest.approx(reports[False][run]["eval_loss_after"], rel=1e-5)
    assert not active_fused_loss(model) and model(**_batch()).logits is not None


def test_cli_finetune_passes_fused_loss(monkeypatch):
    import freezekern.cli.commands as commands
    import freezekern.trials.finetune
    from freezekern import cli

    class Stop(Exception):
        pass

    seen = {}

    def fake_finetune(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    assert cli.build_parser().parse_args(["finetune", "--fused-loss"]).fused_loss is True
    assert cli.build_parser().parse_args(["finetune"]).fused_loss is False
    monkeypatch.setattr(freezekern.trials.finetune, "finetune", fake_finetune)
    monkeypatch.setattr(commands, "_load", lambda args: (_model(), _CharTokenizer()))
    with pytest.raises(Stop):
        cli.main(["-v", "finetune", "--fused-loss", "--steps", "1", "--tokens", "64", "--seq-len", "16",
                  "--eval-tokens", "32", "--data", str(_corpus(monkeypatch))])
    assert seen["fused_loss"] is True


def _corpus(monkeypatch):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "corpus.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(60)))
    return path


class _CharTokenizer:
    """Enough of a tokenizer for make_batches: characters to ids below the tiny vocabulary."""

    eos_token_id = 2
    bos_token_id = 1
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False, **kwargs):
        return {"input_ids": [3 + ord(c) % (V - 3) for c in text]}

    def encode(self, text, add_special_tokens=False, **kwargs):
        return self(text)["input_ids"]


def test_apply_with_a_refused_fused_loss_leaves_nothing_behind():
    from freezekern.cut import active_handle

    model = _model()
    model.loss_function = lambda *a, **k: torch.zeros(())
    with pytest.raises(ValueError, match="not Hugging Face's ForCausalLMLoss"):
        apply(model, 2, fused_loss=True)
    assert active_handle(model) is None and not active_fused_loss(model)
    assert all(p.requires_grad for p in model.parameters())
