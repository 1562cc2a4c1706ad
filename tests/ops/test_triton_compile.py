"""The Triton kernels compile for sm_80 (A100) and sm_90 (H100) without a GPU.

CI runs the kernels only under the interpreter, which neither lowers them nor
checks dtype rules the way the GPU compiler does. Here the kernel variants
listed in ``triton_aot.py`` (the cosine's norm kinds, dtypes, single and
looped D, and every autotune config of the fused linear cross-entropy's
forward, which is also the logit lens) are compiled ahead of time to PTX and
cubin, in a process without TRITON_INTERPRET, and the linear cross-entropy's
kernels must run their matmuls on tensor cores (mma / wgmma) for every dtype,
fp32 as 3xTF32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # about a minute per architecture on a CI core


SCRIPT = Path(__file__).with_name("triton_aot.py")


def _compile(arch: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(arch)], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, f"triton_aot.py failed:\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module", params=[80, 90], ids=lambda a: f"sm_{a}")
def compiled(request):
    reports = _compile(request.param)
    assert reports, "no kernel variant was compiled"
    return request.param, reports


def test_every_variant_compiles(compiled):
    arch, reports = compiled
    failed = [r for r in reports if "error" in r]
    assert not failed, f"{len(failed)} of {len(reports)} variants fail on sm_{arch}; first: {failed[0]}"
    assert {r["kernel"] for r in reports} == {"row", "lce_forward", "lce_backward"}


def test_forward_fp32_is_three_tf32_products(compiled):
    """The forward (the logit lens too) multiplies fp32 as 3xTF32, at least twice single TF32's mma count."""
    arch, reports = compiled
    forward = [r for r in reports if r["kernel"] == "lce_forward" and "error" not in r and not r["softcap"]]
    single = [r for r in forward if r["precision"] == "tf32" and r["x"] == "fp32"]
    assert len(single) == 1
    tiles = ("BLOCK_N", "BLOCK_V", "BLOCK_D")
    triple = [r for r in forward if r["precision"] == "tf32x3" and r["x"] == "fp32" and r["w"] == "fp32"
              and all(r[t] == single[0][t] for t in tiles)]
    assert triple and triple[0]["mma_count"] >= 2 * single[0]["mma_count"], (
        f"fp32 is not 3xTF32 on sm_{arch}: {triple[0]['mma_count']} tensor-core instructions "
        f"vs {single[0]['mma_count']} for single-pass TF32")


def test_linear_cross_entropy_matmuls_use_tensor_cores(compiled):
    arch, reports = compiled
    lce = [r for r in reports if r["kernel"].startswith("lce_") and "error" not in r]
    assert lce
    for report in lce:
        assert report["mma"], f"no tensor-core instruction on sm_{arch} for {report}"
        if report["x"] == "fp32":
            assert all(".tf32" in op for op in report["mma"]), report
        else:
            ptx_type = {"bf16": ".bf16", "fp16": ".f16"}[report["x"]]
            assert all(ptx_type in op for op in report["mma"]), report
