"""Selection policy on synthetic traces with known answers."""

import math

import numpy as np
import pytest

import freezekern as fk
from freezekern.policy import fit_scaling_law, layer_gains


def synthetic_trace(deviations, tied=False, block_params=100):
    num_layers = len(deviations) - 1
    counts = {"blocks": [block_params] * num_layers, "final_norm": 10, "lm_head": 0 if tied else 500,
              "lm_head_trainable": 500, "embeddings": 500, "total": block_params * num_layers + 10 + 500 + (0 if tied else 500)}
    return fk.DeviationTrace(metric="cosine", deviations=list(deviations), sums=list(deviations), token_count=1,
                             num_layers=num_layers, model_id="synthetic", fingerprint="f" * 16, tied=tied,
                             parameter_counts=counts)


def smooth(num_layers, E=0.5, A=0.5, alpha=0.7):
    return [1.0] + [E + A * (k + 1) ** -alpha for k in range(1, num_layers + 1)]


def test_fit_recovers_a_power_law():
    fit = fit_scaling_law(smooth(30, E=0.3, A=0.9, alpha=0.8))
    assert fit.E == pytest.approx(0.3, abs=2e-3) and fit.A == pytest.approx(0.9, rel=1e-2)
    assert fit.alpha == pytest.approx(0.8, rel=1e-2) and fit.sse < 1e-8


def test_fit_constraints_hold_on_an_increasing_trace():
    fit = fit_scaling_law([0.0] + list(np.linspace(0.1, 0.9, 12)))
    assert fit.A >= 0 and fit.E >= 0


def test_the_embedding_space_is_left_out_of_the_fit():
    d = smooth(20)
    d[0] = 100.0
    assert fit_scaling_law(d).sse < 1e-8


def test_one_clear_jump_is_chosen():
    d = smooth(30)
    for k in range(21, 31):
        d[k] -= 0.2  # layer 21 makes a move the smooth law does not explain
    p = fk.plan(synthetic_trace(d))
    assert p.boundary == 21 and p.policy == "salf"
    _, _, gains = layer_gains(d, fit_scaling_law(d))
    assert int(np.nanargmax(gains)) == 21
    assert p.trainable_blocks == list(range(22, 31))


def test_ties_go_to_the_deeper_layer():
    d = [16.0] + [16.0 - k for k in range(1, 9)]  # linear: every reduction exactly equal
    p = fk.plan(synthetic_trace(d), policy="reduction")
    assert p.boundary == 8 - 1  # candidates end at L - min_trainable


def test_budget_and_min_trainable_bind():
    d = smooth(30)
    d[5:] = [v - 0.3 for v in d[5:]]  # jump at layer 5
    assert fk.plan(synthetic_trace(d)).boundary == 5
    budgeted = fk.plan(synthetic_trace(d), budget=0.2)
    assert 30 - budgeted.boundary <= math.ceil(0.2 * 30)
    d2 = smooth(30)
    d2[29:] = [v - 0.5 for v in d2[29:]]  # jump at layer 29
    assert fk.plan(synthetic_trace(d2), min_trainable=1).boundary == 29
    assert fk.plan(synthetic_trace(d2), min_trainable=4).boundary <= 26


def test_no_candidate_is_a_clear_error():
    with pytest.raises(ValueError, match="L >= 3"):
        fk.plan(synthetic_trace(smooth(2)))
    with pytest.raises(ValueError, match="raise the budget or lower min_trainable"):
        fk.plan(synthetic_trace(smooth(10)), budget=0.1, min_trainable=2)
    with pytest.raises(ValueError, match="budget must lie in"):
        fk.plan(synthetic_trace(smooth(10)), budget=1.5)


def test_tied_rule_and_cost_model():
    d = smooth(10)
    tied = fk.plan(synthetic_trace(d, tied=True), policy="fixed", n_frozen=6)
    assert not tied.train_head and tied.trainable_params == 4 * 100 + 10
    assert tied.backward_fraction == pytest.approx(0.4)
    assert tied.step_flops_fraction == pytest.approx((1 + 2 * 0.4) / 3)
    opt_in = fk.plan(synthetic_trace(d, tied=True), policy="fixed", n_frozen=6, train_head=True)
    assert opt_in.train_head and opt_in.trainable_params == 4 * 100 + 10 + 500 and opt_in.notes
    untied = fk.plan(synthetic_trace(d), policy="none")
    assert untied.boundary == 0 and untied.train_head and untied.backward_fraction == 1.0


def test_other_policies_and_errors():
    t = synthetic_trace(smooth(10))
    assert fk.plan(t, policy="fraction", fraction=0.5).boundary == 5
    with pytest.raises(ValueError, match="n_frozen"):
        fk.plan(t, policy="fixed")
    with pytest.raises(ValueError, match="outside"):
        fk.plan(t, policy="fixed", n_frozen=11)
    with pytest.raises(ValueError, match="policy must be"):
        fk.plan(t, policy="greedy")
    summary = {k: getattr(t, k) for k in ("num_layers", "parameter_counts", "fingerprint", "tied", "model_id")}
    assert fk.plan(summary, policy="fixed", n_frozen=3).boundary == 3
    with pytest.raises(ValueError, match="needs a DeviationTrace"):
        fk.plan(summary)


def test_plan_json_round_trip_and_str(tmp_path):
    p = fk.plan(synthetic_trace(smooth(12)))
    path = tmp_path / "plan.json"
    p.save(path)
    again = fk.FreezePlan.load(path)
    assert again == p and again.gains[0] is None
    text = str(p)
    assert f"blocks 1..{p.boundary} of 12" in text and "step FLOPs" in text
