"""Sequence-length load balancing: partitions are complete, deterministic, and never worse than the contiguous split."""

from __future__ import annotations

import numpy as np
import pytest
import torch.utils.data

from gr_parallel.balance import (
    BalancedBatchSampler,
    contiguous_partition,
    imbalance,
    karmarkar_karp,
    partition_by_cost,
    partition_costs,
    sequence_cost,
)


def _zipf_lengths(rng: np.random.Generator, n: int, exponent: float = 1.5, cap: int = 4096) -> np.ndarray:
    return np.minimum(rng.zipf(exponent, n), cap)


def _assert_partition(parts: list[list[int]], n: int, k: int) -> None:
    assert len(parts) == k
    assert all(len(p) > 0 for p in parts)
    assert sorted(i for p in parts for i in p) == list(range(n))
    assert all(p == sorted(p) for p in parts)


def test_sequence_cost_is_square_plus_linear() -> None:
    np.testing.assert_array_equal(sequence_cost([0, 1, 3], linear_coefficient=2.0), [0.0, 3.0, 15.0])


@pytest.mark.parametrize("bad", [[-1, 2], [[1, 2]]])
def test_sequence_cost_rejects_bad_lengths(bad: list) -> None:
    with pytest.raises(ValueError, match="lengths"):
        sequence_cost(bad)


def test_too_few_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="only 3 samples"):
        partition_by_cost([1.0, 2.0, 3.0], 4)


def test_karmarkar_karp_textbook_instance_then_refinement_reaches_optimum() -> None:
    costs = [8.0, 7.0, 6.0, 5.0, 4.0]
    # differencing: 8-7=1, 6-5=1, 4-1=3, 3-1=2 -> a split with difference 2 (16 / 14)
    kk = karmarkar_karp(costs, 2)
    assert sorted(partition_costs(costs, kk).tolist()) == [14.0, 16.0]
    # one improving swap reaches the optimum 15 / 15
    assert sorted(partition_costs(costs, partition_by_cost(costs, 2)).tolist()) == [15.0, 15.0]
    assert partition_costs(costs, partition_by_cost(costs, 2, refine_rounds=0)).max() == 16.0


@pytest.mark.parametrize("equal_size", [False, True])
def test_every_sample_exactly_once_in_non_empty_parts(equal_size: bool) -> None:
    rng = np.random.default_rng(0)
    for n, k in [(1, 1), (5, 5), (7, 3), (64, 8), (200, 16), (33, 4)]:
        costs = sequence_cost(_zipf_lengths(rng, n))
        parts = partition_by_cost(costs, k, equal_size=equal_size)
        _assert_partition(parts, n, k)
        if equal_size:
            assert {len(p) for p in parts} <= {n // k, -(-n // k)}


def test_zero_costs_still_fill_every_part() -> None:
    _assert_partition(partition_by_cost(np.zeros(10), 4), 10, 4)
    _assert_partition(karmarkar_karp(np.zeros(10), 4), 10, 4)


@pytest.mark.parametrize("equal_size", [False, True])
def test_deterministic_with_ties_broken_by_index(equal_size: bool) -> None:
    rng = np.random.default_rng(1)
    costs = sequence_cost(rng.integers(1, 6, size=96))  # many equal costs
    first = partition_by_cost(costs, 8, equal_size=equal_size)
    assert all(partition_by_cost(costs.copy(), 8, equal_size=equal_size) == first for _ in range(3))


def _lower_bound(costs: np.ndarray, k: int) -> float:
    """No split's heaviest part costs less than the heaviest sample or the mean part."""
    return max(float(costs.max()), float(costs.sum()) / k)


@pytest.mark.parametrize("equal_size", [False, True])
def test_never_worse_than_contiguous_split_on_zipf_lengths(equal_size: bool) -> None:
    rng = np.random.default_rng(2)
    excess_before, excess_after = [], []
    for _ in range(150):
        k = int(rng.integers(2, 17))
        n = int(rng.integers(k, 8 * k + 1))
        costs = sequence_cost(_zipf_lengths(rng, n, exponent=float(rng.uniform(1.1, 2.5))), float(rng.integers(0, 64)))
        parts = partition_by_cost(costs, k, equal_size=equal_size)
        _assert_partition(parts, n, k)
        heaviest = partition_costs(costs, parts).max()
        heaviest_contiguous = partition_costs(costs, contiguous_partition(n, k)).max()
        assert heaviest <= heaviest_contiguous
        if not equal_size and heaviest_contiguous > _lower_bound(costs, k):
            assert heaviest < heaviest_contiguous
        excess_before.append(heaviest_contiguous / _lower_bound(costs, k) - 1)
        excess_after.append(heaviest / _lower_bound(costs, k) - 1)
    # not merely "not worse": the excess over the lower bound shrinks several times over
    assert np.mean(excess_after) < 0.3 * np.mean(excess_before)


@pytest.mark.parametrize("equal_size", [False, True])
def test_balanced_split_is_near_even_without_dominant_samples(equal_size: bool) -> None:
    costs = sequence_cost(np.random.default_rng(3).integers(1, 1025, size=2048))
    assert imbalance(costs, partition_by_cost(costs, 8, equal_size=equal_size)) < 1.001
    assert imbalance(costs, contiguous_partition(2048, 8)) > 1.01


def _samplers(world_size: int, **kwargs) -> list[BalancedBatchSampler]:
    return [BalancedBatchSampler(rank=r, world_size=world_size, **kwargs) for r in range(world_size)]


@pytest.mark.parametrize("equal_size", [False, True])
def test_sampler_ranks_cover_each_global_batch_once(equal_size: bool) -> None:
    lengths = _zipf_lengths(np.random.default_rng(4), 51)
    samplers = _samplers(3, num_samples=51, lengths=lengths, global_batch_size=12, equal_size=equal_size, seed=7)
    per_rank = [list(s) for s in samplers]
    assert all(len(batches) == len(samplers[0]) == 5 for batches in per_rank)
    seen = []
    for step, global_batch in enumerate(samplers[0].global_batches()):
        parts = [per_rank[r][step] for r in range(3)]
        assert sorted(i for p in parts for i in p) == sorted(global_batch.tolist())
        assert all(parts)
        seen.extend(global_batch.tolist())
    assert sorted(seen) == list(range(51))  # the last global batch holds 3 samples: one per rank


def test_sampler_pads_a_last_batch_smaller_than_world_size_and_drop_last() -> None:
    samplers = _samplers(4, num_samples=10, lengths=np.arange(1, 11), global_batch_size=8, shuffle=False)
    last = [list(s)[-1] for s in samplers]
    assert all(len(p) == 1 for p in last)
    assert sorted(i for p in last for i in p) == [0, 1, 8, 9]  # 8, 9 then the epoch's first indices
    dropping = BalancedBatchSampler(10, np.arange(1, 11), 8, rank=0, world_size=4, drop_last=True)
    assert len(dropping) == len(list(dropping)) == 1


def test_sampler_epochs_callable_lengths_and_data_loader() -> None:
    lengths = _zipf_lengths(np.random.default_rng(5), 40)
    calls = []

    def read_lengths(indices: np.ndarray) -> np.ndarray:
        calls.append(len(indices))
        return lengths[indices]

    sampler = BalancedBatchSampler(40, read_lengths, 16, rank=1, world_size=2, seed=3)
    by_array = BalancedBatchSampler(40, lengths, 16, rank=1, world_size=2, seed=3)
    epoch0 = list(sampler)
    assert epoch0 == list(by_array)
    assert calls == [16, 16, 8]
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.set_epoch(0, skip_batches=2)  # resuming after two steps of epoch 0
    assert len(sampler) == 1 and list(sampler) == epoch0[2:]
    loader = torch.utils.data.DataLoader(list(range(40)), batch_sampler=by_array, collate_fn=list)
    assert list(loader) == epoch0


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="global_batch_size"):
        BalancedBatchSampler(10, np.ones(10), 2, rank=0, world_size=4)
    with pytest.raises(ValueError, match="lengths has 3 entries"):
        BalancedBatchSampler(10, [1, 2, 3], 4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        BalancedBatchSampler(10, np.ones(10), 4, rank=2, world_size=2)
    bad = BalancedBatchSampler(10, lambda idx: np.ones(3), 4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="lengths gave shape"):
        list(bad)
