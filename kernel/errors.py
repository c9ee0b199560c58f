"""The base of every error a user's input causes: a file, a config value, a command line.

``run.py`` turns any :class:`UserError` into one readable line and a non-zero exit (the traceback
only with ``--verbose``). Errors of the code itself stay ordinary exceptions, with their traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what and where (file, row, column, or key)."""


class BattleDataError(UserError, ValueError):
    """A battle file that cannot be read as the battle table. The message names file, row (or line)
    and column."""

    def __init__(self, path, message: str, row: int | None = None, column: str | None = None,
                 line: int | None = None):
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column '{column}'"
        message = " ".join(part.strip() for part in message.splitlines() if part.strip())  # one line, always
        super().__init__(f"{where}: {message}")
        self.path, self.row, self.column, self.line = str(path), row, column, line
        self.message = message
