"""freezekern.profile: where the backward of a setup goes, measured with hooks, beside freezekern's cut."""

import json
import statistics

import pytest
import torch
from torch import nn

import freezekern as fk
from freezekern.cli.commands import discover_for_command_line
from freezekern.cut import active_handle
from freezekern.policy.cost import step_cost_parts
from freezekern.profiler.part_costs import measure_part_costs
from freezekern.profiler.result import ProfileReport, cost_setups, part_costs_from_report
from freezekern.profiler.setup import describe_setup, prepare_setup
from freezekern.profiler.step_timing import analyse_timeline

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]

L = 6
K = 3



def _model(tie=True):
    model = fk.tiny_model("llama", num_layers=L, hidden=32, vocab=97, tie=tie, seed=0)
    return model


def _batches(n=2, seq=16):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 97, (2, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def _snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def _assert_restored(model, before):
    after = _snapshot(model)
    assert after.keys() == before.keys()
    for name, (value, flag) in before.items():
        assert torch.equal(after[name][0], value), name
        assert after[name][1] == flag, name
    assert all(p.grad is None for p in model.parameters())
    assert active_handle(model) is None


def _quick(model, **kwargs):
    kwargs.setdefault("steps", 2)
    kwargs.setdefault("warmup", 1)
    kwargs.setdefault("repeats", 1)
    return fk.profile(model, _batches(), progress=False, **kwargs)


# -- the timeline -------------------------------------------------------------------------------

def test_analyse_timeline_splits_forward_recompute_and_backward():
    emb, b1, b2, norm, head = 0, 1, 2, 3, 4
    events = [
        ("step_start", -1, 0.0), ("model_start", -1, 0.0),
        ("fwd_start", emb, 0.0), ("fwd_end", emb, 1.0),
        ("fwd_start", b1, 1.0), ("child_start", b1, 1.25), ("child_end", b1, 2.75), ("fwd_end", b1, 3.0),
        ("fwd_start", b2, 3.0), ("fwd_end", b2, 5.0),
        ("fwd_start", norm, 5.0), ("fwd_end", norm, 5.5),
        ("fwd_start", head, 5.5), ("fwd_end", head, 6.0), ("model_end", -1, 6.5),
        ("bwd_begin", -1, 7.0), ("loss_grad", -1, 7.0),
        ("grad_out", head, 7.5), ("grad_out", norm, 8.0), ("grad_out", b2, 8.25),
        ("child_start", b2, 8.5), ("child_start", b2, 8.5), ("child_end", b2, 8.75), ("child_end", b2, 9.0),
        ("param", b2, 9.25), ("grad_in", b2, 9.5), ("grad_out", b1, 9.5),
        ("grad_in", b1, 10.0), ("grad_out", emb, 10.0), ("bwd_end", -1, 10.5),
        ("step_end", -1, 11.0),
    ]
    t = analyse_timeline(events, 5, head)
    assert t.step_s == 11.0 and t.forward_s == 6.5 and t.backward_s == 3.5
    assert t.part_forward == [1.0, 2.0, 2.0, 0.5, 0.5]
    assert t.loss_forward_s == 0.5 and t.loss_backward_s == 0.5
    assert t.part_recompute == [0.0, 0.0, 0.5, 0.0, 0.0]  # only the outermost child call outside the forward
    # backward: from each part's output gradient to the next part's; block 2 minus its recomputation
    assert t.part_backward == [0.5, 0.5, 1.25 - 0.5, 0.25, 0.5]
    assert t.reached == [True] * 5
    assert t.input_grad == [False, True, True, False, False]


def test_analyse_timeline_sums_two_backward_passes():
    events = [("step_start", -1, 0.0)]
    for start in (1.0, 5.0):  # gradient accumulation: two forwards and two backwards in one step
        events += [("model_start", -1, start), ("fwd_start", 1, start), ("fwd_end", 1, start + 1),
                   ("model_end", -1, start + 1), ("bwd_begin", -1, start + 2), ("grad_out", 1, start + 2),
                   ("bwd_end", -1, start + 3)]
    events.append(("step_end", -1, 9.0))
    t = analyse_timeline(events, 3, None)
    assert t.part_forward[1] == 2.0 and t.part_backward[1] == 2.0 and t.backward_s == 2.0
    assert t.loss_forward_s is None and t.loss_backward_s is None


# -- profiles of real setups ----------------------------------------------------------------------

def _profiled(reentrant):
    model = prepare_setup(_model(), boundary=K, gradient_checkpointing=True, reentrant=reentrant)
    before = _snapshot(model)
    return model, before, _quick(model)


@pytest.fixture(scope="module")
def gc_profiled():
    """Plain freezing of blocks 1..K under non-reentrant checkpointing, profiled once for several tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _profiled(False)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_plain_freezing_under_checkpointing_reaches_block_1_and_the_cut_stops(reentrant, gc_profiled):
    model, before, report = gc_profiled if not reentrant else _profiled(True)
    _assert_restored(model, before)
    yours, cut = report.yours, report.freezekern
    assert report.boundary == K and report.checkpointing == ("reentrant" if reentrant else "non-reentrant")
    assert yours.lowest_reached == 0 and yours.blocks_reached == L and yours.backward_floor == 0
    assert yours.lowest_trainable == K + 1 and yours.blocks_trained == L - K
    assert cut.lowest_reached == K + 1 and cut.blocks_reached == L - K
    blocks = slice(1, L + 1)
    assert [r.reached for r in yours.parts[blocks]] == [True] * L
    assert [r.reached for r in cut.parts[blocks]] == [False] * K + [True] * (L - K)
    # recomputation happens exactly in the checkpointed blocks the backward passes through
    assert all(r.recompute_s > 0 for r in yours.parts[blocks])
    assert all(r.recompute_s == 0 for r in cut.parts[1:K + 1])
    assert all(r.recompute_s > 0 for r in cut.parts[K + 1:L + 1])
    assert all(r.forward_s > 0 for r in cut.parts[blocks])
    assert "down to the embedding output" in report.verdict and "differentiated for nothing" in report.verdict
    assert "freezekern's cut at k=3 (backward stops at block 4)" in report.verdict
    assert len(yours.step_s) == 2 and report.memory_kind
    paired = statistics.median(c / y for c, y in zip(cut.step_s, yours.step_s))
    assert report.time_ratio == pytest.approx(paired, rel=1e-12)  # the median of each round's own two steps


def test_the_ideal_is_cost_py_over_the_measured_parts(gc_profiled):
    model, _, report = gc_profiled
    costs = part_costs_from_report(report)
    assert costs.num_layers == L
    plain, cut = cost_setups(describe_setup(model), report.yours, K)
    assert cut.cut and cut.boundary == K and cut.checkpointing and not cut.train_head
    assert not plain.cut and plain.backward_floor == 0
    assert report.ideal == step_cost_parts(costs, cut)
    assert report.yours.modeled == step_cost_parts(costs, plain)
    assert costs.block_recompute is not None and costs.block_weight_grad[:K] == (0.0,) * K
    # the cut's modeled step drops the frozen blocks' backward and recomputation: strictly cheaper
    assert report.ideal["backward"] < report.yours.modeled["backward"]
    assert report.ideal["recompute"] < report.yours.modeled["recompute"]
    assert f"{report.ideal['total']:.3f} s per step" in report.verdict


def test_plain_freezing_without_checkpointing_already_stops():
    model = prepare_setup(_model(), boundary=K)
    report = _quick(model)
    assert report.checkpointing is None
    assert report.yours.lowest_reached == K + 1 and report.freezekern.lowest_reached == K + 1
    assert report.yours.backward_floor == K + 1  # block K+1 passes no gradient to its input
    assert "already stops at the lowest trained block" in report.verdict


def test_peft_lora_with_checkpointing():
    pytest.importorskip("peft")
    model = prepare_setup(_model(), boundary=K, lora=True, lora_r=4, gradient_checkpointing=True)
    assert type(model).__module__.startswith("peft")
    before = _snapshot(model)
    report = _quick(model)
    _assert_restored(model, before)
    assert report.lora and report.yours.lowest_reached == 0
    assert report.freezekern.lowest_reached == K + 1
    trained = [r.name for r in report.yours.parts if r.trainable]
    assert trained == [f"block {i}" for i in range(K + 1, L + 1)]  # the adapters; head and norm frozen by PEFT


def test_trained_embeddings_pull_the_backward_down_and_are_noted():
    model = _model(tie=False)
    for name, p in model.named_parameters():  # LISA-style: embeddings, top blocks and head train
        p.requires_grad_(name.startswith("model.embed_tokens") or name.startswith("lm_head")
                         or any(name.startswith(f"model.layers.{i}.") for i in range(K, L)))
    report = _quick(model)
    assert report.yours.lowest_trainable == 0 and report.yours.lowest_reached == 0
    assert report.yours.parts[0].reached and report.yours.parts[0].trainable
    assert report.freezekern.lowest_reached == K + 1
    assert any("trains the input embedding" in note for note in report.notes)


def test_full_fine_tuning_of_a_tied_model():
    model = _model(tie=True)  # everything trains, the input embedding and the head are one matrix
    report = _quick(model)
    assert report.boundary == 0 and report.tied
    assert report.yours.lowest_trainable == 0 and report.yours.lowest_reached == 0
    assert report.freezekern.lowest_reached == 1  # the cut at 0: the lookup runs graph-free
    assert report.freezekern.parts[-1].trainable  # the tied head still trains, through its output use
    assert any("tied input/output embedding" in note for note in report.notes)
    assert any("trains the input embedding" in note for note in report.notes)


def test_report_round_trips_through_json(tmp_path, gc_profiled):
    from freezekern.profiler.report import plot_profile, profile_table

    report = gc_profiled[2]
    path = tmp_path / "profile.json"
    report.save(path)
    again = ProfileReport.load(path)
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(report.to_dict(), sort_keys=True)
    assert again.yours.parts[4].name == "block 4" and again.freezekern.lowest_reached == K + 1
    table = profile_table(again)
    assert "block 6" in table and "reached*" in table and again.verdict in table
    assert plot_profile(again, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_without_comparison_the_missing_parts_come_from_isolated_timing():
    model = prepare_setup(_model(), boundary=K, gradient_checkpointing=True)
    alone = _quick(model, compare=False)
    assert alone.freezekern is None and alone.time_ratio is None and alone.isolated_part_costs is None
    assert any("counted as zero" in note for note in alone.notes)  # the cut's weight-only block K+1
    priced = _quick(model, compare=False, isolated_parts=True)
    isolated = part_costs_from_report(priced, isolated=True)
    assert isolated is not None and any("priced from isolated timings" in note for note in priced.notes)
    assert part_costs_from_report(priced).block_weight_grad[K] == isolated.block_weight_grad[K]


def test_part_costs_follow_the_trainable_parameters():
    model = prepare_setup(_model(), boundary=K)
    costs = measure_part_costs(model, _batches()[0], repeats=1)
    assert costs.num_layers == L
    assert costs.block_weight_grad[:K] == (0.0,) * K  # frozen blocks have no weight gradient to price
    assert all(w > 0 for w in costs.block_weight_grad[K:])
    assert all(f > 0 for f in costs.block_forward) and all(g > 0 for g in costs.block_input_grad[:K])
    assert all(g >= 0 for g in costs.block_input_grad)  # trained blocks: both - weights, clamped (timing noise)
    assert costs.head_weight_grad == 0.0 and costs.head_forward > 0 and costs.head_input_grad > 0  # tied: frozen
    assert costs.embedding_grad == 0.0 and costs.loss > 0 and costs.loss_backward > 0
    assert all(p.grad is None for p in model.parameters())


def test_part_costs_without_checkpointing_in_isolation():
    model = prepare_setup(_model(), boundary=K, gradient_checkpointing=True)
    blocks = fk.discover(model).blocks
    measure_part_costs(model, _batches()[0], repeats=1)
    assert all(b.gradient_checkpointing for b in blocks)  # switched off for the isolated timing only


# -- bad input --------------------------------------------------------------------------------

class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


def test_bad_input_is_refused_before_any_step():
    model = prepare_setup(_model(), boundary=K)
    with pytest.raises(ValueError, match="steps must be at least 2"):
        fk.profile(model, _batches(), steps=1)
    with fk.apply(model, K):
        with pytest.raises(ValueError, match="already applied"):
            fk.profile(model, _batches())
        with pytest.raises(ValueError, match="runs graph-free"):
            measure_part_costs(model, _batches()[0])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        fk.profile(model, _batches())
    with pytest.raises(ValueError, match="boundary 9 is outside"):
        fk.profile(_model(), _batches(), boundary=9)
    with pytest.raises(ValueError, match="pass layers="):
        fk.profile(_NoBlocks(), _batches())
    with pytest.raises(ValueError, match="--layers PATH"):
        discover_for_command_line(_NoBlocks(), None)


# -- command line -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, char_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama-profile")
    tokenizer = char_tokenizer()
    fk.tiny_model("llama", num_layers=L, hidden=32, vocab=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_profile_writes_table_json_and_png(tiny_dir, tmp_path, capsys):
    from freezekern.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 60)
    out = tmp_path / "prof"
    code = main(["profile", "--model", str(tiny_dir), "--data", str(corpus), "--seq-len", "16", "--batch-size", "2",
                 "--gradient-checkpointing", "--freeze", str(K), "--steps", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "your backward runs through 6 blocks (down to the embedding output)" in printed
    assert "backward stops at block 4" in printed
    report = ProfileReport.load(out / "profile.json")
    assert report.yours.lowest_reached == 0 and report.freezekern.lowest_reached == K + 1
    assert (out / "profile.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,message", [
    (["--steps", "1"], "--steps must be at least 2"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--plan", "/nonexistent/plan.json"], "plan file /nonexistent/plan.json does not exist"),
    (["--freeze", "-2"], "--freeze must be >= 0"),
    (["--threads", "0"], "--threads must be positive"),
])
def test_cli_profile_refuses_bad_arguments_before_loading(monkeypatch, tmp_path, capsys, argv, message):
    import freezekern.cli as cli
    import freezekern.cli.commands as commands

    def no_load(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(commands, "_load", no_load)
    assert cli.main(["profile", "--out", str(tmp_path / "o")] + argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_profile_refuses_a_boundary_beyond_the_model(tiny_dir, tmp_path, capsys):
    from freezekern.cli import main

    assert main(["profile", "--model", str(tiny_dir), "--freeze", "7", "--out", str(tmp_path / "o")]) == 2
    assert "--freeze 7 exceeds the model's 6 blocks" in capsys.readouterr().err
