"""Eviction with per-key scores (LFU, CUSTOMIZED) without a sort (issue 21): the Triton index ranks each
bucket's contenders in its eviction kernel; the result must be the rule of the torch index (the k-th
highest new score against the k-th lowest untouched entry, ties between new keys by key), including
buckets with more contenders than one kernel chunk (16) and more than the bucket holds.

The table is full before the call, so no key takes a free slot (where the two backends may differ
by design: which of several new keys gets a contended free slot).
"""

from __future__ import annotations

import pytest
import torch

from dynamicemb.hash_index import DynamicEmbScoreStrategy, create_hash_table
from dynamicemb.hash_index.layout import bucket_of

BUCKET, NUM_BUCKETS = 16, 4


def _keys_in_bucket(bucket: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    candidates = torch.randint(-(2**62), 2**62, (400 * n,), generator=g).unique()
    candidates = candidates[torch.randperm(candidates.numel(), generator=g)]
    return candidates[bucket_of(candidates, NUM_BUCKETS) == bucket][:n]


def _full_table(backend: str):
    table = create_hash_table(
        init_capacity=BUCKET * NUM_BUCKETS,
        max_capacity=BUCKET * NUM_BUCKETS,
        bucket_capacity=BUCKET,
        score_strategy=DynamicEmbScoreStrategy.CUSTOMIZED,
        backend=backend,
    )
    keys = torch.cat([_keys_in_bucket(b, BUCKET, seed=b) for b in range(NUM_BUCKETS)])
    scores = torch.arange(keys.numel(), dtype=torch.int64) * 10  # distinct: no tie among entries
    table.find_or_insert(keys, scores)
    assert table.size() == BUCKET * NUM_BUCKETS
    return table


def _call() -> tuple[torch.Tensor, torch.Tensor]:
    """40 new keys for bucket 0 (3 chunks; more than its 16 entries), 5 for bucket 1, 1 for bucket 2;
    scores with ties between new keys, some below every entry of their bucket."""
    keys = torch.cat([_keys_in_bucket(0, 40, 100), _keys_in_bucket(1, 5, 101), _keys_in_bucket(2, 1, 102)])
    g = torch.Generator().manual_seed(7)
    scores = torch.randint(0, 40, (keys.numel(),), generator=g) * 10 + 5
    scores[:6] = 1000  # a tie of six at the top
    scores[-1] = 0  # below every entry of bucket 2
    order = torch.randperm(keys.numel(), generator=g)
    return keys[order], scores[order]


@pytest.mark.parametrize("repeat_keys", [False, True], ids=["distinct", "duplicates"])
def test_triton_ranked_eviction_matches_torch(repeat_keys: bool) -> None:
    pytest.importorskip("triton")
    keys, scores = _call()
    if repeat_keys:  # duplicates are reduced (largest score) before the eviction
        keys, scores = torch.cat([keys, keys[:10]]), torch.cat([scores, scores[:10] - 1])
    outcomes = []
    for backend in ("torch", "triton"):
        table = _full_table(backend)
        result = table.find_or_insert(keys, scores)
        stored_keys, _, stored_scores = table.export_batch(0, table.capacity)
        order = stored_keys.argsort()
        outcomes.append(
            {
                "refused": result.refused,
                "stored": (stored_keys[order], stored_scores[order]),
                "evicted": result.evicted_keys.sort().values,
                "evicted_scores": result.evicted_scores.sort().values,
            }
        )
    torch_side, triton_side = outcomes
    assert bool(torch_side["refused"].any()) and not bool(torch_side["refused"].all())
    assert torch.equal(torch_side["refused"], triton_side["refused"])
    for part in ("stored", "evicted", "evicted_scores"):
        a, b = torch_side[part], triton_side[part]
        assert all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, tuple) else torch.equal(a, b), part


def test_lfu_counts_rank_the_contenders() -> None:
    """LFU: a new key's score is its count in the batch; the most frequent new keys win the entries."""
    pytest.importorskip("triton")
    results = []
    for backend in ("torch", "triton"):
        table = create_hash_table(
            init_capacity=BUCKET,
            max_capacity=BUCKET,
            bucket_capacity=BUCKET,
            score_strategy=DynamicEmbScoreStrategy.LFU,
            backend=backend,
        )
        residents = torch.arange(1000, 1000 + BUCKET, dtype=torch.int64)
        table.find_or_insert(torch.cat([residents, residents[:8]]))  # counts 2 for eight of them, 1 for the rest
        new = torch.arange(20, dtype=torch.int64)
        batch = torch.cat([new.repeat_interleave(torch.arange(20) % 4 + 1)])  # counts 1..4
        result = table.find_or_insert(batch[torch.randperm(batch.numel(), generator=torch.Generator().manual_seed(1))])
        stored = table.export_batch(0, table.capacity)[0].sort().values
        results.append((stored, result.evicted_keys.sort().values))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][1].numel() > 0


@pytest.mark.parametrize("strategy", [DynamicEmbScoreStrategy.CUSTOMIZED, DynamicEmbScoreStrategy.LFU], ids=str)
def test_unique_keys_skip_the_reduction_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch, strategy: DynamicEmbScoreStrategy
) -> None:
    """``unique_keys=True`` (what KeyValueTable passes): no ``torch.unique`` in the Triton index, and the
    table, slots and evicted entries of the reducing path."""
    pytest.importorskip("triton")
    from dynamicemb.hash_index import triton_backend

    keys, scores = _call()
    given = scores if strategy == DynamicEmbScoreStrategy.CUSTOMIZED else None
    outcomes = []
    for unique_keys in (False, True):
        table = _full_table("triton")
        table.score_strategy = strategy
        if unique_keys:
            monkeypatch.setattr(triton_backend, "_reduce_duplicates", lambda *a: pytest.fail("keys were reduced"))
        result = table.find_or_insert(keys, given, unique_keys=unique_keys)
        outcomes.append((result.slots, result.existed, result.evicted_keys.sort().values, table.export_batch(0, 64)))
    (slots_a, existed_a, evicted_a, table_a), (slots_b, existed_b, evicted_b, table_b) = outcomes
    assert torch.equal(slots_a, slots_b) and torch.equal(existed_a, existed_b) and torch.equal(evicted_a, evicted_b)
    assert all(torch.equal(x, y) for x, y in zip(table_a, table_b))
    assert evicted_a.numel() > 0
