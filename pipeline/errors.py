"""The exceptions a user sees: raised at the boundary with a message that says what to do."""


class UserError(Exception):
    """Bad input or environment; ``train.py`` prints ``error: <message>`` on one line and exits 2."""


class Interrupted(Exception):
    """A stopping signal (SIGTERM, SIGINT) ended the stage cleanly; ``train.py`` prints
    ``interrupted: <how to resume>`` on one line and exits 128 + the signal number (143, 130)."""

    def __init__(self, signum: int, hint: str) -> None:
        super().__init__(hint)
        self.signum, self.hint = int(signum), hint
