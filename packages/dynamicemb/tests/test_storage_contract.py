"""The behaviour every Storage shares (dict, RocksDB on local disk, Redis on loopback), and tables on top of them."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingConfig

from dynamicemb import (
    DynamicEmbDump,
    DynamicEmbeddingCollection,
    DynamicEmbeddingTable,
    DynamicEmbInitializerArgs,
    DynamicEmbInitializerMode,
    DynamicEmbLoad,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbScoreStrategy,
    DynamicEmbTableOptions,
    dynamic_embedding_lookup,
)
from dynamicemb.storage import Storage
from dynamicemb.storage.cached_store import CachedKeyValueTable

INT64_MIN, INT64_MAX = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
STORAGE_KINDS = ["dict", "rocksdb", "rocksdb-write-behind", "redis"]
NewStorage = Callable[..., Storage]  # the new_storage fixture (conftest.py)
LARGE_BATCH_ROWS = int(os.environ.get("DYNAMICEMB_STORAGE_LARGE_ROWS", 1_000_000))

pytestmark = pytest.mark.parametrize("kind", STORAGE_KINDS)


def _random_keys(n: int, seed: int) -> torch.Tensor:
    """``n`` distinct int64 keys in random order, the extremes among them."""
    g = torch.Generator().manual_seed(seed)
    extremes = torch.tensor([INT64_MIN, INT64_MAX, 0, -1])
    drawn = torch.randint(INT64_MIN, INT64_MAX, (2 * n,), generator=g).unique()
    keys = torch.cat([extremes, drawn[~torch.isin(drawn, extremes)][: n - 4]])
    return keys[torch.randperm(n, generator=g)]


def _stored(storage: Storage, **dump_args) -> dict[int, tuple[torch.Tensor, int]]:
    """Every dumped row by key; fails on a key dumped twice."""
    rows: dict[int, tuple[torch.Tensor, int]] = {}
    for keys, values, scores in storage.dump(**dump_args):
        for key, row, score in zip(keys.tolist(), values, scores.tolist()):
            assert key not in rows, f"key {key} dumped twice"
            rows[key] = (row, score)
    return rows


# --- rows ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_rows_round_trip(kind: str, dtype: torch.dtype, new_storage: NewStorage) -> None:
    storage = new_storage(kind, 7, dtype)
    keys = _random_keys(500, seed=1)
    rows = torch.randn(500, 7).to(dtype)
    scores = torch.randint(0, 1 << 40, (500,))
    storage.insert(keys, rows, scores)
    assert storage.size() == 500
    order = torch.randperm(500)
    values, found = storage.find(keys[order])
    assert bool(found.all()) and values.dtype == dtype
    assert torch.equal(values, rows[order])
    dumped = _stored(storage, batch_size=64)
    assert sorted(dumped) == sorted(keys.tolist())
    assert {k: s for k, (_, s) in dumped.items()} == dict(zip(keys.tolist(), scores.tolist()))
    assert torch.equal(torch.stack([dumped[k][0] for k in keys.tolist()]), rows)


def test_missing_keys_are_not_found(kind: str, new_storage: NewStorage) -> None:
    storage = new_storage(kind, 3)
    values, found = storage.find(torch.tensor([1, INT64_MIN]))
    assert found.tolist() == [False, False] and values.shape == (2, 3)
    storage.insert(torch.tensor([5, 6]), torch.ones(2, 3), torch.tensor([1, 1]))
    values, found = storage.find(torch.tensor([7, 5, INT64_MAX, 6]))
    assert found.tolist() == [False, True, False, True]
    assert values[1].tolist() == [1.0, 1.0, 1.0] and storage.contains(torch.tensor([6, 8])).tolist() == [True, False]
    empty_values, empty_found = storage.find(torch.zeros(0, dtype=torch.int64))
    assert empty_values.shape == (0, 3) and empty_found.shape == (0,)
    assert storage.size() == 2


def test_overwrite_replaces_rows_and_scores(kind: str, new_storage: NewStorage) -> None:
    storage = new_storage(kind, 2)
    storage.insert(torch.tensor([1, 2, 3]), torch.zeros(3, 2), torch.tensor([10, 20, 30]))
    storage.insert(torch.tensor([3, 1]), torch.tensor([[3.0, 3.0], [1.0, 1.0]]), torch.tensor([33, 11]))
    storage.insert(torch.tensor([2, 4]), torch.tensor([[2.0, 2.0], [4.0, 4.0]]))  # no scores: 2 keeps 20, 4 gets 0
    dumped = _stored(storage)
    assert {k: (row.tolist(), s) for k, (row, s) in dumped.items()} == {
        1: ([1.0, 1.0], 11),
        2: ([2.0, 2.0], 20),
        3: ([3.0, 3.0], 33),
        4: ([4.0, 4.0], 0),
    }
    with pytest.raises(ValueError, match="values"):
        storage.insert(torch.tensor([1]), torch.ones(1, 3))


def test_erase_removes_keys_and_they_can_come_back(kind: str, new_storage: NewStorage) -> None:
    storage = new_storage(kind, 2)
    storage.insert(torch.arange(10), torch.arange(20.0).view(10, 2), torch.arange(10))
    assert storage.erase(torch.tensor([3, 99, 7])).tolist() == [True, False, True]
    assert storage.size() == 8 and sorted(_stored(storage)) == [0, 1, 2, 4, 5, 6, 8, 9]
    storage.insert(torch.tensor([3, 11]), torch.full((2, 2), -1.0), torch.tensor([5, 5]))
    values, found = storage.find(torch.arange(12))
    assert found.tolist() == [True] * 7 + [False, True, True, False, True]
    assert values[3].tolist() == [-1.0, -1.0] and values[4].tolist() == [8.0, 9.0]  # other rows untouched


def test_dump_batches_and_score_threshold(kind: str, new_storage: NewStorage) -> None:
    storage = new_storage(kind, 1)
    keys = torch.arange(-100, 100) * 7919
    storage.insert(keys, keys.float().unsqueeze(1), torch.arange(200))
    batches = list(storage.dump(batch_size=30))
    assert all(0 < b[0].numel() <= 30 for b in batches)
    assert sum(b[0].numel() for b in batches) == 200
    recent = _stored(storage, min_score=150, batch_size=16)
    assert sorted(recent) == sorted(keys[150:].tolist())
    assert all(row.item() == float(k) and s >= 150 for k, (row, s) in recent.items())


def test_large_batch(kind: str, new_storage: NewStorage) -> None:
    """One call with ``LARGE_BATCH_ROWS`` rows (1M unless the environment says otherwise)."""
    storage = new_storage(kind, 4)
    n = LARGE_BATCH_ROWS
    keys = torch.randperm(4 * n)[:n] * 7 - 2 * n
    rows = torch.randn(n, 4)
    start = time.perf_counter()
    storage.insert(keys, rows, torch.zeros(n, dtype=torch.int64))
    values, found = storage.find(keys.flip(0))
    elapsed = time.perf_counter() - start
    assert bool(found.all()) and torch.equal(values, rows.flip(0))
    assert storage.size() == n
    print(f"{kind}: {n} rows inserted and found in {elapsed:.2f} s")


def test_concurrent_readers_see_consistent_rows(kind: str, new_storage: NewStorage) -> None:
    """Four reader threads; for the stores that allow it (not the dict), a writer adds keys meanwhile:
    keys ``3i`` hold ``3i``, the writer's keys ``3i + 1`` hold ``3i`` once written, ``3i + 2`` never exist."""
    storage = new_storage(kind, 8)
    n = 20_000
    keys = torch.arange(n) * 3
    rows = keys.float().unsqueeze(1).expand(n, 8).contiguous()
    storage.insert(keys, rows, torch.zeros(n, dtype=torch.int64))
    errors: list[str] = []

    def read(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(5):
            asked = torch.randint(0, 3 * n, (2000,), generator=g)
            values, found = storage.find(asked)
            if not torch.equal(found[asked % 3 == 0], torch.ones_like(found[asked % 3 == 0])):
                errors.append(f"reader {seed}: a stored key was not found")
            if bool(found[asked % 3 == 2].any()):
                errors.append(f"reader {seed}: a key never stored was found")
            row_values = (asked - asked % 3).float().unsqueeze(1).expand(-1, 8)
            if not torch.equal(values[found], row_values[found]):
                errors.append(f"reader {seed}: wrong or torn rows")

    readers = [threading.Thread(target=read, args=(seed,)) for seed in range(4)]
    for reader in readers:
        reader.start()
    if kind != "dict":  # PyDictStorage is a single-threaded reference: no writes during reads
        storage.insert(keys + 1, rows, torch.ones(n, dtype=torch.int64))
    for reader in readers:
        reader.join()
    assert errors == []


# --- tables over a storage ---------------------------------------------------------------------------
SGD = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.SGD, learning_rate=0.25)
DIM = 4


def _table(storage: Storage, *, caching: bool) -> DynamicEmbeddingTable:
    """A table of 64 slots (the host table too, with ``caching``) in front of ``storage``; new
    rows start at 1.0, so after SGD on ``loss = sum`` a row is ``1 - lr * (times looked up)``."""
    options = DynamicEmbTableOptions(
        bucket_capacity=8,
        max_capacity=64,
        caching=caching,
        global_hbm_for_values=16 * DIM * 4,
        external_storage=storage,
        score_strategy=DynamicEmbScoreStrategy.STEP,
        initializer_args=DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.CONSTANT, value=1.0),
    )
    return DynamicEmbeddingTable(name="t", dim=DIM, num_embeddings=64, options=options, optimizer=SGD)


@pytest.mark.parametrize("caching", [False, True], ids=["cache-store", "cache-host-store"])
def test_rows_evicted_by_a_table_land_in_the_storage(kind: str, caching: bool, new_storage: NewStorage) -> None:
    storage = new_storage(kind, DIM)
    table = _table(storage, caching=caching)
    lookups = torch.zeros(300)
    last_two_steps: set[int] = set()
    for seed in range(6):
        ids = torch.randint(0, 300, (120,), generator=torch.Generator().manual_seed(seed))
        dynamic_embedding_lookup(table, ids, training=True).sum().backward()
        lookups += torch.bincount(ids, minlength=300)
        if seed >= 4:
            last_two_steps.update(ids.tolist())
    seen = lookups.nonzero().squeeze(1)
    assert storage.size() > 100  # most rows left the device cache (and the host table) for the storage
    # What an incremental dump takes: rows scored at step 5 or later (STEP scores), wherever they are.
    assert {k for keys, _, _, _ in table.export(min_score=5) for k in keys.tolist()} == last_two_steps
    exported = {k: row for keys, rows, _, _ in table.export() for k, row in zip(keys.tolist(), rows)}
    assert sorted(exported) == seen.tolist()  # every row once, none lost
    expected = 1.0 - SGD.learning_rate * lookups[seen]
    torch.testing.assert_close(torch.stack([exported[k] for k in seen.tolist()]), expected.unsqueeze(1).expand(-1, DIM))
    table.flush()
    values, found = storage.find(seen)
    assert bool(found.all())  # after flush the storage holds every row
    torch.testing.assert_close(values, expected.unsqueeze(1).expand(-1, DIM))
    if caching:
        assert isinstance(table.store.backing, CachedKeyValueTable) and table.store.backing.backing is storage


def _collection(storage: Storage, caching: bool) -> DynamicEmbeddingCollection:
    """Adam, a device cache of 32 rows (with ``caching``, a host table of 64 behind it) in front of ``storage``."""
    adam = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.05)
    options = DynamicEmbTableOptions(
        bucket_capacity=8,
        global_hbm_for_values=32 * 3 * DIM * 4,
        external_storage=storage,
        caching=caching,
        max_capacity=64 if caching else 512,
    )
    config = EmbeddingConfig(name="t", embedding_dim=DIM, num_embeddings=512, feature_names=["f"])
    return DynamicEmbeddingCollection(tables=[config], table_options=options, optimizer=adam)


def _rows_of(module: DynamicEmbeddingCollection) -> dict[int, tuple[list[float], list[float], int]]:
    table = module.dynamic_embedding_tables()["t"]
    rows = {}
    for keys, embeddings, state, scores in table.export():
        for key, embedding, row_state, score in zip(keys.tolist(), embeddings, state, scores.tolist()):
            assert key not in rows, f"key {key} exported twice"
            rows[key] = (embedding.tolist(), row_state.tolist(), score)
    return rows


@pytest.mark.parametrize("caching", [False, True], ids=["cache-store", "cache-host-store"])
def test_dump_and_load_include_the_rows_in_the_storage(
    kind: str, caching: bool, new_storage: NewStorage, tmp_path
) -> None:
    source = _collection(new_storage(kind, 3 * DIM), caching)
    table = source.dynamic_embedding_tables()["t"]
    for seed in range(4):
        ids = torch.randint(0, 400, (150,), generator=torch.Generator().manual_seed(seed))
        dynamic_embedding_lookup(table, ids, training=True).square().sum().backward()
    source_storage = table.store.backing.backing if caching else table.store.backing
    assert source_storage.size() > 100
    DynamicEmbDump(str(tmp_path / "dump"), source, optim=True)
    target_storage = new_storage(kind, 3 * DIM)
    restored = _collection(target_storage, caching)
    DynamicEmbLoad(str(tmp_path / "dump"), restored, optim=True)
    source_rows = _rows_of(source)
    assert _rows_of(restored) == source_rows
    # Rows that were in the device cache went back to it; all others (the host table's too) are in the new storage.
    restored_cache = restored.dynamic_embedding_tables()["t"].store.cache
    assert restored_cache.size() == table.store.cache.size() > 0
    assert target_storage.size() == len(source_rows) - restored_cache.size()


@pytest.mark.parametrize("caching", [False, True], ids=["cache-store", "cache-host-store"])
def test_an_lfu_key_coming_back_from_the_storage_keeps_its_count(
    kind: str, caching: bool, new_storage: NewStorage
) -> None:
    storage = new_storage(kind, DIM)
    storage.insert(torch.tensor([7, 8]), torch.ones(2, DIM), torch.tensor([10, 4]))  # counts from earlier training
    scores, found = storage.find_scores(torch.tensor([8, 7, 9]))
    assert scores.tolist()[:2] == [4, 10] and found.tolist() == [True, True, False]
    options = DynamicEmbTableOptions(
        bucket_capacity=8,
        max_capacity=64,
        caching=caching,
        global_hbm_for_values=16 * DIM * 4,
        external_storage=storage,
        score_strategy=DynamicEmbScoreStrategy.LFU,
    )
    table = DynamicEmbeddingTable(name="t", dim=DIM, num_embeddings=64, options=options, optimizer=SGD)
    out = dynamic_embedding_lookup(table, torch.tensor([7, 7, 9]), training=True)
    torch.testing.assert_close(out[0], torch.ones(DIM))  # the stored row, not a fresh one
    cached_counts, _ = table.store.cache.find_scores(torch.tensor([7, 9]))
    assert cached_counts.tolist() == [11, 1]  # 10 before + this lookup; a new key starts at 1
