"""Atomic writes: a crash never leaves a half-written file or directory under its final name.

Files and directories are created with the user's umask (``tempfile`` makes them 0600 / 0700, which a group
on a shared cluster cannot read). A directory that already exists is swapped with the new one in a single
``renameat2(RENAME_EXCHANGE)`` where the kernel has it, so there is no moment without either of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_dir", "write_json", "write_tensors", "user_mode", "ensure_free_space", "no_space"]


def user_mode(kind: str) -> int:
    """The mode a new ``"file"`` or ``"dir"`` gets under the process umask (read and put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o666 if kind == "file" else 0o777) & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, user_mode("file"))
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, user_mode("file"))  # a writer may have made the file anew (safetensors: 0600)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2); False where the system cannot."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # an old kernel or a file system without exchange: the two-rename fallback
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, before_replace: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` as a whole.

    ``before_replace(path)`` runs right before an existing ``path`` is replaced and may raise to keep it
    (the caller's last check that it is still its own to replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, user_mode("dir"))
    try:
        yield tmp
        for p in tmp.rglob("*"):  # whatever wrote them (safetensors makes 0600 files): the user's umask
            if not p.is_symlink():
                os.chmod(p, user_mode("dir" if p.is_dir() else "file"))
        if path.exists() or path.is_symlink():
            if before_replace is not None:
                before_replace(path)
            if not _exchange(tmp, path):
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
                os.replace(tmp, path)
                os.replace(old, tmp)  # removed below, with the temporary directory
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_symlink():  # ``path`` was a link: the link itself was swapped out, never its target
            tmp.unlink()
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_tensors(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` (name -> CPU tensor) and ``metadata`` to the safetensors file ``path`` atomically and
    return its sha256. The same tensors and metadata give the same bytes: safetensors writes the metadata in its
    hash map's per-process random order, so the header is written again with the metadata's keys sorted."""
    from safetensors.torch import save_file

    from rome.pipeline.core.digest import file_sha256

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        if metadata and len(metadata) > 1:
            _sort_metadata(tmp)
        return file_sha256(tmp)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header in place with its ``__metadata__`` keys sorted. The header holds the same
    entries in another order, so it keeps its length and every tensor its offset; where the rewritten JSON would
    not fit (a writer that formats differently), the file is left as written."""
    with open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:
            f.seek(8)
            f.write(text.ljust(length, b" "))  # safetensors pads its header with spaces


def ensure_free_space(directory: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse, before writing, a write of ``needed`` bytes (plus 5 % and 1 MiB of slack) into ``directory``
    (or the nearest existing directory above it) when its file system has less free space: one line naming
    ``what`` and both sizes, instead of a half-written file and a traceback."""
    where = Path(directory)
    while not where.exists() and where.parent != where:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed * 1.05 + 2**20:
        raise OSError(
            errno.ENOSPC, f"{what} needs {needed / 2**20:.1f} MiB but {where} has {free / 2**20:.1f} MiB free"
        )


def no_space(err: BaseException) -> bool:
    """Whether ``err`` is a full disk, however the library that wrote reported it (OSError ENOSPC, or a
    safetensors error that carries the message)."""
    return (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left on device" in str(err)
