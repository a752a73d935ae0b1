"""One behavioural suite for every hash-table backend (tiny sizes: Triton runs interpreted on CPU)."""

from __future__ import annotations

import pytest
import torch

from dynamicemb.hash_index import DynamicEmbScoreStrategy, create_hash_table
from dynamicemb.hash_index.layout import bucket_of, hash_keys

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SPECIAL_KEYS = [INT64_MIN, INT64_MIN + 1, -1, 0, 1, INT64_MAX - 1, INT64_MAX]


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "triton":
        pytest.importorskip("triton")
    return request.param


def make(backend: str, capacity: int = 256, bucket: int = 16, **kwargs):
    kwargs.setdefault("max_capacity", capacity)
    return create_hash_table(init_capacity=capacity, bucket_capacity=bucket, device=DEVICE, backend=backend, **kwargs)


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


def random_keys(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(INT64_MIN, INT64_MAX, (4 * n,), generator=g, dtype=torch.int64).unique()
    return keys[torch.randperm(keys.numel(), generator=g)[:n]].to(DEVICE)


def keys_in_bucket(num_buckets: int, bucket: int, n: int, seed: int = 0) -> torch.Tensor:
    candidates = random_keys(200 * n * num_buckets, seed)
    return candidates[bucket_of(candidates, num_buckets) == bucket][:n]


def export_all(table) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return table.export_batch(0, table.capacity)


def assert_consistent(table) -> None:
    """Every exported key is unique, found at its slot, and ``size`` counts exactly the entries."""
    keys, slots, _ = export_all(table)
    assert keys.numel() == table.size()
    assert keys.unique().numel() == keys.numel(), "a key has two copies"
    found_slots, found = table.find(keys)
    assert bool(found.all())
    assert torch.equal(found_slots, slots)


def test_hash_matches_murmur3_finalizer() -> None:
    def fmix64(x: int) -> int:
        x &= 2**64 - 1
        x ^= x >> 33
        x = (x * 0xFF51AFD7ED558CCD) & (2**64 - 1)
        x ^= x >> 33
        x = (x * 0xC4CEB9FE1A85EC53) & (2**64 - 1)
        x ^= x >> 33
        return x - 2**64 if x >= 2**63 else x

    keys = [*SPECIAL_KEYS, 12345, -987654321]
    assert hash_keys(torch.tensor(keys)).tolist() == [fmix64(k) for k in keys]


def test_capacity_is_rounded_to_power_of_two_buckets(backend: str) -> None:
    table = make(backend, capacity=100, bucket=16, max_capacity=300)
    assert table.capacity == 128
    assert table.max_capacity == 512
    assert table.size() == 0 and table.load_factor() == 0.0


def test_insert_then_find_special_and_random_keys(backend: str) -> None:
    table = make(backend)
    keys = torch.cat([tensor(SPECIAL_KEYS), random_keys(40, seed=1)])
    slots, found = table.find(keys)
    assert not bool(found.any()) and bool((slots == -1).all()), "an empty table found a key"
    result = table.find_or_insert(keys)
    assert not bool(result.existed.any())
    assert bool((result.slots >= 0).all())
    assert result.slots.unique().numel() == keys.numel()
    assert result.evicted_keys.numel() == 0
    assert table.size() == keys.numel()
    slots, found = table.find(keys)
    assert bool(found.all()) and torch.equal(slots, result.slots)
    again = table.find_or_insert(keys)
    assert bool(again.existed.all()) and torch.equal(again.slots, result.slots)
    assert table.size() == keys.numel()
    exported, _, _ = export_all(table)
    assert sorted(exported.tolist()) == sorted(keys.tolist())
    assert table.load_factor() == keys.numel() / table.capacity
    assert_consistent(table)


def test_every_key_sits_in_its_hash_bucket(backend: str) -> None:
    table = make(backend, capacity=512, bucket=32)
    table.find_or_insert(random_keys(120, seed=19))
    keys, slots, _ = export_all(table)
    assert keys.numel() == 120
    assert torch.equal(slots // table.bucket_capacity, bucket_of(keys, table.num_buckets))


def test_missing_keys_are_not_found_next_to_present_ones(backend: str) -> None:
    table = make(backend)
    present, absent = random_keys(60, seed=2).split([30, 30])
    table.find_or_insert(present)
    slots, found = table.find(torch.cat([absent, present]))
    assert found.tolist() == [False] * 30 + [True] * 30
    assert bool((slots[:30] == -1).all())


def test_duplicates_in_one_batch_share_a_slot(backend: str) -> None:
    table = make(backend)
    base = random_keys(10, seed=3)
    keys = base[torch.tensor([0, 1, 0, 2, 1, 0, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9])]
    result = table.find_or_insert(keys)
    assert not bool(result.existed.any())
    assert table.size() == 10
    for key in base.tolist():
        assert result.slots[keys == key].unique().numel() == 1
    assert_consistent(table)


def test_heavy_collisions_in_one_bucket_leave_a_valid_table(backend: str) -> None:
    table = make(backend, capacity=64, bucket=16)
    crowd = keys_in_bucket(table.num_buckets, 1, 40, seed=4)
    keys = torch.cat([crowd, crowd[:10], crowd[5:8]])
    result = table.find_or_insert(keys)
    accepted = result.slots >= 0
    assert int(accepted[:40].sum()) == 16, "exactly the bucket's 16 slots are filled"
    assert result.slots[:40][accepted[:40]].unique().numel() == 16
    assert result.evicted_keys.numel() == 0, "a call never evicts what it inserted itself"
    for i in range(40, keys.numel()):
        twin = int((crowd == keys[i]).nonzero())
        assert int(result.slots[i]) == int(result.slots[twin])
    assert table.size() == 16
    slots, found = table.find(crowd)
    assert torch.equal(found, accepted[:40])
    assert torch.equal(slots[found], result.slots[:40][accepted[:40]])
    assert_consistent(table)


@pytest.mark.parametrize("newcomers", [10, 20])
def test_repeated_newcomers_to_a_full_bucket_take_one_entry_per_key(backend: str, newcomers: int) -> None:
    table = make(backend, capacity=64, bucket=16)
    crowd = keys_in_bucket(table.num_buckets, 1, 16 + newcomers, seed=12)
    residents, fresh = crowd[:16], crowd[16:]
    table.find_or_insert(residents)
    order = torch.randperm(3 * newcomers, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    keys = fresh.repeat(3)[order]  # each newcomer three times, spread over several chunks of lanes
    result = table.find_or_insert(keys)
    placed_keys = keys[result.slots >= 0].unique()
    assert placed_keys.numel() == min(newcomers, 16)
    for key in fresh.tolist():
        key_slots = result.slots[keys == key]
        assert key_slots.unique().numel() == 1, "the lanes of one key share its slot (or its refusal)"
    assert result.evicted_keys.numel() == placed_keys.numel()
    assert set(result.evicted_keys.tolist()) <= set(residents.tolist())
    assert sorted(result.evicted_slots.tolist()) == sorted(result.slots[result.slots >= 0].unique().tolist())
    assert table.size() == 16
    assert_consistent(table)


def test_scores_at_reads_the_scores_of_found_slots(backend: str) -> None:
    table = make(backend, score_strategy=DynamicEmbScoreStrategy.CUSTOMIZED)
    keys = random_keys(20, seed=21)
    table.find_or_insert(keys, scores=torch.arange(100, 120, device=DEVICE))
    slots, found = table.find(keys)
    assert bool(found.all())
    assert table.scores_at(slots).tolist() == list(range(100, 120))
    with pytest.raises(ValueError, match="missing keys have slot -1"):
        table.scores_at(torch.tensor([-1], device=DEVICE))
    with pytest.raises(ValueError, match="1-D int64"):
        table.scores_at(slots.to(torch.int32))


def test_timestamp_evicts_the_least_recent_entries(backend: str) -> None:
    table = make(backend, capacity=64, bucket=16)
    crowd = keys_in_bucket(table.num_buckets, 2, 24, seed=5)
    old, recent, newcomers = crowd[:8], crowd[8:16], crowd[16:]
    first = table.find_or_insert(crowd[:16])
    table.find(recent, update_score=True)
    result = table.find_or_insert(newcomers)
    assert bool((result.slots >= 0).all())
    assert sorted(result.evicted_keys.tolist()) == sorted(old.tolist())
    old_slots = {int(k): int(s) for k, s in zip(crowd[:16].tolist(), first.slots.tolist())}
    assert sorted(result.evicted_slots.tolist()) == sorted(old_slots[k] for k in old.tolist())
    assert sorted(result.slots.tolist()) == sorted(result.evicted_slots.tolist())
    assert result.evicted_scores.tolist() == [1] * 8, "inserted by the first call of the clock"
    assert not bool(table.find(old)[1].any())
    assert bool(table.find(torch.cat([recent, newcomers]))[1].all())
    _, _, scores = table.export_batch(0, table.capacity)
    assert sorted(set(scores.tolist())) == [2, 3]
    assert_consistent(table)


def test_customized_scores_refuse_a_key_lower_than_every_slot(backend: str) -> None:
    table = make(backend, capacity=64, bucket=16, score_strategy=DynamicEmbScoreStrategy.CUSTOMIZED)
    crowd = keys_in_bucket(table.num_buckets, 0, 18, seed=6)
    table.find_or_insert(crowd[:16], scores=torch.arange(10, 26, device=DEVICE))
    low = table.find_or_insert(crowd[16:17], scores=tensor([5]))
    assert low.slots.tolist() == [-1] and bool(low.refused.all())
    assert low.evicted_keys.numel() == 0
    high = table.find_or_insert(crowd[17:18], scores=tensor([12]))
    assert high.evicted_keys.tolist() == [int(crowd[0])]
    assert high.evicted_scores.tolist() == [10]
    assert high.evicted_slots.tolist() == high.slots.tolist()
    keys, _, scores = export_all(table)
    assert dict(zip(keys.tolist(), scores.tolist()))[int(crowd[17])] == 12
    assert table.size() == 16
    assert_consistent(table)


def test_customized_scores_are_assigned_and_duplicates_keep_the_largest(backend: str) -> None:
    table = make(backend, score_strategy=DynamicEmbScoreStrategy.CUSTOMIZED)
    keys = random_keys(4, seed=7)
    table.find_or_insert(keys, scores=tensor([5, 6, 7, 8]))
    table.find_or_insert(keys[[0, 0, 1, 2]], scores=tensor([3, 9, 1, 7]))
    table.find(keys, update_score=True)
    exported, _, scores = export_all(table)
    got = dict(zip(exported.tolist(), scores.tolist()))
    assert [got[k] for k in keys.tolist()] == [9, 1, 7, 8]


def test_customized_without_scores_is_a_clear_error(backend: str) -> None:
    table = make(backend, score_strategy=DynamicEmbScoreStrategy.CUSTOMIZED)
    with pytest.raises(ValueError, match="CUSTOMIZED needs scores"):
        table.find_or_insert(random_keys(3, seed=8))


def test_step_scores_evict_older_steps_and_refuse_earlier_ones(backend: str) -> None:
    table = make(backend, capacity=64, bucket=16, score_strategy=DynamicEmbScoreStrategy.STEP)
    crowd = keys_in_bucket(table.num_buckets, 3, 20, seed=9)
    table.set_step(7)
    table.find_or_insert(crowd[:16])
    table.set_step(6)
    earlier = table.find_or_insert(crowd[16:18])
    assert bool(earlier.refused.all()), "step 6 is lower than every entry's step"
    table.set_step(8)
    result = table.find_or_insert(crowd[16:20])
    assert bool((result.slots >= 0).all())
    assert result.evicted_scores.tolist() == [7] * 4
    _, _, scores = export_all(table)
    assert sorted(scores.tolist()) == [7] * 12 + [8] * 4


def test_lfu_counts_occurrences_and_evicts_the_least_frequent(backend: str) -> None:
    table = make(backend, capacity=64, bucket=16, score_strategy=DynamicEmbScoreStrategy.LFU)
    crowd = keys_in_bucket(table.num_buckets, 1, 18, seed=10)
    table.find_or_insert(torch.cat([crowd[:16], crowd[1:16]]))
    table.find(crowd[:2], update_score=True)
    keys, _, scores = export_all(table)
    counts = dict(zip(keys.tolist(), scores.tolist()))
    assert counts[int(crowd[0])] == 2 and counts[int(crowd[1])] == 3 and counts[int(crowd[5])] == 2
    table.find(crowd[2:16], update_score=True)
    refused = table.find_or_insert(crowd[16:17])
    assert bool(refused.refused.all()), "count 1 is lower than every entry's count"
    frequent = table.find_or_insert(crowd[[17, 17, 17]])
    assert frequent.evicted_keys.tolist() == [int(crowd[0])]
    assert frequent.evicted_scores.tolist() == [2]
    keys, _, scores = export_all(table)
    assert dict(zip(keys.tolist(), scores.tolist()))[int(crowd[17])] == 3


def test_entries_found_in_a_call_are_not_evicted_by_that_call(backend: str) -> None:
    table = make(backend, capacity=64, bucket=16)
    crowd = keys_in_bucket(table.num_buckets, 0, 24, seed=11)
    table.find_or_insert(crowd[:16])
    result = table.find_or_insert(torch.cat([crowd[:8], crowd[16:24]]))
    assert bool(result.existed[:8].all()) and not bool(result.existed[8:].any())
    assert sorted(result.evicted_keys.tolist()) == sorted(crowd[8:16].tolist())
    assert bool(table.find(crowd[:8])[1].all())
    assert_consistent(table)


def test_no_eviction_raises_naming_the_capacity(backend: str) -> None:
    table = make(backend, capacity=64, bucket=16, score_strategy=DynamicEmbScoreStrategy.NO_EVICTION)
    crowd = keys_in_bucket(table.num_buckets, 2, 17, seed=12)
    table.find_or_insert(crowd[:16])
    with pytest.raises(RuntimeError, match="capacity 64"):
        table.find_or_insert(crowd[16:])
    assert table.size() == 16
    assert_consistent(table)


def test_reserve_grows_by_doubling_and_remaps_slots(backend: str) -> None:
    table = make(backend, capacity=64, bucket=16, max_capacity=512, max_load_factor=0.5)
    keys = random_keys(30, seed=13)
    first = table.find_or_insert(keys)
    values = torch.zeros(table.capacity, dtype=torch.int64, device=DEVICE)
    values[first.slots] = keys
    assert table.reserve(2) is None, "32 keys fit in 64 slots at load factor 0.5"
    remap = table.reserve(90)
    assert remap is not None
    assert (remap.old_capacity, remap.new_capacity, table.capacity) == (64, 256, 256)
    assert remap.old_slots.numel() == 30
    moved = torch.zeros(table.capacity, dtype=torch.int64, device=DEVICE)
    moved[remap.new_slots] = values[remap.old_slots]
    slots, found = table.find(keys)
    assert bool(found.all())
    assert torch.equal(moved[slots], keys)
    assert table.size() == 30
    assert_consistent(table)
    table.find_or_insert(random_keys(90, seed=14))
    assert table.reserve(10_000).new_capacity == 512, "growth stops at max_capacity"
    assert table.reserve(10_000) is None


def test_no_eviction_grows_with_reserve(backend: str) -> None:
    table = make(backend, capacity=64, bucket=16, max_capacity=256, score_strategy=DynamicEmbScoreStrategy.NO_EVICTION)
    keys = random_keys(100, seed=15)
    for chunk in keys.split(25):
        table.reserve(chunk.numel())
        table.find_or_insert(chunk)
    assert table.capacity == 256 and table.size() == 100
    assert bool(table.find(keys)[1].all())


def test_erase_frees_slots_and_keeps_probe_chains(backend: str) -> None:
    table = make(backend, capacity=64, bucket=16)
    crowd = keys_in_bucket(table.num_buckets, 3, 12, seed=16)
    table.find_or_insert(crowd)
    removed = table.erase(torch.cat([crowd[:6:2], tensor([123456789])]))
    assert removed.tolist() == [True, True, True, False]
    assert table.size() == 9
    _, found = table.find(crowd)
    assert found.tolist() == [i not in (0, 2, 4) for i in range(12)]
    reinserted = table.find_or_insert(crowd[:6])
    assert reinserted.existed.tolist() == [False, True, False, True, False, True]
    assert table.size() == 12
    assert_consistent(table)


def test_a_full_bucket_with_erased_slots_fills_them_before_evicting(backend: str) -> None:
    table = make(backend, capacity=64, bucket=16)
    crowd = keys_in_bucket(table.num_buckets, 1, 20, seed=21)
    table.find_or_insert(crowd[:16])
    table.erase(crowd[:2])
    newcomers = torch.cat([crowd[16:18], crowd[16:18]])  # two keys, each twice
    result = table.find_or_insert(newcomers)
    assert result.evicted_keys.numel() == 0, "erased slots are free: nothing is evicted"
    assert result.slots[0] == result.slots[2] and result.slots[1] == result.slots[3]
    assert bool(table.find(torch.cat([crowd[2:16], crowd[16:18]]))[1].all())
    third = table.find_or_insert(crowd[18:19])
    assert third.evicted_keys.numel() == 1, "the bucket is full again, so the next key evicts"
    assert_consistent(table)


def test_more_newcomers_than_evictable_entries_are_refused(backend: str) -> None:
    table = make(backend, capacity=64, bucket=16)
    crowd = keys_in_bucket(table.num_buckets, 2, 30, seed=22)
    table.find_or_insert(crowd[:16])
    # 12 resident keys are found by this call, so only 4 entries can be evicted for 14 newcomers
    result = table.find_or_insert(torch.cat([crowd[:12], crowd[16:30]]))
    placed = result.slots[12:] >= 0
    assert int(placed.sum()) == 4 and result.evicted_keys.numel() == 4
    assert sorted(result.evicted_keys.tolist()) == sorted(crowd[12:16].tolist())
    assert bool(table.find(crowd[:12])[1].all())
    assert table.size() == 16
    assert_consistent(table)


def test_export_batch_covers_slots_and_filters_by_score(backend: str) -> None:
    table = make(backend)
    table.find_or_insert(random_keys(20, seed=17))
    table.find_or_insert(random_keys(20, seed=18))
    parts = [table.export_batch(start, 50) for start in range(0, table.capacity, 50)]
    keys = torch.cat([p[0] for p in parts])
    slots = torch.cat([p[1] for p in parts])
    assert keys.numel() == table.size() == 40
    assert bool((slots[1:] > slots[:-1]).all())
    assert torch.equal(table.find(keys)[0], slots)
    recent, _, scores = table.export_batch_if(0, table.capacity, min_score=2)
    assert sorted(recent.tolist()) == sorted(random_keys(20, seed=18).tolist())
    assert bool((scores == 2).all())
    assert table.export_batch(table.capacity, 10)[0].numel() == 0


def test_empty_batches(backend: str) -> None:
    table = make(backend)
    empty = tensor([])
    assert table.find(empty)[0].numel() == 0
    assert table.find_or_insert(empty).slots.numel() == 0
    assert table.erase(empty).numel() == 0
    assert table.size() == 0


@pytest.mark.parametrize(
    ("keys", "error", "message"),
    [
        (torch.zeros(3, dtype=torch.int32), TypeError, "int64"),
        (torch.zeros(2, 2, dtype=torch.int64), ValueError, "1-D"),
        (torch.zeros(3, dtype=torch.int64, device="meta"), ValueError, "table is on"),
        ([1, 2, 3], TypeError, "torch.Tensor"),
    ],
)
def test_bad_keys_are_clear_errors(backend: str, keys, error, message) -> None:
    table = make(backend)
    for op in (table.find, table.find_or_insert, table.erase):
        with pytest.raises(error, match=message):
            op(keys)


@pytest.mark.parametrize(
    ("scores", "error", "message"),
    [
        (torch.zeros(2, dtype=torch.int64), ValueError, "does not match keys shape"),
        (torch.zeros(3, dtype=torch.float32), TypeError, "scores must be int64"),
    ],
)
def test_bad_scores_are_clear_errors(backend: str, scores, error, message) -> None:
    table = make(backend, score_strategy=DynamicEmbScoreStrategy.CUSTOMIZED)
    with pytest.raises(error, match=message):
        table.find_or_insert(tensor([1, 2, 3]), scores=scores.to(DEVICE))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(init_capacity=64, max_capacity=32), "max_capacity"),
        (dict(init_capacity=64, max_capacity=64, bucket_capacity=24), "power of two"),
        (dict(init_capacity=64, max_capacity=64, max_load_factor=1.5), "max_load_factor"),
        (dict(init_capacity=0, max_capacity=64), "init_capacity"),
        (dict(init_capacity=64, max_capacity=64, backend="cuckoo"), "unknown hash-table backend"),
    ],
)
def test_bad_table_options_are_clear_errors(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        create_hash_table(**kwargs)


def test_auto_backend_picks_by_device() -> None:
    table = create_hash_table(init_capacity=64, max_capacity=64)
    assert type(table).__name__ == "TorchHashTable"
