"""The quality study's quick mode runs end to end, resumes, and rebuilds its report, so the full study cannot rot."""

import json
import sys
from pathlib import Path

import pytest

STUDY_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "quality"


@pytest.mark.slow
def test_quick_study_writes_results_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("yaml")
    pytest.importorskip("chatterbot_corpus")
    monkeypatch.syspath_prepend(str(STUDY_DIR))
    for name in ("study", "report", "runs", "tasks"):
        sys.modules.pop(name, None)
    import study

    assert study.main(["--quick", "--out", str(tmp_path)]) == 0
    tasks = {"code", "chat", "classify"}
    assert {json.loads((tmp_path / f"study_{t}.json").read_text())["task"] for t in tasks} == tasks
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    finals = [r for r in runs if r["stage"] == "final"]
    assert finals and all(r["rows"] and r["rows"][-1]["flops"] <= 4.0 + 1e-9 for r in finals)
    assert all("test_loss" in row and "validation_loss" in row for r in finals for row in r["rows"])
    assert all("test_accuracy" in r["rows"][-1] for r in finals if r["task"] == "classify")
    assert {r["stage"] for r in runs} == {"grid", "final"}
    report = (tmp_path / "results.md").read_text()
    assert "## The default policy, chosen on validation data" in report and "| salf/cosine |" in report
    assert "Pareto front" in report and "## Acceptance" in report
    for task in tasks:
        assert (tmp_path / f"{task}_compute.png").read_bytes()[:4] == b"\x89PNG"
    plans = json.loads((tmp_path / "plans_code.json").read_text())
    assert plans["plans"]["probe"]["probe"]["rows"] and len(plans["stability"]["salf/cosine"]) == 3
    # a second run resumes: every run is recorded already, nothing is trained again
    assert study.main(["--quick", "--out", str(tmp_path)]) == 0
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(runs)
    (tmp_path / "results.md").unlink()
    assert study.main(["--out", str(tmp_path), "--report-only"]) == 0
    assert (tmp_path / "results.md").read_text() == report


def test_speeches_split_rule_keeps_each_speaker_in_one_split(monkeypatch):
    monkeypatch.syspath_prepend(str(STUDY_DIR))
    sys.modules.pop("tasks", None)
    import tasks

    speakers = [f"SPEAKER {i}" for i in range(181)] + [""]
    splits = tasks.split_speakers(speakers)
    assert [len(splits[n]) for n in ("test", "validation", "calibration")] == [27, 27, 18]
    assert sorted(s for names in splits.values() for s in names) == sorted(speakers)  # each exactly once
    assert splits == tasks.split_speakers(list(reversed(speakers)))  # the input order does not matter
    with pytest.raises(RuntimeError, match="none for training"):
        tasks.split_speakers(["a", "b", "c"])
