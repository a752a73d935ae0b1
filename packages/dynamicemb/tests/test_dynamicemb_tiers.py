"""Storage tiers under training: device + host split, device cache over a host table, external storage."""

from __future__ import annotations

import pytest
import torch

from dynamicemb import (
    DynamicEmbeddingTable,
    DynamicEmbInitializerArgs,
    DynamicEmbInitializerMode,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbScoreStrategy,
    DynamicEmbTableOptions,
    PyDictStorage,
    dynamic_embedding_lookup,
)
from dynamicemb.storage import SplitValueStore
from dynamicemb.storage.cached_store import CachedKeyValueTable
from dynamicemb.storage.key_value_store import KeyValueTable

DIM = 4
SGD = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.SGD, learning_rate=0.5)
ROW_BYTES = DIM * 4


def _table(**options) -> DynamicEmbeddingTable:
    options.setdefault("bucket_capacity", 8)
    options.setdefault("initializer_args", DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.NORMAL))
    return DynamicEmbeddingTable(
        name="t", dim=DIM, num_embeddings=256, options=DynamicEmbTableOptions(**options), optimizer=SGD
    )


def _train(table: DynamicEmbeddingTable, ids: torch.Tensor) -> torch.Tensor:
    """One SGD step with loss = sum of the embeddings; returns the rows expected afterwards ``[N, DIM]``."""
    out = dynamic_embedding_lookup(table, ids, training=True)
    out.sum().backward()
    counts = torch.bincount(torch.unique(ids, return_inverse=True)[1]).float()
    _, inverse = torch.unique(ids, return_inverse=True)
    return out.detach() - SGD.learning_rate * counts[inverse].unsqueeze(1)


def _eval_rows(table: DynamicEmbeddingTable, ids: torch.Tensor) -> torch.Tensor:
    return dynamic_embedding_lookup(table, ids, training=False)


def test_split_table_trains_like_a_device_table() -> None:
    split = _table(global_hbm_for_values=5 * ROW_BYTES, init_capacity=16)
    whole = _table(init_capacity=16)
    assert isinstance(split.store, KeyValueTable) and split.store.values.device_rows == 5
    batches = [torch.randint(0, 40, (30,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    results = []
    for table in (split, whole):
        torch.manual_seed(0)  # the same initializer draws for both tables
        results.append([_train(table, ids) for ids in batches])
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference)
    assert split.capacity > 16  # grew, moving rows across the split
    assert isinstance(split.store.values, SplitValueStore)
    ids = torch.arange(40)
    torch.testing.assert_close(_eval_rows(split, ids), _eval_rows(whole, ids))


def _cached(**options) -> DynamicEmbeddingTable:
    table = _table(caching=True, global_hbm_for_values=8 * ROW_BYTES, **options)
    assert isinstance(table.store, CachedKeyValueTable) and table.store.cache.capacity == 8
    return table


def test_cache_writes_back_evicted_rows_and_reads_them_back() -> None:
    table = _cached()
    batches = [torch.arange(8) + 8 * i for i in range(4)]
    expected = {}
    for ids in batches:
        for key, row in zip(ids.tolist(), _train(table, ids)):
            expected[key] = row
    store = table.store
    assert store.cache.size() == 8
    assert store.backing.size() >= 24  # the evicted rows went to the host table
    all_ids = torch.arange(32)
    torch.testing.assert_close(_eval_rows(table, all_ids), torch.stack([expected[k] for k in range(32)]))
    # The first batch is long gone from the cache: training on it reads its rows back from the host table.
    assert not bool(store.cache.contains(batches[0]).any())
    again = _train(table, batches[0])
    torch.testing.assert_close(again + SGD.learning_rate, torch.stack([expected[k] for k in range(8)]))
    assert bool(store.cache.contains(batches[0]).all())
    assert table.size() == 32


def test_lfu_keys_returning_from_the_host_table_keep_their_counts() -> None:
    table = _cached(score_strategy=DynamicEmbScoreStrategy.LFU)
    store = table.store
    residents = torch.arange(8)
    for _ in range(3):
        _train(table, residents)  # the cache's 8 slots hold keys counted 3 times
    hot = torch.tensor([100])
    for _ in range(4):
        _train(table, hot)  # refused by the full cache (count 1 < 3): counted in the host table
    assert not bool(store.cache.contains(hot).any())
    host_count, found = store.backing.find_scores(hot)
    assert bool(found.all()) and int(host_count) >= 2
    store.cache.erase(residents[:1])  # room in the cache
    _train(table, hot)
    assert bool(store.cache.contains(hot).all())
    cache_count, _ = store.cache.find_scores(hot)
    assert int(cache_count) == int(host_count) + 1, "the count goes on from the host table's, not from 1"


def test_flush_writes_cached_rows_to_the_host_table() -> None:
    table = _cached()
    ids = torch.arange(6)
    expected = _train(table, ids)
    store = table.store
    assert not bool(store.backing.contains(ids).any())
    table.flush()
    values, found = store.backing.find(ids)
    assert bool(found.all())
    torch.testing.assert_close(values, expected)


def test_keys_the_cache_refuses_are_served_and_trained_in_the_host_table() -> None:
    table = _cached(score_strategy=DynamicEmbScoreStrategy.CUSTOMIZED)
    table.set_score(100)
    _train(table, torch.arange(8))  # the cache (one bucket of 8) is full of score 100
    table.set_score(1)
    late = torch.tensor([50, 51])
    expected = _train(table, late)
    store = table.store
    assert not bool(store.cache.contains(late).any())
    assert bool(store.backing.contains(late).all())
    torch.testing.assert_close(_eval_rows(table, late), expected)


@pytest.mark.parametrize("caching", [False, True])
def test_two_lookups_before_their_backwards_update_the_right_rows(caching: bool) -> None:
    table = _cached() if caching else _table(init_capacity=8, max_capacity=64)
    first, second = torch.arange(6), torch.arange(4, 14)
    out_first = dynamic_embedding_lookup(table, first, training=True)
    out_second = dynamic_embedding_lookup(table, second, training=True)  # may evict or move first's rows
    before = {**dict(zip(first.tolist(), out_first.detach())), **dict(zip(second.tolist(), out_second.detach()))}
    out_first.sum().backward()
    out_second.sum().backward()
    steps = {k: (k in first.tolist()) + (k in second.tolist()) for k in range(14)}
    expected = torch.stack([before[k] - SGD.learning_rate * steps[k] for k in range(14)])
    torch.testing.assert_close(_eval_rows(table, torch.arange(14)), expected)


def test_external_storage_holds_the_rows_the_cache_evicts() -> None:
    storage = PyDictStorage(value_dim=DIM)
    table = _table(external_storage=storage, global_hbm_for_values=8 * ROW_BYTES)
    expected = {}
    for i in range(3):
        ids = torch.arange(8) + 8 * i
        expected.update(zip(ids.tolist(), _train(table, ids)))
    assert storage.size() == 16
    values, found = storage.find(torch.arange(8))
    assert bool(found.all())
    torch.testing.assert_close(values, torch.stack([expected[k] for k in range(8)]))
    exported = {k: row for keys, rows, _, _ in table.export() for k, row in zip(keys.tolist(), rows)}
    assert sorted(exported) == list(range(24))
    torch.testing.assert_close(
        torch.stack([exported[k] for k in range(24)]), torch.stack([expected[k] for k in range(24)])
    )


def test_external_storage_rows_must_fit_the_table() -> None:
    with pytest.raises(ValueError, match="backing storage rows"):
        DynamicEmbeddingTable(
            name="t",
            dim=DIM,
            num_embeddings=64,
            options=DynamicEmbTableOptions(external_storage=PyDictStorage(value_dim=DIM), bucket_capacity=8),
            optimizer=DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM),
        )


def test_caching_needs_a_cache_budget() -> None:
    with pytest.raises(ValueError, match="global_hbm_for_values"):
        _table(caching=True)


def test_rows_loaded_past_what_the_host_table_holds_go_to_the_cache() -> None:
    table = _cached(max_capacity=16)  # a host table of two buckets of 8, a cache of one bucket of 8
    store = table.store
    keys = torch.arange(100, 120)
    rows = torch.randn(20, DIM)
    store.load(keys, rows, torch.arange(20))
    assert store.backing.size() == 16 and store.cache.size() == 4
    values, found = store.find(keys)
    assert bool(found.all())
    torch.testing.assert_close(values, rows)


def test_a_loaded_row_replaces_the_cached_copy_of_its_key() -> None:
    table = _cached()
    _train(table, torch.arange(4))
    store = table.store
    rows = torch.full((2, DIM), 9.0)
    store.load(torch.tensor([1, 2]), rows, torch.tensor([5, 5]))
    assert store.cache.contains(torch.arange(4)).tolist() == [True, False, False, True]
    torch.testing.assert_close(_eval_rows(table, torch.tensor([1, 2])), rows)
    store.load_cached(torch.tensor([2]), torch.full((1, DIM), 3.0), torch.tensor([6]))
    assert store.cache.contains(torch.tensor([2])).tolist() == [True]
    torch.testing.assert_close(_eval_rows(table, torch.tensor([2])), torch.full((1, DIM), 3.0))
