"""Errors a user can act on.

Every error taskling raises for a user mistake is a `TasklingError`: it names where the
problem is (file, line or row), what was expected, and how to fix it. The CLI prints these
without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class TasklingError(Exception):
    """A problem the user can fix; the message says where and how."""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")


class ConfigError(TasklingError):
    """The configuration is invalid (unknown key, wrong type, missing file)."""


class DataError(TasklingError):
    """A data file, or a row in it, cannot be used."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        fix: str | None = None,
        row: int | None = None,  # for tables (Parquet, `datasets`): a row number, not a line
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.row = row
        where = ""
        if self.path is not None:
            where = self.path if line is None else f"{self.path}:{line}"
            where += "" if row is None else f", row {row}"
            where += ": "
        super().__init__(where + message, fix=fix)


class ModelError(TasklingError):
    """A base model or run directory cannot be loaded."""


class RunError(TasklingError):
    """A run directory is missing files or is inconsistent."""
