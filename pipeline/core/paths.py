"""Paths read from files (a manifest's layer file, a ledger's edit file): resolved inside their own directory
or refused, so a damaged or hostile file can never make the project read, overwrite or delete anything else."""

from __future__ import annotations

import os
from pathlib import Path

from rome.pipeline.errors import UserError

__all__ = ["contained"]


def contained(directory: str | Path, name: object, source: str | Path) -> Path:
    """``directory / name`` when ``name`` is a relative path that stays inside ``directory`` (after resolving
    ``..`` and symlinks); else a ``UserError`` naming ``source``, the file that held ``name``."""
    base = Path(directory).resolve()
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\x00" in name:
        raise UserError(
            f"{source} names the file {name!r}, which is not a relative path inside {directory}; "
            "the file was changed or damaged: restore it from a copy, or recompute"
        )
    path = (base / name).resolve()
    if path == base or base not in path.parents:
        raise UserError(
            f"{source} names the file {name!r}, outside {directory}; nothing was read or removed: "
            "restore it from a copy, or recompute"
        )
    return path
