"""Plans exported for PEFT, axolotl, TRL and as JSON, each read back by the real library and checked against
the parameters freezekern.apply trains."""

import copy
import json
import re

import pytest
import torch

import freezekern as fk
from freezekern.cli import main
from freezekern.cut import apply, trainable_parameters
from freezekern.integrations.export import export_plan, planned_trainable_names, to_peft_config
from freezekern.integrations.peft import block_linear_names

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

L = 6
K = 3


def _model(kind="llama", tie=True):
    return fk.tiny_model(kind, num_layers=L, hidden=32, vocab=97, tie=tie, seed=0)


def _plan(model, policy="fixed", **kwargs):
    if policy == "fixed":
        kwargs.setdefault("boundary", K)
    return fk.plan(fk.discover(model).summary(), policy, **kwargs)


def _applied_names(model, plan):
    """The ground truth: what freezekern.apply leaves trainable on a fresh copy of the model."""
    model = copy.deepcopy(model)
    handle = apply(model, plan)
    trained = {id(p) for p in trainable_parameters(model)}
    handle.remove()
    return [n for n, p in model.named_parameters() if id(p) in trained]


@pytest.fixture()
def model_dir(tmp_path):
    def save(model):
        path = tmp_path / f"model-{model.config.model_type}-{model.config.tie_word_embeddings}"
        model.save_pretrained(path)
        return path

    return save


# -- PEFT -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_config_round_trips_with_adapters_in_the_trained_blocks_only(tmp_path, kind):
    peft = pytest.importorskip("peft")
    model = _model(kind)
    plan = _plan(model)
    targets = ["c_attn", "c_proj"] if kind == "gpt2" else block_linear_names(model)  # gpt2: Conv1D layers
    config = plan.to_peft_config(model=model, r=4, target_modules=targets)
    config.save_pretrained(tmp_path)
    loaded = peft.LoraConfig.from_pretrained(tmp_path)
    assert loaded.layers_to_transform == list(range(K, L))
    assert loaded.layers_pattern == fk.discover(model).blocks_path.rsplit(".", 1)[-1]
    peft_model = peft.get_peft_model(copy.deepcopy(model), loaded)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {_block_index(n, kind) for n in trainable} == set(range(K, L))
    # freezekern.apply takes it as it is: nothing in the prefix to refuse, nothing more to freeze
    handle = apply(peft_model, plan)
    assert handle.frozen_parameters() == [] and handle.frozen_adapter_names == []
    assert [n for n, p in peft_model.named_parameters() if p.requires_grad] == trainable
    handle.remove()


def _block_index(name: str, kind: str) -> int:
    marker = ".h." if kind == "gpt2" else ".layers."
    return int(name.split(marker, 1)[1].split(".", 1)[0])


def test_peft_config_of_full_fine_tuning_and_bad_plans():
    pytest.importorskip("peft")
    model = _model()
    full = _plan(model, "none")
    assert to_peft_config(full, model=model, r=4, target_modules=["q_proj"]).layers_to_transform == list(range(L))
    with pytest.raises(ValueError, match="no block left for LoRA"):
        _plan(model, boundary=L, min_trainable=0).to_peft_config(r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="comes from the plan"):
        _plan(model).to_peft_config(r=4, layers_to_transform=[1])
    with pytest.raises(ValueError, match="the plan has 6 blocks, the model 4"):
        _plan(model).to_peft_config(model=fk.tiny_model("llama", num_layers=4), r=4)


def test_cli_exports_a_peft_folder(tmp_path, model_dir):
    peft = pytest.importorskip("peft")
    model = _model()
    plan = _plan(model)
    plan.save(tmp_path / "plan.json")
    folder = model_dir(model)
    out = tmp_path / "adapter"
    assert main(["export", str(tmp_path / "plan.json"), "--format", "peft", "--model", str(folder),
                 "--out", str(out), "--lora-r", "4"]) == 0
    loaded = peft.LoraConfig.from_pretrained(out)
    assert loaded.r == 4 and loaded.lora_alpha == 8 and set(loaded.target_modules) == set(block_linear_names(model))
    peft_model = peft.get_peft_model(copy.deepcopy(model), loaded)
    assert {_block_index(n, "llama") for n, p in peft_model.named_parameters() if p.requires_grad} == set(range(K, L))


# -- axolotl ----------------------------------------------------------------------------------

def _axolotl_unfrozen(config: dict, model) -> list[str]:
    """axolotl's rule for ``unfrozen_parameters``, written out here: a '.' not followed by '+' is a literal dot,
    the pattern matches from the start of the name; no key means nothing is frozen."""
    patterns = config.get("unfrozen_parameters")
    names = [n for n, _ in model.named_parameters()]
    if patterns is None:
        return names
    compiled = []
    for pattern in patterns:
        assert not pattern.endswith("]"), "freezekern never writes index ranges"
        regex = "".join("\\." if c == "." and pattern[i + 1:i + 2] != "+" else c for i, c in enumerate(pattern))
        compiled.append(re.compile(regex))
    return [n for n in names if any(c.match(n) for c in compiled)]


@pytest.mark.parametrize("tie,train_head", [(True, None), (True, True), (False, None)],
                         ids=["tied", "tied_head_trained", "untied"])
def test_axolotl_yaml_unfreezes_exactly_the_plan(tmp_path, model_dir, tie, train_head):
    yaml = pytest.importorskip("yaml")
    model = _model(tie=tie)
    plan = _plan(model, train_head=train_head)
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "freeze.yaml"
    assert main(["export", str(tmp_path / "plan.json"), "--format", "axolotl", "--model", str(model_dir(model)),
                 "--out", str(out)]) == 0
    text = out.read_text()
    config = yaml.safe_load(text)
    assert _axolotl_unfrozen(config, model) == _applied_names(model, plan)
    assert "backward still runs" in text
    if tie and train_head:  # the shared matrix is listed under the name named_parameters() gives it
        assert "^model.embed_tokens.weight$" in config["unfrozen_parameters"]
    assert not any(p.startswith("^model.layers.(0") for p in config["unfrozen_parameters"])


def test_axolotl_yaml_of_full_fine_tuning_sets_nothing():
    yaml = pytest.importorskip("yaml")
    model = _model()
    plan = _plan(model, "none")
    config = yaml.safe_load(export_plan(plan, "axolotl", model=model)) or {}
    assert "unfrozen_parameters" not in config
    assert _axolotl_unfrozen(config, model) == [n for n, _ in model.named_parameters()]
    assert _applied_names(model, plan) == [n for n, _ in model.named_parameters()]


def test_axolotl_export_reads_the_default_model_without_weights():
    yaml = pytest.importorskip("yaml")
    from transformers import LlamaConfig

    from freezekern.integrations.export import model_skeleton, skeleton_for_plan
    from freezekern.model.loading import DEFAULT_MODEL_NAME, SMOLLM2_135M_SHAPE

    real = model_skeleton(config=LlamaConfig(**SMOLLM2_135M_SHAPE))  # names and shapes of the built-in model
    real.config._name_or_path = DEFAULT_MODEL_NAME
    plan = _plan(real, boundary=24)
    skeleton = skeleton_for_plan(plan)
    assert next(skeleton.parameters()).device.type == "meta"
    config = yaml.safe_load(export_plan(plan, "axolotl"))
    assert config["unfrozen_parameters"] == ["^model.layers.(24|25|26|27|28|29).", "^model.norm.weight$"]
    assert _axolotl_unfrozen(config, real) == planned_trainable_names(plan, real) == _applied_names(real, plan)


# -- TRL / transformers and JSON ------------------------------------------------------------------

def test_trl_snippet_builds_a_trainer_that_trains_the_plan(tmp_path, monkeypatch, char_tokenizer):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    tokenizer = char_tokenizer()
    model = fk.tiny_model("llama", num_layers=L, hidden=32, vocab=len(tokenizer), tie=False)
    plan = _plan(model)
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "train.py"
    assert main(["export", str(tmp_path / "plan.json"), "--format", "trl", "--out", str(out)]) == 0
    snippet = out.read_text()
    expected = _applied_names(model, plan)
    namespace = {
        "model": model, "tokenizer": tokenizer,
        "train_dataset": Dataset.from_dict({"text": ["def f(x): return x"] * 4}),
        "training_args": SFTConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, report_to=[], max_length=16),
    }
    exec(compile(snippet, str(out), "exec"), namespace)
    trainer = namespace["trainer"]
    assert [n for n, p in trainer.model.named_parameters() if p.requires_grad] == expected
    assert "cuts the backward at block 4" in snippet


def test_json_export_is_the_plan(tmp_path, capsys):
    model = _model()
    plan = _plan(model)
    plan.save(tmp_path / "plan.json")
    assert main(["export", str(tmp_path / "plan.json"), "--format", "json"]) == 0
    assert fk.FreezePlan.from_json(capsys.readouterr().out) == plan
    assert json.loads(export_plan(plan, "json"))["boundary"] == K


@pytest.mark.parametrize("argv,message", [
    (["/nonexistent/plan.json", "--format", "json"], "plan file /nonexistent/plan.json does not exist"),
    (["PLAN", "--format", "axolotl"], "not a local model folder: pass the model"),
    (["PLAN", "--format", "peft"], "pass --model DIR or --target-modules"),
    (["PLAN", "--format", "axolotl", "--model", "/nonexistent"], "has no config.json"),
])
def test_cli_export_bad_input(tmp_path, capsys, argv, message):
    _plan(_model()).save(tmp_path / "plan.json")
    argv = [str(tmp_path / "plan.json") if a == "PLAN" else a for a in argv]
    assert main(["export", *argv]) == 2
    assert message in capsys.readouterr().err


def test_planned_names_leave_the_models_flags_alone():
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    assert planned_trainable_names(_plan(model), model) == _applied_names(_model(), _plan(_model()))
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.is_grad_enabled()
