"""A boundary that moves with training: exact gradients, frozen blocks that never change, budget-aware plans."""

import copy
import dataclasses

import pytest
import torch

import freezekern as fk
from freezekern.policy import moving_plan, schedule_of
from freezekern.policy.moving import MovingSchedule

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

L = 6


def _model(seed=0):
    return fk.tiny_model("llama", num_layers=L, hidden=64, vocab=257, tie=True, seed=seed)


def _batch(seed=0, rows=2, seq=16):
    ids = torch.randint(3, 257, (rows, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _static_plan(model, k):
    trace = fk.analyze(model, [_batch(9)], progress=False)
    return fk.plan(trace, "fixed", boundary=k)


def test_schedule_freezes_bottom_up_evenly_over_the_window():
    s = MovingSchedule(start=1, end=5, begin=0.2, finish=0.6)
    targets = [s.target(f / 100) for f in range(101)]
    assert targets[:21] == [1] * 21 and targets[60:] == [5] * 41
    assert targets == sorted(targets)
    assert [targets.index(k) for k in (2, 3, 4, 5)] == [30, 40, 50, 60]
    with pytest.raises(ValueError):
        MovingSchedule(start=3, end=2)
    with pytest.raises(ValueError):
        MovingSchedule(start=0, end=2, begin=0.5, finish=0.5)


def test_moving_plan_is_budget_aware_and_says_why():
    model = _model()
    static = _static_plan(model, 4)
    long = moving_plan(static, run_steps=1000)
    assert long.moving["start"] == 0 and long.boundary == 4 and "moving boundary" in long.rule
    assert "moves:" in str(long)
    assert fk.FreezePlan.from_json(long.to_json()) == long
    short = moving_plan(static, run_steps=10)  # 5 steps in the window: one move of at least 4 steps
    assert short.moving["start"] == 3 and "affords 1 moves" in short.rule
    tiny = moving_plan(static, run_steps=2)
    assert tiny.moving is None and "static" in tiny.rule
    with pytest.raises(ValueError):
        moving_plan(fk.plan(fk.analyze(model, [_batch(9)], progress=False), "none"))


def test_each_step_of_a_moving_boundary_has_the_gradients_of_a_plain_backward_with_the_same_freeze():
    torch.manual_seed(0)
    model = _model()
    plain = copy.deepcopy(model)
    plan = moving_plan(_static_plan(model, 4), run_steps=12, start=1, begin=0.0, finish=1.0)
    handle = fk.apply(model, plan)
    mover = fk.MovingBoundary(handle)
    assert mover.boundary == 1
    seen = set()
    for step in range(12):
        batch = _batch(step)
        k = mover.boundary
        seen.add(k)
        frozen_prefix = {f"model.layers.{i}." for i in range(k)}
        for name, p in plain.named_parameters():  # plain freezing of the same parameters
            p.requires_grad_(not (name.startswith("model.embed_tokens") or any(name.startswith(f)
                                                                               for f in frozen_prefix)))
        model(**batch).loss.backward()
        plain(**batch).loss.backward()
        for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
        for p in (*model.parameters(), *plain.parameters()):
            p.grad = None
        mover.update((step + 1) / 12, step + 1)
    assert seen == {1, 2, 3} and mover.boundary == 4
    mover.handle.remove()


class _Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        return {k: v[0] for k, v in _batch(i, rows=1).items()}


def _train(tmp_path, model, callbacks, steps=40, resume=None, **arguments):
    """A Trainer run of ``steps`` over ``_Rows`` (AdamW, weight decay 0.1; ``arguments`` override),
    resumed from ``resume`` (a checkpoint, or True: the last in ``tmp_path``) where given."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    args = TrainingArguments(**{"output_dir": str(tmp_path), "max_steps": steps, "per_device_train_batch_size": 2,
                                "learning_rate": 1e-3, "weight_decay": 0.1, "use_cpu": True, "report_to": [],
                                "save_strategy": "no", "disable_tqdm": True, "seed": 0,
                                "dataloader_num_workers": 0, **arguments})
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(), data_collator=default_data_collator,
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_trainer_with_a_moving_boundary_never_changes_a_frozen_block_again(tmp_path):
    from transformers import TrainerCallback

    from freezekern.integrations import FreezeKernCallback

    model = _model()
    snapshots = {}

    class Snap(TrainerCallback):  # after freezekern's callback: sees each block right after it froze
        def on_step_end(self, args, state, control, **kwargs):
            for index in range(cb.handle.boundary):
                if index not in snapshots:
                    snapshots[index] = {n: p.detach().clone() for n, p in model.model.layers[index].named_parameters()}

    cb = FreezeKernCallback(plan=_static_plan(model, 4), moving={"begin": 0.1, "finish": 0.6})
    trainer = _train(tmp_path, model, [cb, Snap()], learning_rate=1e-2, lr_scheduler_type="cosine",
                     warmup_steps=0.1, logging_steps=5, max_grad_norm=1.0)
    assert cb.plan.moving is not None and cb.plan.run_steps == 40
    assert [m[2] for m in cb.moves] == sorted(m[2] for m in cb.moves) and cb.handle.boundary == 4
    assert sorted(snapshots) == [0, 1, 2, 3]
    for index, frozen in snapshots.items():
        for name, p in model.model.layers[index].named_parameters():
            assert torch.equal(p, frozen[name]), f"block {index + 1} {name} changed after it froze"
    logged = [e["freezekern_boundary"] for e in trainer.state.log_history if "freezekern_boundary" in e]
    assert logged == sorted(logged) and logged[0] < 4


def test_schedule_of_a_static_plan_is_none():
    assert schedule_of(_static_plan(_model(), 3)) is None


def test_settle_signal_is_refused_on_sharded_weights():
    """The settle signal compares whole block weights; a ZeRO-3 parameter (``ds_id``) is a shard: refused,
    naming the fix, before anything moves."""
    model = fk.tiny_model("llama", num_layers=4, hidden=16, vocab=64, seed=0)
    handle = fk.apply(model, 1)
    schedule = MovingSchedule(start=1, end=3, settle=0.5)
    fk.MovingBoundary(handle, schedule)  # whole weights: accepted
    weight = next(model.parameters())
    weight.ds_id = 0
    try:
        with pytest.raises(ValueError, match="settle=None"):
            fk.MovingBoundary(handle, schedule)
        fk.MovingBoundary(handle, MovingSchedule(start=1, end=3))  # the schedule alone: accepted
    finally:
        del weight.ds_id
    assert handle.active and handle.boundary == 1


@pytest.mark.parametrize("full_up_to,default_moves,expected", [
    (None, True, "moving"), (None, False, "static"), (39, True, "moving"), (40, True, "none"), (40, False, "none")])
def test_the_callbacks_default_follows_the_library_default_for_the_runs_length(tmp_path, monkeypatch, full_up_to,
                                                                              default_moves, expected):
    """``FreezeKernCallback()`` (moving=None) plans from the trace, then trains in full where the run (40
    steps) is at most ``FULL_UP_TO``, else moves or stays as ``DEFAULT_MOVES`` says and ends at the plan's
    boundary; the plan says why."""
    from freezekern.integrations import FreezeKernCallback

    monkeypatch.setattr("freezekern.policy.default.FULL_UP_TO", full_up_to)
    monkeypatch.setattr("freezekern.policy.default.DEFAULT_MOVES", default_moves)
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = FreezeKernCallback(calibration_batches=2)
    _train(tmp_path, model, [cb])
    if expected == "none":
        assert not cb.plan.cut and cb.plan.policy == "none" and cb.plan.run_steps == 40
        assert cb.plan.rule.startswith("do not freeze: a run of 40 steps") and "gain_share boundary" in cb.plan.rule
        assert cb.moves == [] and all(p.requires_grad for p in model.parameters())
        assert not torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
        assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])
        return
    assert cb.plan.policy == "gain_share" and cb.plan.boundary > 0
    assert ("the default freezes: a run of 40 steps is longer" in cb.plan.rule) == (full_up_to is not None)
    if expected == "moving":
        assert cb.plan.moving is not None and cb.plan.run_steps == 40 and "moving boundary" in cb.plan.rule
        assert cb.moves and cb.moves[0][1] == cb.plan.moving["start"] and cb.moves[-1][2] == cb.plan.boundary
    else:
        assert cb.plan.moving is None and cb.moves == []
    assert cb.handle.boundary == cb.plan.boundary
    unchanged = torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])
    assert unchanged == (expected == "static"), "block 1 trains early only where the boundary moves"


@pytest.mark.parametrize("epochs,accumulation,drop_last", [(2, 3, False), (1.5, 1, True), (3, 4, True)])
def test_the_run_length_read_at_init_is_the_trainers_own(tmp_path, epochs, accumulation, drop_last):
    """``planned_steps`` (read at init, where a boundary applied before the engine is built must be decided)
    equals the ``max_steps`` the Trainer computes when training starts, for epoch-based runs."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    from freezekern.integrations.trainer_access import planned_steps

    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=3,
                             gradient_accumulation_steps=accumulation, dataloader_drop_last=drop_last,
                             use_cpu=True, report_to=[], save_strategy="no")
    trainer = Trainer(model=_model(), args=args, train_dataset=_Rows(), data_collator=default_data_collator)
    expected = trainer.set_initial_training_values(args, trainer.get_train_dataloader())[-1]
    assert planned_steps(trainer) == expected
    assert planned_steps(Trainer(model=_model(), args=dataclasses.replace(args, max_steps=7),
                                 train_dataset=_Rows(), data_collator=default_data_collator)) == 7


def test_a_short_run_planned_at_init_trains_in_full_from_the_start(tmp_path, monkeypatch):
    """With calibration data the boundary is decided at init, before the optimizer exists: a run within
    ``FULL_UP_TO`` is known short there and nothing is ever frozen (no embedding left out of the optimizer)."""
    from freezekern.integrations import FreezeKernCallback

    monkeypatch.setattr("freezekern.policy.default.FULL_UP_TO", 150)
    monkeypatch.setattr("freezekern.policy.default.DEFAULT_MOVES", True)
    model = _model()
    before = model.model.embed_tokens.weight.detach().clone()
    cb = FreezeKernCallback(calibration_data=[_batch(5)])
    trainer = _train(tmp_path, model, [cb], steps=12)
    assert not cb.plan.cut and cb.plan.run_steps == 12 and cb._applied_at_init
    assert all(p.requires_grad for p in model.parameters())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in model.parameters())
    assert not torch.equal(model.model.embed_tokens.weight, before)


def test_the_default_stays_static_where_the_user_chose_or_the_engine_builds_once(monkeypatch):
    """With ``DEFAULT_MOVES`` on, ``moving=None`` still means static for a boundary the user gave or fixed,
    for progressive reselection, for PEFT adapters and under DeepSpeed; an explicit ``moving`` wins."""
    import weakref

    import peft

    from freezekern.integrations import FreezeKernCallback

    monkeypatch.setattr("freezekern.policy.default.DEFAULT_MOVES", True)
    monkeypatch.setattr("freezekern.policy.default.FULL_UP_TO", None)
    model = _model()
    assert FreezeKernCallback()._moves(model) is True
    assert FreezeKernCallback(policy="salf")._moves(model) is True
    assert FreezeKernCallback(plan=3)._moves(model) is False
    assert FreezeKernCallback(plan=_static_plan(model, 3))._moves(model) is False
    assert FreezeKernCallback(policy="fraction", policy_kwargs={"frozen_share": 0.5})._moves(model) is False
    assert FreezeKernCallback(reselect_every=5)._moves(model) is False
    assert FreezeKernCallback(moving=False)._moves(model) is False
    assert FreezeKernCallback(plan=3, moving=True)._moves(model) is True
    assert FreezeKernCallback(trained_share=0.5)._moves(model) is False
    assert FreezeKernCallback(policy_kwargs={"flops_budget": 0.6})._moves(model) is False
    lora = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert FreezeKernCallback()._moves(lora) is False

    class DeepSpeedTrainer:
        is_deepspeed_enabled = True

    trainer = DeepSpeedTrainer()
    cb = FreezeKernCallback()
    cb._trainer = weakref.ref(trainer)
    assert cb._moves(model) is False
    cb._trainer = None
    assert cb._moves(model) is False, "resolved once: the answer cannot change between init and training"


def test_a_short_run_trains_in_full_only_where_the_library_chooses(monkeypatch):
    """For a run within ``FULL_UP_TO`` the default trains in full; a boundary, a share or a FLOPs cap the
    user set, adapters, or an explicit ``moving`` keep freezing."""
    import peft

    from freezekern.integrations import FreezeKernCallback

    monkeypatch.setattr("freezekern.policy.default.FULL_UP_TO", 150)
    monkeypatch.setattr("freezekern.policy.default.DEFAULT_MOVES", True)
    model = _model()
    assert FreezeKernCallback()._default_rule(model, None, 150) == "none"
    assert FreezeKernCallback(policy="salf")._default_rule(model, None, 10) == "none"
    assert FreezeKernCallback()._default_rule(model, None, 151) == "moving"
    assert FreezeKernCallback(trained_share=0.5)._default_rule(model, None, 10) == "static"
    assert FreezeKernCallback(policy_kwargs={"flops_budget": 0.6})._default_rule(model, None, 10) == "static"
    lora = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert FreezeKernCallback()._default_rule(lora, None, 10) == "static"
    for chosen in (FreezeKernCallback(plan=3), FreezeKernCallback(moving=False), FreezeKernCallback(moving=True),
                   FreezeKernCallback(reselect_every=5), FreezeKernCallback(policy="fixed")):
        assert chosen._default_rule(model, None, 10) in (None, "static")


def test_a_capped_default_keeps_its_cap(tmp_path, monkeypatch):
    """``trained_share`` caps the trained blocks from the first step, whatever the run's length."""
    from freezekern.integrations import FreezeKernCallback

    monkeypatch.setattr("freezekern.policy.default.FULL_UP_TO", 150)
    cb = FreezeKernCallback(calibration_batches=2, trained_share=0.34)
    _train(tmp_path, _model(), [cb], steps=6)
    assert cb.plan.cut and cb.plan.moving is None and cb.moves == []
    assert L - cb.handle.boundary <= -(-0.34 * L // 1)


@pytest.mark.parametrize("case", ["fixed", "default"])
def test_resuming_with_restored_callback_state_keeps_the_decision(tmp_path, monkeypatch, case):
    """A callback the Trainer rebuilds from ``trainer_state.json`` (``restore_callback_states_from_checkpoint``)
    gets no ``plan=`` argument: it still knows the user chose the boundary (plan=3 stays static in a run the
    default would move) and what the default decided (a short run stays unfrozen)."""
    from freezekern.integrations import FreezeKernCallback

    monkeypatch.setattr("freezekern.policy.default.FULL_UP_TO", 5 if case == "fixed" else 150)
    monkeypatch.setattr("freezekern.policy.default.DEFAULT_MOVES", True)
    make = (lambda: FreezeKernCallback(plan=3)) if case == "fixed" else (lambda: FreezeKernCallback(calibration_batches=2))
    arguments = {"save_strategy": "steps", "save_steps": 4, "restore_callback_states_from_checkpoint": True}
    first = make()
    _train(tmp_path, _model(), [first], steps=8, **arguments)
    for folder in tmp_path.glob("checkpoint-8"):
        import shutil

        shutil.rmtree(folder)
    model = _model()
    again = make()
    trainer = _train(tmp_path, model, [again], steps=8, resume=True, **arguments)
    restored = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FreezeKernCallback))
    assert restored.plan.to_dict() == first.plan.to_dict()
    if case == "fixed":
        assert restored.handle.boundary == 3 and restored.plan.moving is None and restored.moves == []
    else:
        assert not restored.plan.cut and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("examples,batch,processes,drop_last,split,even,rank", [
    (601, 1, 4, True, False, True, 0), (10, 1, 4, False, False, True, 0), (10, 1, 4, False, False, False, 3),
    (10, 1, 4, False, False, False, 1), (37, 4, 2, False, True, True, 1), (37, 3, 3, True, False, True, 2),
    (64, 2, 1, False, False, True, 0)])
def test_the_run_length_read_at_init_counts_each_ranks_share_as_accelerate_does(examples, batch, processes,
                                                                              drop_last, split, even, rank):
    """``planned_steps`` on several ranks: this rank's batches as accelerate's ``BatchSamplerShard`` deals
    them (``split_batches``, ``even_batches``, ``drop_last``), over the accumulation steps, times the epochs."""
    import math
    import types

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    from freezekern.integrations.trainer_access import planned_steps

    sampler = BatchSampler(SequentialSampler(range(examples)), batch_size=batch, drop_last=drop_last)
    batches = len(BatchSamplerShard(sampler, num_processes=processes, process_index=rank, split_batches=split,
                                    even_batches=even))
    for epochs, accumulation in ((1, 1), (3, 2), (2.5, 3)):
        args = types.SimpleNamespace(max_steps=-1, dataloader_drop_last=drop_last, train_batch_size=batch,
                                     gradient_accumulation_steps=accumulation, num_train_epochs=epochs)
        accelerator = types.SimpleNamespace(num_processes=processes, process_index=rank,
                                            dataloader_config=types.SimpleNamespace(split_batches=split,
                                                                                    even_batches=even))
        trainer = types.SimpleNamespace(args=args, accelerator=accelerator, train_dataset=list(range(examples)))
        expected = math.ceil(epochs * max(batches // accumulation + int(batches % accumulation > 0), 1))
        assert planned_steps(trainer) == expected, (epochs, accumulation)


def test_a_run_longer_than_counted_at_init_is_warned_about(monkeypatch, caplog):
    """The default decided at init for one length and trained for another (a batch size found at run time,
    a mesh the count does not know) keeps its decision, and says so where the other length would differ."""
    import logging

    from freezekern.integrations import FreezeKernCallback

    monkeypatch.setattr("freezekern.policy.default.FULL_UP_TO", 150)
    monkeypatch.setattr("freezekern.policy.default.DEFAULT_MOVES", True)
    model = _model()
    cb = FreezeKernCallback()
    assert cb._default_rule(model, None, 100) == "none"
    with caplog.at_level(logging.WARNING, logger="freezekern.hf_trainer"):
        cb._check_decided_length(model, None, 120)  # the same decision: quiet
        assert not caplog.records
        cb._check_decided_length(model, None, 400)
    assert len(caplog.records) == 1 and "would be moving" in caplog.text and "keeps none" in caplog.text
    assert cb._default_rule(model, None, 400) == "none"
