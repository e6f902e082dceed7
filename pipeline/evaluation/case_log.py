"""Per-case results as JSON lines, one file per rank, appended line by line and fsynced.

A crash can only cut the line being written: on reopening, a rank's file is cut back to its last complete
line, and readers ignore a line that does not parse. ``finished()`` is what a rerun skips.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["CaseLog"]


class CaseLog:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self._file = None

    def path(self, rank: int) -> Path:
        return self.dir / f"cases.rank{rank}.jsonl"

    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete record of every rank's file (a cut last line is skipped)."""
        for p in sorted(self.dir.glob("cases.rank*.jsonl")):
            with open(p, encoding="utf-8") as f:
                for line in f:
                    if not line.endswith("\n"):
                        continue  # the line a crash cut
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue

    def finished(self) -> dict[tuple[int, str], dict[str, Any]]:
        """{(case index, method): record}; the first record of a pair wins."""
        out: dict[tuple[int, str], dict[str, Any]] = {}
        for r in self.records():
            out.setdefault((int(r["index"]), r["method"]), r)
        return out

    def open(self, rank: int) -> CaseLog:
        path = self.path(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            data = path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                with open(path, "rb+") as f:
                    f.truncate(keep)
        self._file = open(path, "a", encoding="utf-8")
        return self

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
