"""results.md of the quality study (placeholder until the v2 report lands)."""

from __future__ import annotations

from pathlib import Path


def write_report(out: Path) -> None:
    (Path(out) / "results.md").write_text("# Quality study\n\nReport pending.\n")
