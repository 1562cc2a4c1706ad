"""benchmarks/ab_cpu_cosine.py builds kernel variants side by side and times them interleaved."""

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("ab_cpu_cosine", None)
    import ab_cpu_cosine

    return ab_cpu_cosine


def test_bad_variants_are_refused(monkeypatch, tmp_path):
    tool = _tool(monkeypatch)
    with pytest.raises(SystemExit, match="NAME=DIR"):
        tool.main(["csrc"])
    with pytest.raises(SystemExit, match="is not a csrc folder"):
        tool.main([f"a={tmp_path}"])
    with pytest.raises(SystemExit, match="letters, digits and _ only"):
        tool.main([f"a-b={ROOT / 'csrc'}"])


@pytest.mark.slow  # builds the CPU kernels twice (about a minute each on a CI core)
def test_two_variants_agree_and_are_timed(monkeypatch, capsys):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    tool = _tool(monkeypatch)
    csrc = ROOT / "csrc"
    assert tool.main([f"base={csrc}", f"pf0={csrc}:-DFK_PREFETCH_ROWS=0", "--rows", "67", "--rounds", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("N=67")]
    assert len(lines) == 4  # bf16 / fp32 x RMSNorm / LayerNorm + bias
    assert all("base=" in line and "(1.00)" in line and "pf0=" in line for line in lines)
