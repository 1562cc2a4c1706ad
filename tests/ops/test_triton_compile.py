"""The Triton kernels compile for sm_80 (A100) and sm_90 (H100) without a GPU.

CI runs the kernels only under the interpreter, which neither lowers them nor
checks dtype rules the way the GPU compiler does. Here the kernel variants
listed in ``triton_aot.py`` (each norm kind, dtype, single and looped D, and
every autotune config of the logit-lens kernel) are compiled ahead of time
to PTX and cubin, in a process without TRITON_INTERPRET, and the logit-lens
kernel must run its matmul on tensor cores (mma / wgmma) for every dtype,
fp32 as 3xTF32; so must the fused linear cross-entropy's kernels.
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
    assert {r["kernel"] for r in reports} == {"row", "lens", "lce_forward", "lce_backward"}


def test_logit_lens_matmul_uses_tensor_cores(compiled):
    arch, reports = compiled
    lens = [r for r in reports if r["kernel"] == "lens" and "error" not in r]
    assert lens
    single = [r for r in lens if r["precision"] == "tf32" and r["x"] == "fp32"]
    assert len(single) == 1
    tiles = ("BLOCK_N", "BLOCK_V", "BLOCK_D")
    triple = [r for r in lens if r["precision"] == "tf32x3" and r["w"] == "fp32"
              and all(r[t] == single[0][t] for t in tiles)]
    assert triple and triple[0]["mma_count"] >= 2 * single[0]["mma_count"], (
        f"fp32 is not 3xTF32 on sm_{arch}: {triple[0]['mma_count']} tensor-core instructions "
        f"vs {single[0]['mma_count']} for single-pass TF32")
    for report in lens:
        assert report["mma"], f"no tensor-core instruction on sm_{arch} for {report}"
        if report["x"] == "fp32":
            assert all(".tf32" in op for op in report["mma"]), report
        else:
            ptx_type = {"bf16": ".bf16", "fp16": ".f16"}[report["x"]]
            assert all(ptx_type in op for op in report["mma"]), report


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
