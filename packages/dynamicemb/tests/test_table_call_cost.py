"""The fixed cost of a table call (issue 21): find_or_insert with one score for the call waits for the
device nowhere; the evicted entries are compacted (one synchronization) only when they are read.

CPU: the compaction runs at the first read of the evicted entries, not in the call (the Triton index
under the interpreter). GPU (``-m gpu``): ``torch.cuda.set_sync_debug_mode("error")`` around the
calls, with and without evictions.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dynamicemb.hash_index import DynamicEmbScoreStrategy, create_hash_table, triton_backend
from dynamicemb.hash_index.base import InsertResult


def _full_table(device: torch.device, capacity: int, bucket: int):
    table = create_hash_table(
        init_capacity=capacity,
        max_capacity=capacity,
        bucket_capacity=bucket,
        score_strategy=DynamicEmbScoreStrategy.TIMESTAMP,
        device=device,
        backend="triton",
    )
    g = torch.Generator(device=device).manual_seed(0)
    while table.size() < capacity:
        table.find_or_insert(torch.randint(-(2**62), 2**62, (capacity,), device=device, generator=g))
    return table, g


def test_evicted_entries_are_compacted_when_read(monkeypatch: pytest.MonkeyPatch) -> None:
    table, g = _full_table(torch.device("cpu"), 64, 16)
    compactions = []
    original = triton_backend.positions
    monkeypatch.setattr(triton_backend, "positions", lambda mask: compactions.append(1) or original(mask))
    keys = torch.randint(-(2**62), 2**62, (24,), generator=g)
    result = table.find_or_insert(keys)
    assert compactions == [], "the call compacted the evicted entries before they were read"
    evicted_keys = result.evicted_keys
    assert compactions == [1]
    assert evicted_keys.numel() == int((result.slots >= 0).sum()) > 0  # every new key evicted one entry
    assert not bool(table.find(evicted_keys)[1].any())
    assert torch.equal(result.evicted_slots.sort().values, result.slots[result.slots >= 0].sort().values)
    assert result.evicted_scores.numel() == evicted_keys.numel()
    assert compactions == [1], "the compaction ran twice"


def test_insert_result_takes_tensors_or_a_function() -> None:
    empty = torch.zeros(0, dtype=torch.int64)
    done = InsertResult(empty, empty.bool(), empty, empty, empty)
    assert done.evicted_keys is empty
    late = InsertResult(empty, empty.bool(), evicted=lambda: (empty, empty + 1, empty))
    assert late.evicted() == late.evicted()
    with pytest.raises(ValueError, match="evicted"):
        InsertResult(empty, empty.bool(), empty, empty, empty, evicted=lambda: (empty, empty, empty))
    with pytest.raises(ValueError, match="evicted"):
        InsertResult(empty, empty.bool())


@pytest.mark.gpu
@pytest.mark.parametrize("per_key_scores", [False, True], ids=["one-score", "per-key-scores"])
@pytest.mark.parametrize("full", [False, True], ids=["free-slots", "evicting"])
def test_cuda_find_or_insert_never_synchronizes(full: bool, per_key_scores: bool) -> None:
    """One score for the call, and per-key scores with distinct keys (``unique_keys=True``, as
    ``KeyValueTable`` calls it): no synchronization in the call, with and without evictions."""
    cuda = torch.device("cuda")
    if full:
        table, g = _full_table(cuda, 1 << 16, 128)
    else:
        # 300K keys into 1M slots (8192 buckets of 128, about 37 keys each): no bucket fills.
        table = create_hash_table(init_capacity=1 << 20, max_capacity=1 << 20, device=cuda, backend="triton")
        g = torch.Generator(device=cuda).manual_seed(0)
    batches = []
    for step in range(3):
        keys = torch.randint(-(2**62), 2**62, (100_000,), device=cuda, generator=g).unique()
        keys = keys[torch.randperm(keys.numel(), device=cuda, generator=g)]
        batches.append((keys, torch.full_like(keys, 10**15 + step)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if per_key_scores:
            results = [table.find_or_insert(keys, scores, unique_keys=True) for keys, scores in batches]
        else:
            results = [table.find_or_insert(keys) for keys, _ in batches]
        table.find(batches[0][0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    evicted = sum(result.evicted_keys.numel() for result in results)
    assert (evicted > 0) == full
    stored = table.find(batches[-1][0])[1]
    # Full: a bucket gets more new keys (about 195) than it has entries (128), so some are refused.
    assert bool(stored.any()) if full else bool(stored.all())


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_positions_counted_matches_positions(density: float) -> None:
    from dynamicemb.masks import positions, positions_counted

    mask = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < density
    assert torch.equal(positions_counted(mask, int(mask.sum())), positions(mask))


@pytest.mark.gpu
def test_cuda_training_lookup_synchronizes_once() -> None:
    """A training lookup of unique keys on a table that cannot grow (init = max capacity) waits for
    the device once: for the counts of new and stored keys (the initializer needs the first)."""
    import warnings

    from dynamicemb import DynamicEmbeddingTable, DynamicEmbTableOptions

    cuda = torch.device("cuda")
    options = DynamicEmbTableOptions(init_capacity=1 << 20, max_capacity=1 << 20, global_hbm_for_values=1 << 30)
    table = DynamicEmbeddingTable(name="t", dim=32, num_embeddings=1 << 20, options=options, device=cuda)
    g = torch.Generator(device=cuda).manual_seed(0)
    batches = [torch.randint(0, 1 << 40, (100_000,), device=cuda, generator=g).unique() for _ in range(3)]
    table.lookup(batches[0], training=True)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for keys in batches[1:]:
                table.lookup(keys, training=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == len(batches) - 1, syncs
