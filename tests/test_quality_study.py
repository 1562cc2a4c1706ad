"""The quality study's quick mode runs end to end, so the full study cannot rot."""

import json
import sys
from pathlib import Path

import pytest

STUDY_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "quality"


@pytest.mark.slow
def test_quick_study_writes_results(tmp_path, monkeypatch):
    pytest.importorskip("yaml")
    pytest.importorskip("chatterbot_corpus")
    monkeypatch.syspath_prepend(str(STUDY_DIR))
    sys.modules.pop("study", None)
    import study

    assert study.main(["--quick", "--out", str(tmp_path), "--steps", "2", "--sweep-points", "3"]) == 0
    metas = [json.loads((tmp_path / f"study_{t}.json").read_text()) for t in ("code", "chat")]
    assert [set(m["tasks"]) for m in metas] == [{"code"}, {"chat"}]
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert runs and all(r["held_out_loss"] > 0 and r["tokens_seen"] > 0 for r in runs)
    report = (tmp_path / "results.md").read_text()
    assert "**Verdict.**" in report and "| salf/cosine |" in report
    assert (tmp_path / "code_arms.png").is_file() and (tmp_path / "chat_boundary_sweep.png").is_file()
    # A second run resumes: every run is already recorded, nothing is trained again.
    assert study.main(["--quick", "--out", str(tmp_path), "--steps", "2", "--sweep-points", "3"]) == 0
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(runs)
    (tmp_path / "results.md").unlink()
    assert study.main(["--quick", "--out", str(tmp_path), "--report-only"]) == 0
    assert (tmp_path / "results.md").read_text() == report
