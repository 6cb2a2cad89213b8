"""Benchmarks: run from the repository root (see the README)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_report(stem: str, report: dict, markdown: str) -> None:
    """`<stem>.json` (the report) and `<stem>.md` (its table), then print the table."""
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2))
    Path(f"{stem}.md").write_text(markdown)
    print(markdown)
