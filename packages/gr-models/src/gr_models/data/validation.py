"""Row-level checks of jagged user data; each failure names the source, the row and the column."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from gr_models.data.errors import DataValidationError
from gr_models.data.jagged import JaggedColumn

__all__ = ["check_aligned", "check_ids", "check_time_order", "sort_rows_by_time"]

OutOfOrderPolicy = Literal["error", "sort"]
OutOfVocabPolicy = Literal["error", "clip"]


def check_aligned(columns: Mapping[str, JaggedColumn], *, source: str | None = None) -> np.ndarray:
    """Check that every column has the same length in every row; return those int64 ``[rows]`` lengths."""
    names = list(columns)
    if not names:
        raise ValueError("check_aligned needs at least one column")
    reference = columns[names[0]]
    for name in names[1:]:
        if columns[name].num_rows != reference.num_rows:
            raise DataValidationError(
                f"{columns[name].num_rows} rows but column {names[0]!r} has {reference.num_rows}",
                source=source,
                column=name,
            )
        differ = np.flatnonzero(columns[name].lengths != reference.lengths)
        if differ.size:
            row = int(differ[0])
            raise DataValidationError(
                f"has {int(columns[name].lengths[row])} values but column {names[0]!r} has "
                f"{int(reference.lengths[row])} (sequence columns of a row must have equal lengths)",
                source=source,
                row=row,
                column=name,
            )
    return reference.lengths


def check_time_order(timestamps: JaggedColumn, *, column: str, source: str | None = None) -> None:
    """Raise if any row's timestamps decrease (rows must be in time order, oldest first)."""
    decreasing = np.flatnonzero(np.diff(timestamps.values) < 0) + 1
    if decreasing.size == 0:
        return
    within_row = decreasing[timestamps.positions_in_row()[decreasing] > 0]
    if within_row.size:
        position = int(within_row[0])
        row = int(timestamps.row_of(position))
        index = position - int(timestamps.offsets[row])
        raise DataValidationError(
            f"timestamps out of order at position {index}: {int(timestamps.values[position])} after "
            f"{int(timestamps.values[position - 1])} (pass on_unsorted='sort' to sort rows by time)",
            source=source,
            row=row,
            column=column,
        )


def sort_rows_by_time(timestamps: JaggedColumn, others: Mapping[str, JaggedColumn]) -> dict[str, JaggedColumn]:
    """Stable-sort every row by timestamp, applying the same order to the aligned columns ``others``.

    Returns the sorted columns, the timestamps under the key ``"__timestamps__"`` included.
    """
    order = np.lexsort((timestamps.values, timestamps.row_ids()))
    result = {name: column.with_values(column.values[order]) for name, column in others.items()}
    result["__timestamps__"] = timestamps.with_values(timestamps.values[order])
    return result


def check_ids(
    ids: JaggedColumn,
    *,
    column: str,
    vocab_size: int | None = None,
    on_out_of_vocab: OutOfVocabPolicy = "error",
    source: str | None = None,
) -> JaggedColumn:
    """Check embedding ids: never negative; below ``vocab_size`` when given (a static table).

    ``on_out_of_vocab="clip"`` maps ids ``>= vocab_size`` to ``vocab_size - 1`` instead of raising.
    """
    values = ids.values
    negative = np.flatnonzero(values < 0)
    if negative.size:
        position = int(negative[0])
        raise DataValidationError(
            f"negative id {int(values[position])}", source=source, row=int(ids.row_of(position)), column=column
        )
    if vocab_size is None:
        return ids
    if on_out_of_vocab not in ("error", "clip"):
        raise ValueError(f"on_out_of_vocab must be 'error' or 'clip', got {on_out_of_vocab!r}")
    beyond = np.flatnonzero(values >= vocab_size)
    if beyond.size == 0:
        return ids
    if on_out_of_vocab == "clip":
        return ids.with_values(np.minimum(values, vocab_size - 1))
    position = int(beyond[0])
    raise DataValidationError(
        f"id {int(values[position])} is beyond the static vocabulary of {vocab_size} ids "
        "(hash the column, raise vocab_size, or pass on_out_of_vocab='clip')",
        source=source,
        row=int(ids.row_of(position)),
        column=column,
    )
