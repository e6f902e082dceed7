"""One rule for every output directory: the project writes only into a directory it created or one that carries
its marker (``.rome-output.json``: what wrote it, for which key). Anything else that holds files is refused in
one line, before any work, and nothing in it is touched. (A ledger's marker is its ``ledger.json``, a saved
model's its ``rome_saved_model.json``: ``pipeline/editors/ledger.py`` and ``pipeline/core/saving.py``.)"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from pathlib import Path

from rome.pipeline.core.atomic import write_json
from rome.pipeline.core.locks import LOCK_FILE
from rome.pipeline.core.saving import WRITTEN_BY, check_writable, read_marker, short_listing
from rome.pipeline.errors import UserError

__all__ = ["OUTPUT_MARKER", "claim_output_dir"]

OUTPUT_MARKER = ".rome-output.json"


def _marked(directory: Path) -> bool:
    return read_marker(directory, (OUTPUT_MARKER,)) is not None


def claim_output_dir(directory: str | os.PathLike, what: str, ours: Callable[[Path], bool] | None = None) -> Path:
    """``directory`` ready for ``what`` (e.g. ``trace.out``) to write into: made, or empty, or already marked as
    ours (``ours(directory)`` may recognise one an earlier version wrote before the marker existed); the marker
    is written. Anything else is a ``UserError`` that lists what is there."""
    path = Path(directory).expanduser()
    check_writable(path, what)
    if path.is_dir() and not _marked(path):
        entries = sorted(p.name for p in path.iterdir() if p.name not in (OUTPUT_MARKER, LOCK_FILE))
        if entries and not (ours is not None and ours(path)):
            raise UserError(
                f"{what}={directory} is not empty and was not written by this project (no {OUTPUT_MARKER}); it holds "
                f"{short_listing(entries)}. Nothing was touched: name a new or empty directory"
            )
    if not _marked(path):
        path.mkdir(parents=True, exist_ok=True)
        write_json(
            path / OUTPUT_MARKER,
            {"written_by": WRITTEN_BY, "what": what, "since": datetime.datetime.now().isoformat(timespec="seconds")},
        )
    return path
