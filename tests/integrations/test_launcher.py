"""Two CPU processes started by the documented launcher train the same parameters with the same boundary.

``accelerate launch --cpu`` always takes accelerate's simple launcher, which
starts one process (``--num_processes`` is ignored unless ``--mpirun_hostfile``
wraps it in mpirun); ``--multi_gpu --cpu`` is refused. The working command
on CPUs is the multi-process (torch elastic) launcher without ``--cpu``, with
``use_cpu=True`` in the script's TrainingArguments (or ACCELERATE_USE_CPU=1 in
the environment) so that accelerate picks the gloo backend:

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no train.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "ddp_trainer_script.py"


def _launch(flags, out_dir, tmp_path):
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # CPU processes even on a GPU machine
        "HF_HOME": str(tmp_path / "hf-home"),  # no `accelerate config` file of the user's in the way
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    command = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), str(out_dir)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return sorted(out_dir.glob("rank*.json"))


def test_two_cpu_processes_agree_on_the_boundary_and_train_the_same_parameters(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    files = _launch(["--multi_gpu", "--num_processes", "2", "--main_process_port", "0"], out, tmp_path)
    records = [json.loads(f.read_text()) for f in files]
    assert [r["rank"] for r in records] == [0, 1]
    for r in records:
        assert r["world_size"] == 2 and r["backend"] == "gloo" and r["distributed_type"] == "MULTI_CPU"
        assert r["profile_rank"] == r["rank"]
    first, second = records
    assert 2 <= first["boundary"] <= 5 and first["boundary"] == second["boundary"]
    assert first["trace_tokens"] == second["trace_tokens"]  # the merged trace of both ranks' data
    assert first["trainable"] == second["trainable"]
    assert not any(n.startswith("model.layers.0.") for n in first["trainable"])
    assert first["trained_digest"] == second["trained_digest"]  # DDP kept the replicas equal
    assert first["profile_lowest_reached"] == first["boundary"] + 1  # the cut held on every rank
    assert (out / "backward_profile.rank0.json").is_file() and (out / "backward_profile.rank1.json").is_file()


def test_accelerate_cpu_flag_starts_one_process(tmp_path):
    """The trial's command: ``--cpu`` takes the simple launcher, one process, no DDP."""
    out = tmp_path / "cpu"
    out.mkdir()
    files = _launch(["--cpu", "--num_processes", "2"], out, tmp_path)
    records = [json.loads(f.read_text()) for f in files]
    assert len(records) == 1 and records[0]["world_size"] == 1 and records[0]["local_rank"] is None
