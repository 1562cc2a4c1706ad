"""Selection policy on synthetic traces with known answers."""

import json
import math

import numpy as np
import pytest

import freezekern as fk
from freezekern.policy.cost import StepSetup, flop_costs, step_fraction
from freezekern.policy.depth_law import fit_scaling_law, layer_gains, regime_start
from freezekern.policy.rules import FALLBACK_FROZEN_SHARE


def synthetic_trace(deviations, tied=False, block_params=100, metric="cosine"):
    num_layers = len(deviations) - 1
    counts = {"blocks": [block_params] * num_layers, "final_norm": 10, "lm_head": 0 if tied else 500,
              "lm_head_trainable": 500, "embeddings": 500,
              "total": block_params * num_layers + 10 + 500 + (0 if tied else 500)}
    return fk.DeviationTrace(metric=metric, deviations=list(deviations), sums=list(deviations), token_count=1,
                             num_layers=num_layers, model_id="synthetic", fingerprint="f" * 16, tied=tied,
                             parameter_counts=counts)


def smooth(num_layers, E=0.5, A=0.5, alpha=0.7):
    return [1.0] + [E + A * (k + 1) ** -alpha for k in range(1, num_layers + 1)]


def with_jump(num_layers, layer, size, **law):
    d = smooth(num_layers, **law)
    for k in range(layer, num_layers + 1):
        d[k] -= size
    return d


def test_fit_recovers_a_power_law():
    fit = fit_scaling_law(smooth(30, E=0.3, A=0.9, alpha=0.8))
    assert fit.E == pytest.approx(0.3, abs=2e-3) and fit.A == pytest.approx(0.9, rel=1e-2)
    assert fit.alpha == pytest.approx(0.8, rel=1e-2) and fit.sse < 1e-8


def test_the_embedding_space_is_left_out_of_the_fit():
    d = smooth(20)
    d[0] = 100.0
    assert fit_scaling_law(d).sse < 1e-8


def test_one_clear_jump_is_chosen():
    d = with_jump(30, 21, 0.2)  # layer 21 makes a move the smooth law does not explain
    p = fk.plan(synthetic_trace(d), "salf")
    assert p.boundary == 21 and p.policy == "salf" and "layer 21" in p.rule
    _, _, gains = layer_gains(d, fit_scaling_law(d))
    assert int(np.nanargmax(gains)) == 21
    assert p.trainable_blocks == list(range(22, 31))


@pytest.mark.parametrize("scale", [10.0, 40.0])
def test_an_early_transient_does_not_capture_the_rule(scale):
    """Tied, scaled input embeddings: D_1, D_2 tens of times the rest; the later jump must win."""
    rest = with_jump(18, 12, 3.0, E=3.0, A=30.0, alpha=0.4)  # D ~ 32 ... 3, one move at layer 12
    d = list(rest)
    d[0] = 527.0
    d[1] = scale * d[3]
    d[2] = 0.5 * (d[1] + d[3])
    start = regime_start(d)
    assert start >= 2
    p = fk.plan(synthetic_trace(d), "salf")
    assert p.boundary == 12, p.rule
    assert any("transient" in n for n in p.notes)
    assert p.candidates[0] > start  # the transient's layers are no candidates


@pytest.mark.parametrize("policy", ["salf", "gain_share", "reduction"])
@pytest.mark.parametrize("transform", ["scale", "shift_up", "shift_down", "both"])
def test_choice_is_invariant_under_scale_and_shift(policy, transform):
    d = np.array(with_jump(24, 15, 0.08))
    d[1:4] += np.array([3.0, 1.0, 0.3])  # a transient too, so regime detection is exercised
    changed = {"scale": 7.5 * d, "shift_up": d + 12.0, "shift_down": d - 40.0, "both": 0.01 * d - 3.0}[transform]
    a, b = fk.plan(synthetic_trace(list(d)), policy), fk.plan(synthetic_trace(list(changed)), policy)
    assert a.boundary == b.boundary and a.runner_up == b.runner_up and a.candidates == b.candidates


@pytest.mark.parametrize("policy", ["salf", "gain_share", "flops"])
def test_a_smooth_trace_gives_the_documented_fallback(policy):
    d = smooth(30)
    kwargs = {"flops_budget": 0.9} if policy == "flops" else {}
    p = fk.plan(synthetic_trace(d), policy, **kwargs)
    assert p.boundary == round(FALLBACK_FROZEN_SHARE * 30) and "fallback" in p.rule
    assert fk.plan(synthetic_trace([x * 3 + 1 for x in d]), policy, **kwargs).boundary == p.boundary
    noisy = np.array(d) + 1e-4 * np.random.default_rng(0).standard_normal(len(d))
    assert fk.plan(synthetic_trace(list(noisy)), policy, **kwargs).boundary == p.boundary


def test_ties_go_to_the_deeper_layer():
    d = [16.0] + [16.0 - k for k in range(1, 9)]  # linear: every reduction exactly equal
    p = fk.plan(synthetic_trace(d), policy="reduction")
    assert p.boundary == 8 - 1  # candidates end at L - min_trainable


def test_trained_share_and_min_trainable_bind():
    d = with_jump(30, 5, 0.3)
    assert fk.plan(synthetic_trace(d), "salf").boundary == 5
    limited = fk.plan(synthetic_trace(d), "salf", trained_share=0.2)
    assert 30 - limited.boundary <= math.ceil(0.2 * 30) and limited.trained_share == 0.2
    d2 = with_jump(30, 29, 0.5)
    assert fk.plan(synthetic_trace(d2), "salf", min_trainable=1).boundary == 29
    assert fk.plan(synthetic_trace(d2), "salf", min_trainable=4).boundary <= 26


def test_deprecated_names_still_work():
    d = with_jump(30, 5, 0.3)
    with pytest.warns(DeprecationWarning, match="trained_share"):
        old = fk.plan(synthetic_trace(d), "salf", budget=0.2)
    assert old == fk.plan(synthetic_trace(d), "salf", trained_share=0.2)
    with pytest.warns(DeprecationWarning, match="boundary"):
        assert fk.plan(synthetic_trace(d), "fixed", n_frozen=4).boundary == 4
    with pytest.warns(DeprecationWarning, match="frozen_share"):
        assert fk.plan(synthetic_trace(d), "fraction", fraction=0.5).boundary == 15
    with pytest.raises(TypeError, match="only"):
        fk.plan(synthetic_trace(d), "salf", trained_share=0.2, budget=0.2)
    with pytest.warns(DeprecationWarning):
        assert old.budget == 0.2
    saved = old.to_dict()
    saved["budget"] = saved.pop("trained_share")  # a plan written by freezekern 0.1
    assert fk.FreezePlan.from_dict(saved) == old


def test_no_candidate_is_a_clear_error():
    with pytest.raises(ValueError, match="L >= 3"):
        fk.plan(synthetic_trace(smooth(2)), "salf")
    with pytest.raises(ValueError, match="raise trained_share or lower min_trainable"):
        fk.plan(synthetic_trace(smooth(10)), "salf", trained_share=0.1, min_trainable=2)
    with pytest.raises(ValueError, match="trained_share must lie in"):
        fk.plan(synthetic_trace(smooth(10)), "salf", trained_share=1.5)
    with pytest.raises(ValueError, match="flops_budget"):
        fk.plan(synthetic_trace(smooth(10)), "flops")
    with pytest.raises(ValueError, match="cheapest candidate"):
        fk.plan(synthetic_trace(smooth(10)), "flops", flops_budget=0.05)
    with pytest.raises(ValueError, match="probe_plan"):
        fk.plan(synthetic_trace(smooth(10)), "probe")


def test_gain_share_keeps_the_moves_in_the_trained_layers():
    d = with_jump(30, 24, 0.1)
    for k in range(26, 31):
        d[k] -= 0.1  # a second move at layer 26
    p = fk.plan(synthetic_trace(d), "gain_share", gain_share=0.9)
    assert p.boundary == 23 and p.gain_share == 0.9  # trained 24..30 hold both moves
    assert fk.plan(synthetic_trace(d), "gain_share", gain_share=0.4).boundary == 25  # the upper move alone


def test_flops_budget_limits_the_candidates():
    d = with_jump(30, 8, 0.3)
    p = fk.plan(synthetic_trace(d), "flops", flops_budget=0.6)
    costs = flop_costs(synthetic_trace(d).parameter_counts)
    assert step_fraction(costs, StepSetup(p.boundary, train_head=True)) <= 0.6
    assert p.step_flops_fraction <= 0.6 and p.boundary > 8 and p.flops_budget == 0.6
    assert fk.plan(synthetic_trace(d), "flops", flops_budget=1.0).boundary == 8


def test_tied_rule_and_cost_model():
    d = smooth(10)
    tied = fk.plan(synthetic_trace(d, tied=True), policy="fixed", boundary=6)
    assert not tied.train_head and tied.trainable_params == 4 * 100 + 10
    assert tied.backward_fraction == pytest.approx(0.4)
    # 2 FLOPs per weight forward, input-gradient and weight-gradient; the head (500 weights) is read
    # forward and back-propagated through; the lowest trained block needs no input gradient
    full = 10 * 100 * 6 + 500 * 6
    cut = 10 * 100 * 2 + 500 * 2 + 500 * 2 + 4 * 100 * 2 + 3 * 100 * 2
    assert tied.step_flops_fraction == pytest.approx(cut / full)
    opt_in = fk.plan(synthetic_trace(d, tied=True), policy="fixed", boundary=6, train_head=True)
    assert opt_in.train_head and opt_in.trainable_params == 4 * 100 + 10 + 500 and opt_in.notes


def test_policy_none_is_full_finetuning():
    t = synthetic_trace(smooth(10), tied=True)
    p = fk.plan(t, policy="none")
    assert p.boundary == 0 and not p.cut and p.train_head and p.backward_fraction == 1.0
    assert p.trainable_params == p.total_params and p.step_flops_fraction == 1.0
    assert "nothing frozen" in str(p)
    zero = fk.plan(t, policy="fixed", boundary=0)
    assert zero.cut and not zero.train_head and zero.trainable_params < zero.total_params
    assert "embeddings only" in str(zero)


def test_other_policies_and_errors():
    t = synthetic_trace(smooth(10))
    assert fk.plan(t, policy="fraction", frozen_share=0.5).boundary == 5
    with pytest.raises(ValueError, match="boundary="):
        fk.plan(t, policy="fixed")
    with pytest.raises(ValueError, match="outside"):
        fk.plan(t, policy="fixed", boundary=11)
    with pytest.raises(ValueError, match="policy must be"):
        fk.plan(t, policy="greedy")
    summary = {k: getattr(t, k) for k in ("num_layers", "parameter_counts", "fingerprint", "tied", "model_id")}
    assert fk.plan(summary, policy="fixed", boundary=3).boundary == 3
    with pytest.raises(ValueError, match="needs a DeviationTrace"):
        fk.plan(summary)


def test_plan_json_round_trip_and_str(tmp_path):
    p = fk.plan(synthetic_trace(with_jump(12, 6, 0.2)), "salf")
    path = tmp_path / "plan.json"
    p.save(path)
    again = fk.FreezePlan.load(path)
    assert again == p and again.gains[0] is None
    text = str(p)
    assert f"blocks 1..{p.boundary} of 12" in text and "step FLOPs" in text
    assert f"why:    {p.rule}" in text and f"runner-up: boundary {p.runner_up}" in text
    data = json.loads(path.read_text())
    assert data["rule"] == p.rule and data["runner_up"] == p.runner_up


def test_the_default_rule_is_gain_share_everywhere():
    from freezekern.cli import build_parser
    from freezekern.integrations.hf_trainer import FreezeKernCallback

    t = synthetic_trace(with_jump(30, 24, 0.4))
    assert fk.plan(t) == fk.plan(t, "gain_share")
    assert build_parser().parse_args(["analyze"]).policy == "gain_share"
    assert FreezeKernCallback().policy == "gain_share"
