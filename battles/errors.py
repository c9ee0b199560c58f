"""The base of every error a user's input causes: a file, a config value, a command line.

``run.py`` turns any :class:`UserError` into one readable line and a non-zero exit (the traceback
only with ``--verbose``). Errors of the code itself stay ordinary exceptions, with their traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what and where (file, row, column, or key)."""
