"""Saving an edited model so that plain transformers loads it: ``save_pretrained`` (safetensors) and the
tokenizer, written into a temporary directory and swapped into place as a whole.

A destination is never anything this project did not write: every saved model carries ``MARKER``
(``rome_saved_model.json``: what wrote it and the files it wrote), every adapter ``ADAPTER_MARKER``
(``rome_adapter.json``, written by ``pipeline/core/adapters.py``), and a non-empty directory is replaced only
when it is such a directory holding nothing but those files. ``check_destination`` says so, and that the place
is writable, before any work is done; ``write_marked_dir`` checks again right before the swap.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rome.pipeline.core.atomic import atomic_dir, ensure_free_space, no_space
from rome.pipeline.core.loading import LoadedModel
from rome.pipeline.errors import UserError

__all__ = [
    "MARKER",
    "ADAPTER_MARKER",
    "WRITTEN_BY",
    "check_destination",
    "check_writable",
    "read_marker",
    "save_model",
    "short_listing",
    "write_marked_dir",
]

MARKER = "rome_saved_model.json"
ADAPTER_MARKER = "rome_adapter.json"  # the same rule for an adapter directory: its manifest is its marker
WRITTEN_BY = "rome-lightning"


def short_listing(names: list[str], most: int = 4) -> str:
    """The first ``most`` of ``names`` in sorted order, for an error line that says what a directory holds."""
    return ", ".join(sorted(names)[:most]) + (", ..." if len(names) > most else "")


def read_marker(
    directory: Path, names: tuple[str, ...] = (MARKER, ADAPTER_MARKER)
) -> tuple[str, dict[str, Any]] | None:
    """The first of the marker files ``names`` that ``directory`` carries and this project wrote, and its content
    (by default a saved model's or an adapter's); None if there is none."""
    for name in names:
        try:
            data = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("written_by") == WRITTEN_BY:
            return name, data
    return None


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """``path`` (a directory to be created or written into) can be made: its nearest existing ancestor is
    a directory this process can create entries in (probed with a temporary directory, removed at once)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}={path} is a file, not a directory; name a directory")
    ancestor = path
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{what}={path} is under the file {ancestor}, which is not a directory; name another place")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rome-write-check.", dir=ancestor))
    except OSError as err:
        raise UserError(
            f"{what}={path} cannot be written: {ancestor}: {err.strerror or err}; name a writable place"
        ) from None
    return path


def check_destination(
    directory: str | os.PathLike, what: str = "edit.save_to", protect: tuple[str | os.PathLike, ...] = ()
) -> Path:
    """Refuse ``directory`` unless it is new, empty, or a saved model of ours holding only its own files;
    it must be writable, and neither the current directory (or one above it) nor any path in ``protect``
    (the base model, the ledger) or one above it."""
    path = Path(directory).expanduser()
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UserError(
            f"{what}={directory} is the current directory or one above it; name a new directory for the model"
        )
    for other in protect:
        if other and (
            resolved == Path(other).expanduser().resolve() or resolved in Path(other).expanduser().resolve().parents
        ):
            raise UserError(
                f"{what}={directory} would replace {other}, which this run uses; name another directory for the model"
            )
    check_writable(path, what)
    if path.is_dir():
        entries = [p.name for p in path.iterdir()]
        if entries:
            found = read_marker(path)
            if found is None:
                raise UserError(
                    f"{what}={directory} is not empty and is not a model saved by this project (no {MARKER}); "
                    f"it holds {short_listing(entries)}. Nothing was touched: name a new or empty directory"
                )
            name, marker = found
            foreign = [n for n in entries if n not in set(marker.get("files", [])) | {name}]
            if foreign:
                raise UserError(
                    f"{what}={directory} is a model saved by this project but also holds files it did not "
                    f"write ({short_listing(foreign)}); move them out or name another directory"
                )
    return path


def write_marked_dir(
    directory: str | os.PathLike,
    what: str,
    write: Callable[[Path], dict[str, Any] | None],
    info: dict[str, Any],
    marker: str = MARKER,
) -> Path:
    """A directory of ours written as a whole: ``write(tmp)`` fills a temporary directory (and may return more
    for the marker), ``marker`` (with ``info``, what wrote it, when, and the files) goes beside what it wrote,
    and the directory is swapped into place; an existing one is replaced only when ``check_destination``
    allows, checked again right before."""
    path = check_destination(directory, what)
    with atomic_dir(path, before_replace=lambda p: check_destination(p, what)) as tmp:
        written = write(tmp)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.iterdir())
        record = {
            "written_by": WRITTEN_BY,
            **info,
            **(written or {}),
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
            "files": files,
        }
        (tmp / marker).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def save_model(
    loaded: LoadedModel, directory: str | os.PathLike, what: str = "edit.save_to", record: dict[str, Any] | None = None
) -> Path:
    """Write the model (in its own dtype) and tokenizer to ``directory`` with our marker (``record``: what else
    it should say, e.g. the ledger and the edits); an existing directory is replaced only when
    ``check_destination`` allows."""
    path = check_destination(directory, what)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    ensure_free_space(path.parent, weights, f"{what}={directory} (the model in its own dtype)")

    def write(tmp: Path) -> None:
        try:
            loaded.model.save_pretrained(tmp)
        except OSError:
            raise
        except Exception as err:  # safetensors reports a full disk as its own error type: one kind of failure here
            if no_space(err):
                raise OSError(errno.ENOSPC, f"no space left on device writing {what}={directory}") from err
            raise
        loaded.tokenizer.save_pretrained(tmp)

    info = {"what": "an edited model: save_pretrained + the tokenizer", "base_model": loaded.identity, **(record or {})}
    return write_marked_dir(path, what, write, info)
