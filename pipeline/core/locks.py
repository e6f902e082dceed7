"""One writer at a time for a directory the project writes (a ledger, a statistics entry, an output directory).

``DirectoryLock(dir, what)`` holds an advisory ``flock`` on ``dir/.rome.lock`` for as long as the run writes there,
and writes its owner (pid, host, start time, command) into that file. A second run on the same directory is
refused in one line that names the owner; the kernel drops the lock when its process dies, so a lock left by a
killed run is taken over, with a line that says whose it was.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from types import TracebackType

from rome.pipeline.errors import UserError

__all__ = ["DirectoryLock", "LOCK_FILE", "first_process"]

LOCK_FILE = ".rome.lock"


def first_process() -> bool:
    """Whether this is the process a run starts in, not a DDP rank that Lightning started for it (those have
    LOCAL_RANK / NODE_RANK set and work under the lock their first process holds)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLock:
    def __init__(self, directory: str | os.PathLike, what: str) -> None:
        self.dir, self.what = Path(directory), what
        self.path = self.dir / LOCK_FILE
        self._fd: int | None = None
        self._made_dir = False  # the lock made the directory: it goes again if nothing else was written into it

    def owner(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> DirectoryLock:
        self._made_dir = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = self.owner()
            raise UserError(
                f"{self.what}={self.dir} is in use by another run (pid {who.get('pid', '?')} on "
                f"{who.get('host', '?')} since {who.get('since', '?')}); wait for it to finish, or name another "
                f"{self.what}"
            ) from None
        previous = self.owner()
        here = socket.gethostname()
        if previous.get("pid") and (previous.get("host") != here or not _alive(int(previous["pid"]))):
            print(
                f"{self.what}={self.dir}: taking over the lock of a run that ended without releasing it "
                f"(pid {previous['pid']} on {previous.get('host', '?')}, since {previous.get('since', '?')})",
                file=sys.stderr,
            )
        owner = {
            "pid": os.getpid(),
            "host": here,
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # released cleanly: no owner left behind to take over from
        if self._made_dir and self.dir.is_dir() and [p.name for p in self.dir.iterdir()] == [LOCK_FILE]:
            self.path.unlink()  # a run that wrote nothing leaves no directory (unlinked while still held: no race)
            self.dir.rmdir()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
