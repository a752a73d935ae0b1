"""Reading delimited text files (plain or gzip) into pyarrow tables, with errors that name the bad line."""

from __future__ import annotations

import gzip
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from gr_models.data.errors import DataValidationError, check_readable_file

__all__ = ["column_as_numpy", "read_delimited"]


def _read_bytes(path: Path) -> bytes:
    check_readable_file(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise DataValidationError(f"cannot be read ({type(error).__name__}: {error})", source=str(path)) from None


def _first_bad_line(data: bytes, num_columns: int, separator: bytes, skip: int) -> tuple[int, str]:
    for number, line in enumerate(data.splitlines()[skip:]):
        if line and line.count(separator) != num_columns - 1:
            return number + skip, line.decode("latin-1")[:200]
    return -1, ""


def read_delimited(
    path: str | Path,
    column_names: Sequence[str],
    *,
    separator: str = ",",
    header: bool = False,
    column_types: dict[str, pa.DataType] | None = None,
    include_columns: Sequence[str] | None = None,
) -> pa.Table:
    """Read a delimited file (``.gz`` is decompressed) into a table.

    A multi-character ``separator`` (MovieLens-1M's ``::``) is supported. Without ``header`` the columns are
    ``column_names``; with it the file's header must contain them. A line with the wrong number of fields or a
    value of the wrong type raises `DataValidationError` naming the file and the 0-based line.
    """
    path = Path(path)
    data = _read_bytes(path)
    sep = separator.encode()
    if len(sep) > 1:
        data = data.replace(sep, b"\t")
        sep = b"\t"
    read_options = pacsv.ReadOptions(
        column_names=None if header else list(column_names), autogenerate_column_names=False, encoding="latin-1"
    )
    parse_options = pacsv.ParseOptions(delimiter=sep.decode(), quote_char='"' if header else False)
    convert_options = pacsv.ConvertOptions(
        column_types=column_types or {}, include_columns=list(include_columns or column_names)
    )
    try:
        return pacsv.read_csv(
            io.BytesIO(data), read_options=read_options, parse_options=parse_options, convert_options=convert_options
        )
    except (pa.ArrowInvalid, pa.ArrowKeyError) as error:
        line, text = (-1, "")
        if not header:
            line, text = _first_bad_line(data, len(column_names), sep, 0)
        if line >= 0:
            raise DataValidationError(
                f"expected {len(column_names)} fields {list(column_names)}: {text!r}", source=str(path), row=line
            ) from error
        raise DataValidationError(f"cannot parse: {error}", source=str(path)) from error


def column_as_numpy(table: pa.Table, name: str, *, source: str) -> np.ndarray:
    """A column without nulls as a numpy array; a null raises `DataValidationError` naming its row."""
    column = table.column(name)
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataValidationError("missing value", source=source, row=row, column=name)
    return column.to_numpy()
