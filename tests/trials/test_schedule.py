"""The training schedule (warmup, decay, weight decay on matrices) and runs that resume at a checkpoint."""

import math

import pytest
import torch

import freezekern as fk
from freezekern.model.training import evaluate
from freezekern.trials import Arm, train_arm
from freezekern.trials.schedule import Schedule, adamw, set_lr


def test_factor_follows_the_trainer_recipe():
    s = Schedule(warmup=0.1, decay="cosine")
    assert s.factor(0.0, 0.05) == pytest.approx(0.5)          # warmup: linear in the share reached
    assert s.factor(0.1, 0.11) == pytest.approx(1.0)          # decay starts at the end of warmup
    assert s.factor(0.55, 0.56) == pytest.approx(0.5)         # cosine half-way
    assert s.factor(1.0, 1.0) == pytest.approx(0.0)
    linear = Schedule(warmup=0.0, decay="linear")
    assert linear.factor(0.25, 0.3) == pytest.approx(0.75)
    assert Schedule().factor(0.9, 1.0) == 1.0


@pytest.mark.parametrize("bad", [{"warmup": 1.0}, {"warmup": -0.1}, {"decay": "step"}, {"weight_decay": -1},
                                 {"weight_decay": math.nan}])
def test_bad_schedules_are_refused(bad):
    with pytest.raises(ValueError):
        Schedule(**bad)


def test_weight_decay_reaches_matrices_only():
    model = fk.tiny_model("llama", num_layers=2)
    opt = adamw(model.named_parameters(), 1e-3, weight_decay=0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), name
    set_lr(opt, 0.5)
    assert all(g["lr"] == pytest.approx(5e-4) for g in opt.param_groups)


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(3, 257, (2, 16), generator=g)),
             "attention_mask": torch.ones_like(ids), "labels": ids.clone()} for _ in range(n)]


def test_a_run_interrupted_after_a_checkpoint_resumes_to_the_same_result(tmp_path):
    model = fk.tiny_model("llama", num_layers=4)
    train, held = _batches(4), _batches(2, seed=1)
    arm = Arm("k=1", 1, lr=3e-3)
    schedule = Schedule(warmup=0.2, decay="cosine", weight_decay=0.1)
    kwargs = dict(budget_steps=6.0, checkpoints=(0.5, 1.0), schedule=schedule, progress=False)
    whole = train_arm(model, arm, train, {"heldout": held}, **kwargs)

    calls = []

    def evaluate_then_stop(m, b):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"loss": evaluate(m, b)}

    state = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train_arm(model, arm, train, {"heldout": held}, evaluate_fn=evaluate_then_stop, state_path=state, **kwargs)
    assert state.is_file()
    resumed = train_arm(model, arm, train, {"heldout": held}, state_path=state, **kwargs)
    assert not state.exists()
    assert resumed.steps == whole.steps
    assert [r["heldout_loss"] for r in resumed.rows] == [r["heldout_loss"] for r in whole.rows]
    # a state written for another run is not used
    other = train_arm(model, Arm("k=1", 1, lr=1e-3), train, {"heldout": held}, state_path=state, **kwargs)
    assert other.rows[-1]["heldout_loss"] != whole.rows[-1]["heldout_loss"]


def test_the_schedule_changes_training():
    model = fk.tiny_model("llama", num_layers=3)
    train, held = _batches(3), _batches(1, seed=1)
    arm = Arm("full", None, lr=1e-2)
    plain = train_arm(model, arm, train, {"h": held}, budget_steps=4.0, checkpoints=(1.0,), progress=False)
    decayed = train_arm(model, arm, train, {"h": held}, budget_steps=4.0, checkpoints=(1.0,), progress=False,
                        schedule=Schedule(warmup=0.25, decay="linear", weight_decay=0.5))
    assert plain.rows[-1]["h_loss"] != decayed.rows[-1]["h_loss"]


def test_a_moving_arm_freezes_bottom_up_and_frozen_blocks_never_change_again(monkeypatch):
    import freezekern.cut.moving as moving_module
    from freezekern.cut.moving import MovingBoundary

    snapshots = {}
    original = MovingBoundary.update

    def update(self, fraction, step=None):
        before = self.boundary
        handle = original(self, fraction, step)
        for index in range(before, handle.boundary):  # the blocks this call froze, as they are now
            block = handle.parts.blocks[index]
            snapshots[index] = (block, [p.detach().clone() for p in block.parameters()])
        return handle

    monkeypatch.setattr(moving_module.MovingBoundary, "update", update)
    model = fk.tiny_model("llama", num_layers=5)
    train, held = _batches(4), _batches(1, seed=1)
    arm = Arm("moving", 4, lr=1e-2, moving={"start": 0, "begin": 0.1, "finish": 0.6})
    result = train_arm(model, arm, train, {"h": held}, budget_steps=8.0, checkpoints=(1.0,), progress=False,
                       schedule=Schedule(warmup=0.1, decay="cosine", weight_decay=0.1))
    assert [m["to"] for m in result.moves] == sorted(m["to"] for m in result.moves)
    assert result.moves[-1]["to"] == 4 and sorted(snapshots) == [0, 1, 2, 3]
    # train_arm trains a copy and removes its cut at the end: the blocks captured at freezing time are the
    # copy's; each must be bitwise what it was when it froze (weight decay 0.1 and Adam moments included)
    for index, (block, frozen) in snapshots.items():
        for p, q in zip(block.parameters(), frozen):
            assert torch.equal(p, q), f"block {index + 1} changed after it froze"
