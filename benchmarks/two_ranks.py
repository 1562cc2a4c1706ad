"""What the two-rank benchmarks share: their model and batch, and launching a worker on 2 CPU ranks.

Used by ``bench_distributed.py`` and ``bench_zero_pins.py`` (imported by name:
pytest and torchrun both put this folder on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def model_and_batch(model_name: str):
    """``("tiny")``: a 12-block tiny llama (hidden 128, vocab 2048, tied) and one batch of 2 x 128 random
    tokens; ``("smollm2")``: the default SmolLM2-135M and one batch of 2 x 256 tokens of its built-in text.
    Returns ``(model, batch)``: ``batch`` holds int64 ``input_ids``, ``attention_mask``, ``labels``."""
    if model_name == "tiny":
        from freezekern import tiny_model

        model = tiny_model("llama", num_layers=12, hidden=128, vocab=2048, tie=True, seed=0)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 2048, (2, 128), generator=gen)
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    from freezekern import load_default_model, make_batches

    model, tokenizer = load_default_model()
    return model, make_batches(tokenizer, seq_len=256, num_tokens=2 * 256, batch_size=2)[0]


def launch(script: str, args: list, out: Path) -> list[dict]:
    """Run ``script args... out`` under ``torchrun --standalone --nproc_per_node 2`` on the CPU (gloo, one
    thread per rank, DeepSpeed's CPU accelerator); each rank writes ``{out}.rank{r}.json``. Returns both
    ranks' records."""
    env = dict(os.environ)
    env.update({"PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
                "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",
                "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               script, *map(str, args), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
