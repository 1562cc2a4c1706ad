"""The study's run records: one JSON line per finished run in OUT/runs.jsonl, keyed by what it trained."""

from __future__ import annotations

import hashlib
import json
import os
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


def _claim_path(out: Path, key: str) -> Path:
    return Path(out) / ".claims" / (hashlib.sha1(key.encode()).hexdigest() + ".pid")


def claim(out: Path, key: str) -> bool:
    """Reserve the run ``key`` for this process (an exclusively created file holding its pid).

    False when a live process holds it; a claim left by a process that died is taken over.
    """
    path = _claim_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pid = _holder(path)
        if not pid or _alive(pid):  # None: unreadable; 0: the owner has created the file, not yet written its pid
            return False
        path.unlink(missing_ok=True)
        return claim(out, key)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def claimed_by(out: Path, key: str) -> int | None:
    """The pid of the live process that holds the run ``key``, or None: unclaimed, its owner died, or a claim
    so fresh that its owner has not yet written its pid (which ``claim`` still treats as held)."""
    pid = _holder(_claim_path(out, key))
    return pid if pid and _alive(pid) else None


def _holder(path: Path) -> int | None:
    """The pid written in the claim file ``path`` (0: created, not yet written), or None where unreadable."""
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return None


def release(out: Path, key: str) -> None:
    _claim_path(out, key).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
