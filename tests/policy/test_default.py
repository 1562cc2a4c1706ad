"""The library's default by run length: which rule, and the plans it makes (``freezekern.policy.default``)."""

import pytest
import torch

import freezekern as fk
from freezekern.policy import default_plan, default_rule


def _traced(policy="gain_share"):
    model = fk.tiny_model("llama", num_layers=6, hidden=64, vocab=257, tie=True, seed=0)
    ids = torch.randint(3, 257, (2, 16), generator=torch.Generator().manual_seed(9))
    trace = fk.analyze(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], progress=False)
    return model, trace, fk.plan(trace, policy)


@pytest.mark.parametrize("full_up_to,default_moves,run_steps,builds_once,expected", [
    (150, True, 150, False, "none"), (150, True, 151, False, "moving"), (150, True, None, False, "moving"),
    (150, True, 151, True, "static"), (150, True, 20, True, "none"), (150, False, 1000, False, "static"),
    (None, True, 5, False, "moving"), (None, False, 5, False, "static")])
def test_the_rule_by_run_length(monkeypatch, full_up_to, default_moves, run_steps, builds_once, expected):
    monkeypatch.setattr("freezekern.policy.default.FULL_UP_TO", full_up_to)
    monkeypatch.setattr("freezekern.policy.default.DEFAULT_MOVES", default_moves)
    assert default_rule("gain_share", run_steps, engine_builds_once=builds_once) == expected
    assert default_rule("salf", run_steps, engine_builds_once=builds_once) == expected
    # a boundary the user fixed, a share, and adapters: the user's static plan at any length
    assert default_rule("fixed", run_steps) == default_rule("fraction", run_steps) == "static"
    assert default_rule("gain_share", run_steps, adapters=True) == "static"


def test_bad_run_lengths_are_refused():
    with pytest.raises(ValueError, match="run_steps must be positive"):
        default_rule("gain_share", 0)
    _, trace, plan = _traced()
    with pytest.raises(ValueError, match="known length"):
        default_plan(trace, plan, None, rule="none")


def test_a_short_run_trains_everything_and_the_plan_says_why(monkeypatch):
    monkeypatch.setattr("freezekern.policy.default.FULL_UP_TO", 150)
    model, trace, plan = _traced()
    assert plan.cut and plan.boundary > 0
    full = default_plan(trace, plan, 150)
    assert not full.cut and full.policy == "none" and full.boundary == 0 and full.run_steps == 150
    assert full.trainable_params == full.total_params == sum(p.numel() for p in model.parameters())
    assert full.step_flops_fraction == pytest.approx(1.0)
    text = str(full)
    assert "do not freeze: a run of 150 steps is at most 150" in text
    assert f"gain_share boundary would have been k={plan.boundary}" in text and "moving=False" in text
    assert fk.FreezePlan.from_dict(full.to_dict()) == full
    handle = fk.apply(model, full)
    assert all(p.requires_grad for p in model.parameters())
    handle.remove()


def test_a_longer_run_moves_and_notes_that_the_saving_is_unmeasured(monkeypatch):
    monkeypatch.setattr("freezekern.policy.default.FULL_UP_TO", 150)
    monkeypatch.setattr("freezekern.policy.default.DEFAULT_MOVES", True)
    _, trace, plan = _traced()
    moving = default_plan(trace, plan, 1000)
    assert moving.moving is not None and moving.boundary == plan.boundary and moving.run_steps == 1000
    assert "moving boundary" in moving.rule and "a run of 1000 steps is longer than 150" in moving.rule
    assert "not measured here" in moving.rule
    static = default_plan(trace, plan, 1000, engine_builds_once=True)
    assert static.moving is None and static.boundary == plan.boundary and static.run_steps == 1000
    assert static.rule.startswith(plan.rule) and "longer than 150" in static.rule
    fixed = fk.plan(trace, "fixed", boundary=2)
    assert default_plan(trace, fixed, 1000) == fixed  # the user's boundary: untouched
