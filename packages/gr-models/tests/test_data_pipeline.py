"""The DataLoader pipeline: worker processes give the same batches, ranks split users without overlap."""

from __future__ import annotations

import pytest
import torch

from gr_models.data.pipeline import UserShardSampler, build_dataloader, data_parallel_position
from gr_models.data.synthetic import SyntheticConfig, SyntheticDataset

CONFIG = SyntheticConfig(num_users=103, num_items=500, num_clusters=10, max_events=30, seed=1)


def _user_ids(loader) -> list[int]:
    ids = []
    for batch in loader:
        ids.extend(batch.features["user_id"].values().tolist())
    return ids


def test_workers_yield_the_same_batches_as_the_main_process():
    dataset = SyntheticDataset(CONFIG, kind="ranking", max_train_candidates=4, max_sequence_length=24)
    serial = list(build_dataloader(dataset, 16, seed=5, num_workers=0))
    parallel = list(build_dataloader(dataset, 16, seed=5, num_workers=2, prefetch_factor=2, pin_memory=True))
    assert len(serial) == len(parallel) == 7
    for a, b in zip(serial, parallel):
        assert a.features.keys() == b.features.keys()
        assert torch.equal(a.features.values(), b.features.values())
        assert torch.equal(a.features.lengths(), b.features.lengths())
        assert torch.equal(a.labels, b.labels) and torch.equal(a.num_candidates, b.num_candidates)


def test_ranks_split_users_without_overlap():
    dataset = SyntheticDataset(CONFIG, kind="retrieval", max_sequence_length=24)
    shards = [_user_ids(build_dataloader(dataset, 8, rank=r, world_size=3, even_shards=False)) for r in range(3)]
    assert sum(len(s) for s in shards) == 103
    # user_id = index + 1: every user exactly once
    assert sorted(user for shard in shards for user in shard) == list(range(1, 104))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    padded = [_user_ids(build_dataloader(dataset, 8, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in padded] == [35, 35, 35]
    assert {user for shard in padded for user in shard} == set(range(1, 104))
    assert len(set(padded[0]) & set(padded[1])) <= 2  # only the two padding repeats can coincide


def test_epochs_reshuffle_and_unshuffled_order_is_stable():
    sampler = UserShardSampler(20, rank=0, world_size=1, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(20)) and first != second
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(UserShardSampler(5, rank=1, world_size=2, shuffle=False, even_shards=False)) == [1, 3]
    assert list(UserShardSampler(5, rank=1, world_size=2, shuffle=False)) == [1, 3, 0]


def test_rank_resolution():
    assert data_parallel_position() == (0, 1)  # no process group: the only rank
    with pytest.raises(ValueError, match="rank"):
        UserShardSampler(10, rank=4, world_size=4)
    dataset = SyntheticDataset(CONFIG, kind="retrieval", max_sequence_length=24)
    with pytest.raises(ValueError, match="batch_size"):
        build_dataloader(dataset, 0)
