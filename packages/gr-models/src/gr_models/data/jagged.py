"""`JaggedColumn`: one column of variable-length rows held as flat values plus offsets (numpy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gr_models.data.errors import DataValidationError

__all__ = ["JaggedColumn"]


@dataclass
class JaggedColumn:
    """Rows of variable length: row ``r`` is ``values[offsets[r]:offsets[r + 1]]``.

    Attributes:
        values: ``[total]`` values of every row, row after row.
        offsets: int64 ``[num_rows + 1]``, ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == total``.
    """

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_lengths(
        cls, values: np.ndarray, lengths: np.ndarray, *, column: str, source: str | None = None
    ) -> JaggedColumn:
        """Build from per-row lengths; negative lengths or a total that differs from ``len(values)`` raise
        `DataValidationError` naming the row and column."""
        lengths = np.asarray(lengths, dtype=np.int64)
        negative = np.flatnonzero(lengths < 0)
        if negative.size:
            row = int(negative[0])
            raise DataValidationError(f"negative length {int(lengths[row])}", source=source, row=row, column=column)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if offsets[-1] != len(values):
            raise DataValidationError(
                f"lengths sum to {int(offsets[-1])} but there are {len(values)} values", source=source, column=column
            )
        return cls(np.asarray(values), offsets)

    @classmethod
    def from_scalars(cls, values: np.ndarray) -> JaggedColumn:
        """One value per row."""
        return cls(np.asarray(values), np.arange(len(values) + 1, dtype=np.int64))

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, index: int) -> np.ndarray:
        return self.values[self.offsets[index] : self.offsets[index + 1]]

    def row_of(self, positions: np.ndarray | int) -> np.ndarray:
        """Row index of flat value positions."""
        return np.searchsorted(self.offsets, positions, side="right") - 1

    def row_ids(self) -> np.ndarray:
        """``[total]`` row index of every value."""
        return np.repeat(np.arange(self.num_rows, dtype=np.int64), self.lengths)

    def positions_in_row(self) -> np.ndarray:
        """``[total]`` 0-based position of every value within its row."""
        return np.arange(len(self.values), dtype=np.int64) - np.repeat(self.offsets[:-1], self.lengths)

    def with_values(self, values: np.ndarray) -> JaggedColumn:
        return JaggedColumn(values, self.offsets)

    def take_rows(self, rows: np.ndarray) -> JaggedColumn:
        """The listed rows, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.repeat(self.offsets[rows] - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return JaggedColumn(self.values[gather], offsets)

    def keep(self, mask: np.ndarray) -> JaggedColumn:
        """Only the values where ``mask`` (``[total]`` bool) is True; rows shrink accordingly."""
        kept_before = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        return JaggedColumn(self.values[mask], kept_before[self.offsets])
