"""The error raised for malformed input data, naming where the problem is."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DataValidationError", "check_readable_file"]


class DataValidationError(ValueError):
    """Bad input data. The message names the source (file), the row (0-based, within that source) and the column.

    Attributes:
        source: file or data set name, or None.
        row: 0-based row (user or line) index within the source, or None.
        column: column or feature name, or None.
    """

    def __init__(self, problem: str, *, source: str | None = None, row: int | None = None, column: str | None = None):
        where = [part for part in (source, None if row is None else f"row {row}") if part]
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)
        self.source = source
        self.row = row
        self.column = column


def check_readable_file(path: Path) -> None:
    """Raise `DataValidationError` naming `path` when it does not exist, is not a file, or cannot be opened."""
    if not path.exists():
        raise DataValidationError("no such file", source=str(path))
    if not path.is_file():
        raise DataValidationError("is not a file", source=str(path))
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise DataValidationError(f"cannot be opened ({error.strerror or error})", source=str(path)) from None
