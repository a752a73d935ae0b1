"""Value rows by slot (device / device + host split), the key-value table over the hash index."""

from __future__ import annotations

import pytest
import torch

from dynamicemb import KeyValueTable, PyDictStorage
from dynamicemb.hash_index.base import SlotRemap
from dynamicemb.storage import (
    DeviceValueStore,
    SplitValueStore,
    create_value_store,
    kernels_reach_pinned_memory,
    resize_value_store,
)
from dynamicemb.types import DynamicEmbScoreStrategy

CPU = torch.device("cpu")
INT64_MIN, INT64_MAX = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max


def _sequential_rows(value_dim: int):
    """``new_rows`` giving row i of a call the value ``1000 * call + i`` (so tests can tell rows apart)."""
    calls = [0]

    def new_rows(n: int) -> torch.Tensor:
        calls[0] += 1
        base = torch.arange(n, dtype=torch.float32) + 1000 * calls[0]
        return base.unsqueeze(1).expand(n, value_dim).clone()

    return new_rows


def _table(*, capacity=64, max_capacity=None, budget=None, strategy=DynamicEmbScoreStrategy.TIMESTAMP, bucket=8,
           dim=3, value_dim=5) -> KeyValueTable:  # fmt: skip
    return KeyValueTable(
        dim=dim,
        value_dim=value_dim,
        dtype=torch.float32,
        device=CPU,
        init_capacity=capacity,
        max_capacity=max_capacity or capacity,
        bucket_capacity=bucket,
        max_load_factor=0.5,
        score_strategy=strategy,
        device_budget_bytes=budget,
        new_rows=_sequential_rows(value_dim),
    )


# --- value stores --------------------------------------------------------------------------------
@pytest.mark.parametrize("device_rows", [0, 5, 16])
def test_value_store_reads_what_was_written(device_rows: int) -> None:
    store = create_value_store(16, 4, torch.float32, CPU, device_rows * 16)
    assert isinstance(store, DeviceValueStore if device_rows == 16 else SplitValueStore)
    assert store.device_rows == device_rows
    assert store.memory_bytes() == (device_rows * 16, (16 - device_rows) * 16)
    slots = torch.tensor([15, 0, 7, 4, 5, 9])
    rows = torch.randn(6, 4)
    store.write(slots, rows)
    torch.testing.assert_close(store.read(slots), rows)
    torch.testing.assert_close(store.read(slots.flip(0), columns=2), rows.flip(0)[:, :2])
    assert store.read(slots[:0]).shape == (0, 4)


def test_split_store_puts_rows_past_the_budget_in_the_host_part() -> None:
    store = SplitValueStore(8, 2, torch.float32, CPU, device_rows=3)
    store.write(torch.tensor([2, 3]), torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    assert store.device_part[2].tolist() == [1.0, 1.0]
    assert store.host_part[0].tolist() == [2.0, 2.0]


def test_split_store_copy_path_skips_missing_slots() -> None:
    store = SplitValueStore(8, 2, torch.float32, CPU, device_rows=3)
    store.write_placed(torch.tensor([-1, 1, 6]), torch.tensor([[9.0, 9.0], [1.0, 1.0], [6.0, 6.0]]))
    assert store.read(torch.tensor([1, 6, -1])).tolist() == [[1.0, 1.0], [6.0, 6.0], [0.0, 0.0]]
    assert store.host_access == "copy"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(device_rows=8), "device_rows"),
        (dict(device_rows=2, host_access="dma"), "host_access"),
        (dict(device_rows=2, host_access="kernel"), "needs a CUDA device"),
    ],
)
def test_split_store_rejects_bad_arguments(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SplitValueStore(8, 2, torch.float32, CPU, **kwargs)


@pytest.mark.gpu
def test_split_store_kernel_and_copy_paths_agree_gpu() -> None:
    cuda = torch.device("cuda")
    assert kernels_reach_pinned_memory(cuda), "Triton kernels cannot reach pinned host memory on this device"
    stores = [SplitValueStore(4096, 24, torch.float32, cuda, 1000, host_access=a) for a in ("kernel", "copy")]
    assert SplitValueStore(16, 2, torch.float32, cuda, 4).host_access == "kernel"
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        slots = torch.randperm(4096, generator=g)[:700].cuda()
        slots[::7] = -1
        rows = torch.randn(700, 24, generator=g).cuda()
        for store in stores:
            store.write_placed(slots, rows)
        read = torch.randint(-1, 4096, (900,), generator=g).cuda()
        torch.testing.assert_close(stores[0].read(read, columns=16), stores[1].read(read, columns=16), rtol=0, atol=0)
    torch.cuda.synchronize()
    assert torch.equal(stores[0].host_part, stores[1].host_part)
    assert torch.equal(stores[0].device_part, stores[1].device_part)


@pytest.mark.parametrize("budget", [None, 3 * 8])
def test_resize_moves_rows_as_the_remap_says(budget: int | None) -> None:
    old = create_value_store(4, 2, torch.float32, CPU, budget)
    old.write(torch.arange(4), torch.arange(8, dtype=torch.float32).view(4, 2))
    remap = SlotRemap(4, 8, old_slots=torch.tensor([0, 1, 3]), new_slots=torch.tensor([7, 2, 4]))
    new = resize_value_store(old, remap, budget)
    assert new.capacity == 8
    torch.testing.assert_close(new.read(torch.tensor([7, 2, 4])), torch.tensor([[0.0, 1], [2, 3], [6, 7]]))


# --- key-value table -------------------------------------------------------------------------------
def test_find_or_insert_initializes_new_keys_and_find_reports_them() -> None:
    table = _table()
    keys = torch.tensor([INT64_MIN, 0, -1, INT64_MAX, 42])
    values = table.find_or_insert(keys)
    assert sorted(values[:, 0].tolist()) == [1000.0, 1001.0, 1002.0, 1003.0, 1004.0]
    found_values, found = table.find(torch.tensor([42, 7, INT64_MIN]))
    assert found.tolist() == [True, False, True]
    torch.testing.assert_close(found_values[0], values[4])
    assert found_values[1].abs().sum() == 0
    again = table.find_or_insert(keys)
    torch.testing.assert_close(again, values)  # existing keys keep their rows
    assert table.size() == 5


def test_growth_moves_values_with_their_keys() -> None:
    table = _table(capacity=16, max_capacity=256)
    # Seeded: with buckets of 8, some draws put 9 keys in one bucket and the table rightly evicts one.
    g = torch.Generator().manual_seed(0)
    keys = torch.randperm(10_000, generator=g)[:100]
    rows = torch.randn(100, 5, generator=g)
    for chunk in range(0, 100, 20):
        table.insert(keys[chunk : chunk + 20], rows[chunk : chunk + 20])
    assert table.capacity > 16
    assert table.load_factor() <= 0.5
    values, found = table.find(keys)
    assert bool(found.all())
    torch.testing.assert_close(values, rows)


def test_growth_moves_values_across_the_device_host_split() -> None:
    table = _table(capacity=16, max_capacity=128, budget=10 * 5 * 4)  # 10 rows in "device" memory
    keys = torch.arange(60) * 7919
    rows = torch.randn(60, 5)
    for chunk in range(0, 60, 15):
        table.insert(keys[chunk : chunk + 15], rows[chunk : chunk + 15])
    assert isinstance(table.values, SplitValueStore) and table.values.device_rows == 10
    values, found = table.find(keys)
    assert bool(found.all())
    torch.testing.assert_close(values, rows)


def test_insert_and_evict_returns_evicted_keys_scores_and_values() -> None:
    table = _table(capacity=8, bucket=8, strategy=DynamicEmbScoreStrategy.CUSTOMIZED)
    keys = torch.arange(8)
    rows = torch.randn(8, 5)
    evicted, refused = table.insert_and_evict(keys, rows, torch.arange(10, 18))
    assert evicted.keys.numel() == 0 and not bool(refused.any())
    new_rows = torch.randn(3, 5)
    evicted, refused = table.insert_and_evict(torch.tensor([100, 101, 102]), new_rows, torch.tensor([50, 50, 1]))
    # Two keys scored 50 push out the two lowest (keys 0 and 1, scores 10 and 11); score 1 is refused.
    assert refused.tolist() == [False, False, True]
    order = evicted.keys.argsort()
    assert evicted.keys[order].tolist() == [0, 1]
    assert evicted.scores[order].tolist() == [10, 11]
    torch.testing.assert_close(evicted.values[order], rows[:2])
    values, found = table.find(torch.tensor([100, 101, 102]))
    assert found.tolist() == [True, True, False]
    torch.testing.assert_close(values[:2], new_rows[:2])


def test_dump_and_load_keep_values_and_scores() -> None:
    source = _table(capacity=32, strategy=DynamicEmbScoreStrategy.CUSTOMIZED)
    keys = torch.tensor([5, -9, INT64_MAX, 3])
    rows = torch.randn(4, 5)
    source.insert(keys, rows, torch.tensor([7, 8, 9, 10]))
    batches = list(source.dump(batch_size=8))
    assert len(batches) >= 1
    dumped_keys = torch.cat([b[0] for b in batches])
    assert sorted(dumped_keys.tolist()) == sorted(keys.tolist())
    high = torch.cat([b[0] for b in source.dump(min_score=9)])
    assert sorted(high.tolist()) == [3, INT64_MAX]
    target = _table(capacity=32, strategy=DynamicEmbScoreStrategy.TIMESTAMP)
    for batch in batches:
        target.load(*batch)
    values, found = target.find(keys)
    assert bool(found.all())
    torch.testing.assert_close(values, rows)
    restored = {k: s for b in target.dump() for k, s in zip(b[0].tolist(), b[2].tolist())}
    assert restored == {5: 7, -9: 8, INT64_MAX: 9, 3: 10}


def test_erase_removes_keys() -> None:
    table = _table()
    table.find_or_insert(torch.tensor([1, 2, 3]))
    assert table.erase(torch.tensor([2, 9])).tolist() == [True, False]
    assert table.contains(torch.tensor([1, 2, 3])).tolist() == [True, False, True]


# --- the dict storage -------------------------------------------------------------------------------
def test_py_dict_storage_round_trip() -> None:
    storage = PyDictStorage(value_dim=3)
    keys = torch.tensor([4, INT64_MIN, 11])
    rows = torch.randn(3, 3)
    storage.insert(keys, rows, torch.tensor([1, 2, 3]))
    storage.insert(torch.tensor([11]), torch.ones(1, 3), torch.tensor([9]))
    values, found = storage.find(torch.tensor([11, 5, INT64_MIN]))
    assert found.tolist() == [True, False, True]
    torch.testing.assert_close(values[0], torch.ones(3))
    torch.testing.assert_close(values[2], rows[1])
    dumped = {k: s for b in storage.dump(min_score=2) for k, s in zip(b[0].tolist(), b[2].tolist())}
    assert dumped == {INT64_MIN: 2, 11: 9}
    assert storage.size() == 3
    with pytest.raises(ValueError, match="values"):
        storage.insert(torch.tensor([1]), torch.ones(1, 4))
