"""The one exception type for bad user input.

Code that finds a problem with a file, a field or a flag raises ``UserError`` with a
single-line message naming it and saying what was expected. ``main.py`` prints that
line alone (no traceback) and exits with status 2 (``exit_status``).
"""
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user (a flag, a file or a field inside one)."""


def exit_status(command: Callable[[], None]) -> int:
    """Run a command-line entry point: 0 when it returns; for a ``UserError``, its message as one
    ``error: ...`` line on stderr (no traceback) and 2. Raised in a DataLoader worker, the
    message comes back with the worker's traceback: its last line is the original message."""
    try:
        command()
    except UserError as err:
        message = str(err).strip().splitlines()[-1].removeprefix("util.errors.UserError: ")
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0
