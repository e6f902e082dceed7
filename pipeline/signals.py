"""Stop a long stage cleanly on SIGTERM (a cluster's preemption, ``scancel``, ``kill``) or SIGINT (Ctrl-C).

    with stop_on_signals() as stop:
        for unit in work:            # a batch, a case, an edit: something that is finished or not started
            do(unit)
            if stop.requested:       # checked between units, never inside one
                save_resumable_state()
                raise Interrupted(stop.signum, "partial results saved in DIR")

The handlers only record the first signal; the work decides where it can stop. A second SIGINT while a
stop is pending raises ``KeyboardInterrupt`` at once (a user who presses Ctrl-C twice means it). The
previous handlers are restored when the block ends. Handlers compose with Lightning's: a Trainer started
inside the block keeps calling ours from its own SIGTERM handler (and restores ours when it ends).

Processes that only feed the main one (dataloader workers) call ``ignore_stop_signals()``: a signal sent
to the whole process group (Ctrl-C in a terminal, SLURM signalling every process of a job step) must not
kill a worker under the main process's feet; the main process stops at a unit boundary and the workers
go with it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

__all__ = ["STOP_SIGNALS", "StopRequest", "stop_on_signals", "ignore_stop_signals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """What the handlers recorded: ``signum`` of the first stop signal, or None."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, unsaved
        if self.signum is None:
            self.signum = signum


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Record SIGTERM / SIGINT in the yielded ``StopRequest`` instead of dying, for the ``with`` block.
    Outside the main thread (where Python cannot install handlers) nothing is installed and the request
    never fires."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, stop._handle)
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def ignore_stop_signals() -> None:
    """In a helper process (a dataloader worker): leave SIGTERM / SIGINT to the main process."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
