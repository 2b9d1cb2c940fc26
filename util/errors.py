"""The one exception type for bad user input.

Code that finds a problem with a file, a field or a flag raises ``UserError`` with a
single-line message naming it and saying what was expected. ``main.py`` prints that
line alone (no traceback) and exits with status 2.
"""


class UserError(Exception):
    """Bad input from the user (a flag, a file or a field inside one)."""


def error_line(err: UserError) -> str:
    """The ``error: ...`` line printed for ``err``. Raised in a DataLoader worker, the message
    comes back with the worker's traceback: its last line is the original message."""
    message = str(err).strip().splitlines()[-1].removeprefix("util.errors.UserError: ")
    return f"error: {message}"
