"""The layouts a store takes part in: device cache -> store, device cache -> host table -> store;
their planned memory, and a table's flush reaching the store's disk."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingConfig

from dynamicemb import (
    DynamicEmbeddingTable,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbTableOptions,
    PyDictStorage,
    dynamic_embedding_lookup,
)
from dynamicemb.planner import dynamic_table_memory
from dynamicemb.storage.cached_store import CachedKeyValueTable
from dynamicemb.storage.key_value_store import KeyValueTable

ADAM = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM)
DIM = 16
ROW_BYTES = 3 * DIM * 4  # Adam: embedding and two moments, fp32


def _options(caching: bool, storage) -> DynamicEmbTableOptions:
    return DynamicEmbTableOptions(
        caching=caching, global_hbm_for_values=128 * ROW_BYTES, external_storage=storage, bucket_capacity=16
    )


@pytest.mark.parametrize("caching", [False, True])
def test_planned_memory_counts_the_host_table_only_when_there_is_one(caching: bool) -> None:
    config = EmbeddingConfig(name="t", embedding_dim=DIM, num_embeddings=4096, feature_names=["f"])
    memory = dynamic_table_memory(config, _options(caching, PyDictStorage(3 * DIM)), ADAM, 1, "cuda")
    assert memory.cache_bytes > 0 and memory.value_device_bytes == 0
    if caching:  # device cache -> host table of 4096 slots -> store
        without_store = dynamic_table_memory(config, _options(True, None), ADAM, 1, "cuda")
        assert memory == without_store
        assert memory.value_host_bytes == 4096 * ROW_BYTES
    else:  # device cache -> store: the store's memory is its own
        assert memory.value_host_bytes == 0 and memory.index_bytes == 0


def test_caching_with_a_store_builds_three_tiers() -> None:
    storage = PyDictStorage(3 * DIM)
    table = DynamicEmbeddingTable(
        name="t", dim=DIM, num_embeddings=4096, options=_options(True, storage), optimizer=ADAM
    )
    store = table.store
    assert isinstance(store, CachedKeyValueTable) and isinstance(store.cache, KeyValueTable)
    assert isinstance(store.backing, CachedKeyValueTable) and isinstance(store.backing.cache, KeyValueTable)
    assert store.backing.backing is storage
    assert (store.cache.capacity, store.backing.cache.capacity) == (128, 4096)


def test_a_table_flush_makes_the_rows_durable_in_rocksdb(tmp_path) -> None:
    pytest.importorskip("rocksdict", reason="rocksdict is the optional extra dynamicemb[rocksdb]")
    from dynamicemb import RocksDBStorage

    path = tmp_path / "db"
    with RocksDBStorage(path, 3 * DIM) as storage:
        table = DynamicEmbeddingTable(
            name="t", dim=DIM, num_embeddings=4096, options=_options(False, storage), optimizer=ADAM
        )
        ids = torch.randint(0, 1000, (600,), generator=torch.Generator().manual_seed(0))
        dynamic_embedding_lookup(table, ids, training=True).sum().backward()
        cached_only = table.store.cache.size()
        assert cached_only > 0
        table.flush()  # cached rows written back, then the store synced to disk
        expected = {k: row for keys, rows, _, _ in table.export() for k, row in zip(keys.tolist(), rows)}
        with RocksDBStorage(path, 3 * DIM, read_only=True) as on_disk:  # what a new process would see
            keys = torch.tensor(sorted(expected))
            values, found = on_disk.find(keys)
            assert bool(found.all()) and on_disk.size() == len(expected)
            torch.testing.assert_close(values[:, :DIM], torch.stack([expected[k] for k in keys.tolist()]))
