"""The one exception type a user sees: raised at the boundary with a message that says what to do."""


class UserError(Exception):
    """Bad input or environment; ``train.py`` prints ``error: <message>`` on one line and exits 2."""
