"""Engines on 2 CPU processes (torchrun, gloo): DDP, DeepSpeed ZeRO-1/2/3 through the Trainer, FSDP2 with fully_shard.

Each launch runs several cases (tests/integrations/engine_trainer_script.py, tests/integrations/fsdp2_script.py) and every rank writes
what it saw; the checks here: no autograd graph through a frozen block (and, under FSDP2, no all-gather of a
frozen block in backward), frozen weights bitwise unchanged, trained weights equal to a single-process
reference within 1e-4, for the callback's defaults, a given plan, a moved boundary and the fused loss.
DeepSpeed runs with DS_ACCELERATOR=cpu and gloo collectives (no C++ build at launch); any op it does build
is cached in .cache/torch_extensions inside the checkout.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from freezekern.policy.default import default_rule

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent
TOLERANCE = 1e-4

pytestmark = pytest.mark.slow


def _launch(script, args, tmp_path):
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TESTS / script), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _records(tmp_path, name):
    ranks = [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in range(2)]
    for records in ranks:
        for record in records:
            assert "error" not in record, record["error"]
    return [{r["case"]: r for r in records} for records in ranks]


def _check_trained(record, boundary=None, first_boundary=None):
    """``first_boundary``: the boundary the run started with when it moved since."""
    if boundary is not None:
        assert record["boundary"] == boundary
    assert record["frozen_bitwise_unchanged"], record
    assert record["trained_changed"], record
    assert record["max_diff"] <= TOLERANCE, record
    lowest_cut = record["boundary"] if first_boundary is None else first_boundary
    assert min(record["graph_blocks"]) >= lowest_cut, record  # no autograd graph through a frozen block


def _trainer_engine(engine, tmp_path):
    _launch("engine_trainer_script.py", [engine, str(tmp_path)], tmp_path)
    ranks = _records(tmp_path, engine)
    for case in ranks[0]:
        if "boundary" in ranks[0][case]:
            assert ranks[0][case]["boundary"] == ranks[1][case]["boundary"], case  # every rank the same cut
    for cases in ranks:
        for case in ("defaults", "plan", "fused", "moved"):
            assert cases[case]["applied_at_init"], case  # decided before the engine built its optimizer
        defaults = cases["defaults"]
        assert 1 <= defaults["boundary"] <= 5
        _check_trained(defaults)
        assert min(defaults["graph_blocks"]) == defaults["boundary"]
        library = cases["library"]  # FreezeKernCallback() on a 3-step run: the library's default, decided at init
        assert library["applied_at_init"], library
        if default_rule("gain_share", 3, engine_builds_once=engine.startswith("zero")) == "none":
            assert not library["plan_cut"] and library["boundary"] == 0, library
            assert library["never_trained"] == [] and library["trained_changed"], library
            assert library["max_diff"] <= TOLERANCE, library
        else:
            assert library["plan_cut"], library
            _check_trained(library, first_boundary=0)
        _check_trained(cases["plan"], boundary=3)
        assert cases["plan"]["graph_blocks"] == [3, 4, 5]
        fused = cases["fused"]
        _check_trained(fused)
        assert fused["fused_calls"] == 3 and "lm_head.weight" in fused["trained"]
    return ranks


def _check_moved(cases):
    """plan=2 moved to 4 after step 1: blocks 2 and 3 trained, then never changed again; reselect_every ran;
    the moving boundary froze block 3 after step 2 and it never changed again."""
    moved = cases["moved"]
    assert moved["moved_to"] == 4 and moved["boundary"] == 4
    _check_trained(moved, first_boundary=2)
    assert min(moved["graph_blocks"]) == 2  # blocks 2 and 3 trained before the move
    assert any(n.startswith("model.layers.2.") for n in moved["trained"])
    assert moved["moved_frozen_tensors"] > 0 and moved["moved_frozen_unchanged"], moved  # bitwise, after the move
    reselect = cases["reselect"]
    assert reselect["boundary"] >= 2
    _check_trained(reselect, first_boundary=2)
    moving = cases["moving"]  # the moving boundary (FreezeKernCallback(moving=...)): block 3 frozen after step 2
    assert moving["moves"] == [[2, 3, 4]] and moving["boundary"] == 4, moving
    _check_trained(moving, first_boundary=3)
    assert moving["moved_frozen_tensors"] > 0 and moving["moved_frozen_unchanged"], moving


def test_ddp_trainer_defaults_plan_fused_and_moved_boundary(tmp_path):
    for cases in _trainer_engine("ddp", tmp_path):
        _check_moved(cases)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_trainer_defaults_plan_fused_and_moved_boundary(tmp_path, stage):
    pytest.importorskip("deepspeed")
    ranks = _trainer_engine(f"zero{stage}", tmp_path)
    for cases in ranks:
        if stage == 3:
            assert cases["defaults"]["partitioned_at_init"]  # the trace gathered zero.Init partitions
        _check_moved(cases)
    # every newly frozen tensor is pinned by the rank(s) holding its fp32 master fragment
    assert sum(cases["moved"]["pinned_fragments"] for cases in ranks) >= ranks[0]["moved"]["moved_frozen_tensors"]
    # the Trainer's torch AdamW: every step after the move leaves every pinned element out (summed over ranks;
    # ZeRO-3 counts its padding too, none here: every tiny-model tensor splits evenly over 2 ranks)
    left_out = [sum(step) for step in zip(*(cases["moved"]["left_out"] for cases in ranks))]
    assert left_out and all(n == ranks[0]["moved"]["moved_frozen_elements"] for n in left_out), left_out


def test_fsdp2_plan_moved_boundary_defaults_fused_and_remove(tmp_path):
    _launch("fsdp2_script.py", [str(tmp_path)], tmp_path)
    for cases in _records(tmp_path, "fsdp2"):
        plan = cases["plan"]
        assert plan["gathered_step0"] == [2, 3, 4, 5] and plan["graph_step0"] == [2, 3, 4, 5]
        assert plan["moved_to"] == 4
        assert plan["gathered_after_move"] == [4, 5] and plan["graph_after_move"] == [4, 5]
        assert plan["frozen_bitwise_unchanged"] and plan["trained_changed"]
        assert plan["max_diff"] <= TOLERANCE
        assert plan["prefetch_set"] == 1 and plan["prefetch_after_remove"] == 0
        assert plan["all_trainable_after_remove"] and plan["embedding_grad_after_remove"]
        defaults = cases["defaults"]
        assert defaults["trace_diff"] <= 1e-9 and defaults["tokens"][0] == defaults["tokens"][1]
        assert defaults["parameter_counts_equal"]
        assert defaults["gathered"] == list(range(defaults["boundary"], 6))
        assert defaults["graph_blocks"] == list(range(defaults["boundary"], 6))
        assert defaults["max_diff"] <= TOLERANCE
        fused = cases["fused"]
        assert fused["fused_calls"] == 1 and fused["head_grad"] and fused["grad_names_equal"]
        assert fused["loss_diff"] <= 1e-5 and fused["grad_diff"] <= TOLERANCE
