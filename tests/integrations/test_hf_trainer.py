"""Hugging Face Trainer callback, PEFT helpers, and the progressive boundary move."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from freezekern import discover, tiny_model
from freezekern.cut import trainable_parameters
from freezekern.policy.rules import plan as make_plan

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

L = 6


def _model(seed=0):
    return tiny_model("llama", num_layers=L, hidden=64, vocab=257, tie=True, seed=seed)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=16, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 257, (n, seq), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _trainer(model, out_dir, callback, max_steps=3, **extra):
    from transformers import Trainer, TrainingArguments, default_data_collator

    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-3,
        use_cpu=True, report_to=[], save_strategy="steps", save_steps=2, logging_steps=1, disable_tqdm=True,
        seed=0, dataloader_num_workers=0, **extra,
    )
    callbacks = callback if isinstance(callback, list) else [callback]
    return Trainer(model=model, args=args, train_dataset=_Rows(), data_collator=default_data_collator,
                   callbacks=callbacks)


def _log_recorder():
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        logs: list = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    return Recorder()


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_callback_analyses_applies_saves_and_resumes(tmp_path):
    from freezekern.integrations import FreezeKernCallback
    from freezekern.integrations.hf_trainer import PLAN_FILE, TRACE_FILE

    model = _model()
    before = _snapshot(model)
    callback = FreezeKernCallback(calibration_batches=2, moving=False)  # freeze although the run is short
    recorder = _log_recorder()
    trainer = _trainer(model, tmp_path, [callback, recorder])
    trainer.train()
    assert callback.analysed and callback.trace is not None
    k = callback.handle.boundary
    assert 2 <= k <= L - 1
    after = _snapshot(model)
    frozen = [n for n in before if n.startswith("model.embed_tokens") or any(
        n.startswith(f"model.layers.{i}.") for i in range(k))]
    trained = [n for n in before if any(n.startswith(f"model.layers.{i}.") for i in range(k, L))]
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in trained)
    assert recorder.logs and all(entry.get("freezekern_boundary") == k for entry in recorder.logs)

    checkpoint = tmp_path / "checkpoint-2"
    saved = json.loads((checkpoint / PLAN_FILE).read_text())
    assert saved["boundary"] == k and (checkpoint / TRACE_FILE).is_file()
    assert (tmp_path / PLAN_FILE).is_file()

    # Resume in a fresh process-like setting: new model object, new callback that would analyse again.
    for folder in tmp_path.glob("checkpoint-*"):
        if folder.name != "checkpoint-2":
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()
    resumed = FreezeKernCallback(calibration_batches=2, policy="reduction")
    trainer2 = _trainer(_model(), tmp_path, resumed, max_steps=4)
    trainer2.train(resume_from_checkpoint=True)
    assert not resumed.analysed
    assert resumed.restored_from == "trainer_state.json"
    assert resumed.handle.boundary == k


def test_callback_with_plan_applies_before_optimizer(tmp_path):
    from freezekern.integrations import FreezeKernCallback

    model = _model()
    plan = make_plan(discover(model).summary(), "fixed", boundary=4)
    callback = FreezeKernCallback(plan=plan)
    trainer = _trainer(model, tmp_path, callback, max_steps=2, activation_checkpointing=True,
                       activation_checkpointing_kwargs={"use_reentrant": True})
    assert callback.handle is not None and callback.handle.boundary == 4  # applied at init
    before = _snapshot(model)
    trainer.train()
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in trainable_parameters(model)}
    after = _snapshot(model)
    assert torch.equal(before["model.layers.3.mlp.up_proj.weight"], after["model.layers.3.mlp.up_proj.weight"])
    assert not torch.equal(before["model.layers.4.mlp.up_proj.weight"], after["model.layers.4.mlp.up_proj.weight"])
    assert callback.handle.stats["leaf_cuts"] > 0  # reentrant checkpointing got its grad-requiring leaf


def test_callback_reselect_moves_deeper_in_trainer(tmp_path):
    from freezekern.integrations import FreezeKernCallback

    model = _model()
    plan = make_plan(discover(model).summary(), "fixed", boundary=1)
    callback = FreezeKernCallback(plan=plan, reselect_every=1)
    trainer = _trainer(model, tmp_path, callback, max_steps=3)
    trainer.train()
    assert callback.moves and callback.moves[0][1] == 1
    k = callback.handle.boundary
    assert k >= 2 and all(new > old for _, old, new in callback.moves)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    trainable = {id(p) for p in trainable_parameters(model)}
    assert all(id(p) in trainable for p in inner.state)  # newly frozen parameters lost their Adam state
    assert json.loads((tmp_path / "checkpoint-2" / "freezekern_plan.json").read_text())["boundary"] >= 2


def test_reselect_step_after_move_is_exact(tmp_path):
    """Drive the callback by hand: after it moves the boundary, the next gradients match a plain backward."""
    from freezekern.integrations import FreezeKernCallback

    model = _model()
    model.train()
    reference = copy.deepcopy(model)
    plan = make_plan(discover(model).summary(), "fixed", boundary=1)
    callback = FreezeKernCallback(plan=plan, reselect_every=2)
    args = SimpleNamespace(output_dir=str(tmp_path), ddp_find_unused_parameters=None)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    callback.on_init_end(args, state, None, model=model)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    callback.on_train_begin(args, state, None, model=model, optimizer=optimizer)
    data = _Rows(n=8)
    batches = [torch.utils.data.default_collate([data[i], data[i + 1]]) for i in range(0, 8, 2)]
    for step, batch in enumerate(batches[:2], 1):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.global_step = step
        callback.on_step_end(args, state, None, model=model, optimizer=optimizer)
    assert callback.moves and callback.moves[0][:2] == (2, 1)
    reference.load_state_dict(model.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in reference.named_parameters():
        p.requires_grad_(n in trainable)
    batch = batches[2]
    loss = model(**batch).loss
    loss.backward()
    loss_r = reference(**batch).loss
    loss_r.backward()
    torch.testing.assert_close(loss, loss_r, rtol=0, atol=0)
    ref = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[n].grad, rtol=1e-5, atol=1e-7)
        else:
            assert p.grad is None
    callback.on_train_end(args, state, None)
    assert (tmp_path / "freezekern_plan.json").is_file()


def test_callback_calibration_batches_leave_rng_alone():
    from freezekern.integrations.trainer_access import calibration_batches as _calibration_batches

    loader = torch.utils.data.DataLoader(_Rows(), batch_size=4, shuffle=True)
    state = torch.get_rng_state()
    batches = _calibration_batches(loader, 2)
    assert torch.equal(state, torch.get_rng_state())
    assert len(batches) == 2 and torch.equal(batches[0]["input_ids"], _Rows().ids[:4])


def test_callback_rejects_bad_arguments():
    from freezekern.integrations import FreezeKernCallback

    with pytest.raises(ValueError, match="reselect_every"):
        FreezeKernCallback(reselect_every=0)
    with pytest.raises(ValueError, match="calibration_batches"):
        FreezeKernCallback(calibration_batches=0)


# -- PEFT -------------------------------------------------------------------------------------

def test_layers_to_transform_and_lora_config():
    from freezekern.integrations.peft import layers_to_transform, lora_config_for_plan

    peft = pytest.importorskip("peft")
    model = _model()
    plan = make_plan(discover(model).summary(), "fixed", boundary=4)
    assert layers_to_transform(plan) == [4, 5]
    assert layers_to_transform(2, num_layers=3) == [2]
    with pytest.raises(ValueError, match="num_layers"):
        layers_to_transform(2)
    with pytest.raises(ValueError, match="no block left"):
        layers_to_transform(3, num_layers=3)
    with pytest.raises(ValueError, match="outside"):
        layers_to_transform(5, num_layers=3)
    with pytest.raises(ValueError, match="comes from the plan"):
        lora_config_for_plan(plan, layers_to_transform=[1])
    config = lora_config_for_plan(plan, model=model, r=4, target_modules=["q_proj", "v_proj"])
    assert list(config.layers_to_transform) == [4, 5] and config.layers_pattern == "layers"
    lora = peft.get_peft_model(model, config)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all(".layers.4." in n or ".layers.5." in n for n in names)
    from freezekern.cut import apply

    handle = apply(lora, plan)  # nothing below the boundary to refuse
    assert handle.frozen_adapter_names == []
    handle.remove()


def test_integrations_exports_lazily():
    import freezekern.integrations as integrations

    assert "FreezeKernCallback" in dir(integrations)
    assert callable(integrations.agree_on_boundary)
    with pytest.raises(AttributeError):
        integrations.nothing_here  # noqa: B018


# -- finetune ---------------------------------------------------------------------------------

class _Interrupting(dict):
    """A batch that raises KeyboardInterrupt the first time the training loop reads it."""

    armed = True

    def items(self):
        if _Interrupting.armed:
            _Interrupting.armed = False
            raise KeyboardInterrupt
        return super().items()


def _ft_batches(n, seed):
    data = _Rows(n=2 * n, seed=seed)
    return [torch.utils.data.default_collate([data[2 * i], data[2 * i + 1]]) for i in range(n)]


def test_finetune_reports_compares_and_saves(tmp_path):
    from freezekern.trials.finetune import finetune, format_report

    model = _model()
    plan = make_plan(discover(model).summary(), "fixed", boundary=4)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    report = finetune(model, None, _ft_batches(2, 0), _ft_batches(1, 1), plan, steps=3, lr=1e-2,
                      gradient_checkpointing=True, output_dir=tmp_path, progress=False, compare="full")
    fk, full = report["freezekern"], report["full"]
    assert fk["steps_run"] == 3 and full["steps_run"] == 3
    assert fk["eval_loss_before"] == full["eval_loss_before"]
    assert fk["train_loss_last"] < fk["train_loss_first"]
    assert fk["trainable_params"] < full["trainable_params"]
    assert fk["tokens_per_s"] > 0 and fk["step_time_s"] > 0 and fk["peak_memory_mb"] is not None
    assert report["comparison"]["speedup"] == pytest.approx(full["step_time_s"] / fk["step_time_s"], rel=1e-12)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.is_activation_checkpointing
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "freezekern_plan.json").is_file()
    assert json.loads((tmp_path / "report.json").read_text())["plan"]["boundary"] == 4
    assert "freezekern" in format_report(report)
    # A re-run finds the finished checkpoint and the stored comparison: nothing is trained again.
    again = finetune(_model(), None, _ft_batches(2, 0), _ft_batches(1, 1), plan, steps=3, lr=1e-2,
                     gradient_checkpointing=True, output_dir=tmp_path, progress=False, compare="full")
    assert again["resume"]["resumed"] and again["resume"]["from_step"] == 3
    assert again["freezekern"]["steps_run"] == 0
    assert again["freezekern"]["eval_loss_after"] == pytest.approx(fk["eval_loss_after"], rel=1e-6)
    assert again["full"] == full


def test_finetune_resumes_after_interrupt_without_lost_work(tmp_path):
    from freezekern.trials.finetune import finetune

    plan = make_plan(discover(_model()).summary(), "fixed", boundary=3)
    train, held_out = _ft_batches(2, 0), _ft_batches(1, 1)
    straight = _model()
    finetune(straight, None, train, held_out, plan, steps=4, lr=1e-2, progress=False)

    interrupted = [_Interrupting(b) if i == 0 else b for i, b in enumerate(train)]
    _Interrupting.armed = False
    first = _model()
    with pytest.raises(KeyboardInterrupt):
        # steps 1-2 run, the third reads batch 0 again and is interrupted: the checkpoint holds step 2
        def arm_after_two(module, args, kwargs, calls=[]):  # noqa: B006
            calls.append(1)
            if len(calls) == 2:
                _Interrupting.armed = True
        hook = first.register_forward_pre_hook(arm_after_two, with_kwargs=True)
        finetune(first, None, interrupted, held_out, plan, steps=4, lr=1e-2, output_dir=tmp_path,
                 progress=False, save_every=100)
    hook.remove()
    resumed_model = _model()
    report = finetune(resumed_model, None, train, held_out, plan, steps=4, lr=1e-2, output_dir=tmp_path,
                      progress=False)
    assert report["resume"]["resumed"] and report["resume"]["from_step"] == 2
    assert report["freezekern"]["steps_run"] == 2
    for (name, a), b in zip(straight.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # Different settings: the checkpoint is not used, and the report says why.
    other = finetune(_model(), None, train, held_out, plan, steps=4, lr=5e-3, output_dir=tmp_path,
                     progress=False)
    assert not other["resume"]["resumed"] and "lr differs" in other["resume"]["reason"]


def test_finetune_with_lora_merges_back(tmp_path):
    pytest.importorskip("peft")
    from freezekern.trials.finetune import finetune

    model = _model()
    plan = make_plan(discover(model).summary(), "fixed", boundary=4)
    before = _snapshot(model)
    report = finetune(model, None, _ft_batches(2, 0), _ft_batches(1, 1), plan, steps=2, lr=1e-2, lora=True,
                      gradient_checkpointing=True, progress=False)
    after = _snapshot(model)
    assert set(after) == set(before)  # no adapter modules left behind
    assert torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(before["model.layers.5.self_attn.q_proj.weight"],
                           after["model.layers.5.self_attn.q_proj.weight"])
    assert report["freezekern"]["trainable_params"] < 0.2 * sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("failure", ["interrupt", "error"])
def test_finetune_gives_the_model_back_after_a_failure(tmp_path, failure):
    pytest.importorskip("peft")
    from freezekern.cut import active_handle
    from freezekern.trials.finetune import finetune

    model = _model()
    plan = make_plan(discover(model).summary(), "fixed", boundary=4)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # the caller's own flags come back as they were
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before, hooks = _snapshot(model), _hooks(model)
    train = _ft_batches(2, 0)
    if failure == "interrupt":
        _Interrupting.armed = True
        train[0] = _Interrupting(train[0])
    else:
        train[0] = {**train[0], "input_ids": train[0]["input_ids"] + 10_000}  # out of the vocabulary
    with pytest.raises(KeyboardInterrupt if failure == "interrupt" else IndexError):
        finetune(model, None, train, _ft_batches(1, 1), plan, steps=2, lr=1e-2, lora=True,
                 gradient_checkpointing=True, progress=False, output_dir=tmp_path)
    after = _snapshot(model)
    assert set(after) == set(before) and all(torch.equal(before[n], after[n]) for n in before)  # no adapters
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert _hooks(model) == hooks and not model.is_gradient_checkpointing and active_handle(model) is None
    assert "forward" not in model.model.embed_tokens.__dict__


def test_resume_from_a_checkpoint_elsewhere_restores_the_plan_from_trainer_state(tmp_path):
    import shutil

    from freezekern.integrations import FreezeKernCallback
    from freezekern.integrations.hf_trainer import PLAN_FILE

    first = FreezeKernCallback(policy="fixed", policy_kwargs={"boundary": 4})
    _trainer(_model(), tmp_path / "run", first, max_steps=2).train()
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(tmp_path / "run" / "checkpoint-2", moved)
    (moved / PLAN_FILE).unlink()  # only trainer_state.json carries the plan now
    state = json.loads((moved / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["FreezeKernCallback"]["attributes"]["plan"]["boundary"] == 4
    assert all(e["freezekern_boundary"] == 4 for e in state["log_history"] if "loss" in e)
    again = FreezeKernCallback(policy="fixed", policy_kwargs={"boundary": 1})  # would analyse to k=1
    trainer = _trainer(_model(), tmp_path / "other", again, max_steps=3)
    trainer.train(resume_from_checkpoint=str(moved))
    assert not again.analysed and again.restored_from == "trainer_state.json"
    assert again.handle.boundary == 4
    assert [e["freezekern_boundary"] for e in trainer.state.log_history if "loss" in e] == [4, 4, 4]


def test_sft_trainer_with_peft_config_and_a_default_callback(tmp_path, tiny_tokenizer):
    peft = pytest.importorskip("peft")
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from freezekern.integrations import FreezeKernCallback

    gen = torch.Generator().manual_seed(0)
    ds = Dataset.from_dict({"input_ids": torch.randint(4, 257, (8, 12), generator=gen).tolist()})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                         use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
                         dataloader_num_workers=0)
    callback = FreezeKernCallback(policy="fixed", policy_kwargs={"boundary": 3})
    trainer = trl.SFTTrainer(model=_model(), args=args, train_dataset=ds, processing_class=tiny_tokenizer,
                             peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                             callbacks=[callback])
    before = _snapshot(trainer.model)
    with pytest.warns(UserWarning, match="lora_config_for_plan"):
        trainer.train()
    after = _snapshot(trainer.model)
    lora = [n for n in before if "lora_" in n]
    below = [n for n in lora if any(f"layers.{i}." in n for i in range(3))]
    above = [n for n in lora if n not in below and "lora_B" in n]
    assert below and above and callback.handle.boundary == 3
    assert all(torch.equal(before[n], after[n]) for n in below)
    assert all(not torch.equal(before[n], after[n]) for n in above)
    assert len(callback.handle.frozen_adapter_names) == len(below)
