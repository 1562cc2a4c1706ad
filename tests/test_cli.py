"""The command line on a tiny saved model, and its error messages."""

import json

import pytest
import torch

import freezekern as fk
from freezekern.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, char_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = char_tokenizer()
    model = fk.tiny_model("llama", num_layers=5, vocab=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("def add(a, b):\n    return a + b\n" * 40)
    return path


def test_analyze_writes_plan_trace_and_plot(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["analyze", "--model", str(tiny_dir), "--data", str(text_file), "--tokens", "256",
                 "--seq-len", "32", "--out", str(out), "--metric", "logit_lens"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "<- boundary" in printed and "FreezePlan[gain_share/logit_lens]" in printed
    plan = fk.FreezePlan.load(out / "plan.json")
    trace = fk.DeviationTrace.load(out / "trace.json")
    assert plan.num_layers == 5 and 2 <= plan.boundary <= 4 and trace.token_count > 0
    assert (out / "trace.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "plan.json").read_text())["policy"] == "gain_share"


@pytest.mark.parametrize("argv,message", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--trained-share", "1.5"], "--trained-share must lie in (0, 1]"),
    (["--budget", "1.5"], "--trained-share must lie in (0, 1]"),
    (["--seq-len", "100000"], "exceeds the model's context"),
    (["--data", "/nonexistent.txt"], "data path /nonexistent.txt does not exist"),
])
def test_analyze_bad_input(tiny_dir, tmp_path, capsys, argv, message):
    args = ["analyze", "--out", str(tmp_path / "out"), "--tokens", "64", "--seq-len", "16"]
    if "--model" not in argv:
        args += ["--model", str(tiny_dir)]
    code = main(args + argv)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "plan.json").exists()


def test_analyze_data_with_too_few_tokens_and_model_dir_without_config(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["analyze", "--model", str(tiny_dir), "--data", str(empty), "--seq-len", "16",
                 "--out", str(tmp_path / "o")]) == 2
    assert "no full sequence" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    assert main(["analyze", "--model", str(bare), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_env_lists_versions_and_kernels(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "auto cosine_deviation on cpu" in out and "native extension" in out


def test_bench_finds_every_suite(capfd):
    """`freezekern bench` (no suite) collects the bench_*.py files, not just test_*.py."""
    import importlib.util
    from pathlib import Path

    assert main(["bench", "--list"]) == 0
    listed = capfd.readouterr().out
    suites = sorted(p.name for p in (Path(__file__).resolve().parent.parent / "benchmarks").glob("bench_*.py"))
    assert len(suites) >= 5
    if importlib.util.find_spec("triton") is None:  # that suite skips itself at import without triton
        suites.remove("bench_triton_gpu.py")
    if importlib.util.find_spec("cut_cross_entropy") is None:  # skips itself when the comparison is not installed
        suites.remove("bench_lce_vs_cce.py")
    for suite in suites:
        assert f"{suite}::" in listed, f"{suite} is not collected"
    assert main(["bench", "bench_trace.py::test_plain_forward", "--list"]) == 0
    assert "bench_trace.py::test_plain_forward" in capfd.readouterr().out
    assert main(["bench", "bench_nothing.py"]) == 2
    assert "no benchmark suite 'bench_nothing.py'" in capfd.readouterr().err


def test_bench_from_an_installed_package_says_where_the_suites_live(tmp_path, monkeypatch, capfd):
    from pathlib import Path

    import freezekern.cli.commands as cli

    checkout = Path(__file__).resolve().parent.parent / "benchmarks"
    installed = tmp_path / "site-packages" / "freezekern" / "cli" / "commands.py"  # no benchmarks/ beside it
    monkeypatch.setattr(cli, "__file__", str(installed))
    monkeypatch.delenv("FREEZEKERN_BENCHMARKS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--list"]) == 2
    err = capfd.readouterr().err
    assert "not part of the installed package" in err and "benchmarks/ folder" in err and "--dir" in err
    assert main(["bench", "--dir", str(checkout), "bench_trace.py::test_plain_forward", "--list"]) == 0
    assert "bench_trace.py::test_plain_forward" in capfd.readouterr().out
    monkeypatch.setenv("FREEZEKERN_BENCHMARKS", str(checkout))
    assert cli.benchmarks_root(None) == checkout


def test_tiny_dir_loads_like_a_user_model(tiny_dir):
    model, tokenizer = fk.load_model(tiny_dir)
    assert tokenizer("ab")["input_ids"] == [ord("a") - 30, ord("b") - 30]
    assert isinstance(model, torch.nn.Module) and not model.training


def test_finetune_trains_above_the_boundary_and_resumes(tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(200)))
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(tiny_dir), "--data", str(corpus), "--steps", "3", "--tokens", "256",
            "--seq-len", "32", "--eval-tokens", "128", "--out", str(out), "--lr", "1e-3", "--static"]
    assert main(args) == 0  # --static: the traced boundary, although the default trains a run this short in full
    printed = capsys.readouterr().out
    assert "FreezePlan[gain_share/cosine]" in printed
    plan = fk.FreezePlan.load(out / "freezekern_plan.json")
    assert plan.num_layers == 5 and (out / "trace.json").is_file()
    report = json.loads((out / "report.json").read_text())["freezekern"]
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert report["trainable_params"] < sum(p.numel() for p in fk.load_model(tiny_dir)[0].parameters())
    assert main(args) == 0  # a second run finds the finished work instead of training again
    again = json.loads((out / "report.json").read_text())
    assert again["resume"]["resumed"] and again["freezekern"]["steps_run"] == 0


@pytest.fixture()
def no_model_load(monkeypatch):
    """Any attempt to load a model fails the test: the error must come before that."""
    import freezekern.cli.commands as cli

    def refuse(args):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(cli, "_load", refuse)


@pytest.mark.parametrize("command", ["analyze", "finetune", "compare"])
def test_bad_output_paths_are_refused_before_loading(command, tmp_path, capsys, no_model_load, text_file):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out, message in ((a_file, "exists and is not a folder"), (a_file / "sub", "cannot be created")):
        assert main([command, "--data", str(text_file), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--lr", "nan"], "--lr must be a number > 0"),
    (["finetune", "--lr", "0"], "--lr must be a number > 0"),
    (["finetune", "--lr=-1e-4"], "--lr must be a number > 0"),
    (["finetune", "--steps", "0"], "--steps must be an integer > 0"),
    (["compare", "--budget-steps", "0"], "--budget-steps must be a number > 0"),
    (["compare", "--boundaries", "3,x"], "--boundaries takes"),
    (["analyze", "--policy", "fixed"], "--policy fixed needs --freeze K"),
    (["analyze", "--freeze", "3"], "--freeze K goes with --policy fixed"),
    (["analyze", "--tokens", "0"], "--tokens must be an integer > 0"),
    (["analyze", "--data", "/dev/urandom"], "neither a regular file nor a folder"),
    (["finetune", "--moving", "--policy", "none"], "--moving needs a boundary to move towards"),
])
def test_bad_values_are_refused_before_loading(argv, message, tmp_path, capsys, no_model_load):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", ["noise.txt", "noise.bin"])
def test_binary_data_is_refused_naming_the_file(name, tmp_path, capsys, no_model_load):
    import os

    noise = tmp_path / name
    noise.write_bytes(os.urandom(1 << 16))
    assert main(["analyze", "--data", str(noise), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(noise) in err and "not" in err and "text" in err
    latin = tmp_path / "latin.txt"
    latin.write_bytes(bytes(range(128, 256)) * 64)  # no NUL, but nothing decodes as UTF-8
    assert main(["analyze", "--data", str(latin), "--out", str(tmp_path / "o")]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_internal_errors_point_to_the_traceback(tiny_dir, text_file, tmp_path, capsys, monkeypatch):
    import freezekern

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(freezekern, "analyze", broken)
    assert main(["analyze", "--model", str(tiny_dir), "--data", str(text_file), "--seq-len", "16",
                 "--tokens", "64", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "internal error (RuntimeError): something inside broke" in err and "-v" in err
    with pytest.raises(RuntimeError, match="inside broke"):
        main(["-v", "analyze", "--model", str(tiny_dir), "--data", str(text_file), "--seq-len", "16",
              "--tokens", "64", "--out", str(tmp_path / "o")])


def test_analyze_json_path_flags_and_few_counted_tokens(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default plot lands in ./freezekern-out: this test's folder, not the caller's
    records = tmp_path / "pairs.jsonl"
    records.write_text("".join(json.dumps({"prompt": "q" * 12, "completion": "ab"}) + "\n" for _ in range(30)))
    target = tmp_path / "explanation.json"
    code = main(["analyze", "--model", str(tiny_dir), "--data", str(records), "--tokens", "512", "--seq-len", "16",
                 "--json", str(target), "--plot", str(tmp_path / "p.png"), "--policy", "fixed", "--freeze", "2",
                 "--train-head", "--no-train-final-norm"])
    assert code == 0
    captured = capsys.readouterr()
    assert "only completion tokens count" in captured.err
    assert target.is_file() and (tmp_path / "explanation.trace.json").is_file()
    assert not list(tmp_path.glob("extrace*"))
    plan = fk.FreezePlan.load(target)
    assert plan.train_head and not plan.train_final_norm and plan.boundary == 2
    assert main(["analyze", "--model", str(tiny_dir), "--data", str(records), "--tokens", "64", "--seq-len", "16",
                 "--json", str(target), "--no-train-head"]) == 0
    assert not fk.FreezePlan.load(target).train_head
    assert (tmp_path / "freezekern-out" / "trace.png").is_file()


@pytest.mark.parametrize("full_up_to,default_moves", [(None, True), (None, False), (12, True)])
def test_finetune_follows_the_librarys_default_unless_told(tiny_dir, tmp_path, capsys, monkeypatch, full_up_to,
                                                           default_moves):
    """Without --moving/--static a run of 12 steps trains in full where ``FULL_UP_TO`` >= 12, else moves
    exactly where ``DEFAULT_MOVES`` says (gain_share here); --static and --moving freeze either way."""
    monkeypatch.setattr("freezekern.policy.default.FULL_UP_TO", full_up_to)
    monkeypatch.setattr("freezekern.policy.default.DEFAULT_MOVES", default_moves)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(200)))
    common = ["finetune", "--model", str(tiny_dir), "--data", str(corpus), "--steps", "12", "--tokens", "128",
              "--seq-len", "32", "--eval-tokens", "64", "--lr", "1e-3", "--policy", "fixed", "--freeze", "2"]
    assert main([*common, "--out", str(tmp_path / "fixed")]) == 0  # a boundary the user fixed stays
    assert fk.FreezePlan.load(tmp_path / "fixed" / "freezekern_plan.json").moving is None
    for flag, moves in ((None, default_moves), ("--static", False), ("--moving", True)):
        out = tmp_path / str(flag)
        argv = [*common[:-4], "--policy", "gain_share", "--out", str(out)] + ([flag] if flag else [])
        assert main(argv) == 0
        plan = fk.FreezePlan.load(out / "freezekern_plan.json")
        if flag is None and full_up_to is not None:
            assert not plan.cut and plan.run_steps == 12 and plan.rule.startswith("do not freeze"), plan.rule
            report = json.loads((out / "report.json").read_text())["freezekern"]
            assert report["trainable_params"] == sum(p.numel() for p in fk.load_model(tiny_dir)[0].parameters())
            continue
        assert plan.cut and plan.boundary > 0
        assert (plan.moving is not None) == moves, (flag, plan.rule)
    capsys.readouterr()


def test_finetune_policy_none_trains_everything_and_lora_is_seeded(tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(200)))
    common = ["finetune", "--model", str(tiny_dir), "--data", str(corpus), "--steps", "2", "--tokens", "128",
              "--seq-len", "32", "--eval-tokens", "128", "--lr", "1e-3"]
    assert main([*common, "--policy", "none", "--out", str(tmp_path / "none")]) == 0
    report = json.loads((tmp_path / "none" / "report.json").read_text())["freezekern"]
    assert report["trainable_params"] == sum(p.numel() for p in fk.load_model(tiny_dir)[0].parameters())
    capsys.readouterr()
    losses = []
    for run in ("a", "b"):
        assert main([*common, "--lora", "--out", str(tmp_path / run), "--seed", "3"]) == 0
        printed = capsys.readouterr()
        report = json.loads((tmp_path / run / "report.json").read_text())["freezekern"]
        assert f"training {report['trainable_params']:,} of" in printed.err and "LoRA adapters" in printed.err
        losses.append(report["eval_loss_after"])
    assert losses[0] == losses[1]


def test_compare_recommends_resumes_and_refuses_bad_budgets(tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(300)))
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(tiny_dir), "--data", str(corpus), "--seq-len", "32", "--tokens", "128",
            "--train-tokens", "256", "--eval-tokens", "128", "--budget-steps", "2", "--boundaries", "3,1,full",
            "--out", str(out), "--lr", "1e-3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "recommended:" in printed and "<- recommended" in printed
    result = json.loads((out / "compare.json").read_text())
    assert {r["arm"]["boundary"] for r in result["results"]} == {3, 1, None}
    assert all(r["rows"][-1]["flops"] <= 2 + 1e-9 for r in result["results"])
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert main(args) == 0
    assert "reusing 3 finished arm(s)" in capsys.readouterr().err
    assert main([*args[:-4], "--budget-steps", "0.5", "--out", str(out / "small")]) == 2
    assert "smaller than one step" in capsys.readouterr().err
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "abc"}) + "\n")
    assert main(["compare", "--model", str(tiny_dir), "--data", str(one), "--out", str(out / "x")]) == 2
    assert "too short to split" in capsys.readouterr().err
    one.write_text(json.dumps({"prompt": "abc", "completion": "d"}) + "\n")
    assert main(["compare", "--model", str(tiny_dir), "--data", str(one), "--out", str(out / "x")]) == 2
    assert "at least two are needed" in capsys.readouterr().err


def test_compare_runs_the_users_schedule_with_a_moving_arm_and_reports_compute_to_quality(tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def g{i}(y):\n    return y + {i}\n" for i in range(300)))
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(tiny_dir), "--data", str(corpus), "--seq-len", "32", "--tokens", "128",
            "--train-tokens", "256", "--eval-tokens", "128", "--budget-steps", "6", "--out", str(out),
            "--lr", "3e-3", "--policy", "fixed", "--freeze", "3", "--lr-scheduler-type", "cosine",
            "--warmup-steps", "0.1", "--weight-decay", "0.1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())
    assert result["schedule"] == {"warmup": 0.1, "decay": "cosine", "weight_decay": 0.1}
    moving = [r for r in result["results"] if r["arm"]["moving"]]
    assert len(moving) == 1 and moving[0]["arm"]["boundary"] == 3
    assert [m["to"] for m in moving[0]["moves"]] == sorted(m["to"] for m in moving[0]["moves"])
    assert moving[0]["moves"][-1]["to"] == 3
    assert "compute to reach full fine-tuning's best held-out loss" in printed
    quality = result["to_quality"]
    assert quality["reference"] == "full fine-tuning" and quality["full fine-tuning"]["share"] == pytest.approx(1.0)
    # a different schedule is a different run: nothing is reused
    assert main([*args[:-2], "--weight-decay", "0.0"]) == 0
    assert "reusing" not in capsys.readouterr().err
    assert main([*args[:-6], "--warmup-steps", "7"]) == 2  # more warmup than the budget
    assert "whole budget" in capsys.readouterr().err


def test_compute_to_reach_interpolates_between_checkpoints():
    from freezekern.trials.compare import compute_to_reach

    rows = [{"flops": 2.0, "heldout_loss": 3.0}, {"flops": 4.0, "heldout_loss": 2.0}]
    assert compute_to_reach(rows, 2.5, baseline=4.0) == pytest.approx(3.0)
    assert compute_to_reach(rows, 3.5, baseline=4.0) == pytest.approx(1.0)
    assert compute_to_reach(rows, 1.0, baseline=4.0) is None
