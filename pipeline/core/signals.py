"""Stopping cleanly on SIGTERM (a cluster's preemption) and SIGINT (Ctrl+C).

``train.py`` runs every stage inside ``stop_on_signals()``: a signal only sets a flag (and says so on one
line); the stage's loop calls ``check_stop(hint)`` between units of work (a batch, a case, an edit), so the
unit in progress finishes or is abandoned whole, what is resumable gets written, and ``Interrupted`` carries
the resume hint up to ``train.py``, which prints it and exits 128 + the signal number (143 / 130).
A second Ctrl+C stops at once (one ``interrupted:`` line, exit 130), for when the current unit takes too long.

Processes that only feed the main one (dataloader workers) call ``ignore_stop_signals()``: a signal sent to
the whole process group (Ctrl+C in a terminal, SLURM signalling every process of a job step) must not kill
a worker under the main process's feet; the main process stops at a unit boundary and its workers go with it.
They also call ``ignore_resource_sharer_resets()``: after a second Ctrl+C the main process may be gone
mid-transfer, and the worker must not print a traceback about it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any

from rome.pipeline.errors import Interrupted

__all__ = ["stop_on_signals", "stop_requested", "check_stop", "ignore_stop_signals", "ignore_resource_sharer_resets"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []  # the signals received while armed (the first one decides the exit code)


def stop_requested() -> bool:
    """True once a stopping signal arrived: finish the current unit, save, then ``check_stop``."""
    return bool(_received)


def check_stop(hint: str) -> None:
    """Raise ``Interrupted`` (with ``hint``: how to resume) when a stopping signal arrived."""
    if _received:
        raise Interrupted(_received[0], hint)


def _handler(signum: int, frame: object) -> None:
    if _received and signum == signal.SIGINT:
        # a second Ctrl+C: stop now. Exiting here, not raising KeyboardInterrupt, because the interrupt would land
        # wherever the process is (a dataloader's teardown, Lightning's own handler, which exits with 1) and print
        # a traceback; every file is written atomically, so nothing half-written is left under its final name
        print(
            "\ninterrupted: stopped at once by a second Ctrl+C; the unit of work in progress was abandoned, what "
            "was recorded before it is kept; to resume, run the same command",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(130)
    _received.append(signum)
    print(
        f"\nreceived {signal.Signals(signum).name}: stopping; the unit of work in flight is finished or abandoned "
        "(Ctrl+C again stops at once)",
        file=sys.stderr,
        flush=True,
    )


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS, *, then_ignore: bool = False) -> Iterator[None]:
    """Turn ``signals`` into a stop request for the duration (main thread only; elsewhere a no-op).
    Lightning's own SIGTERM handler, installed inside fit/predict, calls this one too.

    ``then_ignore``: for a process that exits after the block (the console command). The signals are ignored
    afterwards instead of given back to Python's default, which would raise KeyboardInterrupt wherever the
    exit is (an atexit finaliser of torch prints a traceback): a second Ctrl+C that comes after the stage
    stopped, while the process prints its ``interrupted:`` line and exits, changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signals}
    _received.clear()
    for s in signals:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_IGN if then_ignore else h)
        _received.clear()


def ignore_resource_sharer_resets() -> None:
    """In a dataloader worker: a worker hands each batch's tensors to the main process through multiprocessing's
    resource sharer, a thread of the worker that serves their file descriptors. When a second Ctrl+C stops the
    main process at once, a connection it had opened to that thread is reset, and the thread prints the error
    (through ``sys.excepthook``, which it calls itself) after the user's one ``interrupted:`` line. The worker
    goes with its main process either way; only that thread's lost connections are left unprinted, everything
    else reaches the hook as before."""
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        lost = issubclass(exc_type, (ConnectionError, EOFError))
        if lost and any(_in_resource_sharer(frame) for frame, _ in traceback.walk_tb(tb)):
            return
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def _in_resource_sharer(frame: Any) -> bool:
    return frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "resource_sharer.py"))


def ignore_stop_signals() -> None:
    """In a helper process (a dataloader worker): leave SIGTERM and SIGINT to the main process, and SIGUSR1
    too (SLURM's ``--signal`` reaches every process of a job step; Lightning's requeue handles it in the main
    process, and its default action would kill the worker)."""
    for s in (*STOP_SIGNALS, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
