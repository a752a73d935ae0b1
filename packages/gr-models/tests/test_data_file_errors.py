"""Missing or unreadable data files and string label columns: one error naming the file (and the column)."""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest

from gr_models.cli import main
from gr_models.data.errors import DataValidationError
from gr_models.data.table import SequenceTableDataset
from gr_models.data.text_files import read_delimited
from gr_models.logs import remove_logging


@pytest.fixture(autouse=True)
def _drop_cli_logging() -> Iterator[None]:
    yield
    remove_logging()


def _ranking_table(click: list) -> pa.Table:
    return pa.table({"items": [[5, 6, 7], [8, 9]], "click": click})


def _load(path: Path) -> SequenceTableDataset:
    return SequenceTableDataset(path, kind="ranking", item="items", label_columns=["click"])


@pytest.mark.parametrize("suffix", [".parquet", ".orc"])
def test_missing_and_corrupt_tables_name_the_file(tmp_path: Path, suffix: str) -> None:
    missing = tmp_path / f"missing{suffix}"
    with pytest.raises(DataValidationError, match=rf"^{re.escape(str(missing))}: no such file$"):
        _load(missing)
    corrupt = tmp_path / f"corrupt{suffix}"
    corrupt.write_bytes(b"not a table at all")
    kind = "Parquet" if suffix == ".parquet" else "ORC"
    with pytest.raises(DataValidationError, match=rf"^{re.escape(str(corrupt))}: cannot be read as {kind} \("):
        _load(corrupt)
    folder = tmp_path / f"folder{suffix}"
    folder.mkdir()
    with pytest.raises(DataValidationError, match=rf"^{re.escape(str(folder))}: is not a file$"):
        _load(folder)


@pytest.mark.parametrize("suffix", [".parquet", ".orc"])
def test_string_label_column_names_file_and_column(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"users{suffix}"
    table = _ranking_table([["0", "1", "1"], ["1", "0"]])
    if suffix == ".orc":
        orc.write_table(table, str(path))
    else:
        pq.write_table(table, str(path))
    expected = rf"^{re.escape(str(path))}, column 'click': label column holds string values; labels must be integers"
    with pytest.raises(DataValidationError, match=expected):
        _load(path)


def test_missing_and_bad_gzip_text_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match=rf"^{re.escape(str(tmp_path / 'ratings.csv'))}: no such file$"):
        read_delimited(tmp_path / "ratings.csv", ["user", "item"])
    bad = tmp_path / "ratings.csv.gz"
    bad.write_bytes(b"plain text, not gzip")
    with pytest.raises(DataValidationError, match=rf"^{re.escape(str(bad))}: cannot be read \(BadGzipFile"):
        read_delimited(bad, ["user", "item"])
    good = tmp_path / "good.csv.gz"
    good.write_bytes(gzip.compress(b"1,2\n3,4\n"))
    assert read_delimited(good, ["user", "item"]).num_rows == 2


def test_gr_train_prints_one_line_for_a_missing_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "users.parquet"
    options = "data.options={item: items, label_columns: [click]}"
    assert main(["data.dataset=parquet", f"data.path={missing}", options, f"output_dir={tmp_path}/run"]) == 2
    err = capsys.readouterr().err
    assert err == f"gr-train: error: {missing}: no such file  (--debug shows the traceback)\n"
