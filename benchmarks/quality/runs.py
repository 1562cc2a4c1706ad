"""The study's run records: one JSON line per finished run in OUT/runs.jsonl, keyed by what it trained."""

from __future__ import annotations

import json
from pathlib import Path

from freezekern.trials import Arm


def run_key(task: str, arm: Arm, seed: int, budget: float) -> str:
    return f"{task}|{arm.key()}|seed={seed}|budget={budget:g}"


def load_runs(path: Path) -> dict[str, dict]:
    """Key -> record of every run in ``path`` (a line cut off by an interrupted write is skipped)."""
    runs = {}
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            runs[record["key"]] = record
    return runs
