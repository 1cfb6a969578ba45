"""Read a run's metrics.jsonl (one JSON object per line), which the trainer appends to line by line.

A run killed, or a disk that filled, while a line was being appended leaves that last line cut short: it is
dropped, as the step it logs is redone on resume. An unreadable line anywhere else means the file was damaged.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError


def read_metrics(path: Path, damaged: list[int] | None = None) -> list[dict]:
    """The rows of metrics.jsonl at `path` ([] if there is none). An unreadable line before the last is refused
    with its number, or, given a `damaged` list, dropped and its number appended there (the trainer, which rewrites
    the file on resume, goes on without it)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif i == last:
            pass  # cut short by a kill while it was written: that step is redone on resume
        elif damaged is not None:
            damaged.append(i + 1)
        else:
            raise ConfigError(
                f"{path} is damaged: line {i + 1} is not a JSON object; remove that line (or restore the file) "
                "and run again"
            )
    return rows
