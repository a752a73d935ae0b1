"""The error raised for malformed input data, naming where the problem is."""

from __future__ import annotations

__all__ = ["DataValidationError"]


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
