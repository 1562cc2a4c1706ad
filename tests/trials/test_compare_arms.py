"""Which arms ``compare`` trains, and which of them is the library's default."""

import pytest
import torch

import freezekern as fk
from freezekern.model.parts import discover
from freezekern.trials.compare import _fit_to_budget, _mark_default, arms_for


def _plan(policy="gain_share"):
    model = fk.tiny_model("llama", num_layers=6, hidden=64, vocab=257, tie=True, seed=0)
    ids = torch.randint(3, 257, (2, 16), generator=torch.Generator().manual_seed(9))
    trace = fk.analyze(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], progress=False)
    kwargs = {"boundary": 3} if policy == "fixed" else {}
    return model, fk.plan(trace, policy, **kwargs)


@pytest.mark.parametrize("default_moves", [True, False])
@pytest.mark.parametrize("policy", ["gain_share", "fixed"])
def test_exactly_the_arm_the_callback_would_train_is_named_the_default(monkeypatch, default_moves, policy):
    monkeypatch.setattr("freezekern.policy.default.DEFAULT_MOVES", default_moves)
    monkeypatch.setattr("freezekern.policy.default.FULL_UP_TO", 30)
    model, plan = _plan(policy)
    assert plan.cut and plan.boundary > 0
    arms = _mark_default(arms_for(plan), plan, run_steps=31)
    marked = [a for a in arms if a.name.endswith(", default)")]
    assert len(marked) == 1 and marked[0].boundary == plan.boundary
    assert (marked[0].moving is not None) == (default_moves and policy == "gain_share"), marked[0].name
    # a budget too short for any move drops the moving arm: the static one is what the default trains then
    short = [_fit_to_budget(a, plan, discover(model), 1.0) for a in arms_for(plan)]
    marked = [a for a in _mark_default([a for a in short if a is not None], plan) if a.name.endswith(", default)")]
    assert len(marked) == 1 and marked[0].moving is None and marked[0].boundary == plan.boundary
    # a run within FULL_UP_TO: the default trains in full, unless the user fixed the boundary
    marked = [a for a in _mark_default(arms_for(plan), plan, run_steps=30) if "default" in a.name]
    expected = "full fine-tuning (default)" if policy == "gain_share" else f"fixed (k={plan.boundary}, default)"
    assert [a.name for a in marked] == [expected]
