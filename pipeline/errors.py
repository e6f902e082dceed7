"""The exceptions a user sees, raised at the boundary: a bad input (``UserError``) and a stop on request
(``Interrupted``)."""

import signal


class UserError(Exception):
    """Bad input or environment; ``train.py`` prints ``error: <message>`` on one line and exits 2."""


class Interrupted(Exception):
    """A stage stopped cleanly on a signal after saving what can be resumed. ``train.py`` prints one line,
    ``interrupted by SIG...: <resume_hint>; to resume, run the same command: ...``, and exits 128 + signum
    (143 for SIGTERM, 130 for SIGINT), as a shell reports a process killed by that signal."""

    def __init__(self, signum: int, resume_hint: str) -> None:
        self.signum, self.resume_hint = int(signum), resume_hint
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}: {resume_hint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
