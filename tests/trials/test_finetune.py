"""finetune(): a moving plan, and the caller's model given back as it was when a run fails."""

import pytest
import torch

import freezekern as fk
from freezekern.policy import moving_plan
from freezekern.trials import finetune as finetune_module

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 257, (2, 16), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _plan(model, k):
    return fk.plan(fk.analyze(model, _batches(1, 9), progress=False), "fixed", boundary=k)


def test_finetune_follows_a_moving_plan_and_frozen_blocks_stay_frozen(monkeypatch):
    from freezekern.cut.moving import MovingBoundary

    snapshots, original = {}, MovingBoundary.update

    def update(self, fraction, step=None):
        before = self.boundary
        handle = original(self, fraction, step)
        for index in range(before, handle.boundary):
            snapshots[index] = [p.detach().clone() for p in handle.parts.blocks[index].parameters()]
        return handle

    monkeypatch.setattr(MovingBoundary, "update", update)
    model = fk.tiny_model("llama", num_layers=6, hidden=64, vocab=257, tie=True)
    plan = moving_plan(_plan(model, 4), run_steps=32)
    assert plan.moving["start"] == 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = finetune_module.finetune(model, None, _batches(4, 0), _batches(1, 1), plan, steps=32, lr=3e-3,
                                      progress=False)
    moves = report["moves"]
    assert [m["to"] for m in moves] == sorted(m["to"] for m in moves) and moves[-1]["to"] == 4
    assert report["plan"]["moving"] == plan.moving
    assert sorted(snapshots) == [0, 1, 2, 3]
    for index, frozen in snapshots.items():  # trained until it froze, never after
        assert not torch.equal(frozen[0], before[f"model.layers.{index}.self_attn.q_proj.weight"])
        for p, q in zip(model.model.layers[index].parameters(), frozen):
            assert torch.equal(p, q), f"block {index + 1} changed after it froze"
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags are back


def test_a_failed_lora_run_leaves_the_callers_model_as_it_was(monkeypatch):
    pytest.importorskip("peft")
    model = fk.tiny_model("llama", num_layers=4, hidden=64, vocab=257)
    names = [n for n, _ in model.named_parameters()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "_train", fail)
    with pytest.raises(KeyboardInterrupt):
        finetune_module.finetune(model, None, _batches(2, 0), _batches(1, 1), _plan(model, 2), steps=2, lr=1e-3,
                                 lora=True, progress=False)
    assert [n for n, _ in model.named_parameters()] == names
    assert not any("lora_" in n for n, _ in model.named_modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert fk.active_handle(model) is None
