"""The command line on a tiny saved model, and its error messages."""

import json

import pytest
import torch

import freezekern as fk
from freezekern.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {chr(i): i - 30 for i in range(32, 127)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    model = fk.tiny_model("llama", num_layers=5, vocab=len(vocab))
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
    assert "<- boundary" in printed and "FreezePlan[salf/logit_lens]" in printed
    plan = fk.FreezePlan.load(out / "plan.json")
    trace = fk.DeviationTrace.load(out / "trace.json")
    assert plan.num_layers == 5 and 2 <= plan.boundary <= 4 and trace.token_count > 0
    assert (out / "trace.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "plan.json").read_text())["policy"] == "salf"


@pytest.mark.parametrize("argv,message", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--budget", "1.5"], "--budget must lie in (0, 1]"),
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
    for suite in suites:
        assert f"{suite}::" in listed, f"{suite} is not collected"
    assert main(["bench", "bench_trace.py::test_plain_forward", "--list"]) == 0
    assert "bench_trace.py::test_plain_forward" in capfd.readouterr().out
    assert main(["bench", "bench_nothing.py"]) == 2
    assert "no benchmark suite 'bench_nothing.py'" in capfd.readouterr().err


def test_tiny_dir_loads_like_a_user_model(tiny_dir):
    model, tokenizer = fk.load_model(tiny_dir)
    assert tokenizer("ab")["input_ids"] == [ord("a") - 30, ord("b") - 30]
    assert isinstance(model, torch.nn.Module) and not model.training


def test_finetune_trains_above_the_boundary_and_resumes(tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(200)))
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(tiny_dir), "--data", str(corpus), "--steps", "3", "--tokens", "256",
            "--seq-len", "32", "--eval-tokens", "128", "--out", str(out), "--lr", "1e-3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "FreezePlan[salf/cosine]" in printed
    plan = fk.FreezePlan.load(out / "freezekern_plan.json")
    assert plan.num_layers == 5 and (out / "trace.json").is_file()
    report = json.loads((out / "report.json").read_text())["freezekern"]
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert report["trainable_params"] < sum(p.numel() for p in fk.load_model(tiny_dir)[0].parameters())
    assert main(args) == 0  # a second run finds the finished work instead of training again
    again = json.loads((out / "report.json").read_text())
    assert again["resume"]["resumed"] and again["freezekern"]["steps_run"] == 0
