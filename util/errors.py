"""The one exception type for bad user input.

Code that finds a problem with a file, a field or a flag raises ``UserError`` with a
single-line message naming it and saying what was expected. ``main.py`` prints that
line alone (no traceback) and exits with status 2.
"""


class UserError(Exception):
    """Bad input from the user (a flag, a file or a field inside one)."""
