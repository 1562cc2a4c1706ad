"""FreezeKernCallback(plan=k): an int boundary, as freezekern.apply takes it."""

import json

import pytest
import torch

from freezekern import tiny_model
from freezekern.cut import trainable_parameters

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=12):
        self.ids = torch.randint(3, 97, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_int_plan_is_applied_at_init_and_saved(tmp_path):
    from transformers import Trainer, TrainingArguments, default_data_collator

    from freezekern.integrations import FreezeKernCallback

    model = tiny_model("llama", num_layers=4, hidden=32, vocab=97, tie=True, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = FreezeKernCallback(plan=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, use_cpu=True,
                             report_to=[], save_strategy="steps", save_steps=2, disable_tqdm=True,
                             weight_decay=0.1, learning_rate=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(), data_collator=default_data_collator,
                      callbacks=[callback])
    assert callback.handle is not None and callback.handle.boundary == 2  # before the optimizer was built
    trainer.train()
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in trainable_parameters(model)}
    for name, p in model.named_parameters():
        frozen = name.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1."))
        assert torch.equal(p, before[name]) == frozen, name
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["FreezeKernCallback"]["attributes"]["plan"]["boundary"] == 2


def test_int_plan_is_checked():
    from freezekern.integrations import FreezeKernCallback

    with pytest.raises(ValueError, match="k >= 0"):
        FreezeKernCallback(plan=-1)
    with pytest.raises(TypeError, match="int boundary"):
        FreezeKernCallback(plan=True)
    callback = FreezeKernCallback(plan=9)
    with pytest.raises(ValueError, match="outside"):
        callback.on_init_end(None, None, None, model=tiny_model("llama", num_layers=4, hidden=32, vocab=97))
