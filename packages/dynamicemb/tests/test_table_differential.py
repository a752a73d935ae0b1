"""Randomized workloads run on the Triton and torch backends side by side.

Without eviction pressure the two must agree on everything but slot numbers (which key wins a
contended slot may differ). Under pressure (load factor 1.0, crowded buckets) each must keep the
table valid: one copy per key, every returned slot holding its key, exact sizes.
"""

from __future__ import annotations

import pytest
import torch

from dynamicemb.hash_index import DynamicEmbScoreStrategy, ScoredHashTable, create_hash_table
from dynamicemb.hash_index.layout import bucket_of

pytest.importorskip("triton")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
GPU = pytest.mark.gpu
# The Triton backend runs on CPU tensors only under the interpreter, i.e. on machines without CUDA.
INTERPRETER = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton on CPU runs only interpreted")


def _key_score_map(table: ScoredHashTable) -> dict[int, int]:
    keys, _, scores = table.export_batch(0, table.capacity)
    return dict(zip(keys.tolist(), scores.tolist()))


def _check_valid(table: ScoredHashTable) -> None:
    keys, slots, _ = table.export_batch(0, table.capacity)
    assert keys.numel() == table.size()
    assert keys.unique().numel() == keys.numel(), "a key has two copies"
    found_slots, found = table.find(keys)
    assert bool(found.all()) and torch.equal(found_slots, slots)


def _check_result(keys: torch.Tensor, result, table: ScoredHashTable) -> None:
    placed = result.slots >= 0
    slots, found = table.find(keys[placed])
    assert bool(found.all()) and torch.equal(slots, result.slots[placed])
    distinct_keys = keys[placed].unique().numel()
    assert result.slots[placed].unique().numel() == distinct_keys, "two keys share a slot"
    if result.evicted_keys.numel():
        assert not bool(table.find(result.evicted_keys)[1].any()), "an evicted key is still present"
        assert not bool(torch.isin(result.evicted_keys, keys).any()), "a call evicted one of its own keys"


def _check_evicted_were_held(result, held_keys, held_slots, held_scores, capacity: int) -> None:
    """Each evicted entry is one the table held before the call: its key, at that slot, with that score."""
    occupied = torch.zeros(capacity, dtype=torch.bool, device=held_slots.device)
    key_at = torch.zeros(capacity, dtype=torch.int64, device=held_slots.device)
    score_at = torch.zeros(capacity, dtype=torch.int64, device=held_slots.device)
    occupied[held_slots], key_at[held_slots], score_at[held_slots] = True, held_keys, held_scores
    slots = result.evicted_slots
    assert slots.unique().numel() == slots.numel(), "an entry was evicted twice"
    assert bool(occupied[slots].all()), "an evicted slot held no entry"
    assert torch.equal(key_at[slots], result.evicted_keys), "an evicted key is not the one its slot held"
    assert torch.equal(score_at[slots], result.evicted_scores), "an evicted score is not the one its slot held"


def _pair(device: torch.device, **kwargs) -> tuple[ScoredHashTable, ScoredHashTable]:
    return (
        create_hash_table(device=device, backend="torch", **kwargs),
        create_hash_table(device=device, backend="triton", **kwargs),
    )


def _batches(universe: torch.Tensor, sizes: list[int], generator: torch.Generator) -> list[torch.Tensor]:
    picks = [torch.randint(0, universe.numel(), (n,), generator=generator) for n in sizes]
    return [universe[p.to(universe.device)] for p in picks]


def _universe(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    keys = torch.randint(INT64_MIN, INT64_MAX, (n,), generator=generator, dtype=torch.int64)
    keys[:4] = torch.tensor([INT64_MIN, -1, 0, INT64_MAX])
    return keys.unique().to(device)


def run_agreement(device: torch.device, capacity: int, max_capacity: int, bucket: int, sizes: list[int], seed: int):
    generator = torch.Generator().manual_seed(seed)
    universe = _universe(capacity // 2, generator, device)
    reference, triton_table = _pair(
        device,
        init_capacity=capacity,
        max_capacity=max_capacity,
        bucket_capacity=bucket,
        max_load_factor=0.5,
        score_strategy=DynamicEmbScoreStrategy.STEP,
    )
    for step, keys in enumerate(_batches(universe, sizes, generator)):
        for table in (reference, triton_table):
            table.set_step(step)
            table.reserve(keys.unique().numel())
        expected, got = reference.find_or_insert(keys), triton_table.find_or_insert(keys)
        assert reference.capacity == triton_table.capacity
        assert not bool(expected.refused.any()) and not bool(got.refused.any())
        assert torch.equal(expected.existed, got.existed)
        assert got.evicted_keys.numel() == 0
        _check_result(keys, got, triton_table)
        if step % 3 == 2:
            gone = keys[: keys.numel() // 4]
            assert torch.equal(reference.erase(gone), triton_table.erase(gone))
        probe = universe[torch.randperm(universe.numel(), generator=generator)[:200].to(device)]
        assert torch.equal(reference.find(probe)[1], triton_table.find(probe)[1])
        assert reference.size() == triton_table.size()
        assert _key_score_map(reference) == _key_score_map(triton_table)
    _check_valid(triton_table)


def run_pressure(device: torch.device, capacity: int, bucket: int, batch: int, rounds: int, seed: int, strategy):
    generator = torch.Generator().manual_seed(seed)
    universe = _universe(4 * capacity, generator, device)
    for table in _pair(
        device, init_capacity=capacity, max_capacity=capacity, bucket_capacity=bucket, score_strategy=strategy
    ):
        for step, keys in enumerate(_batches(universe, [batch] * rounds, generator)):
            table.set_step(step)
            scores = None
            if strategy == DynamicEmbScoreStrategy.CUSTOMIZED:
                scores = torch.randint(0, 1000, keys.shape, generator=generator).to(device)
            before = table.size()
            held_keys, held_slots, held_scores = table.export_batch(0, table.capacity)
            result = table.find_or_insert(keys, scores)
            _check_result(keys, result, table)
            _check_evicted_were_held(result, held_keys, held_slots, held_scores, table.capacity)
            new_keys = keys[(result.slots >= 0) & ~result.existed].unique().numel()
            assert table.size() == before + new_keys - result.evicted_keys.numel()
        assert table.load_factor() > 0.9
        _check_valid(table)


def run_one_bucket_crowd(device: torch.device, crowd: int, copies: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for table in _pair(device, init_capacity=1024, max_capacity=1024, bucket_capacity=128):
        candidates = _universe(400 * crowd, generator, device)
        keys = candidates[bucket_of(candidates, table.num_buckets) == 3][:crowd]
        batch = keys.repeat(copies)[torch.randperm(crowd * copies, generator=generator).to(device)]
        result = table.find_or_insert(batch)
        _check_result(batch, result, table)
        assert table.size() == min(crowd, 128)
        assert int((result.slots >= 0).sum()) == copies * min(crowd, 128)
        _check_valid(table)


@INTERPRETER
def test_backends_agree_tiny_cpu() -> None:
    run_agreement(torch.device("cpu"), capacity=256, max_capacity=1024, bucket=64, sizes=[48, 64, 64, 32, 64], seed=0)


@INTERPRETER
def test_pressure_keeps_tables_valid_tiny_cpu() -> None:
    run_pressure(torch.device("cpu"), capacity=256, bucket=16, batch=64, rounds=6, seed=1, strategy=0)


@INTERPRETER
def test_one_bucket_crowd_tiny_cpu() -> None:
    run_one_bucket_crowd(torch.device("cpu"), crowd=150, copies=2, seed=2)


@GPU
@pytest.mark.parametrize("seed", [0, 1])
def test_backends_agree_gpu(seed: int) -> None:
    sizes = [100_000, 300_000, 50_000, 200_000, 1, 7, 300_000]
    run_agreement(torch.device("cuda"), capacity=1 << 16, max_capacity=1 << 22, bucket=128, sizes=sizes, seed=seed)


@GPU
@pytest.mark.parametrize("strategy", list(DynamicEmbScoreStrategy)[:4])
def test_pressure_keeps_tables_valid_gpu(strategy: DynamicEmbScoreStrategy) -> None:
    run_pressure(torch.device("cuda"), capacity=1 << 18, bucket=128, batch=100_000, rounds=8, seed=3, strategy=strategy)


@GPU
@pytest.mark.parametrize(("crowd", "copies"), [(100, 50), (1000, 8)])
def test_one_bucket_crowd_gpu(crowd: int, copies: int) -> None:
    run_one_bucket_crowd(torch.device("cuda"), crowd=crowd, copies=copies, seed=4)
