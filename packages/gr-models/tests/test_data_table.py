"""Parquet/ORC sequence tables: feature ops (truncate, hash, vocab, time buckets) and every bad-data error."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest

from gr_models.data.collate import collate_samples
from gr_models.data.errors import DataValidationError
from gr_models.data.feature_ops import BucketizeTimestamps, CheckVocab, HashIds, Truncate
from gr_models.data.hashing import hash_int64, hash_strings, to_key_space
from gr_models.data.jagged import JaggedColumn
from gr_models.data.table import FeatureColumn, SequenceTableDataset


def _table(**overrides) -> pa.Table:
    columns = {
        "user": [7, 8, 9],
        "items": [[5, 6, 7], [8, 9], [1, 2, 3, 4]],
        "ts": [[10, 20, 30], [5, 6], [1, 1, 2, 1025]],
        "click": [[0, 1, 1], [1, 0], [0, 0, 1, 1]],
        "like": [[0, 1, 0], [0, 0], [0, 0, 0, 1]],
        "city": ["paris", "oslo", "paris"],
        "tags": [["a", "b", "c"], ["d"], []],
    }
    columns.update(overrides)
    return pa.table(columns)


def _write(table: pa.Table, path) -> str:
    if str(path).endswith(".orc"):
        orc.write_table(table, str(path))
    else:
        pq.write_table(table, str(path))
    return str(path)


@pytest.mark.parametrize("suffix", [".parquet", ".orc"])
def test_ranking_table_with_feature_ops(tmp_path, suffix):
    path = _write(_table(), tmp_path / f"users{suffix}")
    dataset = SequenceTableDataset(
        path,
        kind="ranking",
        item=FeatureColumn("items", "item_id", (HashIds(0),)),
        label_columns=["click", "like"],
        timestamp_column="ts",
        side_features=[FeatureColumn("ts", "age_bucket", (BucketizeTimestamps(num_buckets=8),))],
        contextual=[
            "user",
            FeatureColumn("city", ops=(HashIds(100),)),
            FeatureColumn("tags", ops=(Truncate(2), HashIds(50))),
        ],
        split="full",
        max_sequence_length=8,
    )
    schema = dataset.schema
    assert schema.vocab_sizes == {"item_id": 0, "age_bucket": 8, "action": 4, "user": 10, "city": 100, "tags": 50}
    assert schema.contextual_max_lengths["tags"] == 2 and schema.task_names == ("click", "like")
    third = dataset[2]
    assert third.sequence["item_id"].tolist() == to_key_space(hash_int64(np.array([1, 2, 3, 4])), 0).tolist()
    assert third.sequence["action"].tolist() == [0, 0, 1, 3]
    assert third.sequence["age_bucket"].tolist() == [7, 7, 7, 0]  # ages 1024, 1024, 1023, 0 -> log2 buckets, clipped
    assert dataset[0].contextual["tags"].tolist() == to_key_space(hash_strings(["b", "c"]), 50).tolist()
    assert dataset[0].contextual["city"].tolist() == to_key_space(hash_strings(["paris"]), 100).tolist()
    assert len(dataset[2].contextual["tags"]) == 0
    batch = collate_samples([dataset[i] for i in range(3)], schema)
    assert batch.features.keys() == ["user", "city", "tags", "item_id", "action", "age_bucket", "ts"]
    assert batch.labels[:, 1].tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 1]


def test_retrieval_table_with_static_vocab_and_multiple_files(tmp_path):
    first = _write(_table(), tmp_path / "a.parquet")
    second = _write(_table(user=[10, 11, 12]), tmp_path / "b.parquet")
    dataset = SequenceTableDataset(
        [first, second], item=FeatureColumn("items", ops=(CheckVocab(20),)), contextual=["user"], split="eval"
    )
    assert len(dataset) == 6 and dataset.schema.vocab_sizes == {"items": 20, "user": 13}
    assert dataset[4].sequence["items"].tolist() == [8, 9] and dataset[4].num_candidates == 1
    assert dataset[4].contextual["user"].tolist() == [11]


def _load(tmp_path, table: pa.Table, **kwargs) -> SequenceTableDataset:
    path = _write(table, tmp_path / "bad.parquet")
    options = {"item": "items", "timestamp_column": "ts", "label_columns": ["click"], "kind": "ranking"}
    options.update(kwargs)
    return SequenceTableDataset(path, **options)


def test_ragged_columns_name_row_and_column(tmp_path):
    table = _table(click=[[0, 1, 1], [1, 0, 1], [0, 0, 1, 1]])
    with pytest.raises(DataValidationError, match=r"bad.parquet, row 1, column '(click|items)': has [23] values but"):
        _load(tmp_path, table)


def test_out_of_order_timestamps_error_or_sort(tmp_path):
    table = _table(ts=[[10, 20, 30], [6, 5], [1, 1, 2, 3]])
    with pytest.raises(DataValidationError, match=r"row 1, column 'ts': timestamps out of order at position 1"):
        _load(tmp_path, table)
    dataset = _load(tmp_path, table, on_unsorted="sort", split="full")
    assert dataset[1].sequence["items"].tolist() == [9, 8]
    assert dataset[1].sequence["ts"].tolist() == [5, 6]
    assert dataset[1].sequence["action"].tolist() == [0, 1]


def test_ids_beyond_static_vocab_error_or_clip(tmp_path):
    with pytest.raises(DataValidationError, match=r"row 1, column 'items': id 9 is beyond the static vocabulary of 9"):
        _load(tmp_path, _table(), item=FeatureColumn("items", ops=(CheckVocab(9),)))
    clipped = _load(tmp_path, _table(), item=FeatureColumn("items", ops=(CheckVocab(9, "clip"),)), split="full")
    assert clipped[1].sequence["items"].tolist() == [8, 8]


def test_negative_ids_nulls_strings_labels_and_floats(tmp_path):
    with pytest.raises(DataValidationError, match=r"row 2, column 'items': negative id -3"):
        _load(tmp_path, _table(items=[[5, 6, 7], [8, 9], [1, 2, -3, 4]]))
    with pytest.raises(DataValidationError, match=r"row 1, column 'items': null row"):
        _load(tmp_path, _table(items=[[5, 6, 7], None, [1, 2, 3, 4]]))
    with pytest.raises(DataValidationError, match=r"row 0, column 'items': null value inside the row"):
        _load(tmp_path, _table(items=[[5, None, 7], [8, 9], [1, 2, 3, 4]]))
    with pytest.raises(DataValidationError, match=r"column 'city': holds object values: add HashIds"):
        _load(tmp_path, _table(), contextual=["city"])
    with pytest.raises(DataValidationError, match=r"row 2, column 'click': label 2 is not 0 or 1"):
        _load(tmp_path, _table(click=[[0, 1, 1], [1, 0], [0, 0, 2, 1]]))
    with pytest.raises(DataValidationError, match=r"column 'ts': values of type double are not ids"):
        _load(tmp_path, _table(ts=[[1.0, 2.0, 3.0], [1.0, 2.0], [1.0, 2.0, 3.0, 4.0]]))
    with pytest.raises(DataValidationError, match=r"column 'missing': no such column"):
        _load(tmp_path, _table(), contextual=["missing"])


def test_truncation_that_breaks_alignment_is_reported(tmp_path):
    with pytest.raises(DataValidationError, match=r"row 0, column 'action': has 3 values but column 'items' has 2"):
        _load(tmp_path, _table(), item=FeatureColumn("items", ops=(Truncate(2),)))
    kept = _load(
        tmp_path,
        _table(),
        item=FeatureColumn("items", ops=(Truncate(2, side="right"),)),
        label_columns=[],
        kind="retrieval",
        timestamp_column=None,
        split="full",
    )
    assert kept[2].sequence["items"].tolist() == [1, 2]


def test_action_column_must_be_a_task_bitmask(tmp_path):
    table = _table(act=[[0, 1, 3], [1, 0], [0, 4, 1, 1]])
    with pytest.raises(DataValidationError, match=r"row 2, column 'act': action 4 is not a bitmask of 2 tasks"):
        _load(tmp_path, table, action="act", label_columns=[], task_names=["click", "like"])
    with pytest.raises(ValueError, match="ranking needs label_columns"):
        _load(tmp_path, table, label_columns=[])


def test_jagged_column_from_lengths_rejects_negative_and_mismatched_lengths():
    with pytest.raises(DataValidationError, match=r"row 1, column 'items': negative length -2"):
        JaggedColumn.from_lengths(np.arange(3), np.array([3, -2, 2]), column="items", source="memory")
    with pytest.raises(DataValidationError, match="lengths sum to 4 but there are 3 values"):
        JaggedColumn.from_lengths(np.arange(3), np.array([1, 3]), column="items")
    column = JaggedColumn.from_lengths(np.arange(5), np.array([2, 0, 3]), column="items")
    assert column.row(2).tolist() == [2, 3, 4] and column.row(1).tolist() == []
    assert column.take_rows(np.array([2, 0])).values.tolist() == [2, 3, 4, 0, 1]
