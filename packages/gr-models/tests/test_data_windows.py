"""WindowPolicy (leave-last-out splits, candidates, truncation) and collation into the batch layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gr_models.data.batch import RankingBatch, RetrievalBatch
from gr_models.data.collate import collate_samples
from gr_models.data.sample import SequenceSample, Window, WindowPolicy
from gr_models.data.schema import DatasetSchema


def test_retrieval_leave_last_out():
    train = WindowPolicy("retrieval", "train", max_sequence_length=4)
    assert train.window(10) == Window(5, 9, 9, 9)  # last event held out, keep the 4 newest before it
    assert train.window(3) == Window(0, 2, 2, 2)
    assert train.minimum_events == 3 and train.max_num_candidates == 0
    evaluation = WindowPolicy("retrieval", "eval", max_sequence_length=4)
    assert evaluation.window(10) == Window(6, 9, 9, 10)  # 3 history + the held-out target
    assert evaluation.minimum_events == 2 and evaluation.max_num_candidates == 1
    full = WindowPolicy("retrieval", "full", max_sequence_length=4)
    assert full.window(10) == Window(6, 10, 10, 10)


def test_ranking_candidates_and_right_truncation():
    policy = WindowPolicy("ranking", "train", max_sequence_length=6, holdout=2, max_train_candidates=3)
    assert policy.window(12) == Window(4, 7, 7, 10)
    assert policy.window(4) == Window(0, 1, 1, 2)  # 2 events left: 1 history + 1 candidate
    assert policy.minimum_events == 4
    right = WindowPolicy("ranking", "eval", max_sequence_length=6, holdout=2, truncate_side="right")
    window = right.window(12)
    assert window == Window(0, 4, 10, 12)  # the oldest 4 history events, then the 2 held-out candidates
    assert window.take(np.arange(12)).tolist() == [0, 1, 2, 3, 10, 11]
    labeled_all = WindowPolicy("ranking", "train", max_sequence_length=6)
    assert labeled_all.window(3) == Window(0, 2, 2, 2) and labeled_all.minimum_events == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "test"}, "split"),
        ({"holdout": 0}, "holdout"),
        ({"truncate_side": "middle"}, "truncate_side"),
        ({"max_train_candidates": 6}, "no history"),
    ],
)
def test_window_policy_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WindowPolicy("ranking", **{"split": "train", "max_sequence_length": 6, **kwargs})
    with pytest.raises(ValueError, match="below the minimum"):
        WindowPolicy("ranking", "train", 6).window(1)


def _schema(kind="ranking", max_num_candidates=2) -> DatasetSchema:
    return DatasetSchema(
        kind=kind,
        item_feature_name="item",
        contextual_feature_names=("user",),
        contextual_max_lengths={"user": 2},
        action_feature_name="action",
        timestamp_feature_name="ts",
        vocab_sizes={"user": 10, "item": 100, "action": 4},
        max_sequence_length=5,
        max_num_candidates=max_num_candidates,
        task_names=("click", "like"),
    )


def test_collate_hand_computed_example():
    samples = [
        SequenceSample(
            {"user": np.array([1, 2])},
            {"item": np.array([11, 12, 13]), "action": np.array([1, 3, 2]), "ts": np.array([5, 6, 7])},
            num_candidates=2,
        ),
        SequenceSample(
            {"user": np.array([3])},
            {"item": np.array([21, 22]), "action": np.array([0, 1]), "ts": np.array([1, 1])},
            num_candidates=1,
        ),
    ]
    batch = collate_samples(samples, _schema())
    assert isinstance(batch, RankingBatch)
    assert batch.features.keys() == ["user", "item", "action", "ts"]
    assert batch.features.lengths().tolist() == [2, 1, 3, 2, 3, 2, 3, 2]
    assert batch.features.values().tolist() == [1, 2, 3, 11, 12, 13, 21, 22, 1, 3, 2, 0, 1, 5, 6, 7, 1, 1]
    assert batch.num_candidates.tolist() == [2, 1]
    # candidate actions 3, 2 (user 0) and 1 (user 1) -> bits (task0, task1)
    assert batch.labels.tolist() == [[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]
    assert batch.feature_to_max_seqlen == {"user": 2, "item": 5, "action": 5, "ts": 5}
    assert batch.history_lengths().tolist() == [1, 1]

    no_candidates = collate_samples(
        [SequenceSample(s.contextual, s.sequence, 0) for s in samples], _schema(max_num_candidates=0)
    )
    assert no_candidates.num_candidates is None
    assert no_candidates.labels.shape == (5, 2)
    retrieval = collate_samples(samples, _schema("retrieval"))
    assert isinstance(retrieval, RetrievalBatch) and torch.equal(retrieval.num_candidates, torch.tensor([2, 1]))


def test_collate_rejects_misaligned_or_overlong_samples():
    schema = _schema()
    bad_alignment = SequenceSample(
        {"user": np.array([1])}, {"item": np.array([1, 2]), "action": np.array([1]), "ts": np.array([1, 2])}, 1
    )
    with pytest.raises(ValueError, match="sample 0: sequence feature 'action' has 1 values"):
        collate_samples([bad_alignment], schema)
    no_history = SequenceSample(
        {"user": np.array([1])}, {"item": np.array([1, 2]), "action": np.array([1, 1]), "ts": np.array([1, 2])}, 2
    )
    with pytest.raises(ValueError, match="leaves no history"):
        collate_samples([no_history], schema)
    too_long = SequenceSample({"user": np.array([1])}, {k: np.arange(6) for k in ("item", "action", "ts")}, 1)
    with pytest.raises(ValueError, match="exceed max_sequence_length"):
        collate_samples([too_long], schema)
    with pytest.raises(ValueError, match="empty"):
        collate_samples([], schema)


def test_schema_feature_configs_feed_random_batches():
    schema = _schema()
    configs = schema.feature_configs()
    assert [c.feature_names for c in configs] == [["user"], ["item", "action"]]
    batch = RankingBatch.random(
        batch_size=3,
        feature_configs=configs,
        item_feature_name=schema.item_feature_name,
        contextual_feature_names=list(schema.contextual_feature_names),
        action_feature_name=schema.action_feature_name,
        max_num_candidates=schema.max_num_candidates,
        num_tasks=schema.num_tasks,
        timestamp_feature_name=schema.timestamp_feature_name,
    )
    assert batch.features.keys() == list(schema.feature_names)
    with pytest.raises(ValueError, match="action feature and at least one task"):
        DatasetSchema(kind="ranking", item_feature_name="item", vocab_sizes={"item": 3}, max_sequence_length=4)
