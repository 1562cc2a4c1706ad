"""BackwardProfileCallback: the first real steps of a Trainer / TRL SFTTrainer profiled, training unchanged."""

import json
import statistics

import pytest
import torch

import freezekern as fk
from freezekern.integrations.profile_callback import BackwardProfileCallback
from freezekern.profiler.result import ProfileReport
from freezekern.profiler.setup import prepare_setup

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]

L = 6
K = 3
VOCAB = 98



class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=32, seq=16):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (n, seq), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _logs_recorder():
    """A callback that keeps the logs as the callbacks before it left them."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs or {}))

    return Recorder()


def _model():
    return prepare_setup(fk.tiny_model("llama", num_layers=L, hidden=32, vocab=VOCAB, tie=True, seed=0), boundary=K)


def _args(out_dir, max_steps, **extra):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=2,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0, **extra)


def _train(model, out_dir, callbacks, max_steps=6, **extra):
    from transformers import Trainer, default_data_collator

    trainer = Trainer(model=model, args=_args(out_dir, max_steps, **extra), train_dataset=_Rows(),
                      data_collator=default_data_collator, callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.mark.parametrize("reentrant", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["non_reentrant", "reentrant"])
def test_trainer_steps_profiled_and_training_unchanged(tmp_path, capsys, reentrant):
    callback = BackwardProfileCallback(steps=2, warmup=1, repeats=1)
    gc = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    logs = _logs_recorder()
    trainer = _train(_model(), tmp_path / "a", [callback, logs], **gc)
    profiled = trainer.model
    plain = _train(_model(), tmp_path / "b", [], **gc).model
    for (name, a), (_, b) in zip(profiled.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)  # the cut's steps train exactly the same
    report = callback.report
    assert report.steps == 2 and report.checkpointing == ("reentrant" if reentrant else "non-reentrant")
    assert report.yours.lowest_reached == 0 and report.yours.blocks_reached == L
    assert report.freezekern.lowest_reached == K + 1
    paired = statistics.median(c / y for c, y in zip(report.freezekern.step_s, report.yours.step_s))
    assert report.time_ratio == pytest.approx(paired, rel=1e-12)
    assert report.ideal is not None and report.yours.modeled is not None
    assert "freezekern backward profile" in capsys.readouterr().out
    saved = ProfileReport.load(tmp_path / "a" / "backward_profile.json")
    assert saved.verdict == report.verdict
    assert (tmp_path / "a" / "backward_profile.png").is_file()
    logged = [e for e in logs.seen if "freezekern_profile_cut_step_ratio" in e]
    assert len(logged) == 1 and logged[0]["freezekern_profile_lowest_reached"] == 0


@pytest.mark.slow
def test_sft_trainer(tmp_path, char_tokenizer):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = char_tokenizer()
    model = prepare_setup(fk.tiny_model("llama", num_layers=L, hidden=32, vocab=len(tokenizer), tie=True), boundary=K)
    dataset = Dataset.from_dict({"text": [f"def f{i}(x): return x * {i}" for i in range(24)]})
    callback = BackwardProfileCallback(steps=2, warmup=1, repeats=1, print_verdict=False)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-3,
                     use_cpu=True, report_to=[], save_strategy="no", logging_steps=10, disable_tqdm=True, seed=0,
                     max_length=32, gradient_checkpointing=True)
    SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback]).train()
    report = callback.report
    assert report.yours.lowest_reached == 0 and report.freezekern.lowest_reached == K + 1
    assert json.loads((tmp_path / "backward_profile.json").read_text())["boundary"] == K


def test_with_freezekern_callback_profiles_the_cut_alone(tmp_path):
    from freezekern.integrations import FreezeKernCallback

    model = fk.tiny_model("llama", num_layers=L, hidden=32, vocab=VOCAB, tie=True)
    plan = fk.plan(fk.discover(model).summary(), "fixed", boundary=K)
    callback = BackwardProfileCallback(steps=2, warmup=0, repeats=1, print_verdict=False)
    _train(model, tmp_path, [FreezeKernCallback(plan=plan), callback], max_steps=3, gradient_checkpointing=True)
    report = callback.report
    assert report.freezekern is None and report.time_ratio is None
    assert report.yours.lowest_reached == K + 1 and report.boundary == K
    # the cut is the setup profiled: its own modeled step is the ideal, priced from its own parts
    assert report.ideal == report.yours.modeled and report.ideal["backward"] > 0
    assert not any("not measured" in note for note in report.notes)
    assert any("already applied" in note for note in report.notes) and "already applied" in report.verdict


def test_trained_embeddings_are_profiled_without_the_cut(tmp_path):
    model = fk.tiny_model("llama", num_layers=L, hidden=32, vocab=VOCAB, tie=False)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.embed_tokens") or any(
            name.startswith(f"model.layers.{i}.") for i in range(K, L)))
    callback = BackwardProfileCallback(steps=2, warmup=0, repeats=1, print_verdict=False)
    _train(model, tmp_path, [callback], max_steps=3)
    report = callback.report
    assert report.freezekern is None and report.yours.lowest_reached == 0
    assert any("would change what trains" in note for note in report.notes)
    assert report.ideal is not None  # priced from the parts: the cut's ideal for the same blocks


def test_a_trained_position_embedding_is_never_deprived(tmp_path):
    def gpt2():  # wte and blocks 1-2 frozen by hand, wpe trainable: the cut would freeze wpe on its steps
        model = fk.tiny_model("gpt2", num_layers=L, hidden=32, vocab=VOCAB, tie=False, seed=0)
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(("transformer.wte", "transformer.h.0.", "transformer.h.1.")))
        return model

    callback = BackwardProfileCallback(steps=2, warmup=1, repeats=1, print_verdict=False)
    profiled = _train(gpt2(), tmp_path / "a", [callback], max_steps=5).model
    plain = _train(gpt2(), tmp_path / "b", [], max_steps=5).model
    for (name, a), (_, b) in zip(profiled.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    report = callback.report
    assert report.freezekern is None and any("transformer.wpe.weight" in note for note in report.notes)


def test_short_training_still_reports_and_bad_arguments():
    with pytest.raises(ValueError, match="steps must be at least 2"):
        BackwardProfileCallback(steps=1)
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        BackwardProfileCallback(warmup=-1)


def test_training_shorter_than_the_profile(tmp_path):
    callback = BackwardProfileCallback(steps=4, warmup=1, repeats=1, print_verdict=False)
    trainer = _train(_model(), tmp_path, [callback], max_steps=4)
    assert callback.report is not None and "training ended after 4 of 10 profiled steps" in callback.report.verdict
    assert fk.active_handle(trainer.model) is None
