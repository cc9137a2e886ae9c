"""Errors of the data pipeline: each names the file, row and field, and says what to do."""

from __future__ import annotations

from jaxtune.errors import JaxtuneError


class DataError(JaxtuneError, ValueError):
    """A data problem the user can fix (missing file, bad split, unusable tokenizer...)."""


class BadRowError(DataError):
    """One malformed row: the message names the file, the row, the field and the fix."""

    def __init__(self, where: str, field: str, problem: str, fix: str = ""):
        self.where, self.field, self.problem = where, field, problem
        hint = f" {fix}" if fix else ""
        super().__init__(
            f"{where}: field '{field}' {problem}.{hint} "
            "Set data.on_bad_row: skip to skip such rows and count them instead."
        )


class RowProblem(Exception):
    """Raised by a format for one row; the caller adds the file and row (internal)."""

    def __init__(self, field: str, problem: str, fix: str = ""):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem, self.fix = field, problem, fix
