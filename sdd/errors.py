"""Errors a user can fix.

Anything raised as `SddError` reaches the terminal as one line and exit code 2; anything else is
a bug in sdd and keeps its traceback.
"""


class SddError(Exception):
    """Bad input or state the user can fix; the message says what to do."""

    exit_code = 2
