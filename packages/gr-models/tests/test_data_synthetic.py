"""The synthetic default data set: determinism, Zipf shapes, and a planted signal that a simple model can learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from gr_models.data.collate import collate_samples
from gr_models.data.synthetic import SyntheticConfig, SyntheticDataset

SMALL = SyntheticConfig(num_users=600, num_items=2000, num_clusters=20, max_events=60, seed=3)


def test_samples_are_a_pure_function_of_seed_and_index():
    first, again = SyntheticDataset(SMALL), SyntheticDataset(SMALL)
    for index in (0, 17, 599):
        a, b = first[index], again[index]
        assert all(np.array_equal(a.sequence[k], b.sequence[k]) for k in a.sequence)
        assert all(np.array_equal(a.contextual[k], b.contextual[k]) for k in a.contextual)
    other_seed = SyntheticDataset(SyntheticConfig(**{**SMALL.__dict__, "seed": 4}))
    assert not np.array_equal(first[0].sequence["item_id"], other_seed[0].sequence["item_id"])


def test_zipf_lengths_and_item_popularity_and_layout():
    dataset = SyntheticDataset(SMALL, max_sequence_length=40)
    lengths = dataset._num_events_per_user
    assert lengths.min() >= SMALL.min_events and lengths.max() <= SMALL.max_events
    assert np.mean(lengths == SMALL.min_events) > np.mean(lengths == SMALL.min_events + 5)  # decreasing mass
    items = np.concatenate([dataset.user_events(u)[1]["item_id"] for u in range(200)])
    counts = np.sort(np.bincount(items))[::-1]
    assert counts[0] > 10 * np.median(counts[counts > 0])  # heavy head
    assert items.min() >= 1 and items.max() <= SMALL.num_items
    batch = collate_samples([dataset[i] for i in range(32)], dataset.schema)
    assert batch.features.keys() == ["user_id", "user_segment", "item_id", "action", "timestamp"]
    assert int(batch.item_lengths().max()) <= 40
    for user in batch.features["timestamp"].to_dense():
        assert (user[1:] >= user[:-1]).all()
    assert set(batch.labels.unique().tolist()) <= {0.0, 1.0} and batch.labels.shape[1] == 2


def _history_overlap_features(dataset: SyntheticDataset, users: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per candidate: share of history items in the candidate's cluster and the candidate's task-1 quality bit;
    plus the click and task-1 labels."""
    features, clicks, quality = [], [], []
    for index in users:
        sample = dataset[index]
        history_length = len(sample.sequence["item_id"]) - sample.num_candidates
        clusters = dataset.item_cluster(sample.sequence["item_id"])
        candidates = sample.sequence["item_id"][history_length:]
        actions = sample.sequence["action"][history_length:]
        overlap = (clusters[:history_length][None, :] == clusters[history_length:][:, None]).mean(axis=1)
        quality_bit = (dataset.item_quality_bits(candidates) >> 1) & 1
        features.append(np.stack([overlap, quality_bit], axis=1))
        clicks.append(actions & 1)
        quality.append((actions >> 1) & 1)
    return np.concatenate(features), np.concatenate(clicks), np.concatenate(quality)


def test_planted_click_signal_is_learnable_from_history():
    dataset = SyntheticDataset(SMALL, kind="ranking", max_train_candidates=2)
    features, clicks, quality = _history_overlap_features(dataset, range(0, 400))
    test_features, test_clicks, _ = _history_overlap_features(dataset, range(400, 600))
    model = LogisticRegression().fit(features, clicks)
    auc = roc_auc_score(test_clicks, model.predict_proba(test_features)[:, 1])
    assert auc > 0.75, auc
    clicked = clicks == 1
    assert roc_auc_score(quality[clicked], features[clicked, 1]) > 0.7  # item-level signal of task 1


def test_retrieval_next_item_is_predictable_above_chance():
    dataset = SyntheticDataset(SMALL, kind="retrieval", split="eval")
    same_cluster = []
    for index in range(300):
        items = dataset[index].sequence["item_id"]
        clusters = dataset.item_cluster(items)
        same_cluster.append(clusters[-1] == clusters[-2])
    assert np.mean(same_cluster) > 1.0 / SMALL.num_clusters + 0.3


def test_config_validation():
    with pytest.raises(ValueError, match="num_items"):
        SyntheticConfig(num_items=5, num_clusters=10)
    with pytest.raises(ValueError, match="min_events"):
        SyntheticDataset(SyntheticConfig(min_events=2), kind="ranking", split="train", max_train_candidates=2)
