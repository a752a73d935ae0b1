"""KuaiRand logs: multi-task actions, user features, hashing of video ids, and bad rows (tiny fixture files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gr_models.data.collate import collate_samples
from gr_models.data.errors import DataValidationError
from gr_models.data.hashing import hash_int64, to_key_space
from gr_models.data.kuairand import KuaiRandDataset

FIXTURES = Path(__file__).parent / "data_fixtures" / "kuairand"
LOG = FIXTURES / "log_standard_4_08_to_4_21_fixture.csv"
USERS = FIXTURES / "user_features_fixture.csv"


def _expected_user(user_id: int, tasks: list[str]) -> tuple[list[int], list[int]]:
    import csv

    with open(LOG) as handle:
        rows = [r for r in csv.DictReader(handle) if int(r["user_id"]) == user_id]
    rows.sort(key=lambda r: int(r["time_ms"]))
    actions = [sum(int(r[t]) << i for i, t in enumerate(tasks)) for r in rows]
    return [int(r["video_id"]) for r in rows], actions


def test_kuairand_ranking_from_fixture():
    dataset = KuaiRandDataset(LOG, user_features_path=USERS, split="full", max_sequence_length=32)
    schema = dataset.schema
    assert schema.task_names == ("is_click", "long_view", "is_like", "is_follow")
    assert schema.vocab_sizes["action"] == 16
    assert schema.contextual_feature_names[0] == "user_id" and "user_active_degree" in schema.contextual_feature_names
    assert len(dataset) == 4
    items, actions = _expected_user(5, list(schema.task_names))
    sample = dataset[2]  # users are 0, 3, 5, 12
    assert sample.sequence["item_id"].tolist() == items
    assert sample.sequence["action"].tolist() == actions
    assert (np.diff(sample.sequence["timestamp"]) >= 0).all()
    assert sample.contextual["user_active_degree"].tolist() == [1]  # "UNKNOWN" sorts first
    assert dataset[3].contextual["user_active_degree"].tolist() == [0]  # user 12 has no user features
    batch = collate_samples([dataset[i] for i in range(4)], schema)
    assert batch.labels.shape == (int(batch.item_lengths().sum()), 4)


def test_kuairand_eval_split_and_hashed_items():
    dataset = KuaiRandDataset(LOG, split="eval", item_hash_buckets=0, task_columns=("is_click",))
    assert dataset.schema.vocab_sizes["item_id"] == 0 and dataset.schema.max_num_candidates == 1
    items, _ = _expected_user(0, ["is_click"])
    assert dataset[0].sequence["item_id"].tolist() == to_key_space(hash_int64(np.array(items)), 0).tolist()
    assert dataset[0].num_candidates == 1


def test_kuairand_bad_rows(tmp_path):
    header = LOG.read_text().splitlines()[0]
    good = LOG.read_text().splitlines()[1]
    fields = good.split(",")
    bad_label = fields.copy()
    bad_label[header.split(",").index("is_like")] = "2"
    path = tmp_path / "log.csv"
    path.write_text("\n".join([header, good, ",".join(bad_label)]) + "\n")
    with pytest.raises(DataValidationError, match=r"row 1, column 'is_like': task label 2 is not 0 or 1"):
        KuaiRandDataset(path, task_columns=("is_click", "is_like"))
    missing = fields.copy()
    missing[header.split(",").index("video_id")] = ""
    path.write_text("\n".join([header, good, ",".join(missing)]) + "\n")
    with pytest.raises(DataValidationError, match=r"row 1, column 'video_id': missing value"):
        KuaiRandDataset(path)
    path.write_text("user_id,time_ms\n1,2\n")
    with pytest.raises(DataValidationError, match="video_id"):
        KuaiRandDataset(path)
